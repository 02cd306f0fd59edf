"""`agent_relay.py setup` and `agent_relay.py daemon ...`, run as a person runs them.

Each test runs the real commands as subprocesses with a temporary HOME, no
XDG_* variables from the outside, and a PATH holding only stand-ins for
`systemctl`, `journalctl`, `loginctl` and `launchctl` that append their
arguments to a log file. That is the one stand-in these tests use: they must
never touch the machine's real init system. What the commands wrote is read
back with configparser and plistlib; what they ran is read from the log.
"""
import configparser
import json
import os
import plistlib
import re
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import RELAY_PY, need

TOOLS = ("systemctl", "journalctl", "loginctl", "launchctl")
STANDIN = """#!{python}
import json, os, sys
with open(os.environ["STANDIN_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
if sys.argv[1:2] == ["show-user"]:
    print("Linger=no")
"""

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the stand-ins are POSIX scripts")


class Ops:
    """A temporary home with stand-in service tools, and a way to run agent_relay.py commands in it."""

    def __init__(self, root):
        self.root = str(root)
        self.home = os.path.join(self.root, "home")
        self.bin = os.path.join(self.root, "bin")
        self.log = os.path.join(self.root, "commands.log")
        os.makedirs(self.home)
        os.makedirs(self.bin)
        for tool in TOOLS:
            self.add_tool(tool)
        # Scripts started through `#!/usr/bin/env python3` find this Python.
        os.symlink(sys.executable, os.path.join(self.bin, "python3"))
        self.extra_env = {}

    def add_tool(self, name):
        path = os.path.join(self.bin, name)
        with open(path, "w") as f:
            f.write(STANDIN.format(python=sys.executable))
        os.chmod(path, 0o755)

    def remove_tool(self, name):
        os.remove(os.path.join(self.bin, name))

    def env(self):
        env = {"HOME": self.home, "PATH": self.bin, "USER": "tester", "LOGNAME": "tester", "STANDIN_LOG": self.log,
               "LANG": "C.UTF-8"}
        env.update(self.extra_env)
        return env

    def run(self, *args, **kw):
        env = self.env()
        env.update(kw.pop("env", {}))
        p = subprocess.run([sys.executable, RELAY_PY] + list(args), env=env, cwd=self.root, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, **kw)
        p.out = p.stdout.decode("utf-8", "replace")
        p.err = p.stderr.decode("utf-8", "replace")
        return p

    def ok(self, *args):
        p = self.run(*args)
        assert p.returncode == 0, (args, p.out, p.err)
        return p

    def commands(self):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [json.loads(line) for line in f]

    def clear(self):
        if os.path.exists(self.log):
            os.remove(self.log)

    def files(self):
        out = []
        for base, _dirs, names in os.walk(self.home):
            out.extend(os.path.relpath(os.path.join(base, n), self.home) for n in names)
        return sorted(out)

    # Where things go on each system (as the README documents them).
    def env_file(self, system="linux"):
        if system == "macos":
            return os.path.join(self.home, "Library", "Application Support", "agent-relay", "agent-relay.env")
        return os.path.join(self.home, ".config", "agent-relay", "agent-relay.env")

    @property
    def unit(self):
        return os.path.join(self.home, ".config", "systemd", "user", "agent-relay.service")

    @property
    def plist(self):
        return os.path.join(self.home, "Library", "LaunchAgents", "dev.agent-relay.plist")


@pytest.fixture
def ops(tmp_path):
    return Ops(tmp_path)


def read_env(path):
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                k, _, v = line.partition("=")
                values[k] = v[1:-1].replace('\\"', '"').replace("\\\\", "\\") if v.startswith('"') else v
    return values


def parse_unit(path):
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    with open(path) as f:
        cp.read_file(f)
    return cp


# -- setup ---------------------------------------------------------------------


def test_setup_dry_run_then_write_then_refuse_to_overwrite(ops, relay_factory):
    p = ops.ok("setup", "--dry-run")
    assert "Would write " + ops.env_file() in p.out
    assert "HOST=127.0.0.1" in p.out and "PORT=4850" in p.out
    assert "AGENT_RELAY_DB=" + os.path.join(ops.home, ".local", "share", "agent-relay", "relay.db") in p.out
    assert ops.files() == []

    # Without --yes and with no terminal to ask on: a clear refusal, nothing written.
    p = ops.run("setup")
    assert p.returncode != 0 and "--yes" in p.err and "nothing was changed" in p.err
    assert ops.files() == []

    p = ops.ok("setup", "--yes")
    path = ops.env_file()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        assert f.readline().startswith("# Managed by agent-relay")
    values = read_env(path)
    assert set(values) == {"AGENT_RELAY_TOKEN", "HOST", "PORT", "AGENT_RELAY_DB"}
    assert values["HOST"] == "127.0.0.1" and values["PORT"] == "4850"
    assert values["AGENT_RELAY_DB"] == os.path.join(ops.home, ".local", "share", "agent-relay", "relay.db")
    token = values["AGENT_RELAY_TOKEN"]
    assert len(token) >= 43 and token not in p.out  # secrets.token_urlsafe(32); never printed
    assert "daemon install --binary " in p.out and "--enable --start" in p.out

    # An existing file is kept unless --force; --force keeps the token, --new-token replaces it.
    p = ops.run("setup", "--yes", "--port", "4999")
    assert p.returncode != 0 and "--force" in p.err
    assert read_env(path) == values
    ops.ok("setup", "--yes", "--force", "--port", "4999")
    again = read_env(path)
    assert again["PORT"] == "4999" and again["AGENT_RELAY_TOKEN"] == token
    ops.ok("setup", "--yes", "--force", "--new-token")
    assert read_env(path)["AGENT_RELAY_TOKEN"] != token

    # The written token is one the relay accepts and requires.
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": read_env(path)["AGENT_RELAY_TOKEN"]})
    assert relay.get("/api/agents").status == 200
    assert relay.get("/api/agents", token=False).status == 401


def test_setup_flags_places_and_non_loopback_host(ops):
    db = os.path.join(ops.root, "data", "relay.db")
    p = ops.ok("setup", "--yes", "--host", "0.0.0.0", "--port", "5050", "--db", "data/relay.db")
    assert "not loopback" in p.out and "AGENT_RELAY_TOKEN" in p.out
    values = read_env(ops.env_file())
    assert values["HOST"] == "0.0.0.0" and values["PORT"] == "5050" and values["AGENT_RELAY_DB"] == db

    for bad in (["--port", "70000"], ["--port", "x"], ["--host", "a b"], ["--db", ":memory:"]):
        p = ops.run("setup", "--yes", "--force", *bad)
        assert p.returncode == 2 and p.err.startswith("agent-relay: "), bad
    assert read_env(ops.env_file()) == values

    # XDG_CONFIG_HOME moves the file; macOS and Windows have their own places.
    xdg = os.path.join(ops.home, "xdg")
    p = ops.run("setup", "--yes", env={"XDG_CONFIG_HOME": xdg})
    assert p.returncode == 0, p.err
    assert os.path.exists(os.path.join(xdg, "agent-relay", "agent-relay.env"))
    ops.ok("setup", "--yes", "--platform", "macos")
    mac = read_env(ops.env_file("macos"))
    assert mac["AGENT_RELAY_DB"] == os.path.join(ops.home, "Library", "Application Support", "agent-relay", "relay.db")
    ops.ok("setup", "--yes", "--platform", "windows")
    assert os.path.exists(os.path.join(ops.home, "AppData", "Roaming", "agent-relay", "agent-relay.env"))
    assert ops.commands() == []


# -- daemon on Linux (systemd) -----------------------------------------------------


def test_systemd_install_dry_run_writes_and_runs_nothing(ops):
    ops.ok("setup", "--yes")
    before = ops.files()
    p = ops.ok("daemon", "install", "--binary", RELAY_PY, "--enable", "--start", "--dry-run")
    assert "Would write " + ops.unit in p.out
    assert "Would run: systemctl --user daemon-reload" in p.out
    assert "Would run: systemctl --user enable agent-relay.service" in p.out
    assert "Would run: systemctl --user start agent-relay.service" in p.out
    assert ops.files() == before and ops.commands() == []
    p = ops.ok("daemon", "stop", "--dry-run")
    assert "Would run: systemctl --user stop agent-relay.service" in p.out and ops.commands() == []


def test_systemd_install_lifecycle_and_uninstall(ops):
    ops.ok("setup", "--yes")
    env_file = ops.env_file()

    # No terminal and no --yes: refused, nothing written or run.
    p = ops.run("daemon", "install", "--binary", RELAY_PY, "--enable", "--start")
    assert p.returncode != 0 and "--yes" in p.err
    assert not os.path.exists(ops.unit) and ops.commands() == []

    p = ops.ok("daemon", "install", "--binary", RELAY_PY, "--enable", "--start", "--yes")
    unit = parse_unit(ops.unit)
    with open(ops.unit) as f:
        assert f.readline().startswith("# Managed by agent-relay")
    service = unit["Service"]
    assert service["ExecStart"] == "%s %s serve" % (sys.executable, RELAY_PY)
    assert service["EnvironmentFile"] == env_file
    assert service["Restart"] == "on-failure" and int(service["RestartSec"]) > 0
    assert unit["Install"]["WantedBy"] == "default.target"
    assert ops.commands() == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "agent-relay.service"],
        ["systemctl", "--user", "start", "agent-relay.service"],
        ["loginctl", "show-user", "tester", "--property=Linger"],
    ]
    assert "loginctl enable-linger tester" in p.out

    expected = {
        "stop": [["systemctl", "--user", "stop", "agent-relay.service"]],
        "start": [["systemctl", "--user", "start", "agent-relay.service"]],
        "restart": [["systemctl", "--user", "restart", "agent-relay.service"]],
        "enable": [["systemctl", "--user", "enable", "agent-relay.service"]],
        "disable": [["systemctl", "--user", "disable", "agent-relay.service"]],
    }
    for action, cmds in expected.items():
        ops.clear()
        ops.ok("daemon", action, "--yes")
        assert ops.commands() == cmds, action
    ops.clear()
    p = ops.ok("daemon", "status")
    assert ops.unit in p.out
    assert ops.commands() == [["systemctl", "--user", "status", "agent-relay.service", "--no-pager"]]
    ops.clear()
    ops.ok("daemon", "logs", "--lines", "20")
    assert ops.commands() == [["journalctl", "--user", "-u", "agent-relay", "--no-pager", "-n", "20"]]

    # Installing again over its own file replaces it and restarts the running service.
    ops.clear()
    ops.ok("daemon", "install", "--binary", RELAY_PY, "--start", "--yes")
    assert ops.commands()[:2] == [["systemctl", "--user", "daemon-reload"],
                                  ["systemctl", "--user", "restart", "agent-relay.service"]]

    # Uninstall removes only what it wrote.
    other = os.path.join(os.path.dirname(ops.unit), "something-else.service")
    with open(other, "w") as f:
        f.write("[Service]\nExecStart=/bin/true\n")
    ops.clear()
    ops.ok("daemon", "uninstall", "--yes")
    assert not os.path.exists(ops.unit)
    assert os.path.exists(other) and os.path.exists(env_file)
    assert ops.commands() == [["systemctl", "--user", "disable", "--now", "agent-relay.service"],
                              ["systemctl", "--user", "daemon-reload"]]


def test_an_executable_binary_is_started_directly(ops):
    ops.ok("setup", "--yes")
    binary = os.path.join(ops.root, "agent-relay")
    shutil.copy(RELAY_PY, binary)
    os.chmod(binary, 0o755)
    ops.ok("daemon", "install", "--binary", binary, "--yes")
    assert parse_unit(ops.unit)["Service"]["ExecStart"] == binary + " serve"
    # Neither enabled nor started: only the reload ran.
    assert ops.commands()[0] == ["systemctl", "--user", "daemon-reload"]
    assert not any(c[:3] in (["systemctl", "--user", "enable"], ["systemctl", "--user", "start"]) for c in ops.commands())


def exec_start_argv(value):
    """(executable path, argv) of an ExecStart= value, unquoted as systemd documents it (systemd.syntax "Quoting",
    systemd.service "Command lines"): %% is % in every word; $$ is $ in the arguments only (argv[0] included),
    never in the executable path; "@path argv0" passes argv[0] apart from the path."""
    def unescape(m):
        e = m.group(1)
        if e[0] == "x":
            n = int(e[1:], 16)
            return chr(n) if n < 0x80 else chr(0xDC00 + n)
        return {"n": "\n", "t": "\t"}.get(e, e)

    words = []
    for quoted, bare in re.findall(r'"((?:[^"\\]|\\.)*)"(?=\s|$)|(\S+)', value):
        word = re.sub(r"\\(x[0-9a-fA-F]{2}|.)", unescape, quoted) if quoted or not bare else bare
        assert "%" not in word.replace("%%", ""), "a specifier systemd would expand: %r" % word
        words.append(word.replace("%%", "%"))
    path, args = words[0], words[1:]
    if path.startswith("@"):
        path = path[1:]
    else:
        args = [path] + args
    for a in args:
        assert "$" not in a.replace("$$", ""), "a variable systemd would expand: %r" % a
    return path, [a.replace("$$", "$") for a in args]


def systemd_verify(unit):
    """Problems `systemd-analyze verify` reports for the command line of `unit` (system mode: a user manager is not
    needed for a file check, and may be missing in a container)."""
    p = subprocess.run([shutil.which("systemd-analyze"), "verify", unit], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    out = p.stdout.decode("utf-8", "replace")
    bad = ("not executable", "special characters", "escape", "fatal error", "bad unit file setting", "Failed to parse",
           "Unbalanced quoting", unit + ":")
    return [line for line in out.splitlines() if any(b in line for b in bad)]


def test_systemd_unit_starts_a_binary_whose_path_has_dollar_percent_quotes_and_spaces(ops):
    need(shutil.which("systemd-analyze"), "systemd-analyze (Debian package systemd) checks the written unit")
    ops.ok("setup", "--yes")
    # $HOME is a variable and %h a specifier that systemd would expand if they were not escaped; the second
    # directory also holds what systemd never accepts in an executable path (quotes, a backslash).
    plain = os.path.join(ops.root, "tools $HOME 100%h & more")
    odd = os.path.join(ops.root, "it's \"odd\" \\ $x %i")
    binaries = []
    for d in (plain, odd):
        os.makedirs(d)
        binaries.append(os.path.join(d, "agent-relay"))
        shutil.copy(RELAY_PY, binaries[-1])
        os.chmod(binaries[-1], 0o755)

    for binary, expect_path, expect_argv in (
            (binaries[0], binaries[0], [binaries[0], "serve"]),  # started directly
            (binaries[1], sys.executable, [sys.executable, binaries[1], "serve"])):  # through Python
        ops.ok("daemon", "install", "--binary", binary, "--yes", "--force")
        with open(ops.unit, encoding="utf-8") as f:
            line = [l for l in f.read().splitlines() if l.startswith("ExecStart=")]
        assert len(line) == 1, line
        assert systemd_verify(ops.unit) == [], line[0]
        assert exec_start_argv(line[0][len("ExecStart="):]) == (expect_path, expect_argv), line[0]

        # launchd takes the arguments as a list: the path as it is, never split or escaped
        ops.ok("setup", "--yes", "--force", "--platform", "macos")
        ops.ok("daemon", "install", "--platform", "macos", "--binary", binary, "--yes", "--force")
        with open(ops.plist, "rb") as f:
            assert plistlib.load(f)["ProgramArguments"] == [binary, "serve"]

    # A Python that systemd cannot start either (its path holds a quote): a clear refusal, nothing written.
    os.remove(ops.unit)
    python = os.path.join(odd, "python3")
    os.symlink(sys.executable, python)
    script = os.path.join(odd, "agent_relay.py")
    shutil.copy(RELAY_PY, script)  # not executable: started through the Python that runs the command
    p = subprocess.run([python, RELAY_PY, "daemon", "install", "--binary", script, "--yes"], env=ops.env(),
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2 and "systemd does not start" in err and "quote" in err and "Traceback" not in err, err
    assert not os.path.exists(ops.unit)


def test_daemon_install_checks_its_inputs(ops):
    # No env file yet: it says to run setup.
    p = ops.run("daemon", "install", "--binary", RELAY_PY, "--yes")
    assert p.returncode == 2 and "setup" in p.err
    ops.ok("setup", "--yes")
    p = ops.run("daemon", "install", "--binary", os.path.join(ops.root, "missing.py"), "--yes")
    assert p.returncode == 2 and "--binary" in p.err
    impostor = os.path.join(ops.root, "impostor.py")
    with open(impostor, "w") as f:
        f.write("print('hello')\n")
    p = ops.run("daemon", "install", "--binary", impostor, "--yes")
    assert p.returncode == 2 and "--binary" in p.err
    p = ops.run("daemon", "start", "--yes")
    assert p.returncode == 2 and "not installed" in p.err
    assert not os.path.exists(ops.unit) and ops.commands() == []


def test_files_without_the_marker_are_left_alone_unless_forced(ops):
    ops.ok("setup", "--yes")
    ops.ok("setup", "--yes", "--platform", "macos")
    mine = {ops.unit: b"[Service]\nExecStart=/usr/bin/my-own-relay\n",
            ops.plist: plistlib.dumps({"Label": "dev.agent-relay", "ProgramArguments": ["/usr/bin/mine"]})}
    for path, data in mine.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    for platform in ("linux", "macos"):
        p = ops.run("daemon", "install", "--binary", RELAY_PY, "--start", "--yes", "--platform", platform)
        assert p.returncode == 2 and "not written by agent-relay" in p.err and "--force" in p.err, platform
        p = ops.run("daemon", "uninstall", "--yes", "--platform", platform)
        assert p.returncode == 2 and "--force" in p.err, platform
    for path, data in mine.items():
        with open(path, "rb") as f:
            assert f.read() == data
    assert ops.commands() == []
    # --force replaces it with a managed one.
    ops.ok("daemon", "install", "--binary", RELAY_PY, "--yes", "--force")
    with open(ops.unit) as f:
        assert f.readline().startswith("# Managed by agent-relay")


def test_without_systemd_or_on_windows_it_prints_the_manual_command(ops):
    ops.ok("setup", "--yes")
    ops.remove_tool("systemctl")
    p = ops.run("daemon", "install", "--binary", RELAY_PY, "--enable", "--start", "--yes")
    assert p.returncode == 1 and "systemctl was not found" in p.out
    assert "set -a; . %s; set +a; exec %s %s serve" % (ops.env_file(), sys.executable, RELAY_PY) in p.out
    p = ops.run("daemon", "install", "--binary", RELAY_PY, "--yes", "--platform", "windows")
    assert p.returncode == 1 and "schtasks /Create" in p.out and "serve" in p.out
    assert not os.path.exists(ops.unit) and ops.commands() == []


# -- daemon on macOS (launchd) -------------------------------------------------------


def test_launchd_install_lifecycle_logs_and_uninstall(ops):
    ops.ok("setup", "--yes", "--platform", "macos", "--port", "4999")
    env_values = read_env(ops.env_file("macos"))
    uid = os.getuid()
    target = "gui/%d/dev.agent-relay" % uid

    p = ops.ok("daemon", "install", "--platform", "macos", "--binary", RELAY_PY, "--enable", "--start", "--dry-run")
    assert "Would run: launchctl bootstrap gui/%d %s" % (uid, ops.plist) in p.out
    assert env_values["AGENT_RELAY_TOKEN"] not in p.out
    assert not os.path.exists(ops.plist) and ops.commands() == []

    ops.ok("daemon", "install", "--platform", "macos", "--binary", RELAY_PY, "--enable", "--start", "--yes")
    assert stat.S_IMODE(os.stat(ops.plist).st_mode) == 0o600  # it holds the token
    with open(ops.plist, "rb") as f:
        plist = plistlib.load(f)
    logs = os.path.join(ops.home, "Library", "Logs", "agent-relay")
    assert plist["Label"] == "dev.agent-relay" and plist["AgentRelayManaged"] is True
    assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True
    assert plist["ProgramArguments"] == [sys.executable, RELAY_PY, "serve"]
    env = plist["EnvironmentVariables"]
    for key, value in env_values.items():
        assert env[key] == value, key
    assert env["PORT"] == "4999" and " " in env["AGENT_RELAY_DB"]  # "Application Support", unquoted
    assert os.path.dirname(plist["StandardOutPath"]) == logs and os.path.dirname(plist["StandardErrorPath"]) == logs
    assert plist["StandardOutPath"] != plist["StandardErrorPath"] and os.path.isdir(logs)
    assert ops.commands() == [["launchctl", "enable", target], ["launchctl", "bootstrap", "gui/%d" % uid, ops.plist]]

    expected = {
        "stop": [["launchctl", "bootout", target]],
        "start": [["launchctl", "bootstrap", "gui/%d" % uid, ops.plist]],
        "restart": [["launchctl", "kickstart", "-k", target]],
        "disable": [["launchctl", "disable", target]],
        "enable": [["launchctl", "enable", target]],
    }
    for action, cmds in expected.items():
        ops.clear()
        ops.ok("daemon", action, "--yes", "--platform", "macos")
        assert ops.commands() == cmds, action
    ops.clear()
    ops.ok("daemon", "status", "--platform", "macos")
    assert ops.commands() == [["launchctl", "print", target]]

    # logs tails the files launchd writes.
    with open(plist["StandardErrorPath"], "w") as f:
        f.write("".join("line %d\n" % i for i in range(50)))
    p = ops.ok("daemon", "logs", "--platform", "macos", "--lines", "3")
    assert "line 49" in p.out and "line 47" in p.out and "line 46" not in p.out

    other = os.path.join(os.path.dirname(ops.plist), "com.example.other.plist")
    with open(other, "wb") as f:
        f.write(plistlib.dumps({"Label": "com.example.other"}))
    ops.clear()
    ops.ok("daemon", "uninstall", "--yes", "--platform", "macos")
    assert not os.path.exists(ops.plist) and os.path.exists(other)
    assert ops.commands() == [["launchctl", "bootout", target]]
    p = ops.ok("daemon", "uninstall", "--yes", "--platform", "macos")
    assert "nothing to remove" in p.out
