"""The relay's MCP server under the real Claude Code and Codex CLIs (pinned in tests/cli), fully offline: the model
is tests/scripted_model.py on loopback, every other outbound connection goes to a refusing loopback proxy, HOME is
thrown away after each test.

Each CLI is configured as docs/agents.md says, with `agent-relay` on PATH (a throwaway bin dir whose `agent-relay`
runs this checkout's agent_relay.py): Claude Code with `claude mcp add relay --scope user --env AGENT_RELAY_URL=...
-- agent-relay mcp` (or `--transport http ... /api/mcp`), Codex with `[mcp_servers.relay]` in $CODEX_HOME/config.toml.
The CLIs' own environment points AGENT_RELAY_URL at the refusing port, so only the configured URL can reach the
relay. The scripted model calls the tools by the names the CLI offers them under: Claude Code lists
`mcp__relay__<tool>` as deferred tools, loaded with its ToolSearch tool (`select:mcp__relay__send`); Codex sends
one `namespace` tool `mcp__relay` holding the server's tools, called as function `send` in namespace `mcp__relay`.

Claude Code channels: Claude Code 2.1.332 never declares `claude/channel` in what it sends (its capabilities are
roots and elicitation); it registers a listener for `notifications/claude/channel` when the *server* declares
the capability, the connection is of a handshake revision (it asks for 2026-07-28 first, with server/discover,
and takes no channel events there), the session was started with `--dangerously-load-development-channels
server:relay` (a plain MCP server is on no approved channel list), the API is Anthropic's own, and its
`tengu_harbor` feature flag is on. That flag comes from Anthropic's feature service, which an offline run never
reaches: without it Claude Code logs "Channel notifications skipped: channels feature is not currently available".
The channel tests put `{"tengu_harbor": true}` in ~/.claude.json's cachedGrowthBookFeatures, where Claude Code
keeps the flags it last fetched. `agent-relay mcp --claude-channel` is the server side: handshake revisions only,
and every message pushed as a channel event.

Each test prints (never asserts) how long the relay took: from the model's request that produced the call to the
message landing, or from a peer's send to the answer landing.
"""
import json
import os
import re
import shlex
import shutil
import sys
import time

import pytest

from conftest import ROOT, need, wait_for
from realcli import (RELAY_PY, ClaudeHome, Tmux, cli_ready, codex_bin, describe_proc, exec_events,
                     offline_env, replies_to, run, toml_str)
from scripted_model import Text, ToolCall

INSTRUCTIONS = "Agent Relay connects you with other coding agents."
TOOLS = {"whoami", "send", "reply", "inbox", "read", "claim", "release", "agents", "thread", "tasks", "update_task",
         "search", "lease", "unlease"}
REPLY_TEXT = "pong over mcp"
# A peer's message in an inbox result, as the relay's line or as the structured JSON (which is all Claude Code
# hands its model of a successful result: the structuredContent, not the text blocks)
PEER_MESSAGE = re.compile(r'\[msg:(\d+)\] from peer: |\{"id": ?(\d+), ?"from": ?"peer"')


def peer_message_id(text):
    m = PEER_MESSAGE.search(text or "")
    return int(m.group(1) or m.group(2)) if m else None


# The tap between an MCP client and this checkout's server: copies each line both ways, logging it as
# {"at", "dir": "c2s"|"s2c", "msg"}, and hands signals on (Claude Code stops a server with SIGINT, then SIGTERM).
WIRE_TAP = r'''#!%(python)s
import json, signal, subprocess, sys, threading, time
log = open(%(log)r, "a", buffering=1)
lock = threading.Lock()
child = subprocess.Popen([sys.executable, %(relay)r] + sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
def note(direction, line):
    try:
        msg = json.loads(line)
    except ValueError:
        msg = line.decode("utf-8", "replace")
    with lock:
        log.write(json.dumps({"at": time.time(), "dir": direction, "msg": msg}) + "\n")
def upstream():
    for line in sys.stdin.buffer:
        note("c2s", line)
        try:
            child.stdin.write(line)
            child.stdin.flush()
        except OSError:
            break
    try:
        child.stdin.close()
    except OSError:
        pass
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: child.send_signal(signum))
threading.Thread(target=upstream, daemon=True).start()
for line in child.stdout:
    note("s2c", line)
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()
sys.exit(child.wait())
'''

DOCS_URL = "http://localhost:4850"


def docs_mcp_section():
    with open(os.path.join(ROOT, "docs", "agents.md"), encoding="utf-8") as f:
        return f.read().split("\n## MCP\n", 1)[1].split("\n## ", 1)[0]


def docs_block(after, lang):
    """The first ```lang block after the line `after` in docs/agents.md's MCP section."""
    section = docs_mcp_section()
    rest = section[section.index(after + "\n"):]
    return rest.split("```%s\n" % lang, 1)[1].split("```", 1)[0]


def docs_claude_channel_commands(relay):
    """docs/agents.md's two lines for a Claude Code channel: the `claude mcp add` and the `claude` start."""
    add, start = [shlex.split(line.replace(DOCS_URL, relay.url)) for line in
                  docs_block("(it asks for a confirmation at each start):", "sh").strip().splitlines()]
    assert add[:3] == ["claude", "mcp", "add"] and start[0] == "claude", (add, start)
    return add[1:], start[1:]


def docs_claude_command(relay, http=False):
    """The `claude mcp add ...` line docs/agents.md gives (stdio, or the Streamable HTTP one), for this relay."""
    if http:
        line = re.search(r"`(claude mcp add --transport http [^`]+)`", docs_mcp_section()).group(1)
    else:
        line = docs_block("Claude Code:", "sh").strip()
    words = shlex.split(line.replace(DOCS_URL, relay.url))
    assert words[:3] == ["claude", "mcp", "add"], words
    return words[1:]


def agent_relay_bin(bin_dir, wire_log=None):
    """`agent-relay` in bin_dir, running this checkout's agent_relay.py (through the wire tap when wire_log is set)."""
    os.makedirs(bin_dir, exist_ok=True)
    path = os.path.join(bin_dir, "agent-relay")
    with open(path, "w", encoding="utf-8") as f:
        if wire_log:
            f.write(WIRE_TAP % {"python": sys.executable, "log": wire_log, "relay": RELAY_PY})
        else:
            f.write("#!/bin/sh\nexec %s %s \"$@\"\n" % (shlex.quote(sys.executable), shlex.quote(RELAY_PY)))
    os.chmod(path, 0o755)
    return bin_dir


def wire(log):
    """What the tap logged: [(direction, message)]."""
    if not os.path.exists(log):
        return []
    with open(log, encoding="utf-8") as f:
        return [(e["dir"], e["msg"]) for e in map(json.loads, f)]


def mcp_agents(relay):
    r = relay.get("/api/agents")
    assert r.status == 200, r
    return [a for a in r.json["agents"] if a.get("rig") == "mcp"]


def card(relay, agent_id):
    r = relay.get("/api/agents/%s" % agent_id)
    return r.json if r.status == 200 else None


def peer_messages(relay):
    return relay.get("/api/messages", query={"agent": "peer", "limit": 100}).json["messages"]


def print_landing(label, asked_at, message, landed_at):
    """From the scripted model answering with the call to the message landing (createdAt; the test seeing it)."""
    print("\n[timing] %s: model's request -> message in the peer's inbox: %d ms by the message's createdAt "
          "(msg %s); %.0f ms until the test saw it, looking once the CLI had exited"
          % (label, message["createdAt"] - asked_at * 1000, message["id"], (landed_at - asked_at) * 1000))


def print_answer(label, sent, reply, started_at, landed_at):
    print("\n[timing] %s: peer's send -> answer in the peer's inbox: %d ms by the relay's clock (msg %s, answer %s); "
          "%.2f s by the test's clock" % (label, reply["createdAt"] - sent["createdAt"], sent["id"], reply["id"],
                                          landed_at - started_at))


# -- Claude Code -------------------------------------------------------------------------------------------------

CLAUDE = "@anthropic-ai/claude-code"


@pytest.fixture
def claude_ready():
    ok, why = cli_ready(CLAUDE)
    need(ok, why)


def claude_home(tmp_path, model, relay, proxy, wire_log=None, **extra_env):
    """A Claude Code home with `agent-relay` on PATH; the CLI's own AGENT_RELAY_URL is the refusing port."""
    home = ClaudeHome(tmp_path, model.url, proxy.url, proxy, **extra_env)
    home.bin_dir = agent_relay_bin(os.path.join(str(tmp_path), "bin"), wire_log)
    home.env["PATH"] = home.bin_dir + os.pathsep + home.env["PATH"]
    return home


def claude_mcp_add(home, relay, *server_args):
    """docs/agents.md's line: claude mcp add relay --scope user --env AGENT_RELAY_URL=... -- agent-relay mcp"""
    p = home.claude(*(docs_claude_command(relay) + list(server_args)))
    assert p.returncode == 0, describe_proc(p)
    with open(os.path.join(home.home, ".claude.json"), encoding="utf-8") as f:
        config = json.load(f)["mcpServers"]["relay"]
    assert config == {"type": "stdio", "command": "agent-relay", "args": ["mcp"] + list(server_args),
                      "env": {"AGENT_RELAY_URL": relay.url}}, config


def deferred_relay_tools(req):
    """The mcp__relay__* names a Claude Code request lists (as deferred tools, or loaded)."""
    text = req.all_text() + "\n" + "\n".join(req.tools)
    return set(re.findall(r"\bmcp__relay__(\w+)", text))


def claude_tool(req, tool, arguments, load=None):
    """Call mcp__relay__<tool>; when it is still deferred, first load it (and `load`, more tools) with ToolSearch:
    by name when the request lists the deferred tools, else by keywords (a turn that a channel event starts
    comes without that list, and without the server's instructions)."""
    name = "mcp__relay__" + tool
    if name in req.tools:
        return ToolCall(name, arguments)
    if "ToolSearch" not in req.tools:
        return None
    if tool in deferred_relay_tools(req):
        query = "select:" + ",".join([name] + ["mcp__relay__" + t for t in (load or ())])
    else:
        query = "+relay " + tool
    if any(json.loads(c).get("query") == query for c in req.tool_calls() if c and c.startswith("{")):
        return None  # searched already, and it is still not there
    return ToolCall("ToolSearch", {"query": query})


UNKNOWN_AGENT_HINT = "unknown_agent: no such agent: list them with the agents tool"


def test_claude_code_send_lands_in_a_peers_inbox(claude_ready, relay, proxy, model_factory, tmp_path):
    """claude -p with the relay added as docs/agents.md says: the model's mcp__relay__send lands in the peer's
    inbox, from the session's agent (rig mcp), which goes offline when the session ends. A send to a wrong name
    first: the model is told the relay's code and what to do."""
    relay.register("peer")
    state = {}

    def policy(req):
        if "asked_at" in state:
            return Text("sent")
        if not any("peer-typo" in c for c in req.tool_calls()):
            return claude_tool(req, "send", {"to": "peer-typo", "body": "hello?"}) or Text("ok")
        call = claude_tool(req, "send", {"to": "peer", "body": "hello from claude code over mcp"})
        if call is not None and call.name == "mcp__relay__send":
            state["asked_at"] = time.time()
        return call or Text("ok")

    model = model_factory(policy)
    home = claude_home(tmp_path, model, relay, proxy)
    claude_mcp_add(home, relay)
    p = home.claude("-p", "Tell the peer agent hello through the relay", "--allowedTools", "mcp__relay__send")
    assert p.returncode == 0, describe_proc(p)
    got = wait_for(lambda: [m for m in peer_messages(relay) if m["to"] == "peer"], timeout=10)
    landed = time.time()
    assert got, "nothing reached the peer\n%s\n%s" % (describe_proc(p), model.describe())
    message = got[0]
    assert message["body"] == "hello from claude code over mcp", message
    agents = mcp_agents(relay)
    assert [a["id"] for a in agents] == [message["from"]], agents
    assert re.match(r"^[a-z0-9._-]+-mcp-project-[0-9a-f]{8}$", message["from"]), message["from"]
    # every tool, under the name Claude Code gives it; the send's result came back as a success
    requests = [r.model_request for r in model.model_requests("anthropic")]
    assert deferred_relay_tools(requests[0]) == TOOLS, model.describe()
    assert "## relay\n" + INSTRUCTIONS in requests[0].all_text(), requests[0].system[-3000:]  # server instructions
    results = [t for r in requests for t in r.tool_results()]
    assert any(t.startswith(UNKNOWN_AGENT_HINT) for t in results), results  # a refusal: its text
    assert any('"id":%d' % message["id"] in t.replace(" ", "") for t in results), results  # a result: its JSON
    assert wait_for(lambda: card(relay, message["from"])["status"] == "offline", timeout=10), message["from"]
    print_landing("claude -p, mcp__relay__send (stdio)", state["asked_at"], message, landed)


def test_claude_code_reads_a_peers_message_with_inbox_and_answers_with_reply(claude_ready, relay, proxy,
                                                                             model_factory, tmp_path):
    """The session's agent is on the relay, listening, before the model does anything; a peer writes to it; the
    model reads the message with mcp__relay__inbox and answers it with mcp__relay__reply."""
    relay.register("peer")
    state = {}

    def policy(req):
        if "agents_at_first_request" not in state:
            agents = mcp_agents(relay)  # registered as Claude Code connected, not at a first tool call
            state["agents_at_first_request"] = agents
            if agents and agents[0]["listening"]:
                state["started"] = time.time()
                state["sent"] = relay.send("peer", agents[0]["id"], "ping from peer: what is the build status?")
        mid = peer_message_id("\n".join(req.tool_results()))
        if mid and not any(REPLY_TEXT in c for c in req.tool_calls()):
            return claude_tool(req, "reply", {"messageId": mid, "body": REPLY_TEXT}) or Text("?")
        if mid:
            return Text("answered")
        if "sent" not in state:
            return Text("this session is not on the relay")  # ends the run: the assertion below says why
        return claude_tool(req, "inbox", {"wait": 5}, load=["reply"]) or Text("ok")

    model = model_factory(policy)
    home = claude_home(tmp_path, model, relay, proxy)
    claude_mcp_add(home, relay)
    p = home.claude("-p", "Check your relay inbox and answer what is there",
                    "--allowedTools", "mcp__relay__inbox mcp__relay__reply")
    assert p.returncode == 0, describe_proc(p)
    assert state.get("sent"), "no listening MCP agent at the model's first request: %r\n%s" % (
        state.get("agents_at_first_request"), model.describe())
    sent = state["sent"]
    replies = wait_for(lambda: replies_to(relay, "peer", sent["id"]), timeout=10)
    landed = time.time()
    assert replies, "no answer reached the peer\n%s\n%s" % (describe_proc(p), model.describe())
    assert replies[0]["from"] == sent["to"] and replies[0]["body"] == REPLY_TEXT, replies
    # the model read it in the inbox result: Claude Code 2.1.332 shows the structuredContent, as JSON
    inbox_results = [t for r in model.model_requests("anthropic") for t in r.model_request.tool_results()
                     if peer_message_id(t) == sent["id"]]
    assert inbox_results and json.loads(inbox_results[0])["messages"][0]["body"] == sent["body"], model.describe()
    print_answer("claude -p, mcp__relay__inbox then mcp__relay__reply (stdio)", sent, replies[0], state["started"],
                 landed)


def test_claude_code_over_streamable_http(claude_ready, relay, proxy, model_factory, tmp_path):
    """`claude mcp add --transport http relay http://.../api/mcp --header "X-Agent-Relay-Agent: ..."`: the
    relay's own /api/mcp; the send lands from the agent the header names."""
    relay.register("peer")
    state = {}

    def policy(req):
        if "asked_at" in state:
            return Text("sent")
        call = claude_tool(req, "send", {"to": "peer", "body": "hello over streamable http"})
        if call is not None and call.name == "mcp__relay__send":
            state["asked_at"] = time.time()
        return call or Text("ok")

    model = model_factory(policy)
    home = claude_home(tmp_path, model, relay, proxy)
    add = home.claude(*docs_claude_command(relay, http=True))
    assert add.returncode == 0, describe_proc(add)
    p = home.claude("-p", "Tell the peer agent hello through the relay", "--allowedTools", "mcp__relay__send")
    assert p.returncode == 0, describe_proc(p)
    got = wait_for(lambda: [m for m in peer_messages(relay) if m["to"] == "peer"], timeout=10)
    landed = time.time()
    assert got, "nothing reached the peer\n%s\n%s" % (describe_proc(p), model.describe())
    assert got[0]["from"] == "laptop-reviewer" and got[0]["body"] == "hello over streamable http", got
    assert card(relay, "laptop-reviewer")["rig"] == "mcp"
    assert deferred_relay_tools(model.model_requests("anthropic")[0].model_request) == TOOLS, model.describe()
    print_landing("claude -p, mcp__relay__send (Streamable HTTP, /api/mcp)", state["asked_at"], got[0], landed)


# -- Codex -------------------------------------------------------------------------------------------------------

CODEX = "@openai/codex"


@pytest.fixture
def codex_ready():
    ok, why = cli_ready(CODEX)
    need(ok, why)


class CodexMcpHome:
    """A throwaway HOME and CODEX_HOME whose config.toml holds the scripted model's provider and docs/agents.md's
    [mcp_servers.relay] table (stdio, or with http the Streamable HTTP one; nothing else: no hooks), with
    `agent-relay` on PATH."""

    API_KEY_VAR = "SCRIPTED_MODEL_API_KEY"

    def __init__(self, tmp, model, relay, proxy, http=False):
        self.home = os.path.join(str(tmp), "home")
        self.project = os.path.join(str(tmp), "project")
        self.codex_home = os.path.join(self.home, ".codex")
        for d in (self.project, self.codex_home):
            os.makedirs(d)
        bin_dir = agent_relay_bin(os.path.join(str(tmp), "bin"))
        where = "token):" if http else "Codex, in `~/.codex/config.toml`:"
        self.mcp_toml = docs_block(where, "toml").replace(DOCS_URL, relay.url)
        assert self.mcp_toml.startswith("[mcp_servers.relay]\n"), self.mcp_toml
        with open(os.path.join(self.codex_home, "config.toml"), "w", encoding="utf-8") as f:
            f.write("\n".join([
                'model = "scripted-model"',
                'model_provider = "scripted"',
                "",
                "[model_providers.scripted]",
                'name = "Scripted model"',
                "base_url = %s" % toml_str(model.url + "/v1"),
                "env_key = %s" % toml_str(self.API_KEY_VAR),
                'wire_api = "responses"',
                "",
                "# docs/agents.md",
                self.mcp_toml,
            ]))
        self.env = offline_env(self.home, proxy, CODEX_HOME=self.codex_home, AGENT_RELAY_URL=proxy.url)
        self.env[self.API_KEY_VAR] = "sk-scripted"
        self.env["PATH"] = bin_dir + os.pathsep + self.env.get("PATH", "")

    def exec(self, prompt, timeout=60):
        return run([codex_bin(), "exec", "--skip-git-repo-check", "--json", prompt], self.env, self.project,
                   timeout=timeout)


def codex_tool(req, tool, arguments):
    """Codex offers the server's tools as the namespace tool mcp__relay: call `tool` in it."""
    if tool in req.namespaces.get("mcp__relay", {}):
        return ToolCall(tool, arguments, namespace="mcp__relay")
    return None


def mcp_items(p):
    """codex exec --json's completed mcp_tool_call items."""
    return [e["item"] for e in exec_events(p)
            if e.get("type") == "item.completed" and (e.get("item") or {}).get("type") == "mcp_tool_call"]


def test_codex_send_lands_in_a_peers_inbox(codex_ready, relay, proxy, model_factory, tmp_path):
    """codex exec with docs/agents.md's [mcp_servers.relay]: the model's call of `send` in the namespace tool
    mcp__relay lands in the peer's inbox, from the session's agent (rig mcp), offline once Codex exits."""
    relay.register("peer")
    state = {}

    def policy(req):
        if "asked_at" in state:
            return Text("sent")
        state.setdefault("namespace", {k: sorted(v) for k, v in req.namespaces.items()})
        state.setdefault("described", req.tools.get("mcp__relay", {}).get("description"))
        if not req.tool_calls():
            return codex_tool(req, "send", {"to": "peer-typo", "body": "hello?"}) or Text("ok")
        call = codex_tool(req, "send", {"to": "peer", "body": "hello from codex over mcp"})
        if call is not None:
            state["asked_at"] = time.time()
        return call or Text("ok")

    model = model_factory(policy)
    home = CodexMcpHome(tmp_path, model, relay, proxy)
    p = home.exec("Tell the peer agent hello through the relay")
    assert p.returncode == 0, describe_proc(p)
    got = wait_for(lambda: [m for m in peer_messages(relay) if m["to"] == "peer"], timeout=10)
    landed = time.time()
    assert got, "nothing reached the peer\n%s\n%s" % (describe_proc(p), model.describe())
    message = got[0]
    assert message["body"] == "hello from codex over mcp", message
    assert [a["id"] for a in mcp_agents(relay)] == [message["from"]]
    assert state["namespace"].get("mcp__relay") == sorted(TOOLS), state["namespace"]
    assert (state["described"] or "").startswith(INSTRUCTIONS), state["described"]  # the server's instructions
    items = mcp_items(p)
    assert [(i["server"], i["tool"], i["status"]) for i in items] == [("relay", "send", "failed"),
                                                                      ("relay", "send", "completed")], items
    # Codex shows its model the structuredContent of a result, a refusal's too: what to do is in it
    refusal = [t for r in model.model_requests("openai") for t in r.model_request.tool_results() if "unknown_agent" in t]
    assert refusal, model.describe()
    error = json.loads(refusal[0].split("Output:\n", 1)[1])["error"]
    assert error["code"] == "unknown_agent" and error["hint"].startswith("no such agent: list them"), error
    assert wait_for(lambda: card(relay, message["from"])["status"] == "offline", timeout=10), message["from"]
    print_landing("codex exec, send in namespace mcp__relay (stdio)", state["asked_at"], message, landed)


def test_codex_reads_a_peers_message_with_inbox_and_answers_with_reply(codex_ready, relay, proxy, model_factory,
                                                                       tmp_path):
    """The agent is on the relay, listening, when Codex first asks the model; a peer writes to it; the model reads
    the message with `inbox` and answers it with `reply`."""
    relay.register("peer")
    state = {}

    def policy(req):
        if "agents_at_first_request" not in state:
            agents = mcp_agents(relay)
            state["agents_at_first_request"] = agents
            if agents and agents[0]["listening"]:
                state["started"] = time.time()
                state["sent"] = relay.send("peer", agents[0]["id"], "ping from peer: what is the build status?")
        mid = peer_message_id("\n".join(req.tool_results()))
        if mid and not any(REPLY_TEXT in (c or "") for c in req.tool_calls()):
            return codex_tool(req, "reply", {"messageId": mid, "body": REPLY_TEXT}) or Text("?")
        if mid:
            return Text("answered")
        if "sent" not in state:
            return Text("this session is not on the relay")  # ends the run: the assertion below says why
        return codex_tool(req, "inbox", {"wait": 5}) or Text("ok")

    model = model_factory(policy)
    home = CodexMcpHome(tmp_path, model, relay, proxy)
    p = home.exec("Check your relay inbox and answer what is there")
    assert p.returncode == 0, describe_proc(p)
    assert state.get("sent"), "no listening MCP agent at the model's first request: %r\n%s" % (
        state.get("agents_at_first_request"), model.describe())
    sent = state["sent"]
    replies = wait_for(lambda: replies_to(relay, "peer", sent["id"]), timeout=10)
    landed = time.time()
    assert replies, "no answer reached the peer\n%s\n%s" % (describe_proc(p), model.describe())
    assert replies[0]["from"] == sent["to"] and replies[0]["body"] == REPLY_TEXT, replies
    items = mcp_items(p)
    assert [(i["tool"], i["status"]) for i in items] == [("inbox", "completed"), ("reply", "completed")], items
    print_answer("codex exec, inbox then reply in namespace mcp__relay (stdio)", sent, replies[0], state["started"],
                 landed)


# -- Claude Code channels ------------------------------------------------------------------------------------------

CHANNEL_FLAGS = ("--dangerously-load-development-channels", "server:relay")
DEV_CHANNEL_DIALOG = "I am using this for local development"
# The feature flag Claude Code 2.1.332 gates channels on, as it keeps it after fetching it from Anthropic
FEATURE_ON = {"cachedGrowthBookFeatures": {"tengu_harbor": True}}
CHANNEL_EVENT = re.compile(r'<channel source="relay"([^>]*)>\n(.*?)\n</channel>', re.S)


def debug_lines(home, needle):
    """Lines of Claude Code's --debug logs (~/.claude/debug) that hold needle."""
    out = []
    folder = os.path.join(home.home, ".claude", "debug")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".txt"):
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                out.extend(line.rstrip("\n") for line in f if needle in line)
    return out


def start_interactive(home, tmp_path, *args, confirm=True):
    """Claude Code in tmux, past the development-channels confirmation (asked at every start with the flag, once
    the channels feature is on; without it there is none)."""
    command = " ".join(shlex.quote(w) for w in (home.bin, "--debug") + tuple(args))
    term = Tmux(os.path.join(str(tmp_path), "tmux.sock"), command, home.env, home.project)
    if confirm:
        shown = wait_for(lambda: DEV_CHANNEL_DIALOG in term.screen(), timeout=30)
        if not shown:
            screen = term.screen()
            term.close()
            raise AssertionError("no development-channels confirmation:\n" + screen)
        term.send_keys("Enter")  # the first choice: local development
    return term


def test_claude_code_channel_reaches_an_idle_interactive_session(claude_ready, relay, proxy, model_factory, tmp_path):
    """`claude mcp add ... -- agent-relay mcp --claude-channel`, Claude Code started with
    --dangerously-load-development-channels server:relay (and its channels flag on): a peer's message reaches the
    idle session as a <channel source="relay"> event with no prompt typed, and the model answers it with
    mcp__relay__reply."""
    need(shutil.which("tmux"), "tmux is not installed (apt-get install tmux)")
    relay.register("peer")

    def policy(req):
        events = [m for m in CHANNEL_EVENT.finditer(req.all_text())]
        mid = peer_message_id(events[-1].group(2)) if events else None
        if mid and not any(REPLY_TEXT in c for c in req.tool_calls()):
            return claude_tool(req, "reply", {"messageId": mid, "body": REPLY_TEXT}) or Text("?")
        return Text("ok")

    model = model_factory(policy)
    home = claude_home(tmp_path, model, relay, proxy)
    home.accept_first_run_dialogs(**FEATURE_ON)
    add, start = docs_claude_channel_commands(relay)
    assert add == docs_claude_command(relay) + ["--claude-channel"] and start == list(CHANNEL_FLAGS), (add, start)
    p = home.claude(*add)
    assert p.returncode == 0, describe_proc(p)
    term = start_interactive(home, tmp_path, "--allowedTools", "mcp__relay__reply", *start)
    try:
        agents = wait_for(lambda: [a for a in mcp_agents(relay) if a["listening"]], timeout=30)
        assert agents, "no listening MCP agent\n%s\n%s" % (term.screen(), "\n".join(debug_lines(home, "relay")))
        aid = agents[0]["id"]
        assert wait_for(lambda: debug_lines(home, 'MCP server "relay": Channel notifications registered'), timeout=10), \
            "\n".join(debug_lines(home, 'MCP server "relay"'))
        time.sleep(1.0)  # room for a turn nobody asked for (asserted just below)
        assert model.model_requests("anthropic") == [], model.describe()

        started = time.time()
        sent = relay.send("peer", aid, "ping through the channel: are you there?")
        replies = wait_for(lambda: replies_to(relay, "peer", sent["id"]), timeout=30)
        landed = time.time()
        assert replies, "no answer reached the peer\n%s\n%s" % (term.screen(), model.describe())
        assert replies[0]["from"] == aid and replies[0]["body"] == REPLY_TEXT, replies
        first = model.model_requests("anthropic")[0].model_request
        event = CHANNEL_EVENT.search(first.all_text())
        assert event, first.all_text()[-3000:]
        assert event.group(2) == "[msg:%d] from peer: ping through the channel: are you there?" % sent["id"], event.group(0)
        attributes = dict(re.findall(r'(\w+)="([^"]*)"', event.group(1)))
        assert attributes == {"message_id": str(sent["id"]), "from": "peer", "to": aid, "kind": "chat"}, attributes
        print_answer("interactive claude, channel event to the idle session, mcp__relay__reply", sent, replies[0],
                     started, landed)

        term.send_keys("/exit", "Enter")
        assert wait_for(term.pane_dead, timeout=20), term.screen()
        assert wait_for(lambda: card(relay, aid)["status"] == "offline", timeout=10), card(relay, aid)
    finally:
        term.close()


def test_claude_code_declares_no_channel_capability_and_takes_channel_events_only_after_initialize(
        claude_ready, relay, proxy, model_factory, tmp_path):
    """What Claude Code 2.1.332 sends the relay's server (seen through a tap) and what it decides (its --debug log),
    interactive with --dangerously-load-development-channels server:relay. With docs/agents.md's line it probes
    server/discover at 2026-07-28, the server offers it, and Claude Code skips the channel: "connection negotiated
    a modern protocol revision with no unsolicited notification path". With --claude-channel the probe is refused
    and it initializes (2025-11-25). Its capabilities are roots and elicitation either way: it never declares
    claude/channel. And without the channels feature flag it skips the channel before anything else: "channels
    feature is not currently available"."""
    need(shutil.which("tmux"), "tmux is not installed (apt-get install tmux)")
    model = model_factory(lambda req: Text("ok"))

    def declares_no_channel(capabilities):
        assert "experimental" not in capabilities and "claude/channel" not in json.dumps(capabilities), capabilities
        assert capabilities["roots"] == {"listChanged": True} and "elicitation" in capabilities, capabilities

    def session(name, server_args, feature):
        folder = os.path.join(str(tmp_path), name)
        os.makedirs(folder)
        log = os.path.join(folder, "wire.jsonl")
        home = claude_home(folder, model, relay, proxy, wire_log=log)
        home.accept_first_run_dialogs(**(FEATURE_ON if feature else {}))
        claude_mcp_add(home, relay, *server_args)
        term = start_interactive(home, folder, *CHANNEL_FLAGS, confirm=feature)
        try:
            said = wait_for(lambda: debug_lines(home, 'MCP server "relay": Channel notifications'), timeout=30)
            assert said, "%s\n%s" % (term.screen(), "\n".join(debug_lines(home, 'MCP server "relay"')))
            term.send_keys("/exit", "Enter")
            assert wait_for(term.pane_dead, timeout=20), term.screen()
        finally:
            term.close()
        return said[0].split('MCP server "relay": ', 1)[1], wire(log)

    said, sent = session("modern", (), feature=True)
    assert said == ("Channel notifications skipped: connection negotiated a modern protocol revision with no "
                    "unsolicited notification path"), said
    first = sent[0][1]
    assert sent[0][0] == "c2s" and first["method"] == "server/discover", sent[:2]
    assert first["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] == "2026-07-28"
    declares_no_channel(first["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"])
    assert first["params"]["_meta"]["io.modelcontextprotocol/clientInfo"]["name"] == "claude-code"
    assert "2026-07-28" in sent[1][1]["result"]["supportedVersions"], sent[1]
    assert "claude/channel" in sent[1][1]["result"]["capabilities"]["experimental"]
    assert "initialize" not in [m.get("method") for d, m in sent if d == "c2s"]

    said, sent = session("handshake", ("--claude-channel",), feature=False)
    assert said == "Channel notifications skipped: channels feature is not currently available", said
    methods = [m.get("method") for d, m in sent if d == "c2s"]
    assert methods[:3] == ["server/discover", "initialize", "notifications/initialized"], methods
    assert sent[1][1]["error"]["code"] == -32601, sent[1]
    init = sent[2][1]["params"]
    assert init["protocolVersion"] == "2025-11-25", init
    declares_no_channel(init["capabilities"])
    assert sent[3][1]["result"]["capabilities"]["experimental"] == {"claude/channel": {}}, sent[3]


def test_codex_over_streamable_http(codex_ready, relay, proxy, model_factory, tmp_path):
    """docs/agents.md's [mcp_servers.relay] with url and http_headers: Codex talks to the relay's own /api/mcp, and
    the send lands from the agent the X-Agent-Relay-Agent header names."""
    relay.register("peer")
    state = {}

    def policy(req):
        if "asked_at" in state:
            return Text("sent")
        call = codex_tool(req, "send", {"to": "peer", "body": "hello from codex over streamable http"})
        if call is not None:
            state["asked_at"] = time.time()
        return call or Text("ok")

    model = model_factory(policy)
    home = CodexMcpHome(tmp_path, model, relay, proxy, http=True)
    assert "url = " in home.mcp_toml and "command" not in home.mcp_toml, home.mcp_toml
    p = home.exec("Tell the peer agent hello through the relay")
    assert p.returncode == 0, describe_proc(p)
    got = wait_for(lambda: [m for m in peer_messages(relay) if m["to"] == "peer"], timeout=10)
    landed = time.time()
    assert got, "nothing reached the peer\n%s\n%s" % (describe_proc(p), model.describe())
    assert got[0]["from"] == "laptop-reviewer" and got[0]["body"] == "hello from codex over streamable http", got
    assert card(relay, "laptop-reviewer")["rig"] == "mcp"
    assert [(i["server"], i["tool"], i["status"]) for i in mcp_items(p)] == [("relay", "send", "completed")]
    print_landing("codex exec, send in namespace mcp__relay (Streamable HTTP, /api/mcp)", state["asked_at"], got[0],
                  landed)
