"""The README's Install section, run as written: the installer served by a relay (`curl -fsSL
http://RELAY:4850/install.sh | sh`) installs the relay's own file into a temporary home, and the command it gives
runs `--version` and `doctor`; the GitHub line names the installer this checkout ships. (pipx, a wheel and uvx are
run by tests/test_packaging.py.)"""
import os
import re
import shutil
import subprocess

from conftest import RELAY_PY, ROOT, need
from test_install import SHEBANG, clean_path, relay_version


def install_lines():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    return [l.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S) for l in block.splitlines() if l.strip()]


def test_the_relay_serves_its_installer_and_its_own_file(relay, tmp_path):
    need(shutil.which("curl"), "curl runs the README's install line")
    line = [l for l in install_lines() if "RELAY:4850/install.sh" in l]
    assert line == ["curl -fsSL http://RELAY:4850/install.sh | sh"], install_lines()
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    env.update(HOME=str(home), PATH=clean_path(), TMPDIR=str(tmp_path))
    script = line[0].replace("RELAY:4850", "127.0.0.1:%d" % relay.port)
    r = subprocess.run(["sh", "-c", script], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=120, universal_newlines=True)
    assert r.returncode == 0, r.stdout
    assert "fetching http://127.0.0.1:%d/agent_relay.py" % relay.port in r.stdout, r.stdout
    installed = home / ".local" / "bin" / "agent-relay"
    with open(RELAY_PY, "rb") as f:
        assert installed.read_bytes() == f.read() and installed.read_bytes().startswith(SHEBANG)
    out = subprocess.run([str(installed), "--version"], env=env, stdout=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert out.stdout.strip() == relay_version()
    doctor = subprocess.run([str(installed), "doctor"], env=dict(env, AGENT_RELAY_URL=relay.url), stdout=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    assert doctor.returncode == 0 and "all good" in doctor.stdout, doctor.stdout


def test_the_installer_and_the_file_are_public_and_answer_what_they_are(relay_factory):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": "a-token-for-the-api"})
    r = relay.get("/install.sh", token=False)
    assert r.status == 200 and r.headers["content-type"].startswith("text/x-shellscript"), r
    assert b'DEFAULT_SOURCE="http://127.0.0.1:%d/agent_relay.py"' % relay.port in r.body
    with open(os.path.join(ROOT, "install.sh"), "rb") as f:
        shipped = f.read()
    assert r.body.replace(b"http://127.0.0.1:%d/agent_relay.py" % relay.port, b"X") == \
        shipped.replace(b"https://raw.githubusercontent.com/agent-relay/agent-relay/main/agent_relay.py", b"X", 1)
    behind_tls = relay.get("/install.sh", token=False, headers={"X-Forwarded-Proto": "https"})
    assert b'DEFAULT_SOURCE="https://127.0.0.1:%d/agent_relay.py"' % relay.port in behind_tls.body
    r = relay.get("/agent_relay.py", token=False)
    with open(RELAY_PY, "rb") as f:
        assert r.status == 200 and r.body == f.read()
    # a Host that is no host name is refused, not written into a script
    bad = relay.get("/install.sh", token=False, headers={"Host": "evil$(id)"})
    assert bad.status in (400, 403) and bad.code in ("invalid_field", "forbidden"), bad
    assert relay.get("/api/cursor", token=False).status == 401  # the API still needs the token


def test_the_github_line_names_the_installer_this_checkout_ships():
    line = [l for l in install_lines() if "githubusercontent" in l]
    assert line == ["curl -fsSL https://raw.githubusercontent.com/agent-relay/agent-relay/main/install.sh | sh"], install_lines()
    with open(os.path.join(ROOT, "install.sh"), encoding="utf-8") as f:
        assert 'DEFAULT_SOURCE="https://raw.githubusercontent.com/agent-relay/agent-relay/main/agent_relay.py"' in f.read()
    assert any(l.startswith("pipx install .") for l in install_lines()), install_lines()
