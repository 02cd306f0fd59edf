"""`agent-relay codex` (the launcher) and `agent-relay codex install | doctor | uninstall`, with the real Codex CLI
(npm @openai/codex, pinned in tests/cli) and the scripted model on loopback, fully offline (tests/realcli.py).

The settings are written by `agent-relay codex install` itself into a throwaway CODEX_HOME that holds only the model
provider; `agent-relay` is the one file install.sh puts in ~/.local/bin. The launcher runs headless: it prints the
agent id on its first line and runs until its standard input closes or it is signalled. Each delivery test prints
the time from the peer's send to the reply landing in the peer's inbox.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT as _ROOT

sys.path.insert(0, _ROOT)
import agent_relay  # noqa: E402
from conftest import RELAY_PY, ROOT, need, wait_for  # noqa: E402
from realcli import (CodexHome, Tmux, agent, agents_by_host, cli_ready, describe_proc,  # noqa: E402
                     exec_thread_id, print_timing, processes_with, replies_to, toml_str)
from scripted_model import Text, act_then_reply, relay_message_ids, relay_reply_policy

PACKAGE = "@openai/codex"
REPLY_TEXT = "pong from the launcher's session"
HOOK_EVENTS = ["preToolUse", "sessionStart", "stop", "userPromptSubmit"]


@pytest.fixture
def codex_ready():
    ok, why = cli_ready(PACKAGE)
    need(ok, why)


class BareCodexHome(CodexHome):
    """A CODEX_HOME with only the model provider in config.toml (and whatever a test adds): no hooks, no snippet, no
    AGENTS.md. `agent-relay` (this file) is in ~/.local/bin, as install.sh puts it."""

    def __init__(self, tmp, model_url, relay_url, proxy, user_config="", **extra_env):
        self.user_config = user_config
        CodexHome.__init__(self, tmp, model_url, relay_url, proxy, **extra_env)
        for name in ("hooks.json", "AGENTS.md"):
            os.remove(os.path.join(self.codex_home, name))
        self.relay_bin = os.path.join(self.bin_dir, "agent-relay")
        self.env["AGENT_RELAY_CODEX_BIN"] = self.bin

    def write_config(self):
        lines = [
            'model = "scripted-model"',
            'model_provider = "scripted"',
            'sandbox_mode = "workspace-write"',
            "",
            self.user_config,
            "",
            "[model_providers.scripted]",
            'name = "Scripted model"',
            "base_url = %s" % toml_str(self.model_url + "/v1"),
            "env_key = %s" % toml_str(self.API_KEY_VAR),
            'wire_api = "responses"',
            "",
        ]
        with open(self.path("config.toml"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines))

    def path(self, name):
        return os.path.join(self.codex_home, name)

    def read(self, name):
        try:
            with open(self.path(name), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def relay_cmd(self, *args, input_text=None, timeout=60):
        """The installed agent-relay, run with no terminal."""
        return subprocess.run([self.relay_bin] + list(args), env=self.env, cwd=self.project, timeout=timeout,
                              input=input_text, stdin=None if input_text is not None else subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)

    def install(self):
        p = self.relay_cmd("codex", "install", "--yes")
        assert p.returncode == 0, describe_proc(p)
        return p

    def doctor(self):
        p = self.relay_cmd("codex", "doctor", "--json")
        out = json.loads(p.stdout)
        return p.returncode, {c["code"]: c for c in out["checks"]}


class Launcher:
    """`agent-relay codex --headless` as a child: stdin a pipe, the agent id read from its first line."""

    def __init__(self, home, *codex_args, env=None):
        self.home = home
        self.proc = subprocess.Popen([home.relay_bin, "codex", "--headless", "--"] + list(codex_args),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env or home.env, cwd=home.project)
        self.err = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.first_line = self.proc.stdout.readline().decode("utf-8", "replace")
        self.agent_id = self.first_line.strip()

    def _drain(self):
        for line in self.proc.stderr:
            self.err.append(line.decode("utf-8", "replace"))

    def log(self):
        return "".join(self.err)[-4000:]

    def stop_by_stdin(self):
        self.proc.stdin.close()
        return self.proc.wait(60)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def codex_processes(home):
    """Codex processes (and launchers) of this HOME, the test's own tmux server aside."""
    out = []
    for pid in processes_with("codex", home.home):
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                argv0 = f.read().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(argv0) != b"tmux":
            out.append(pid)
    return out


def model_turn_requests(model):
    return [r for r in model.model_requests("openai") if "exec_command" in r.model_request.tools]


# -- the trust hash ---------------------------------------------------------------------------------------------------


def test_trust_hash_is_the_one_codex_reports(codex_ready, relay, proxy, model_factory, tmp_path):
    """The hash `codex_hook_hash` computes for each hook of a hooks.json (with a matcher, a status message, a timeout
    and a default one) is the currentHash that the real app-server's hooks/list reports, under the same key."""
    model = model_factory(lambda req: Text("ok"))
    home = BareCodexHome(tmp_path, model.url, relay.url, proxy)
    hooks = {"hooks": {
        "SessionStart": [{"hooks": [{"type": "command", "command": "echo one", "timeout": 10, "statusMessage": "Hi"}]}],
        "PreToolUse": [{"matcher": "^Bash$", "hooks": [{"type": "command", "command": "echo two", "timeout": 5}]},
                       {"hooks": [{"type": "command", "command": "echo 'three' \"x\""}, {"type": "command",
                                                                                         "command": "echo four"}]}],
    }}
    with open(home.path("hooks.json"), "w") as f:
        json.dump(hooks, f)
    listed = {h["key"]: h for h in home.list_hooks()}
    ours = {}
    for event, groups in hooks["hooks"].items():
        for gi, g in enumerate(groups):
            for hi, h in enumerate(g["hooks"]):
                ours[agent_relay.codex_hook_key(home.path("hooks.json"), event, gi, hi)] = agent_relay.codex_hook_hash(event, g, h)
    assert sorted(ours) == sorted(listed), (sorted(ours), sorted(listed))
    for key, digest in ours.items():
        assert listed[key]["currentHash"] == digest, (key, listed[key])


# -- install, doctor, uninstall ----------------------------------------------------------------------------------------


def test_install_then_codex_reports_the_hooks_trusted_and_runs_them(codex_ready, relay, proxy, model_factory, tmp_path):
    """`agent-relay codex install --yes` into an empty CODEX_HOME: the real Codex lists the four relay hooks as trusted,
    pointing at the installed agent-relay, and a `codex exec` registers the session through them; doctor is happy."""
    model = model_factory(lambda req: Text("ok"))
    home = BareCodexHome(tmp_path, model.url, relay.url, proxy)
    out = home.install()
    assert "Writing %s" % home.path("hooks.json") in out.stdout, out.stdout
    listed = home.list_hooks()
    assert sorted(h["eventName"] for h in listed) == HOOK_EVENTS, listed
    assert all(h["trustStatus"] == "trusted" and h["enabled"] for h in listed), listed
    assert all(h["command"].startswith(home.relay_bin + " hook codex ") for h in listed), listed
    config = home.read("config.toml")
    assert 'notify = [%s, "hook", "codex", "notify"]' % toml_str(home.relay_bin) in config, config
    assert "## Agent Relay" in home.read("AGENTS.md")
    code, checks = home.doctor()
    assert code == 0 and all(c["ok"] for c in checks.values()), checks

    p = home.exec("hello")
    assert p.returncode == 0, describe_proc(p)
    thread = exec_thread_id(p)
    cards = [a for a in relay.get("/api/agents").json["agents"] if (a.get("meta") or {}).get("host") == "codex"]
    assert len(cards) == 1 and cards[0]["meta"]["sessionId"] == thread, (cards, describe_proc(p))
    text = model.model_requests("openai")[0].model_request.all_text()
    assert 'as agent "%s"' % cards[0]["id"] in text and "## Agent Relay" in text, model.describe()
    # the session's first context states both versions
    assert "Versions: relay %s, client %s." % (agent_relay.__version__, agent_relay.__version__) in text, text[-3000:]
    # a second install changes nothing
    again = home.install()
    assert "nothing to change" in again.stdout, again.stdout


USER_CONFIG = """# my own settings
approval_policy = "on-request"

[features]
# a feature of my own
web_search_request = true

[projects."/somewhere"]
trust_level = "trusted"
"""
USER_HOOKS = {"hooks": {"Stop": [{"hooks": [{"type": "command", "command": "echo my own stop hook"}]}],
                        "PostToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "echo mine"}]}]}}
USER_AGENTS = "# My instructions\n\nAlways run the tests.\n"


def test_dry_run_writes_nothing_and_uninstall_leaves_the_users_settings(codex_ready, relay, proxy, model_factory, tmp_path):
    """With the user's own config.toml ([features] table, projects), hooks.json and AGENTS.md: --dry-run shows the
    changes and writes nothing; with no terminal and no --yes it refuses; install adds only marked lines (one inside
    the user's [features]), keeps the user's hooks (Codex lists and trusts ours beside them, and leaves theirs
    untrusted); uninstall puts every file back as it was."""
    model = model_factory(lambda req: Text("ok"))
    home = BareCodexHome(tmp_path, model.url, relay.url, proxy, user_config=USER_CONFIG)
    with open(home.path("hooks.json"), "w") as f:
        json.dump(USER_HOOKS, f, indent=2)
    with open(home.path("AGENTS.md"), "w") as f:
        f.write(USER_AGENTS)
    before = {n: home.read(n) for n in ("config.toml", "hooks.json", "AGENTS.md")}

    dry = home.relay_cmd("codex", "install", "--dry-run")
    assert dry.returncode == 0, describe_proc(dry)
    assert "Would write %s" % home.path("config.toml") in dry.stdout and "Nothing was written" in dry.stdout, dry.stdout
    assert {n: home.read(n) for n in before} == before, "--dry-run changed a file"
    refused = home.relay_cmd("codex", "install")
    assert refused.returncode != 0 and "--yes" in refused.stderr, describe_proc(refused)
    assert {n: home.read(n) for n in before} == before, "changed files without asking"

    home.install()
    config = home.read("config.toml")
    assert "# my own settings\napproval_policy" in config, config
    assert config.index("notify = ") < config.index("[features]"), "notify must sit above every table"
    assert "[features]\nhooks = true  # managed by agent-relay codex\n# a feature of my own" in config, config
    assert 'approval_policy = "on-request"' in config and 'trust_level = "trusted"' in config
    if sys.version_info >= (3, 11):
        import tomllib

        parsed = tomllib.loads(config)
        assert parsed["features"] == {"hooks": True, "web_search_request": True}, parsed["features"]
        assert parsed["sandbox_workspace_write"]["network_access"] is True and parsed["notify"][1:] == [
            "hook", "codex", "notify"], parsed
    hooks = json.loads(home.read("hooks.json"))
    assert hooks["hooks"]["PostToolUse"] == USER_HOOKS["hooks"]["PostToolUse"]
    assert hooks["hooks"]["Stop"][0] == USER_HOOKS["hooks"]["Stop"][0] and len(hooks["hooks"]["Stop"]) == 2
    assert home.read("AGENTS.md").startswith(USER_AGENTS) and "## Agent Relay" in home.read("AGENTS.md")
    listed = home.list_hooks()
    relay_hooks = [h for h in listed if " hook codex " in h["command"]]
    theirs = [h for h in listed if " hook codex " not in h["command"]]
    assert sorted(h["eventName"] for h in relay_hooks) == HOOK_EVENTS
    assert all(h["trustStatus"] == "trusted" for h in relay_hooks), relay_hooks
    assert theirs and all(h["trustStatus"] == "untrusted" for h in theirs), theirs

    dry = home.relay_cmd("codex", "uninstall", "--dry-run")
    assert dry.returncode == 0 and "Nothing was changed" in dry.stdout, describe_proc(dry)
    assert "Would write %s" % home.path("config.toml") in dry.stdout
    out = home.relay_cmd("codex", "uninstall", "--yes")
    assert out.returncode == 0, describe_proc(out)
    assert home.read("config.toml") == before["config.toml"]
    assert home.read("AGENTS.md") == before["AGENTS.md"]
    assert json.loads(home.read("hooks.json")) == USER_HOOKS


def test_install_refuses_settings_that_say_otherwise_and_purge_removes_session_state(codex_ready, relay, proxy,
                                                                                    model_factory, tmp_path):
    """A config.toml whose notify runs another program, or that turns hooks off, is refused with a message naming
    the key, and nothing changes. uninstall --purge also removes the Codex sessions' relay state."""
    model = model_factory(lambda req: Text("ok"))
    for user, key in (('notify = ["my-notifier"]\n', "notify"), ("[features]\nhooks = false\n", "features.hooks")):
        home = BareCodexHome(tmp_path / key, model.url, relay.url, proxy, user_config=user)
        before = home.read("config.toml")
        p = home.relay_cmd("codex", "install", "--yes")
        assert p.returncode == 1 and "nothing was changed" in p.stderr and key in p.stderr, describe_proc(p)
        assert home.read("config.toml") == before and home.read("hooks.json") is None

    home = BareCodexHome(tmp_path / "purge", model.url, relay.url, proxy)
    home.install()
    p = home.exec("hello")
    assert p.returncode == 0, describe_proc(p)
    sessions = os.path.join(home.home, ".local", "share", "agent-relay", "sessions")
    assert [n for n in os.listdir(sessions) if n.startswith("codex-") and n.endswith(".json")], os.listdir(sessions)
    out = home.relay_cmd("codex", "uninstall", "--purge", "--yes")
    assert out.returncode == 0, describe_proc(out)
    assert not [n for n in os.listdir(sessions) if n.startswith("codex-")], os.listdir(sessions)
    assert home.read("hooks.json") is None and home.read("AGENTS.md") is None
    assert "agent-relay" not in home.read("config.toml")


def test_doctor_says_what_is_missing(codex_ready, relay_factory, proxy, model_factory, tmp_path):
    """doctor names each problem with its fix: relay unreachable, token refused, hooks not installed, hooks untrusted,
    hooks modified since trusted, and no network for the model's reply in the sandbox mode in use."""
    model = model_factory(lambda req: Text("ok"))
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": "right-token-0123456789"})
    home = BareCodexHome(tmp_path, model.url, relay.url, proxy, AGENT_RELAY_TOKEN="wrong-token-0123456789")
    code, checks = home.doctor()
    assert code == 1
    assert not checks["token"]["ok"] and "AGENT_RELAY_TOKEN" in checks["token"]["text"], checks
    assert not checks["hooks_missing"]["ok"] and "codex install" in checks["hooks_missing"]["text"], checks
    assert not checks["network_blocked"]["ok"] and "network_access" in checks["network_blocked"]["text"], checks

    home.env["AGENT_RELAY_TOKEN"] = "right-token-0123456789"
    home.install()
    code, checks = home.doctor()
    assert code == 0, checks

    config = home.read("config.toml")
    with open(home.path("config.toml"), "w") as f:
        f.write(re.sub(r'(?m)^\[hooks\.state\."[^"]*:stop:[^"]*"\]\ntrusted_hash = "[^"]*"\n', "", config))
    code, checks = home.doctor()
    assert code == 1 and "Stop" in checks["hooks_untrusted"]["text"], checks
    with open(home.path("config.toml"), "w") as f:
        f.write(config)
    hooks = json.loads(home.read("hooks.json"))
    hooks["hooks"]["PreToolUse"][0]["hooks"][0]["timeout"] = 50
    with open(home.path("hooks.json"), "w") as f:
        json.dump(hooks, f)
    code, checks = home.doctor()
    assert code == 1 and "PreToolUse" in checks["hooks_modified"]["text"], checks
    # Codex agrees: the modified hook is no longer trusted
    assert {h["eventName"]: h["trustStatus"] for h in home.list_hooks()}["preToolUse"] == "modified"

    home.env["AGENT_RELAY_URL"] = proxy.url  # nothing listens there
    code, checks = home.doctor()
    assert code == 1 and "unreachable" in checks["relay_unreachable"]["text"], checks


# -- the launcher ------------------------------------------------------------------------------------------------------


def test_headless_launcher_registers_at_launch_answers_an_idle_message_and_goes_offline_when_stdin_closes(
        codex_ready, relay, proxy, model_factory, tmp_path):
    """`agent-relay codex --headless`: the first line is the agent id (the hooks' id for the thread, rig codex); the
    agent is registered, idle and listening before any prompt; a message to it is answered through the relay with
    nothing typed; closing stdin marks it offline at once and leaves no Codex process behind."""
    relay.register("peer")
    model = model_factory(relay_reply_policy(RELAY_PY, REPLY_TEXT))
    home = BareCodexHome(tmp_path, model.url, relay.url, proxy)
    home.install()
    launcher = Launcher(home)
    try:
        aid = launcher.agent_id
        assert re.match(r"^[a-z0-9._-]+-codex-project-[0-9a-f]{8}$", aid), (launcher.first_line, launcher.log())
        card = agent(relay, aid)
        assert card and card["rig"] == "codex" and card["meta"]["host"] == "codex", card
        thread = card["meta"]["sessionId"]
        assert aid == agent_relay.derive_agent_id(agent_relay.short_hostname(), "codex", "project", thread)
        assert wait_for(lambda: agent(relay, aid)["listening"], timeout=20), agent(relay, aid)
        assert agent(relay, aid)["status"] == "idle"
        assert not model.model_requests("openai"), "a model turn ran before any message"

        started = time.time()
        sent = relay.send("peer", aid, "ping: what is the build status?")
        replies = wait_for(lambda: replies_to(relay, "peer", sent["id"]), timeout=60)
        landed = time.time()
        assert replies, "no reply\n%s\n%s" % (launcher.log(), model.describe())
        assert replies[0]["from"] == aid and replies[0]["body"] == REPLY_TEXT
        print_timing("agent-relay codex --headless, message to the idle session", sent, replies[0], started, landed)
        seen = [r for r in model.model_requests("openai") if sent["id"] in relay_message_ids(r.model_request.all_text())]
        assert seen and 'as agent "%s"' % aid in seen[0].model_request.all_text(), model.describe()
        assert wait_for(lambda: agent(relay, aid)["status"] == "idle", timeout=20), agent(relay, aid)
        card = agent(relay, aid)
        assert card["epoch"] == 1, "the hooks' SessionStart registered a second instance: %s" % card
        assert codex_processes(home), "no codex process while the launcher runs?"

        assert launcher.stop_by_stdin() == 0, launcher.log()
        assert agent(relay, aid)["status"] == "offline", agent(relay, aid)
        assert codex_processes(home) == [], "processes left: %s" % codex_processes(home)
    finally:
        launcher.close()


def test_message_during_a_busy_turn_is_steered_in_and_sigterm_ends_everything(codex_ready, relay, proxy, model_factory,
                                                                              tmp_path):
    """While the session works on one message (the model is slow), a second one arrives: the launcher steers it into
    the running turn (busy meanwhile); both are answered. SIGTERM then marks the agent offline and ends every Codex
    process."""
    relay.register("peer")
    hold = threading.Event()
    reply = relay_reply_policy(RELAY_PY, REPLY_TEXT)
    state = {}

    def policy(req):
        ids = relay_message_ids(req.all_text())
        if ids and "first" not in state and "exec_command" in req.tools:
            state["first"] = True
            hold.wait(30)  # thinking about the first message until the test has sent the second
        return reply(req)

    model = model_factory(policy)
    home = BareCodexHome(tmp_path, model.url, relay.url, proxy)
    home.install()
    launcher = Launcher(home)
    try:
        aid = launcher.agent_id
        assert wait_for(lambda: agent(relay, aid) and agent(relay, aid)["listening"], timeout=20), launcher.log()
        first = relay.send("peer", aid, "first: please look at the logs")
        assert wait_for(lambda: state.get("first"), timeout=30), model.describe()
        assert wait_for(lambda: agent(relay, aid)["status"] == "busy", timeout=20), agent(relay, aid)
        started = time.time()
        second = relay.send("peer", aid, "second: and the build status?")
        assert wait_for(lambda: "delivered message(s) %d as steered into the running turn" % second["id"] in launcher.log(),
                        timeout=30), launcher.log()
        hold.set()
        replies = wait_for(lambda: replies_to(relay, "peer", second["id"]) and replies_to(relay, "peer", first["id"]),
                           timeout=60)
        assert replies, "not both answered\n%s\n%s" % (launcher.log(), model.describe())
        print_timing("agent-relay codex --headless, message during a busy turn (steered)", second,
                     replies_to(relay, "peer", second["id"])[0], started, time.time())
        seen = [r for r in model.model_requests("openai") if second["id"] in relay_message_ids(r.model_request.all_text())]
        assert seen and first["id"] in relay_message_ids(seen[0].model_request.all_text()), "not in the same turn"
        assert wait_for(lambda: agent(relay, aid)["status"] == "idle", timeout=20), agent(relay, aid)

        launcher.proc.send_signal(signal.SIGTERM)
        assert launcher.proc.wait(60) == 128 + signal.SIGTERM, launcher.log()
        assert agent(relay, aid)["status"] == "offline", agent(relay, aid)
        assert codex_processes(home) == [], "processes left: %s" % codex_processes(home)
    finally:
        hold.set()
        launcher.close()


@pytest.mark.parametrize("installed", [True, False], ids=["hooks-installed", "no-hooks"])
def test_read_only_session_refuses_a_peers_edit(codex_ready, relay, proxy, model_factory, tmp_path, installed):
    """AGENT_RELAY_APPROVAL=read-only: a peer asks for a file to be created; the model tries (shell command) and is
    refused, and its reply still reaches the peer. With the hooks installed the PreToolUse gate refuses it (the
    launcher records the relay as the turn's origin); without them the launcher runs the relay turn in Codex's
    read-only sandbox with no approvals."""
    relay.register("peer")
    target = os.path.join(str(tmp_path), "project", "done-for-the-peer")
    model = model_factory(act_then_reply("touch %s" % target, RELAY_PY, REPLY_TEXT))
    home = BareCodexHome(tmp_path, model.url, relay.url, proxy, AGENT_RELAY_APPROVAL="read-only")
    if installed:
        home.install()
    launcher = Launcher(home)
    try:
        aid = launcher.agent_id
        assert wait_for(lambda: agent(relay, aid) and agent(relay, aid)["listening"], timeout=20), launcher.log()
        assert agent(relay, aid)["approvalMode"] == "read-only"
        sent = relay.send("peer", aid, "please create done-for-the-peer")
        replies = wait_for(lambda: replies_to(relay, "peer", sent["id"]), timeout=60)
        assert replies and replies[0]["body"] == REPLY_TEXT, "no reply\n%s\n%s" % (launcher.log(), model.describe())
        assert model.policy.state["acted"], model.describe()
        assert not os.path.exists(target), "the read-only session ran the peer's command"
        results = [t for r in model.model_requests("openai") for t in r.model_request.tool_results()]
        if installed:
            assert any("blocked by PreToolUse hook" in t and "read-only on the relay" in t for t in results), results
        else:
            assert "read-only sandbox" in launcher.log(), launcher.log()
        assert launcher.stop_by_stdin() == 0
    finally:
        launcher.close()


# -- versions and PermissionDenied (no CLI needed) -------------------------------------------------------------------------


def test_intro_states_versions_and_warns_when_they_differ():
    card = {"id": "a1", "approvalMode": "open"}
    same = agent_relay.intro_text(card, "http://x", cli="agent-relay", relay_version=agent_relay.__version__)
    assert "Versions: relay %s, client %s." % (agent_relay.__version__, agent_relay.__version__) in same
    assert "Warning" not in same
    other = agent_relay.intro_text(card, "http://x", cli="agent-relay", relay_version="99.1.0")
    assert "relay 99.1.0" in other and "Warning: they differ" in other


def test_permission_denied_hook_records_the_refusal_on_relay_work(relay, tmp_path):
    """Claude Code's PermissionDenied event (2.1.332 has it): during relay work the refusal is kept on the session's
    origin (the gate keeps applying); no retry is asked for and nothing goes to the peer. Outside relay work: nothing."""
    env = dict(os.environ, AGENT_RELAY_URL=relay.url, AGENT_RELAY_STATE_DIR=str(tmp_path / "state"),
               HOME=str(tmp_path))
    assert agent_relay.run_hook("claude", "session-start", json.dumps({"session_id": "s1", "cwd": str(tmp_path)}), env)
    sess = agent_relay.HookSession("claude", "s1", env)
    sess.update(origin={"kind": "relay", "messageId": 7, "from": "peer", "at": 1})
    before = relay.get("/api/messages", query={"limit": 100}).json["messages"]
    denied = {"hook_event_name": "PermissionDenied", "session_id": "s1", "tool_name": "Bash",
              "tool_input": {"command": "rm -rf build"}, "tool_use_id": "t1", "reason": "user said no"}
    assert agent_relay.run_hook("claude", None, json.dumps(denied), env) is None
    origin = agent_relay.HookSession("claude", "s1", env).data["origin"]
    assert origin["kind"] == "relay" and origin["messageId"] == 7 and origin["denied"][0]["tool"] == "Bash", origin
    assert relay.get("/api/messages", query={"limit": 100}).json["messages"] == before
    sess.update(origin={"kind": "human", "at": 1})
    assert agent_relay.run_hook("claude", "permission-denied", json.dumps(denied), env) is None
    assert agent_relay.HookSession("claude", "s1", env).data["origin"] == {"kind": "human", "at": 1}
    with open(os.path.join(ROOT, "integrations", "claude-code", "hooks", "hooks.json")) as f:
        hooks = json.load(f)["hooks"]
    assert hooks["PermissionDenied"][0]["hooks"][0]["command"].endswith("hook claude permission-denied")


def test_embedded_codex_files_match_integrations():
    """The one file carries what install writes; integrations/codex holds the same for people who copy by hand."""
    with open(os.path.join(ROOT, "integrations", "codex", "AGENTS.md.snippet")) as f:
        assert f.read() == agent_relay.CODEX_AGENTS_MD
    with open(os.path.join(ROOT, "integrations", "codex", "hooks.json")) as f:
        template = json.load(f)["hooks"]
    settings = agent_relay.CodexSettings(home="/nowhere", argv=["agent-relay"])
    for event, group, handler in settings.ours():
        assert template[event] == [group], (event, template[event], group)


def test_interactive_launcher_opens_the_tui_on_the_same_app_server(codex_ready, relay, proxy, model_factory, tmp_path):
    """`agent-relay codex` in a terminal (tmux): Codex 0.171.0's TUI attaches to the launcher's app-server (`codex
    --remote unix://...`); the session is on the relay as soon as the TUI has its thread, a message shows up in the
    TUI as a turn and is answered with nothing typed; when the person quits the TUI (Ctrl-C), the agent is offline
    and no Codex process is left."""
    need(shutil.which("tmux"), "tmux is not installed")
    relay.register("peer")
    model = model_factory(relay_reply_policy(RELAY_PY, REPLY_TEXT))
    home = BareCodexHome(tmp_path, model.url, relay.url, proxy)
    home.install()
    tui = Tmux(os.path.join(str(tmp_path), "tmux.sock"), "%s codex" % home.relay_bin, home.env, home.project)
    try:
        cards = wait_for(lambda: agents_by_host(relay, "codex"), timeout=60)
        assert len(cards) == 1, tui.screen()
        aid = cards[0]["id"]
        assert wait_for(lambda: agent(relay, aid)["listening"], timeout=20), agent(relay, aid)
        assert wait_for(lambda: "Ask Codex to do anything" in tui.screen() or "OpenAI Codex" in tui.screen(),
                        timeout=30), tui.screen()
        started = time.time()
        sent = relay.send("peer", aid, "ping to the interactive session")
        replies = wait_for(lambda: replies_to(relay, "peer", sent["id"]), timeout=60)
        landed = time.time()
        assert replies and replies[0]["from"] == aid, "no reply\n%s\n%s" % (tui.screen(), model.describe())
        print_timing("agent-relay codex (TUI attached), message to the idle session", sent, replies[0], started, landed)
        assert wait_for(lambda: "[msg:%d] from peer: ping to the interactive session" % sent["id"] in tui.screen(),
                        timeout=20), tui.screen()
        assert wait_for(lambda: agent(relay, aid)["status"] == "idle", timeout=20), agent(relay, aid)
        tui.send_keys("C-c")
        time.sleep(0.3)
        tui.send_keys("C-c")
        assert wait_for(tui.pane_dead, timeout=60) and "is offline" in tui.screen(), tui.screen()
        assert agent(relay, aid)["status"] == "offline", agent(relay, aid)
        assert codex_processes(home) == [], "processes left: %s" % codex_processes(home)
    finally:
        tui.close()
