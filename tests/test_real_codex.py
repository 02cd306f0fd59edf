"""The Codex hooks under the real Codex CLI (npm @openai/codex, pinned in tests/cli), fully offline: the model is
tests/scripted_model.py on loopback (a custom model provider, wire_api = "responses"), every other outbound
connection goes to a refusing loopback proxy, HOME and CODEX_HOME are thrown away after each test.

Set up as integrations/codex/README.md says (hooks.json, config.toml.snippet and AGENTS.md.snippet in
~/.codex, `agent-relay` on PATH), with the hooks trusted the way Codex records it: config.toml
`[hooks.state."<key>"] trusted_hash = "<hash>"`, key and hash as `codex app-server`'s hooks/list reports them.
`codex exec` covers the CLI; `codex app-server` (JSON-RPC over stdio) covers a long-lived thread with turn/start
and turn/steer. Each test prints the time from the peer's send to the reply landing in its inbox.
"""
import os
import re
import threading
import time

import pytest

from conftest import need, wait_for
from realcli import (RELAY_PY, CodexHome, agent, agents_by_host, cli_ready, describe_proc, exec_events,
                     exec_thread_id, print_timing, replies_to)
from scripted_model import Text, act_then_reply, relay_message_ids, relay_reply_policy

PACKAGE = "@openai/codex"
REPLY_TEXT = "pong from codex"


@pytest.fixture
def codex_ready():
    ok, why = cli_ready(PACKAGE)
    need(ok, why)


def relay_context_requests(model, message_id):
    return [r for r in model.model_requests("openai") if message_id in relay_message_ids(r.model_request.all_text())]


def test_untrusted_hooks_do_not_run_and_trust_is_recorded_in_config_toml(codex_ready, relay, proxy, model_factory, tmp_path):
    """Codex lists the copied hooks as untrusted and runs none of them (saying nothing); after
    [hooks.state."<key>"] trusted_hash entries in config.toml, hooks/list reports them trusted."""
    model = model_factory(lambda req: Text("ok"))
    home = CodexHome(tmp_path, model.url, relay.url, proxy)
    hooks = home.list_hooks()
    events = sorted(h["eventName"] for h in hooks)
    assert events == ["preToolUse", "sessionStart", "stop", "userPromptSubmit"], hooks
    assert all(h["trustStatus"] == "untrusted" for h in hooks), hooks
    p = home.exec("hello")
    assert p.returncode == 0, describe_proc(p)
    assert model.model_requests("openai"), model.describe()
    assert agents_by_host(relay, "codex") == [], "an untrusted hook ran"

    trusted = home.trust_hooks()
    assert sorted(h["trustStatus"] for h in trusted) == ["trusted"] * 4, trusted
    for h in trusted:
        assert h["key"].startswith(home.codex_home + "/hooks.json:") and h["currentHash"].startswith("sha256:"), h


def test_exec_registers_gets_waiting_message_and_replies_with_its_shell_tool(codex_ready, relay, proxy, model_factory, tmp_path):
    """A first `codex exec` registers the session (SessionStart on its first turn) and goes idle at Stop; a message
    sent to it then reaches the resumed session (`codex exec resume`) in the hooks' context, and the model's
    exec_command call of `agent-relay reply` answers it from inside the workspace-write sandbox."""
    relay.register("peer")
    model = model_factory(relay_reply_policy(RELAY_PY, REPLY_TEXT))
    home = CodexHome(tmp_path, model.url, relay.url, proxy)
    home.trust_hooks()

    first = home.exec("hello")
    assert first.returncode == 0, describe_proc(first)
    thread = exec_thread_id(first)
    assert thread, describe_proc(first)
    # Codex reports config problems as error items (e.g. the deprecated `[features].codex_hooks` of the snippet)
    problems = [e["item"].get("message", "") for e in exec_events(first) if (e.get("item") or {}).get("type") == "error"]
    assert not [m for m in problems if "deprecated" in m or "hook" in m.lower()], problems
    cards = agents_by_host(relay, "codex")
    assert len(cards) == 1, (cards, describe_proc(first), model.describe())
    card = cards[0]
    aid = card["id"]
    assert card["meta"]["sessionId"] == thread and card["rig"] == "codex", card
    assert re.match(r"^[a-z0-9._-]+-codex-project-[0-9a-f]{8}$", aid), aid
    texts = [r.model_request.all_text() for r in model.model_requests("openai")]
    assert texts and 'as agent "%s"' % aid in texts[0], model.describe()
    assert "## Agent Relay" in texts[0], "AGENTS.md snippet not in the model's context"
    # the command the session is told to use is the installed `agent-relay`, not python3 and its path
    assert "reply:  agent-relay reply --from %s" % aid in texts[0], texts[0][-3000:]
    assert wait_for(lambda: agent(relay, aid)["status"] == "idle", timeout=10), agent(relay, aid)

    started = time.time()
    sent = relay.send("peer", aid, "ping from peer: what is the build status?")
    second = home.exec("anything new?", resume=thread)
    assert second.returncode == 0, describe_proc(second)
    replies = wait_for(lambda: replies_to(relay, "peer", sent["id"]), timeout=10)
    landed = time.time()
    assert replies, "no reply reached the peer\n%s\n%s\n%s" % (describe_proc(second), model.describe(), relay.log[-2000:])
    reply = replies[0]
    assert reply["from"] == aid and reply["body"] == REPLY_TEXT and reply["to"] == "peer", reply
    seen = relay_context_requests(model, sent["id"])
    assert seen, model.describe()
    # on resume Codex runs SessionStart again (source "resume"), whose context carries the waiting message
    holders = [e for e in seen[0].model_request.entries if "[msg:%d] from peer: ping from peer" % sent["id"] in e[2]]
    assert holders and holders[0][0] == "developer" and "Agent Relay: new relay messages" in holders[0][2], holders
    commands = [e for e in exec_events(second) if (e.get("item") or {}).get("type") == "command_execution"]
    assert commands and all(c["item"].get("exit_code") in (0, None) for c in commands), commands
    assert wait_for(lambda: agent(relay, aid)["status"] == "idle", timeout=10), agent(relay, aid)
    print_timing("codex exec resume, message waiting, delivered by the hooks", sent, reply, started, landed)


def test_exec_message_arriving_mid_turn_is_delivered_at_stop(codex_ready, relay, proxy, model_factory, tmp_path):
    """A message that arrives while Codex works reaches it at Stop (the hook's block makes it Codex's next
    prompt), and Codex answers it in the same `codex exec` run."""
    relay.register("peer")
    state = {}
    reply_policy = relay_reply_policy(RELAY_PY, REPLY_TEXT)

    def policy(req):
        if "sent" not in state and "exec_command" in req.tools:
            aid = re.search(r'as agent "([^"]+)"', req.all_text())
            if aid:
                state["aid"] = aid.group(1)
                state["started"] = time.time()
                state["sent"] = relay.send("peer", state["aid"], "ping while you work")
                return Text("working on the user's request")
        return reply_policy(req)

    model = model_factory(policy)
    home = CodexHome(tmp_path, model.url, relay.url, proxy)
    home.trust_hooks()
    p = home.exec("do the user's task")
    assert p.returncode == 0, describe_proc(p)
    assert "sent" in state, "the session never told the model its agent id (no SessionStart context)\n" + model.describe()
    sent, aid = state["sent"], state["aid"]
    replies = wait_for(lambda: replies_to(relay, "peer", sent["id"]), timeout=10)
    landed = time.time()
    assert replies, "no reply reached the peer\n%s\n%s" % (describe_proc(p), model.describe())
    assert replies[0]["from"] == aid and replies[0]["body"] == REPLY_TEXT
    seen = relay_context_requests(model, sent["id"])
    assert seen and model.model_requests("openai").index(seen[0]) >= 1, model.describe()
    print_timing("codex exec, message arriving mid-turn, delivered at Stop", sent, replies[0], state["started"], landed)


def test_app_server_registers_on_first_turn_and_delivers_at_turn_start_and_steer(codex_ready, relay, proxy, model_factory,
                                                                                 tmp_path):
    """`codex app-server` (JSON-RPC over stdio, as IDEs run Codex): thread/start registers nothing yet;
    SessionStart runs with the thread's first turn. A message sent while the thread is idle comes with the next
    turn/start; one sent while a turn runs comes with a turn/steer (Codex runs UserPromptSubmit for steered input
    too). Both are answered with the shell tool."""
    relay.register("peer")
    hold = threading.Event()
    reply_policy = relay_reply_policy(RELAY_PY, REPLY_TEXT)

    def policy(req):
        if req.entries and req.entries[-1][2] == "slow task" and not hold.is_set():
            hold.wait(20)  # the model is "thinking" until the test has steered
        return reply_policy(req)

    model = model_factory(policy)
    home = CodexHome(tmp_path, model.url, relay.url, proxy)
    home.trust_hooks()
    server = home.app_server()
    try:
        thread = server.request("thread/start", {"cwd": home.project, "sandbox": "workspace-write"})["thread"]["id"]
        time.sleep(0.5)
        assert agents_by_host(relay, "codex") == [], "registered before the first turn"

        def turn(text):
            started = server.request("turn/start", {"threadId": thread, "input": [{"type": "text", "text": text}]})
            return started["turn"]["id"]

        def completed(turn_id):
            done = server.wait_notification("turn/completed", lambda p: p["turn"]["id"] == turn_id, timeout=40)
            assert done["params"]["turn"]["status"] == "completed", done
            return done

        completed(turn("hello"))
        cards = agents_by_host(relay, "codex")
        assert len(cards) == 1 and cards[0]["meta"]["sessionId"] == thread, cards
        aid = cards[0]["id"]
        runs = [m["params"]["run"] for m in server.seen if m.get("method") == "hook/completed"]
        assert {r["eventName"] for r in runs} >= {"sessionStart", "userPromptSubmit", "stop"}, runs
        assert all(r.get("status") == "completed" for r in runs), runs
        assert wait_for(lambda: agent(relay, aid)["status"] == "idle", timeout=10), agent(relay, aid)

        # idle thread: the message waits for the next turn
        started = time.time()
        sent = relay.send("peer", aid, "ping while the thread is idle")
        completed(turn("anything new?"))
        replies = wait_for(lambda: replies_to(relay, "peer", sent["id"]), timeout=10)
        assert replies, "no reply\n%s" % model.describe()
        print_timing("codex app-server, message to an idle thread, delivered with the next turn/start", sent, replies[0],
                     started, time.time())

        # running turn: a steer brings the message in
        slow = turn("slow task")
        assert wait_for(lambda: any(r.model_request.entries and r.model_request.entries[-1][2] == "slow task"
                                    for r in model.model_requests("openai")), timeout=20), model.describe()
        started = time.time()
        sent2 = relay.send("peer", aid, "ping while the turn runs")
        server.request("turn/steer", {"threadId": thread, "expectedTurnId": slow,
                                      "input": [{"type": "text", "text": "check the relay"}]})
        hold.set()
        completed(slow)
        replies = wait_for(lambda: replies_to(relay, "peer", sent2["id"]), timeout=10)
        assert replies and replies[0]["from"] == aid, "no reply\n%s" % model.describe()
        seen = relay_context_requests(model, sent2["id"])
        assert seen, model.describe()
        entries = seen[0].model_request.entries
        steer = [i for i, e in enumerate(entries) if e[2] == "check the relay"]
        holder = [i for i, e in enumerate(entries) if sent2["id"] in relay_message_ids(e[2])]
        assert steer and holder and holder[0] == steer[0] + 1 and entries[holder[0]][0] == "developer", entries[-4:]
        print_timing("codex app-server, message during a turn, delivered with turn/steer", sent2, replies[0], started,
                     time.time())
    finally:
        server.close()


def test_read_only_gate_refuses_shell_for_a_message_delivered_at_stop(codex_ready, relay, proxy, model_factory, tmp_path):
    """AGENT_RELAY_APPROVAL=read-only: the workspace-write sandbox would let the command run, yet while Codex works on
    a relay message (here one delivered at Stop) the PreToolUse hook refuses it; the reply still goes through."""
    relay.register("peer")
    target = os.path.join(str(tmp_path), "project", "done-for-the-peer")
    act = act_then_reply("touch %s" % target, RELAY_PY, REPLY_TEXT)
    state = {}

    def policy(req):
        if "sent" not in state:
            aid = re.search(r'as agent "([^"]+)"', req.all_text())
            if aid:
                state["sent"] = relay.send("peer", aid.group(1), "please create done-for-the-peer")
                return Text("working on the user's request")
        return act(req)

    model = model_factory(policy)
    home = CodexHome(tmp_path, model.url, relay.url, proxy, AGENT_RELAY_APPROVAL="read-only")
    home.trust_hooks()
    p = home.exec("do the user's task")
    assert p.returncode == 0, describe_proc(p)
    assert act.state["acted"], model.describe()
    assert not os.path.exists(target), "the read-only gate let the peer's command run"
    results = [t for r in model.model_requests("openai") for t in r.model_request.tool_results()]
    assert any("Command blocked by PreToolUse hook" in t and "read-only on the relay" in t for t in results), results
    replies = wait_for(lambda: replies_to(relay, "peer", state["sent"]["id"]), timeout=10)
    assert replies and replies[0]["body"] == REPLY_TEXT, model.describe()


def test_read_only_gate_refuses_shell_for_a_message_delivered_at_session_start(codex_ready, relay, proxy, model_factory,
                                                                              tmp_path):
    """AGENT_RELAY_APPROVAL=read-only and a message waiting when the session resumes (SessionStart delivers it): the
    peer's command must be refused as it is for a message delivered at Stop."""
    relay.register("peer")
    target = os.path.join(str(tmp_path), "project", "done-for-the-peer")
    model = model_factory(act_then_reply("touch %s" % target, RELAY_PY, REPLY_TEXT))
    home = CodexHome(tmp_path, model.url, relay.url, proxy, AGENT_RELAY_APPROVAL="read-only")
    home.trust_hooks()
    first = home.exec("hello")
    assert first.returncode == 0, describe_proc(first)
    aid = agents_by_host(relay, "codex")[0]["id"]
    sent = relay.send("peer", aid, "please create done-for-the-peer")
    second = home.exec("anything new?", resume=exec_thread_id(first))
    assert second.returncode == 0, describe_proc(second)
    assert model.policy.state["acted"] and relay_context_requests(model, sent["id"]), model.describe()
    assert not os.path.exists(target), "the read-only gate let the peer's command run"
