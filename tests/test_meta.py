"""Checks on the project itself: Python 3.8 compatibility of agent_relay.py,
a friendly message on older interpreters, the test tooling and the browser
that the dashboard tests drive."""
import configparser
import glob
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import threading
import urllib.request

import pytest

from conftest import RELAY_PY, ROOT, need

VERSION_LINE = re.compile(r"^agent-relay \S+$")
CHROMIUM = "/usr/bin/chromium"
# As root in a container Chromium needs --no-sandbox; the rest keep it off this machine's closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


# -- finding interpreters ----------------------------------------------------------
def _version_key(path):
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", path)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def _pyenv_roots():
    roots = []
    if os.environ.get("PYENV_ROOT"):
        roots.append(os.environ["PYENV_ROOT"])
    pyenv = shutil.which("pyenv")
    if pyenv:
        try:
            out = subprocess.run([pyenv, "root"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 stdin=subprocess.DEVNULL, timeout=20, check=False)
            if out.returncode == 0 and out.stdout.strip():
                roots.append(out.stdout.decode().strip())
        except (OSError, subprocess.TimeoutExpired):
            pass
    roots.append(os.path.expanduser("~/.pyenv"))
    return roots


def find_python(minor):
    """Path of a working CPython 3.<minor> on this machine, or None.

    Looks on PATH, in the usual system folders, in pyenv's versions and in uv's
    managed Pythons; each candidate is run to make sure it is that version
    (a pyenv shim for a version that is not selected fails and is skipped).
    """
    name = "python3.%d" % minor
    candidates = [os.path.join(d, name) for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    candidates += [os.path.join(d, name) for d in ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin")]
    for root in _pyenv_roots():
        found = glob.glob(os.path.join(root, "versions", "3.%d.*" % minor, "bin", name))
        candidates += sorted(found, key=_version_key, reverse=True)
    uv_dir = os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "uv", "python")
    found = glob.glob(os.path.join(uv_dir, "cpython-3.%d.*" % minor, "bin", name))
    candidates += sorted(found, key=_version_key, reverse=True)

    seen = set()
    for c in candidates:
        if c in seen or not (os.path.isfile(c) and os.access(c, os.X_OK)):
            continue
        seen.add(c)
        try:
            out = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                 timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.decode().strip() == "3.%d" % minor:
            return c
    return None


def vermin_command():
    """How to run vermin for this interpreter, or None when it is not installed."""
    for d in (sysconfig.get_paths()["scripts"], os.path.join(site.getuserbase(), "bin")):
        exe = os.path.join(d, "vermin")
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            return [exe]
    try:
        import vermin  # noqa: F401
    except ImportError:
        exe = shutil.which("vermin")
        return [exe] if exe else None
    return [sys.executable, "-c", "import sys, vermin; sys.argv[0] = 'vermin'; sys.exit(vermin.main())"]


def run(cmd, timeout=60, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          timeout=timeout, check=False, universal_newlines=True, **kw)


def current_version_line():
    r = run([sys.executable, RELAY_PY, "--version"])
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


# -- (a) static check ----------------------------------------------------------------
def test_vermin_finds_nothing_newer_than_python_3_8():
    cmd = vermin_command()
    need(cmd, "vermin is not installed (pip install vermin)")
    # --eval-annotations: 3.8 evaluates annotations at definition time, so list[int] in a signature breaks it.
    r = run(cmd + ["-t=3.8-", "--no-tips", "--violations", "-vvv", "--eval-annotations", "--no-config-file", RELAY_PY],
            timeout=300, cwd=ROOT)
    assert r.returncode == 0, "vermin found code that needs a Python newer than 3.8:\n" + r.stdout + r.stderr


# -- (b) the oldest supported interpreter ----------------------------------------------
@pytest.fixture(scope="module")
def python38():
    py = find_python(8)
    if py is None:
        # No interpreter to install for this: Debian ships one Python 3 and PyPI none;
        # the vermin check above still guards 3.8 compatibility.
        pytest.skip("no Python 3.8 interpreter on this machine")
    return py


def test_version_runs_on_python_3_8(python38):
    r = run([python38, RELAY_PY, "--version"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    line = r.stdout.strip()
    assert VERSION_LINE.match(line), line
    assert line == current_version_line()


def test_relay_serves_on_python_3_8(python38, tmp_path):
    """The server starts, answers /api/health and stops cleanly on SIGTERM under 3.8."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([python38, RELAY_PY, "serve", "--port", "0", "--db", str(tmp_path / "relay.db")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=str(tmp_path), universal_newlines=True)
    lines = []
    port = []
    found = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            m = re.search(r"listening on http://[^\s:]+:(\d+)", line)
            if m and not found.is_set():
                port.append(int(m.group(1)))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert found.wait(20), "relay did not start under 3.8:\n" + "\n".join(lines)
        with urllib.request.urlopen("http://127.0.0.1:%d/api/health" % port[0], timeout=10) as resp:
            assert resp.status == 200
            body = json.loads(resp.read().decode("utf-8"))
        assert body.get("ok") is True, body
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "did not stop on SIGTERM"
    assert code == 0, "exit %r under 3.8:\n%s" % (code, "\n".join(lines))
    assert not any("Traceback" in line for line in lines), "\n".join(lines)


# -- (c) older interpreters get a message, not a traceback ----------------------------
@pytest.mark.parametrize("minor", [6, 7])
def test_old_python_gets_a_friendly_message(minor):
    py = find_python(minor)
    if py is None:
        # Skipped under CI too: an old interpreter is not something CI must install.
        pytest.skip("no Python 3.%d interpreter on this machine" % minor)
    r = run([py, RELAY_PY, "--version"])
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "3.8" in out, "the message should name the Python version needed:\n" + out
    assert "Traceback" not in out, out


# -- (d) test tooling ---------------------------------------------------------------------
def test_pytest_configuration():
    ini = os.path.join(ROOT, "pytest.ini")
    assert os.path.isfile(ini), "pytest.ini is missing"
    cp = configparser.ConfigParser()
    cp.read(ini)
    assert cp.has_section("pytest")
    assert "tests" in cp.get("pytest", "testpaths").split()
    with open(os.path.join(ROOT, "tests", "requirements.txt")) as f:
        reqs = {re.split(r"[<>=!~;\[\s]", line.strip(), 1)[0].lower()
                for line in f if line.strip() and not line.lstrip().startswith("#")}
    assert {"pytest", "hypothesis", "playwright", "vermin"} <= reqs, reqs
    if cp.has_option("pytest", "timeout"):
        assert "pytest-timeout" in reqs, "pytest.ini sets a timeout but pytest-timeout is not required"


@pytest.mark.parametrize("script", ["tests/run.sh", ".ci/run"])
def test_test_scripts_pass_shellcheck(script):
    need(shutil.which("shellcheck"), "shellcheck is not installed (apt-get install shellcheck)")
    r = run(["bash", "-n", os.path.join(ROOT, script)])
    assert r.returncode == 0, r.stderr
    r = run(["shellcheck", os.path.join(ROOT, script)], cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_playwright_drives_debian_chromium(tmp_path):
    """The browser tests' tools work here: Playwright launches Debian's Chromium."""
    need(os.access(CHROMIUM, os.X_OK), "Debian's chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    need(sync_playwright, "playwright is not installed (pip install playwright)")
    shot = tmp_path / "shot.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 320, "height": 120})
            page.goto("data:text/html,<h1>relay</h1><button onclick=\"this.textContent='clicked'\">go</button>")
            page.click("button")
            assert page.inner_text("button") == "clicked"
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 500

