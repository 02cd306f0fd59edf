"""The MCP server: `agent-relay mcp` (stdio) and /api/mcp (Streamable HTTP), driven by the official MCP Python SDK.

Each test starts a real relay; stdio sessions are `python3 agent_relay.py mcp` processes that the SDK spawns, HTTP
sessions talk to the relay's /api/mcp. Raw bytes (stdin lines, POST bodies) check the JSON-RPC error answers.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import RELAY_PY, ROOT, wait_for

mcp = pytest.importorskip("mcp", reason="the MCP Python SDK (pip install -r tests/requirements.txt)")
import anyio  # noqa: E402  (installed with mcp)
import httpx2  # noqa: E402
from mcp import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

TOOLS = {"whoami", "send", "reply", "inbox", "read", "claim", "release", "agents", "thread", "tasks", "update_task",
         "search", "lease", "unlease"}


def stdio_env(relay, agent_id, **more):
    env = {"AGENT_RELAY_URL": relay.url, "AGENT_RELAY_STATE_DIR": os.path.join(relay.tmpdir, "state"),
           "PYTHONUNBUFFERED": "1"}
    if agent_id:
        env["AGENT_RELAY_AGENT_ID"] = agent_id
    env.update(more)
    return env


def stdio(relay, agent_id, **env):
    return stdio_client(StdioServerParameters(command=sys.executable, args=[RELAY_PY, "mcp"], cwd=ROOT,
                                              env=stdio_env(relay, agent_id, **env)))


def http(relay, agent_id, terminate=True):
    headers = {"X-Agent-Relay-Agent": agent_id} if agent_id else {}
    client = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=120.0))
    return client, streamable_http_client(relay.url + "/api/mcp", http_client=client, terminate_on_close=terminate)


class Session:
    """One SDK session over either transport: `async with Session(relay, "stdio", "a") as s:` -> s.call(...)."""

    def __init__(self, relay, transport, agent_id, on_message=None, terminate=True, **env):
        self.relay, self.transport, self.agent_id = relay, transport, agent_id
        self.on_message, self.terminate, self.env = on_message, terminate, env
        self.notes = []

    async def __aenter__(self):
        self.stack = contextlib_stack = __import__("contextlib").AsyncExitStack()
        await contextlib_stack.__aenter__()
        if self.transport == "stdio":
            read, write = await contextlib_stack.enter_async_context(stdio(self.relay, self.agent_id, **self.env))
        else:
            client, transport = http(self.relay, self.agent_id, self.terminate)
            await contextlib_stack.enter_async_context(client)
            read, write = await contextlib_stack.enter_async_context(transport)

        async def handler(message):
            self.notes.append(message)

        self.session = await contextlib_stack.enter_async_context(ClientSession(read, write, message_handler=handler))
        self.init = await self.session.initialize()
        return self

    async def __aexit__(self, *exc):
        return await self.stack.__aexit__(*exc)

    async def call(self, name, **args):
        result = await self.session.call_tool(name, args)
        return result, "\n".join(c.text for c in result.content if getattr(c, "text", None))


def run(fn):
    return anyio.run(fn)


def card(relay, agent_id):
    r = relay.get("/api/agents/" + agent_id)
    return r.json if r.status == 200 else None


# -- the protocol -------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_initialize_and_tool_schemas(relay, transport):
    async def go():
        async with Session(relay, transport, "schema-" + transport) as s:
            assert s.init.protocol_version == "2025-11-25"  # what the SDK's initialize asks for
            assert s.init.server_info.name == "agent-relay"
            assert s.init.capabilities.tools is not None and s.init.capabilities.resources.subscribe is True
            tools = {t.name: t for t in (await s.session.list_tools()).tools}
            assert set(tools) == TOOLS
            for t in tools.values():
                schema = t.input_schema
                assert schema["type"] == "object" and schema["additionalProperties"] is False, t.name
                assert t.description and len(t.description) > 40, t.name
                for name, prop in schema["properties"].items():
                    assert prop.get("type") and prop.get("description"), (t.name, name)
                assert t.output_schema and t.output_schema["type"] == "object", t.name
            assert tools["send"].input_schema["required"] == ["to", "body"]
            wait = tools["inbox"].input_schema["properties"]["wait"]
            assert (wait["type"], wait["minimum"], wait["maximum"]) == ("integer", 0, 60)
            assert tools["update_task"].input_schema["properties"]["status"]["enum"] == [
                "open", "claimed", "blocked", "done", "failed", "canceled"]
            # what a client decides approvals by (Codex asks before, or under `codex exec` refuses, a tool that may be
            # destructive, the default): only whoami (approval mode, tags) and update_task overwrite anything
            hints = {name: (t.annotations.read_only_hint, t.annotations.destructive_hint, t.annotations.open_world_hint)
                     for name, t in tools.items()}
            assert hints == {"agents": (True, None, False), "thread": (True, None, False), "tasks": (True, None, False),
                             "send": (False, False, False), "reply": (False, False, False), "inbox": (False, False, False),
                             "read": (False, False, False), "claim": (False, False, False), "release": (False, False, False),
                             "whoami": (False, None, False), "update_task": (False, None, False),
                             "lease": (False, False, False), "unlease": (False, None, False),
                             "search": (True, None, False)}, hints
            me, text = await s.call("whoami")
            assert not me.is_error and me.structured_content["id"] == "schema-" + transport
            assert text.startswith("you are agent schema-" + transport)
            resources = (await s.session.list_resources()).resources
            assert [str(r.uri) for r in resources] == ["relay://inbox"]
            c = card(relay, "schema-" + transport)
            assert c["rig"] == "mcp" and c["status"] == "online"
            if transport == "stdio":
                assert c["listening"] is True  # the server holds the agent's narrowed stream
            bad, text = await s.call("inbox", wait=61)
            assert bad.is_error and text.startswith("invalid_field: ") and "wait" in text

    run(go)


def test_tool_table_in_the_docs_matches_the_server(relay):
    """docs/api.md's MCP tool table lists exactly the tools the server offers, with their arguments."""
    with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as f:
        doc = f.read()
    section = doc.split("## MCP", 1)[1]
    rows = re.findall(r"^\| `(\w+)`(?: / `(\w+)`)? \| ([^|]*) \|", section, re.M)
    documented = {}
    for first, second, args in rows:
        for tool in filter(None, (first, second)):
            documented[tool] = {a.rstrip("?") for a in re.findall(r"`([\w?]+)`", args)}

    async def go():
        async with Session(relay, "http", "docs-check") as s:
            return {t.name: set(t.input_schema["properties"]) for t in (await s.session.list_tools()).tools}

    served = run(go)
    assert set(documented) == set(served), (sorted(documented), sorted(served))
    for tool, args in served.items():
        assert documented[tool] == args, (tool, documented[tool], args)


def test_send_on_stdio_received_on_http_with_inbox_wait(relay):
    async def go():
        async with Session(relay, "stdio", "mcp-sender") as a, Session(relay, "http", "mcp-receiver") as b:
            got = {}

            async def receive():
                got["result"] = await b.call("inbox", wait=30)

            async with anyio.create_task_group() as tg:
                tg.start_soon(receive)
                await anyio.to_thread.run_sync(lambda: wait_for(lambda: card(relay, "mcp-receiver")["listening"]))
                sent, text = await a.call("send", to="mcp-receiver", body="migration is clean")
                assert not sent.is_error and text.startswith("sent [msg:")
            result, text = got["result"]
            mid = sent.structured_content["message"]["id"]
            assert [m["id"] for m in result.structured_content["messages"]] == [mid]
            assert text == "[msg:%d] from mcp-sender: migration is clean" % mid
            # the same kept cursor as the HTTP inbox: nothing comes twice
            again, text = await b.call("inbox")
            assert again.structured_content["messages"] == [] and text == "no new messages"
            assert relay.inbox("mcp-receiver")["messages"] == []
            answer, _ = await b.call("reply", messageId=mid, body="thanks")
            assert answer.structured_content["message"]["to"] == "mcp-sender"
            assert answer.structured_content["message"]["replyTo"] == mid

    run(go)


@pytest.mark.filterwarnings("ignore:resources/subscribe is removed")  # the SDK's note about 2026-07-28; this is 2025-11-25
@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_push_announces_a_message_to_a_subscribed_client(relay, transport):
    async def go():
        async with Session(relay, transport, "pushed-" + transport) as s:
            await s.session.subscribe_resource("relay://inbox")
            if transport == "http":  # the SDK opens the session's GET stream after initialize; it is up once listening
                await anyio.to_thread.run_sync(lambda: wait_for(lambda: card(relay, "pushed-http")["listening"]))
            relay.register("pusher")
            relay.send("pusher", "pushed-" + transport, "are you there?")
            with anyio.fail_after(20):
                while not any(getattr(getattr(n, "params", None), "uri", None) for n in s.notes):
                    await anyio.sleep(0.05)
            note = [n for n in s.notes if getattr(getattr(n, "params", None), "uri", None)][0]
            assert str(note.params.uri) == "relay://inbox"
            contents = (await s.session.read_resource("relay://inbox")).contents
            assert "from pusher: are you there?" in contents[0].text

    run(go)


def test_claim_race_between_an_mcp_agent_and_an_http_agent(relay):
    relay.register("boss")
    relay.register("http-worker", capabilities=["build"])

    async def go():
        async with Session(relay, "http", "mcp-worker") as s:
            await s.call("whoami", capabilities=["build"])
            outcomes = []
            for i in range(6):
                mid = relay.send("boss", "cap:build", "job %d" % i, claimable=True)["id"]
                http_result = {}
                start = threading.Event()

                def http_claim():
                    start.wait()
                    http_result["r"] = relay.post("/api/messages/%d/claim" % mid, {"agentId": "http-worker"})

                t = threading.Thread(target=http_claim)
                t.start()
                start.set()
                mine, text = await s.call("claim", messageId=mid)
                await anyio.to_thread.run_sync(t.join)
                r = http_result["r"]
                winners = [not mine.is_error, r.status == 200]
                assert winners.count(True) == 1, (text, r)
                holder = relay.get("/api/messages/%d" % mid).json["message"]["claimedBy"]
                assert holder == ("mcp-worker" if not mine.is_error else "http-worker")
                if mine.is_error:
                    assert text.startswith("already_claimed: http-worker holds it")
                    assert mine.structured_content["error"]["code"] == "already_claimed"
                    assert mine.structured_content["error"]["hint"] == "http-worker holds it; leave it and pick other work"
                else:
                    assert r.code == "already_claimed"
                outcomes.append(holder)
            return outcomes

    run(go)


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_read_only_agent_is_refused_with_a_tool_error(relay, transport):
    relay.register("someone")
    agent = "ro-" + transport
    if transport == "http":
        relay.register(agent, approvalMode="read-only")

    async def go():
        async with Session(relay, transport, agent, AGENT_RELAY_APPROVAL="read-only") as s:
            result, text = await s.call("send", to="someone", body="let us start something new")
            assert result.is_error
            assert text.startswith("read_only: this session is read-only"), text
            assert result.structured_content["error"]["code"] == "read_only"
            assert result.structured_content["error"]["hint"].startswith("this session is read-only; it may read")

    run(go)
    assert relay.get("/api/messages", query={"from": agent}).json["messages"] == []


def test_modern_revision_through_server_discover(relay):
    """The SDK's default client probes server/discover at 2026-07-28 and stays there: no initialize, no session.
    Over stdio the agent joins (listening) as the client connects, before any tool is called, as it does at
    initialize: Claude Code connects this way."""
    from mcp.client import Client

    async def go():
        for server in (StdioServerParameters(command=sys.executable, args=[RELAY_PY, "mcp"], cwd=ROOT,
                                             env=stdio_env(relay, "modern-stdio")),):
            async with Client(server) as c:
                assert c.session.protocol_version == "2026-07-28"
                joined = await anyio.to_thread.run_sync(
                    lambda: wait_for(lambda: (card(relay, "modern-stdio") or {}).get("listening"), timeout=10))
                assert joined, card(relay, "modern-stdio")
                assert relay.get("/api/messages", query={"agent": "modern-stdio"}).json["messages"] == []
                names = {t.name for t in (await c.list_tools()).tools}
                assert names == TOOLS
                result = await c.call_tool("send", {"to": "modern-stdio", "body": "note to self"})
                assert not result.is_error and result.structured_content["message"]["from"] == "modern-stdio"
        client = httpx2.AsyncClient(headers={"X-Agent-Relay-Agent": "modern-http"})
        async with client:
            async with Client(streamable_http_client(relay.url + "/api/mcp", http_client=client)) as c:
                assert c.session.protocol_version == "2026-07-28"
                result = await c.call_tool("whoami", {})
                assert not result.is_error and result.structured_content["id"] == "modern-http"

    run(go)
    assert card(relay, "modern-http")["rig"] == "mcp"


# -- bad input ------------------------------------------------------------------------


def test_stdio_answers_malformed_input_with_json_rpc_errors(relay):
    proc = subprocess.Popen([sys.executable, RELAY_PY, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=dict(os.environ, **stdio_env(relay, "raw-stdio")))
    lines = [b"this is not json", b"\xff\xfe{", b"[1, 2]", b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}',
             b'{"jsonrpc": "2.0", "id": {"no": 1}, "method": "ping"}', b'{"jsonrpc": "2.0", "id": 2, "method": "tools/list"}',
             b'{"jsonrpc": "2.0", "id": 3, "method": "initialize", "params": {"protocolVersion": "1999-01-01", '
             b'"capabilities": {"experimental": {"claude/channel": {}}}, "clientInfo": {"name": "raw", "version": "0"}}}',
             b'{"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "nope"}}',
             b'{"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "send", "arguments": "x"}}',
             b'{"jsonrpc": "2.0", "id": 6, "method": "resources/read", "params": {"uri": "file:///etc/passwd"}}',
             b'{"jsonrpc": "2.0", "id": 7, "method": "no/such/method"}',
             b'{"jsonrpc": "2.0", "id": 8, "method": "ping"}']
    proc.stdin.write(b"\n".join(lines) + b"\n")
    proc.stdin.flush()
    answers = []
    while len(answers) < len(lines):
        line = proc.stdout.readline()
        assert line, "the server stopped answering: %r" % proc.stderr.read()
        answers.append(json.loads(line))  # every line on stdout is a JSON-RPC message
    by_id = {json.dumps(a.get("id")): a for a in answers}
    codes = sorted(a["error"]["code"] for a in answers if a.get("id") is None)
    assert codes == [-32700, -32700, -32600, -32600], answers  # not JSON, not UTF-8; a batch, an id that is no id
    assert by_id["1"]["error"]["code"] == -32600  # "jsonrpc": "1.0"
    assert by_id["2"]["error"]["code"] == -32600  # before initialize
    assert by_id["3"]["result"]["protocolVersion"] == "2025-11-25"  # an unknown revision gets the newest handshake one
    assert by_id["4"]["error"]["code"] == -32602 and "Unknown tool" in by_id["4"]["error"]["message"]
    assert by_id["5"]["error"]["code"] == -32602
    assert by_id["6"]["error"]["code"] == -32002
    assert by_id["7"]["error"]["code"] == -32601
    assert by_id["8"]["result"] == {}
    # the server is still there, and a message for its agent is pushed as a channel event (it declared claude/channel)
    wait_for(lambda: card(relay, "raw-stdio") and card(relay, "raw-stdio")["listening"])
    relay.register("peer")
    mid = relay.send("peer", "raw-stdio", "ping from a peer")["id"]
    while True:
        line = proc.stdout.readline()
        assert line
        note = json.loads(line)
        if note.get("method") == "notifications/claude/channel":
            break
    assert note["params"]["content"] == "[msg:%d] from peer: ping from a peer" % mid
    assert note["params"]["meta"]["message_id"] == str(mid) and note["params"]["meta"]["from"] == "peer"
    proc.stdin.close()  # the client goes: the agent is offline at once
    assert proc.wait(10) == 0
    assert card(relay, "raw-stdio")["status"] == "offline"
    assert "Traceback" not in proc.stderr.read().decode()


def test_http_answers_malformed_input_with_json_rpc_errors(relay):
    def post(raw, **headers):
        return relay.request("POST", "/api/mcp", raw=raw, headers=dict({"Accept": "application/json, text/event-stream"},
                                                                        **headers))

    r = post("{not json")
    assert r.status == 400 and r.json["error"]["code"] == -32700 and r.json["id"] is None
    r = post('{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}')
    assert r.status == 400 and r.json["error"]["code"] == -32600 and "Mcp-Session-Id" in r.json["error"]["message"]
    r = post('{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}', **{"Mcp-Session-Id": "f" * 32})
    assert r.status == 404 and r.json["error"]["code"] == -32600  # unknown (or forgotten) session: initialize again
    init = ('{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", '
            '"capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}')
    r = post(init)
    assert r.status == 200 and r.json["result"]["protocolVersion"] == "2025-06-18"
    sid = r.headers["mcp-session-id"]
    assert re.match(r"^[\x21-\x7e]{16,}$", sid)
    h = {"Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-06-18"}
    assert post('{"jsonrpc": "2.0", "method": "notifications/initialized"}', **h).status == 202
    r = post('[{"jsonrpc": "2.0", "id": 2, "method": "ping"}]', **h)
    assert r.status == 400 and r.json["error"]["code"] == -32600  # no batches in 2025-06-18
    r = post('{"jsonrpc": "2.0", "id": 3, "method": "ping"}', **dict(h, **{"MCP-Protocol-Version": "2031-01-01"}))
    assert r.status == 400
    r = post('{"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "inbox"}}', **h)
    assert r.status == 200 and r.json["result"]["isError"] is True  # no agent named yet
    assert r.json["result"]["content"][0]["text"].startswith("no_agent: ")
    r = post('{"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "whoami", "arguments": '
             '{"id": "raw-http"}}}', **h)
    assert r.status == 200 and r.json["result"]["structuredContent"]["id"] == "raw-http"
    r = post('{"jsonrpc": "2.0", "id": 6, "method": "ping"}', **dict(h, Origin="http://evil.example"))
    assert r.status == 403
    r = relay.request("GET", "/api/mcp", headers=dict(h, Origin="http://evil.example"))
    assert r.status == 403
    # batches where the revision has them (2025-03-26)
    r = post(init.replace("2025-06-18", "2025-03-26"))
    sid2 = r.headers["mcp-session-id"]
    r = post('[{"jsonrpc": "2.0", "id": 7, "method": "ping"}, {"jsonrpc": "2.0", "id": 8, "method": "nope"}, 5]',
             **{"Mcp-Session-Id": sid2})
    assert r.status == 200 and [a.get("id") for a in r.json] == [7, 8, None]
    assert "result" in r.json[0] and r.json[1]["error"]["code"] == -32601 and r.json[2]["error"]["code"] == -32600
    # DELETE ends the session; its agent goes offline
    assert card(relay, "raw-http")["status"] == "online"
    assert relay.request("DELETE", "/api/mcp", headers=h).status == 200
    assert card(relay, "raw-http")["status"] == "offline"
    assert post('{"jsonrpc": "2.0", "id": 9, "method": "ping"}', **h).status == 404
    assert relay.get("/api/health").status == 200
    assert "Traceback" not in relay.log


# -- clients that go away ---------------------------------------------------------------


def test_stdio_client_that_goes_away_takes_its_agent_offline(relay):
    """The SDK closes the server's stdin when its session ends: the agent is offline at once, claims released."""
    relay.register("boss")

    async def go():
        async with Session(relay, "stdio", "leaving-stdio") as s:
            mid = relay.send("boss", "leaving-stdio", "work", claimable=True)["id"]
            claimed, _ = await s.call("claim", messageId=mid)
            assert not claimed.is_error
            assert card(relay, "leaving-stdio")["listening"] is True
        return mid

    mid = run(go)
    c = card(relay, "leaving-stdio")
    assert c["status"] == "offline" and c["listening"] is False
    assert relay.get("/api/messages/%d" % mid).json["message"]["claimedBy"] is None


def test_stdio_server_stopped_as_claude_code_stops_it_takes_its_agent_offline(relay):
    """Claude Code ends a stdio server with SIGINT, SIGTERM 100 ms later and SIGKILL 400 ms after that (2.1.332):
    the agent is marked offline within that half second, and stays offline once the relay sees its stream end."""
    proc = subprocess.Popen([sys.executable, RELAY_PY, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=dict(os.environ, **stdio_env(relay, "stopped")))
    try:
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}).encode()
            + b"\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["result"]["serverInfo"]["name"]
        assert wait_for(lambda: card(relay, "stopped") and card(relay, "stopped")["listening"])
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.4)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    assert wait_for(lambda: card(relay, "stopped")["listening"] is False)
    c = card(relay, "stopped")
    assert c["status"] == "offline", c


def test_http_client_that_disappears_goes_offline_within_the_presence_window(relay_factory):
    relay = relay_factory(env={"STALE_TTL_MS": "1500"})

    async def go():
        async with Session(relay, "http", "leaving-http", terminate=False) as s:
            await s.call("whoami")
            await anyio.to_thread.run_sync(lambda: wait_for(lambda: card(relay, "leaving-http")["listening"]))
        # the client vanished without DELETE: its stream is gone, so presence takes the agent offline

    run(go)
    assert wait_for(lambda: card(relay, "leaving-http")["status"] == "offline", timeout=30)
    assert card(relay, "leaving-http")["listening"] is False


def test_cancelled_inbox_wait_ends_and_keeps_the_message(relay):
    """notifications/cancelled ends a long-poll at once (the relay's count of long-polls drops) and the kept cursor
    does not move: the next look still gets what arrives."""
    relay.register("later")

    async def go():
        async with Session(relay, "stdio", "impatient") as s:
            with pytest.raises(Exception):
                await s.session.call_tool("inbox", {"wait": 60}, read_timeout_seconds=1.0)
            # (waited for in a thread: the SDK writes its notifications/cancelled from this event loop)
            assert await anyio.to_thread.run_sync(
                lambda: wait_for(lambda: relay.get("/api/stats").json["longPolls"] == 0, timeout=15))
            mid = relay.send("later", "impatient", "after the cancel")["id"]
            result, _ = await s.call("inbox")
            assert [m["id"] for m in result.structured_content["messages"]] == [mid]

    run(go)


def test_modern_listen_pushes_inbox_updates_over_stdio(relay):
    """2026-07-28: subscriptions/listen is acknowledged, then carries resources/updated tagged with its id, until
    notifications/cancelled ends it (with no answer)."""
    proc = subprocess.Popen([sys.executable, RELAY_PY, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=dict(os.environ, **stdio_env(relay, "listener")))

    def write(message):
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        proc.stdin.flush()

    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    write({"jsonrpc": "2.0", "id": "sub-1", "method": "subscriptions/listen",
           "params": {"_meta": meta, "notifications": {"resourceSubscriptions": ["relay://inbox"], "toolsListChanged": True}}})
    ack = json.loads(proc.stdout.readline())
    assert ack["method"] == "notifications/subscriptions/acknowledged"
    assert ack["params"] == {"_meta": {"io.modelcontextprotocol/subscriptionId": "sub-1"},
                             "notifications": {"resourceSubscriptions": ["relay://inbox"]}}  # what it honours
    wait_for(lambda: card(relay, "listener") and card(relay, "listener")["listening"])
    relay.register("talker")
    relay.send("talker", "listener", "hello")
    note = json.loads(proc.stdout.readline())
    assert note == {"jsonrpc": "2.0", "method": "notifications/resources/updated",
                    "params": {"uri": "relay://inbox", "_meta": {"io.modelcontextprotocol/subscriptionId": "sub-1"}}}
    write({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "sub-1"}})
    write({"jsonrpc": "2.0", "id": 2, "method": "server/discover", "params": {"_meta": meta}})
    answer = json.loads(proc.stdout.readline())  # the listen request gets no answer: the next line is discover's
    assert answer["id"] == 2 and "2026-07-28" in answer["result"]["supportedVersions"]
    assert answer["result"]["resultType"] == "complete"
    write({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {"_meta": dict(meta, **{
        "io.modelcontextprotocol/protocolVersion": "1999-01-01"})}})
    refused = json.loads(proc.stdout.readline())
    assert refused["error"]["code"] == -32022 and "2026-07-28" in refused["error"]["data"]["supported"]
    proc.stdin.close()
    assert proc.wait(10) == 0
    assert card(relay, "listener")["status"] == "offline"


def test_claude_channel_mode_pushes_channel_events_to_a_client_that_declares_nothing(relay):
    """`agent-relay mcp --claude-channel`, as Claude Code talks to it (its own initialize, captured from 2.1.332):
    server/discover is refused as by a server of the handshake era, so the client initializes; the client declares
    no claude/channel, the server does, and each message for the agent comes as a notifications/claude/channel."""
    proc = subprocess.Popen([sys.executable, RELAY_PY, "mcp", "--claude-channel"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=dict(os.environ, **stdio_env(relay, "channel-stdio")))

    def write(message):
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        proc.stdin.flush()

    client = {"name": "claude-code", "title": "Claude Code", "version": "2.1.332"}
    caps = {"roots": {"listChanged": True}, "elicitation": {"form": {}, "url": {}}}
    write({"jsonrpc": "2.0", "id": "server-discover-probe-1", "method": "server/discover", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientInfo": client,
        "io.modelcontextprotocol/clientCapabilities": caps}}})
    probe = json.loads(proc.stdout.readline())
    assert probe["id"] == "server-discover-probe-1" and probe["error"]["code"] == -32601, probe
    write({"jsonrpc": "2.0", "id": "stateless", "method": "tools/list", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": caps}}})
    refused = json.loads(proc.stdout.readline())  # no stateless requests in this mode: the handshake comes first
    assert refused["error"]["code"] == -32600 and "initialize" in refused["error"]["message"], refused
    write({"jsonrpc": "2.0", "id": 0, "method": "initialize",
           "params": {"protocolVersion": "2025-11-25", "capabilities": caps, "clientInfo": client}})
    init = json.loads(proc.stdout.readline())["result"]
    assert init["protocolVersion"] == "2025-11-25" and init["capabilities"]["experimental"] == {"claude/channel": {}}
    write({"jsonrpc": "2.0", "method": "notifications/initialized"})
    write({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert {t["name"] for t in json.loads(proc.stdout.readline())["result"]["tools"]} == TOOLS
    assert wait_for(lambda: card(relay, "channel-stdio") and card(relay, "channel-stdio")["listening"])
    relay.register("peer")
    sent = relay.send("peer", "channel-stdio", "ping through the channel")
    note = json.loads(proc.stdout.readline())
    assert note == {"jsonrpc": "2.0", "method": "notifications/claude/channel", "params": {
        "content": "[msg:%d] from peer: ping through the channel" % sent["id"],
        "meta": {"message_id": str(sent["id"]), "from": "peer", "to": "channel-stdio", "kind": "chat"}}}, note
    proc.stdin.close()
    assert proc.wait(10) == 0
    assert card(relay, "channel-stdio")["status"] == "offline"
    assert "Traceback" not in proc.stderr.read().decode()


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_lease_and_unlease_through_mcp(relay, transport):
    """The lease tool takes paths for the session's agent; a conflicting one is a tool error naming the holder;
    unlease gives it back, after which another agent may lease the same paths."""
    agent = "lessee-" + transport
    relay.register("holder", project="shop")
    held = relay.post("/api/leases", {"agentId": "holder", "paths": ["src/api/"], "scope": "shop", "reason": "migrating"})
    assert held.status == 201, held

    async def go():
        async with Session(relay, transport, agent) as s:
            result, text = await s.call("lease", paths=["src/api/routes.py"], scope="shop")
            assert result.is_error and text.startswith("lease_conflict"), text
            assert result.structured_content["error"]["conflicts"][0]["agentId"] == "holder"
            result, text = await s.call("lease", paths=["docs/"], scope="shop", reason="docs pass")
            assert not result.is_error, text
            lease = result.structured_content["lease"]
            assert lease["agentId"] == agent and lease["paths"] == ["docs/"] and "lease:%d holds docs/" % lease["id"] in text
            assert relay.get("/api/leases", query={"scope": "shop", "path": "docs/index.md"}).json["leases"][0]["id"] == lease["id"]
            result, text = await s.call("unlease", leaseId=lease["id"])
            assert not result.is_error and result.structured_content["lease"]["releasedAt"], text

    run(go)
    assert relay.get("/api/leases", query={"agentId": agent}).json["leases"] == []
    relay.register("other", project="shop")
    assert relay.post("/api/leases", {"agentId": "other", "paths": ["docs/"], "scope": "shop"}).status == 201


def test_search_through_mcp_finds_only_what_the_agent_may_see(relay):
    relay.register("finder")
    relay.register("g", approvalMode="guarded")
    relay.register("peer")
    relay.send("peer", "finder", "the flaky refund rounding test fails again")
    relay.send("peer", "g", "refund rounding secret for g")  # held for g: never found by g

    async def go():
        async with Session(relay, "http", "finder") as s:
            result, text = await s.call("search", q="refund rounding")
            assert not result.is_error, text
            bodies = [r["message"]["body"] for r in result.structured_content["results"]]
            assert bodies == ["the flaky refund rounding test fails again"], bodies
            assert "[msg:" in text and "rounding" in text
        async with Session(relay, "http", "g") as s:
            result, text = await s.call("search", q="secret")
            assert not result.is_error and result.structured_content["results"] == [], text

    run(go)
