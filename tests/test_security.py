"""The network boundary and the approval modes, from a browser's and an agent's point of view.

- DNS rebinding: a Host that is not the relay's own name gets 403, on the API
  and on the page (a rebound page must not even load), and stores nothing.
- Cross-site writes: a write whose Origin is not the relay's own gets 403 and
  stores nothing, including the one write a browser sends without asking first
  (a form-like `text/plain` POST); no answer carries CORS headers.
- Tokens: never in a log line, never echoed in an answer, refused in URLs;
  an integration token opens nothing but its own route.
- Guarded and read-only hold on every route that could get around them.
"""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from conftest import wait_for, raw_exchange

TOKEN = "relay-token-do-not-log-1"
ADMIN = "admin-token-do-not-log-2"
INTEG = "integration-token-do-not-log-3"
SECRET = "callback-secret-do-not-log-4"


def raw_request(port, method, path, headers, body=b""):
    """A request with exactly these headers (http.client would add its own Host)."""
    lines = ["%s %s HTTP/1.1" % (method, path)] + ["%s: %s" % kv for kv in headers.items()]
    if body:
        lines.append("Content-Length: %d" % len(body))
    lines.append("Connection: close")
    return raw_exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

def counts(relay):
    return relay.sql("SELECT (SELECT COUNT(*) FROM messages) AS m, (SELECT COUNT(*) FROM agents) AS a, "
                     "(SELECT COUNT(*) FROM tasks) AS t, (SELECT COUNT(*) FROM receipts) AS r")[0]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:4850", "127.0.0.1.evil.example",
                                  "localhost.evil.example:80", "127.0.0.1@evil.example", "[::1].evil.example", "0.0.0.0",
                                  "127.0.0.2", ""])
def test_dns_rebinding_hosts_are_refused_on_the_api_and_the_page(relay, host):
    relay.register("alice")
    before = counts(relay)
    for method, path, body in [("GET", "/", b""), ("GET", "/api/agents", b""), ("GET", "/api/health", b""),
                               ("POST", "/api/messages", json.dumps({"from": "alice", "to": "alice", "body": "x"}).encode()),
                               ("POST", "/api/agents", b'{"id": "mallory"}')]:
        headers = {"Host": host, "Content-Type": "application/json"}
        status, hdrs, payload = raw_request(relay.port, method, path, headers, body)
        assert status == 403, (host, method, path, status, payload[:200])
        assert json.loads(payload)["error"]["code"] == "forbidden"
        assert "access-control-allow-origin" not in hdrs
    assert counts(relay) == before


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:4850", "127.0.0.1", "127.0.0.1:9", "[::1]", "[::1]:4850",
                                  "relay.lan", "relay.lan:8080"])
def test_the_relays_own_names_are_served(relay_factory, host):
    relay = relay_factory(env={"AGENT_RELAY_ALLOWED_HOSTS": "relay.lan"})
    for path in ("/", "/api/health", "/api/agents"):
        status, _, _ = raw_request(relay.port, "GET", path, {"Host": host})
        assert status == 200, (host, path, status)


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1.evil.example",
                                    "http://localhost:1", "https://127.0.0.1", "file://"])
@pytest.mark.parametrize("ctype", ["application/json", "text/plain", "application/x-www-form-urlencoded"])
def test_cross_site_writes_are_refused_and_store_nothing(relay, origin, ctype):
    relay.register("alice")
    relay.register("bob")
    work = relay.send("alice", "bob", "job", claimable=True)
    before = counts(relay)
    host = "127.0.0.1:%d" % relay.port
    writes = [("POST", "/api/messages", {"from": "human", "to": "bob", "body": "rm -rf /"}),
              ("POST", "/api/agents", {"id": "mallory"}),
              ("POST", "/api/messages/%d/claim" % work["id"], {"agentId": "bob"}),
              ("PATCH", "/api/agents/bob", {"approvalMode": "open"}),
              ("DELETE", "/api/agents/bob?purge=true", None),
              ("POST", "/api/tasks", {"title": "t", "target": "bob"})]
    for method, path, body in writes:
        data = json.dumps(body).encode() if body is not None else b""
        status, hdrs, payload = raw_request(relay.port, method, path, {"Host": host, "Origin": origin, "Content-Type": ctype}, data)
        assert status == 403, (origin, ctype, method, path, status, payload[:200])
        assert "access-control-allow-origin" not in hdrs
    assert counts(relay) == before
    assert relay.get("/api/agents/bob").json["status"] == "online"
    assert relay.get("/api/messages/%d" % work["id"]).json["message"]["claimedBy"] is None


def test_the_relays_own_page_may_write_and_reads_carry_no_cors(relay):
    relay.register("alice")
    host = "127.0.0.1:%d" % relay.port
    body = json.dumps({"from": "human", "to": "alice", "body": "from the dashboard"}).encode()
    status, _, _ = raw_request(relay.port, "POST", "/api/messages", {"Host": host, "Origin": "http://" + host,
                                                                     "Content-Type": "application/json"}, body)
    assert status == 201
    # a plain-text body without an Origin (curl, a script) is refused for its type, not stored
    before = counts(relay)
    status, _, payload = raw_request(relay.port, "POST", "/api/messages", {"Host": host, "Content-Type": "text/plain"}, body)
    assert status == 415 and json.loads(payload)["error"]["code"] == "unsupported_media_type"
    assert counts(relay) == before
    # a cross-site read gets its answer, but no CORS header lets a browser hand it to the other site
    status, hdrs, _ = raw_request(relay.port, "GET", "/api/agents", {"Host": host, "Origin": "http://evil.example"})
    assert status == 200 and not any(k.startswith("access-control-") for k in hdrs)
    status, hdrs, _ = raw_request(relay.port, "OPTIONS", "/api/messages", {"Host": host, "Origin": "http://evil.example",
                                                                           "Access-Control-Request-Method": "POST"})
    assert status >= 400 and not any(k.startswith("access-control-") for k in hdrs)


def delivery_state(relay, agent_id):
    """What an inbox read moves: the agent's kept cursor and its delivery receipts."""
    return (relay.sql("SELECT cursor FROM agents WHERE id = ?", (agent_id,))[0]["cursor"],
            relay.sql("SELECT COUNT(*) AS n FROM receipts WHERE agent_id = ?", (agent_id,))[0]["n"])


# what a browser sends for a request another page makes: a fetch() carries Origin; an <img> or <script> tag carries
# only Sec-Fetch-Site; a page on another port of the same host is same-site, yet another origin
FOREIGN = [{"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
           {"Origin": "http://evil.example"},
           {"Sec-Fetch-Site": "cross-site"},
           {"Sec-Fetch-Site": "same-site"},
           {"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"},
           {"Origin": "null", "Sec-Fetch-Site": "cross-site"}]


def test_a_foreign_page_cannot_drain_an_agents_inbox(relay):
    """An inbox read records delivery and moves the kept cursor: from another page it is 403 and moves nothing,
    so the agent still gets every message."""
    relay.register("alice")
    relay.register("victim")
    sent = [relay.send("alice", "victim", "secret %d" % i)["id"] for i in range(3)]
    host = "127.0.0.1:%d" % relay.port
    before = delivery_state(relay, "victim")
    for foreign in FOREIGN:
        for path in ("/api/agents/victim/inbox", "/api/agents/victim/inbox?since=0", "/api/agents/victim/inbox?wait=1"):
            headers = dict(foreign, Host=host)
            for method in ("GET", "HEAD"):
                status, hdrs, payload = raw_request(relay.port, method, path, headers)
                assert status == 403, (foreign, method, path, status, payload[:200])
                if method == "GET":
                    err = json.loads(payload)["error"]
                    assert err["code"] == "forbidden" and "cross-site" in err["message"], err
                    assert b"secret" not in payload
                assert not any(k.startswith("access-control-") for k in hdrs)
    assert delivery_state(relay, "victim") == before
    assert relay.get("/api/agents/victim").json["listening"] is False
    # the agent itself (curl, a script: no Origin) gets every message, and that read moves the cursor
    got = relay.inbox("victim")
    assert [m["id"] for m in got["messages"]] == sent
    assert delivery_state(relay, "victim") == (sent[-1], 3)


def test_a_foreign_page_cannot_open_an_agents_narrowed_stream(relay):
    """A stream narrowed to an agent marks it listening: from another page it is 403 and the agent is not listening."""
    relay.register("alice")
    relay.register("victim")
    host = "127.0.0.1:%d" % relay.port
    for foreign in FOREIGN:
        status, hdrs, payload = raw_request(relay.port, "GET", "/api/events?agentId=victim", dict(foreign, Host=host))
        assert status == 403, (foreign, status, payload[:200])
        assert json.loads(payload)["error"]["code"] == "forbidden"
        assert relay.get("/api/agents/victim").json["listening"] is False
    # the agent's own narrowed stream from a script (no Origin) works and marks it listening
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    try:
        s.sendall(("GET /api/events?agentId=victim HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        assert wait_for(lambda: relay.get("/api/agents/victim").json["listening"], timeout=10)
    finally:
        s.close()


def test_a_foreign_page_cannot_act_as_an_agent_through_mcp(relay):
    """/api/mcp acts as an agent (its stream marks it listening, its calls send and claim): every method of it is
    refused cross-site, and no agent is registered by the attempt."""
    host = "127.0.0.1:%d" % relay.port
    init = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "evil", "version": "1"}}})
    for foreign in FOREIGN:
        for method, body in (("POST", init), ("GET", None), ("DELETE", None)):
            headers = dict(foreign, Host=host, **{"X-Agent-Relay-Agent": "mcp-victim", "Accept": "application/json, text/event-stream"})
            if body is not None:
                headers["Content-Type"] = "application/json"
            status, hdrs, payload = raw_request(relay.port, method, "/api/mcp", headers, (body or "").encode())
            assert status == 403, (method, foreign, status, payload[:200])
    assert relay.get("/api/agents/mcp-victim").status == 404


def test_the_relays_own_page_and_scripts_still_read_inboxes_and_streams(relay):
    relay.register("alice")
    relay.register("bob")
    m = relay.send("alice", "bob", "for bob")
    host = "127.0.0.1:%d" % relay.port
    own = {"Host": host, "Origin": "http://" + host, "Sec-Fetch-Site": "same-origin"}
    status, _, payload = raw_request(relay.port, "GET", "/api/agents/bob/inbox", own)
    assert status == 200 and [x["id"] for x in json.loads(payload)["messages"]] == [m["id"]]
    assert delivery_state(relay, "bob") == (m["id"], 1)
    # a URL typed into the address bar (Sec-Fetch-Site: none), and a plain script
    for headers in ({"Host": host, "Sec-Fetch-Site": "none"}, {"Host": host}):
        status, _, payload = raw_request(relay.port, "GET", "/api/agents/bob/inbox?since=0", headers)
        assert status == 200 and [x["id"] for x in json.loads(payload)["messages"]] == [m["id"]], payload[:200]
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    try:
        s.sendall(("GET /api/events?agentId=bob HTTP/1.1\r\nHost: %s\r\nOrigin: http://%s\r\nSec-Fetch-Site: same-origin\r\n\r\n"
                   % (host, host)).encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        s.close()
    # a read that moves nothing is still answered to another page (without CORS headers, the page cannot read it)
    status, hdrs, _ = raw_request(relay.port, "GET", "/api/messages/%d" % m["id"], {"Host": host, "Sec-Fetch-Site": "cross-site"})
    assert status == 200 and not any(k.startswith("access-control-") for k in hdrs)


class Receiver(BaseHTTPRequestHandler):
    """A callback receiver that fails every other delivery, so that the relay logs its retries."""

    count = [0]

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.count[0] += 1
        self.send_response(500 if self.count[0] % 2 else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def test_tokens_never_reach_a_log_line_or_an_answer(relay_factory):
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    integ = [{"name": "mon", "token": INTEG, "scopes": ["tasks:create"], "targets": ["tag:ops"],
              "callbackUrl": "http://127.0.0.1:%d/hook" % server.server_address[1], "callbackSecret": SECRET}]
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": TOKEN, "AGENT_RELAY_ADMIN_TOKEN": ADMIN, "AGENT_RELAY_AGENT_KEYS": "1",
                               "AGENT_RELAY_INTEGRATIONS": json.dumps(integ)})
    try:
        agent_key = relay.post("/api/agents", {"id": "ops-1", "tags": ["ops"]}).json["agentKey"]
        secrets_ = [TOKEN, ADMIN, INTEG, SECRET, agent_key]
        answers = []
        for headers, token in [({}, True), ({"Authorization": "Bearer " + TOKEN[:-1] + "X"}, False),
                               ({"X-Agent-Relay-Token": TOKEN}, False), ({"Authorization": "Bearer " + INTEG}, False),
                               ({"Authorization": "Bearer " + ADMIN}, False), ({"X-Agent-Relay-Agent-Key": agent_key}, True)]:
            for method, path, body in [("GET", "/api/agents", None), ("GET", "/api/agents/ops-1/inbox", None),
                                       ("POST", "/api/messages", {"from": "ops-1", "to": "ops-1", "body": "x"}),
                                       ("GET", "/api/agents?token=" + TOKEN, None), ("GET", "/api/stats?access_token=" + ADMIN, None),
                                       ("GET", "/nothing-here?token=" + TOKEN, None), ("PATCH", "/api/tasks/999/status", {"status": "x"})]:
                answers.append(relay.request(method, path, body=body, headers=headers, token=token))
        # the integration, its callbacks (some failing and retried) and the token in a URL
        for i in range(3):
            r = relay.post("/api/integrations/events", {"dedupeKey": "k%d" % i, "title": "disk"},
                           headers={"Authorization": "Bearer " + INTEG}, token=False)
            assert r.status == 201, r
            answers.append(r)
        answers.append(relay.post("/api/integrations/events?token=" + INTEG, {"dedupeKey": "q", "title": "t"}, token=False))
        answers.append(relay.post("/api/integrations/events", {"dedupeKey": "q", "title": "t"},
                                  headers={"Authorization": "Bearer " + TOKEN}, token=False))
        wait_for(lambda: not relay.get("/api/callbacks?status=pending").json["callbacks"], timeout=10)
        # a token in the URL is refused, and what it asked for is not done
        assert relay.get("/api/agents?token=" + TOKEN, token=False).status in (400, 401)
        r = relay.post("/api/messages?token=" + TOKEN, {"from": "ops-1", "to": "ops-1", "body": "via url"}, token=False)
        assert r.status in (400, 401)
        assert not relay.sql("SELECT id FROM messages WHERE body = 'via url'")
        # integration tokens open only the ingress
        for method, path in [("GET", "/api/agents"), ("GET", "/api/tasks"), ("POST", "/api/messages"), ("GET", "/api/events")]:
            r = relay.request(method, path, body={} if method == "POST" else None,
                              headers={"Authorization": "Bearer " + INTEG}, token=False)
            assert r.status == 403, (method, path, r)
        relay.stop()
    finally:
        server.shutdown()
        server.server_close()
    log = relay.log
    assert relay.sql("SELECT COUNT(*) AS n FROM callbacks WHERE attempts > 1") != [{"n": 0}], "no retry was logged to scan"
    for s in secrets_:
        assert s not in log, "a secret reached the relay's output"
        for a in answers:
            assert s.encode() not in a.body, "a secret was echoed in an answer: %r" % a
    stored = open(relay.db_path, "rb").read()
    for s in (TOKEN, ADMIN, INTEG, SECRET, agent_key):
        assert s.encode() not in stored


# -- approval modes hold on every route ------------------------------------------------


@pytest.fixture
def modes(relay):
    relay.register("boss", tags=["team"])
    relay.register("ro", approvalMode="read-only", tags=["team"])
    relay.register("guard", approvalMode="guarded", tags=["team"])
    relay.register("peer", tags=["team"])
    return relay


def test_read_only_cannot_claim_or_start_work_by_any_route(modes):
    relay = modes
    job = relay.send("boss", "tag:team", "job", claimable=True)
    task = relay.post("/api/tasks", {"title": "task", "target": "tag:team", "from": "boss"}).json["task"]
    private = relay.send("boss", "peer", "between boss and peer")
    seen = relay.send("boss", "ro", "a question for ro")
    before = counts(relay)
    attempts = [
        ("POST", "/api/messages/%d/claim" % job["id"], {"agentId": "ro"}, "read_only"),
        ("POST", "/api/messages/%d/claim" % task["messageId"], {"agentId": "ro"}, "read_only"),
        ("POST", "/api/tasks/%d/claim" % task["id"], {"agentId": "ro"}, "read_only"),
        ("PATCH", "/api/tasks/%d/status" % task["id"], {"agentId": "ro", "status": "canceled"}, "read_only"),
        ("POST", "/api/tasks", {"title": "new work", "target": "peer", "from": "ro"}, "read_only"),
        ("POST", "/api/messages", {"from": "ro", "to": "peer", "body": "new conversation"}, "read_only"),
        ("POST", "/api/messages", {"from": "ro", "to": "tag:team", "body": "work", "claimable": True, "replyTo": seen["id"]},
         "read_only"),
        ("POST", "/api/messages", {"from": "ro", "to": "peer", "body": "butting in", "replyTo": private["id"]}, "not_addressed"),
    ]
    for method, path, body, code in attempts:
        r = relay.request(method, path, body=body)
        assert r.status == 403 and r.code == code, (method, path, r)
    assert counts(relay) == before
    assert relay.get("/api/tasks/%d" % task["id"]).json["task"]["status"] == "open"
    # what read-only may do: read, and reply to what it received
    assert [m["id"] for m in relay.inbox("ro", since=0)["messages"]] == [job["id"], task["messageId"], seen["id"]]
    r = relay.post("/api/messages", {"from": "ro", "to": "boss", "body": "an answer", "replyTo": seen["id"]})
    assert r.status == 201 and r.json["message"]["threadId"] == seen["id"]


def test_guarded_holds_messages_from_agents_on_every_route(modes):
    relay = modes
    stream = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    stream.sendall(b"GET /api/events?agentId=guard HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    stream.recv(4096)
    direct = relay.send("peer", "guard", "direct")
    fanout = relay.send("peer", "tag:team", "to the team")
    task = relay.post("/api/tasks", {"title": "for guard", "target": "guard", "from": "peer"}).json["task"]
    from_human = relay.send("human", "guard", "from a person")
    reply = relay.send("peer", "guard", "a reply", replyTo=from_human["id"])
    held = [direct["id"], fanout["id"], task["messageId"], reply["id"]]
    # none of them reaches the guarded agent's inbox or stream; the person's message does
    assert [m["id"] for m in relay.inbox("guard", since=0)["messages"]] == [from_human["id"]]
    # nor can it act on them before a person decides
    for mid in held:
        assert relay.post("/api/messages/%d/read" % mid, {"agentId": "guard"}).status == 403
    assert relay.post("/api/messages/%d/claim" % task["messageId"], {"agentId": "guard"}).status == 403
    for mid in held:
        states = {r["agentId"]: r["state"] for r in relay.get("/api/messages/%d" % mid).json["receipts"]}
        assert states.get("guard") == "held", (mid, states)
    stream.settimeout(0.5)
    got = b""
    try:
        while True:
            chunk = stream.recv(65536)
            if not chunk:
                break
            got += chunk
    except socket.timeout:
        pass
    stream.close()
    text = got.decode("utf-8", "replace")
    assert "from a person" in text
    for word in ("direct", "to the team", "for guard", "a reply"):
        assert '"body":"%s"' % word not in text, word
    # a person approves one: it arrives once, the rest stay held
    assert relay.post("/api/messages/%d/approve" % direct["id"], {"agentId": "guard"}).status == 200
    assert [m["id"] for m in relay.inbox("guard")["messages"]] == [direct["id"]]
    assert relay.inbox("guard")["messages"] == []


def test_a_reply_to_a_held_message_does_not_leak_it(modes):
    """The guarded agent has not seen a held message, so it cannot reply to it as if it had (in read-only terms)."""
    relay = modes
    relay.patch("/api/agents/guard", {"approvalMode": "read-only"})
    held_before = relay.send("peer", "ro", "for ro")
    r = relay.post("/api/messages", {"from": "guard", "to": "peer", "body": "re", "replyTo": held_before["id"]})
    assert r.status == 403 and r.code == "not_addressed"
