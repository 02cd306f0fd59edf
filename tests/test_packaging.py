"""pyproject.toml gives the `agent-relay` command from the one module, three ways: `pipx install .`, `pip install`
of a built wheel into a virtual environment, and `uvx --from . agent-relay`. Each install goes into a temporary
home, and the command it gives runs `--version` and `doctor` against a real relay."""
import os
import shutil
import subprocess
import sys
import venv

import pytest

from conftest import ROOT, need
from test_install import relay_version


@pytest.fixture
def checkout(tmp_path):
    """The tracked files of this checkout, as a fresh clone has them (builds leave build/ and *.egg-info behind)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, stdout=subprocess.PIPE, check=True).stdout
    dest = tmp_path / "src"
    for name in filter(None, files.decode().split("\0")):
        src = os.path.join(ROOT, name)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(str(dest / name)), exist_ok=True)
            shutil.copy2(src, str(dest / name))
    return dest


def clean_env(tmp_path, relay, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_RELAY_", "PIPX_", "UV_", "VIRTUAL_ENV"))}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local" / "share"),
               AGENT_RELAY_URL=relay.url, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.update(extra)
    return env


def run(argv, env, cwd=None, timeout=300):
    r = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout, check=False)
    return r.returncode, r.stdout.decode("utf-8", "replace")


def check_command(argv_prefix, env, relay):
    code, out = run(argv_prefix + ["--version"], env)
    assert code == 0, out
    assert out.strip().splitlines()[-1] == relay_version(), out  # uvx says what it built before the command's output
    code, out = run(argv_prefix + ["doctor"], env)
    assert code == 0, out
    assert "answers at %s" % relay.url in out and "all good" in out, out


def tool(name):
    path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    need(os.path.exists(path), "%s (PyPI, in tests/requirements.txt) installs the package as users do" % name)
    return path


def test_pipx_install_gives_the_command(relay, tmp_path, checkout):
    pipx = tool("pipx")
    env = clean_env(tmp_path, relay, PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(tmp_path / "bin"),
                    PIPX_MAN_DIR=str(tmp_path / "man"))
    code, out = run([pipx, "install", str(checkout)], env)
    assert code == 0, out
    check_command([str(tmp_path / "bin" / "agent-relay")], env, relay)


def test_a_built_wheel_installs_the_command_into_a_venv(relay, tmp_path, checkout):
    env = clean_env(tmp_path, relay)
    code, out = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(checkout)], env)
    assert code == 0, out
    wheels = os.listdir(str(tmp_path / "dist"))
    assert len(wheels) == 1 and wheels[0].startswith("agent_relay-") and wheels[0].endswith("-py3-none-any.whl"), wheels
    venv.create(str(tmp_path / "venv"), with_pip=True)
    bindir = tmp_path / "venv" / ("Scripts" if os.name == "nt" else "bin")
    code, out = run([str(bindir / "python"), "-m", "pip", "install", "-q", str(tmp_path / "dist" / wheels[0])], env)
    assert code == 0, out
    check_command([str(bindir / "agent-relay")], env, relay)
    # the wheel carries the one module, and no test, doc or benchmark
    code, out = run([str(bindir / "python"), "-m", "pip", "show", "-f", "agent-relay"], env)
    files = [l.strip() for l in out.splitlines() if l.startswith("  ")]
    assert "agent_relay.py" in files and not [f for f in files if f.startswith(("tests", "docs", "benchmarks"))], out


def test_uvx_runs_the_command_from_the_checkout(relay, tmp_path, checkout):
    uvx = tool("uvx")
    env = clean_env(tmp_path, relay, UV_CACHE_DIR=str(tmp_path / "uv-cache"), UV_TOOL_DIR=str(tmp_path / "uv-tools"),
                    UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1")
    check_command([uvx, "--from", str(checkout), "agent-relay"], env, relay)


def test_the_license_matches_the_plugin_manifest():
    import json
    with open(os.path.join(ROOT, "integrations", "claude-code", ".claude-plugin", "plugin.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        first = f.readline().strip()
    assert first == "%s License" % manifest["license"]
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        assert 'license = {text = "%s"}' % manifest["license"] in f.read()
