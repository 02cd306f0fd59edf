"""The settings file that `agent-relay setup` writes is the one source: with AGENT_RELAY_URL and AGENT_RELAY_TOKEN
unset, the CLI, the hooks and `doctor` read the relay's address and token from it, so `setup`, then the service,
then any client work with no token copying; and the file's token is never sent to another relay."""
import json
import os
import shutil
import socket
import subprocess

from conftest import RELAY_PY
from test_cli import cli_env, run_cli
from test_hooks import fixture


def home_env(tmp_path, **extra):
    """A client's environment on a machine where `setup` ran: a temporary HOME, no AGENT_RELAY_* variables."""
    env = cli_env(url="unused")
    del env["AGENT_RELAY_URL"]
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), AGENT_RELAY_STATE_DIR=str(tmp_path / "state"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def unused_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # the relay binds it next (SO_REUSEADDR)
    return port


def set_up(tmp_path, relay_factory):
    """`setup --yes` on a free port, then the relay started with exactly the file's settings, as its service would."""
    env = home_env(tmp_path)
    port = unused_port()
    p = run_cli(env, "setup", "--yes", "--port", port, "--db", tmp_path / "relay.db")
    assert p.returncode == 0, p.stdout + p.stderr
    path = tmp_path / "home" / ".config" / "agent-relay" / "agent-relay.env"
    values = dict(l.split("=", 1) for l in path.read_text().splitlines() if l and not l.startswith("#"))
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": values["AGENT_RELAY_TOKEN"]}, start=False)
    relay.start(port=int(values["PORT"]))
    return env, relay, str(path)


def test_clients_read_the_settings_file_when_the_variables_are_unset(tmp_path, relay_factory):
    env, relay, path = set_up(tmp_path, relay_factory)
    p = run_cli(env, "doctor")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "token accepted" in p.stdout and "settings read from %s" % path in p.stdout, p.stdout
    p = run_cli(env, "register", "--id", "from-file")
    assert p.returncode == 0 and p.stdout.strip() == "from-file", p.stdout + p.stderr
    p = run_cli(env, "send", "--from", "from-file", "--to", "from-file", "note to self")
    assert p.returncode == 0, p.stdout + p.stderr
    assert relay.get("/api/agents/from-file").json["id"] == "from-file"
    # the Claude Code hook registers the session the same way
    p = run_cli(dict(env, CLAUDE_PROJECT_DIR=str(tmp_path)), "hook", "claude", "session-start",
                stdin=fixture("claude", "session_start"))
    assert p.returncode == 0, p.stderr
    context = json.loads(p.stdout)["hookSpecificOutput"]["additionalContext"]
    assert "connected to the Agent Relay" in context, context
    agents = [a for a in relay.get("/api/agents").json["agents"] if a["id"].startswith(os.uname()[1].split(".")[0].lower())]
    assert agents, "the hook did not register the session through the settings file"


def test_the_file_token_is_not_sent_to_another_relay(tmp_path, relay_factory):
    env, relay, path = set_up(tmp_path, relay_factory)
    other = relay_factory(env={"AGENT_RELAY_TOKEN": "another-relays-token"})
    p = run_cli(dict(env, AGENT_RELAY_URL=other.url), "doctor")
    assert p.returncode == 1, p.stdout
    assert "token missing" in p.stdout and "is for another relay" in p.stdout, p.stdout
    # the variables still win over the file
    p = run_cli(dict(env, AGENT_RELAY_URL=other.url, AGENT_RELAY_TOKEN="another-relays-token"), "doctor")
    assert p.returncode == 0 and "settings read from" not in p.stdout, p.stdout


def test_doctor_without_a_token_names_the_settings_file(tmp_path, relay_factory):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": "a-token-nobody-has"})
    env = home_env(tmp_path, AGENT_RELAY_URL=relay.url)
    p = run_cli(env, "doctor")
    assert p.returncode == 1, p.stdout
    assert "token missing" in p.stdout and "agent-relay.env" in p.stdout and "nor is there a settings file" in p.stdout, p.stdout


def test_daemon_install_defaults_to_the_program_running_it(tmp_path):
    from test_setup_daemon import Ops, parse_unit

    ops = Ops(tmp_path / "ops")
    ops.ok("setup", "--yes")
    binary = os.path.join(ops.root, "bin", "agent-relay")  # as install.sh or pipx puts it on PATH
    shutil.copy(RELAY_PY, binary)
    os.chmod(binary, 0o755)
    env = {"HOME": ops.home, "PATH": ops.bin, "USER": "tester", "STANDIN_LOG": ops.log, "LANG": "C.UTF-8"}
    p = subprocess.run(["agent-relay", "daemon", "install", "--yes"], env=env, cwd=ops.root, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, universal_newlines=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert parse_unit(ops.unit)["Service"]["ExecStart"] == binary + " serve"
