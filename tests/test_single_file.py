"""agent_relay.py alone is the whole relay: it serves the dashboard from the copy it carries.

The page's source is dashboard.html; agent_relay.py embeds it gzip-compressed
between the EMBEDDED DASHBOARD markers (tests/refresh_dashboard.py writes it).
These tests copy agent_relay.py by itself into an empty directory, start it
there and compare the page it serves with dashboard.html byte for byte.
"""
import base64
import gzip
import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT, RELAY_PY

PAGE = os.path.join(ROOT, "dashboard.html")
REFRESH = os.path.join(ROOT, "tests", "refresh_dashboard.py")
STALE_HINT = "the page embedded in agent_relay.py differs from dashboard.html: run `python3 tests/refresh_dashboard.py`"


def page_bytes():
    with open(PAGE, "rb") as f:
        return f.read()


def test_the_copy_alone_serves_the_same_page_with_etag_304_and_gzip(tmp_path, relay_factory):
    alone = tmp_path / "alone"
    alone.mkdir()
    script = str(alone / "agent_relay.py")
    shutil.copyfile(RELAY_PY, script)
    relay = relay_factory(script=script, cwd=str(alone))
    assert relay.get("/api/health").json["ok"] is True
    html = page_bytes()

    r = relay.get("/", headers={"Accept-Encoding": "identity"})
    assert r.status == 200 and r.body == html, STALE_HINT
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "content-encoding" not in r.headers
    etag = r.headers["etag"]
    assert re.match(r'^"[0-9a-f]{8,}"$', etag), etag
    assert r.headers.get("cache-control") == "no-cache" and "Accept-Encoding" in r.headers.get("vary", "")

    # The browser's revalidation: same tag, 304 and no body; another tag, the page again.
    r304 = relay.get("/", headers={"If-None-Match": etag})
    assert r304.status == 304 and r304.body == b"" and r304.headers["etag"] == etag
    assert relay.get("/", headers={"If-None-Match": '"someone-else", ' + etag}).status == 304
    other = relay.get("/", headers={"If-None-Match": '"0000000000"', "Accept-Encoding": "identity"})
    assert other.status == 200 and other.body == html

    gz = relay.get("/", headers={"Accept-Encoding": "gzip, deflate, br"})
    assert gz.status == 200 and gz.headers.get("content-encoding") == "gzip"
    assert int(gz.headers["content-length"]) == len(gz.body) < len(html)
    assert gzip.decompress(gz.body) == html
    assert gz.headers["etag"] == etag

    head = relay.request("HEAD", "/", headers={"Accept-Encoding": "identity"})
    assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) == len(html)
    assert relay.get("/index.html", headers={"Accept-Encoding": "identity"}).body == html

    # Nothing was written beside the copy (the database lives where --db says), and the tag survives a restart.
    assert sorted(os.listdir(str(alone))) == ["agent_relay.py"]
    relay.restart()
    assert relay.get("/", headers={"If-None-Match": etag}).status == 304


def test_the_embedded_copy_matches_dashboard_html():
    with open(RELAY_PY, encoding="utf-8") as f:
        source = f.read()
    m = re.search(r"# BEGIN EMBEDDED DASHBOARD\nDASHBOARD_GZIP_B64 = \[\n(.*?)\n\]\n# END EMBEDDED DASHBOARD\n", source, re.S)
    assert m, "agent_relay.py has lost its EMBEDDED DASHBOARD markers"
    chunks = re.findall(r'"([A-Za-z0-9+/=]*)"', m.group(1))
    embedded = gzip.decompress(base64.b64decode("".join(chunks)))
    assert embedded == page_bytes(), STALE_HINT
    check = subprocess.run([sys.executable, REFRESH, "--check"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert check.returncode == 0, STALE_HINT + "\n" + check.stdout.decode()


def test_the_embedded_installer_matches_install_sh():
    with open(RELAY_PY, encoding="utf-8") as f:
        source = f.read()
    m = re.search(r"# BEGIN EMBEDDED INSTALLER\nINSTALLER_GZIP_B64 = \[\n(.*?)\n\]\n# END EMBEDDED INSTALLER\n", source, re.S)
    assert m, "agent_relay.py has lost its EMBEDDED INSTALLER markers"
    chunks = re.findall(r'"([A-Za-z0-9+/=]*)"', m.group(1))
    with open(os.path.join(ROOT, "install.sh"), "rb") as f:
        assert gzip.decompress(base64.b64decode("".join(chunks))) == f.read(), (
            "the installer embedded in agent_relay.py differs from install.sh: run `python3 tests/refresh_dashboard.py`")


def test_refresh_dashboard_check_catches_a_stale_copy_and_refresh_fixes_it(tmp_path):
    # On a copy of the tree, never on the real files.
    (tmp_path / "tests").mkdir()
    shutil.copyfile(RELAY_PY, str(tmp_path / "agent_relay.py"))
    shutil.copyfile(REFRESH, str(tmp_path / "tests" / "refresh_dashboard.py"))
    shutil.copyfile(os.path.join(ROOT, "install.sh"), str(tmp_path / "install.sh"))
    with open(str(tmp_path / "dashboard.html"), "wb") as f:
        f.write(page_bytes().replace(b"<title>Agent Relay</title>", b"<title>Agent Relay (edited)</title>"))
    script = str(tmp_path / "tests" / "refresh_dashboard.py")

    assert subprocess.run([sys.executable, script, "--check"]).returncode == 1
    before = (tmp_path / "agent_relay.py").read_bytes()
    assert subprocess.run([sys.executable, script], stdout=subprocess.PIPE).returncode == 0
    after = (tmp_path / "agent_relay.py").read_bytes()
    assert subprocess.run([sys.executable, script, "--check"]).returncode == 0
    # Only the block between the markers changed.
    strip = re.compile(rb"# BEGIN EMBEDDED DASHBOARD\n.*?# END EMBEDDED DASHBOARD\n", re.S)
    assert strip.sub(b"", before) == strip.sub(b"", after) and before != after
