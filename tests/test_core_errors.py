"""Bad requests: each gets the right status and error code in the relay's
envelope, none gets a 500 or a traceback, and none changes what is stored.
Also: clients that stall or hang up do not hurt anyone else."""
import json
import socket
import time

import pytest

ENVELOPE_KEYS = {"error"}


def assert_no_traceback(relay, settle=0.3):
    """The relay's output (stdout and stderr) holds no Python traceback.

    Output reaches relay.log through a pipe; give it a moment to arrive before judging."""
    deadline = time.monotonic() + settle
    while True:
        log = relay.log
        for bad in ("Traceback", "internal error", "connection error"):
            assert bad not in log, "relay printed %r:\n%s" % (bad, log)
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def assert_envelope(r):
    assert r.status != 500, r
    assert r.json is not None and set(r.json) == ENVELOPE_KEYS, r
    err = r.json["error"]
    assert isinstance(err, dict), r
    assert isinstance(err.get("code"), str) and err["code"], r
    assert isinstance(err.get("message"), str) and err["message"].strip(), r
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers


def snapshot(relay):
    """Everything stored about agents, messages, receipts and tasks (lastSeen moves on its own)."""
    out = {}
    for table, order in (("agents", "id"), ("messages", "id"), ("receipts", "message_id, agent_id"),
                         ("tasks", "id"), ("redeliveries", "agent_id, message_id")):
        rows = relay.sql("SELECT * FROM %s ORDER BY %s" % (table, order))
        for row in rows:
            row.pop("last_seen", None)
        out[table] = rows
    return out


def counts(snap):
    return {t: len(rows) for t, rows in snap.items()}


@pytest.fixture
def seeded(relay):
    relay.register("a", tags=["t"])
    relay.register("b")
    relay.send("a", "b", "hello")
    relay.send("b", "tag:t", "work", claimable=True)
    relay.inbox("b")
    return relay


JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}


def msg(**fields):
    body = {"from": "a", "to": "b", "body": "hi"}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


# (name, method, path, request kwargs, status, code, a word the message must hold)
CASES = [
    ("broken JSON", "POST", "/api/messages", {"raw": '{"from": "a", "to": '}, 400, "invalid_json", None),
    ("not JSON at all", "POST", "/api/messages", {"raw": "from=a&to=b"}, 400, "invalid_json", None),
    ("a JSON array", "POST", "/api/messages", {"raw": '[{"from": "a", "to": "b", "body": "x"}]'}, 400, "invalid_json", None),
    ("a JSON string", "POST", "/api/messages", {"raw": '"hello"'}, 400, "invalid_json", None),
    ("NaN in JSON", "POST", "/api/messages", {"raw": '{"from": "a", "to": "b", "body": "x", "meta": {"n": NaN}}'},
     400, "invalid_json", None),
    ("invalid UTF-8", "POST", "/api/messages", {"raw": b'{"from": "a", "to": "b", "body": "\xff\xfe"}'}, 400, "invalid_json", None),
    ("missing from", "POST", "/api/messages", {"body": msg(**{"from": None})}, 400, "invalid_field", "from"),
    ("missing to", "POST", "/api/messages", {"body": msg(to=None)}, 400, "invalid_field", "to"),
    ("missing body", "POST", "/api/messages", {"body": msg(body=None)}, 400, "invalid_field", "body"),
    ("empty request body", "POST", "/api/messages", {"raw": ""}, 400, "invalid_field", "from"),
    ("body is a number", "POST", "/api/messages", {"body": msg(body=5)}, 400, "invalid_field", "body"),
    ("to is a list", "POST", "/api/messages", {"body": msg(to=["b"])}, 400, "invalid_field", "to"),
    ("claimable as 'yes'", "POST", "/api/messages", {"body": msg(claimable="yes")}, 400, "invalid_field", "claimable"),
    ("replyTo as 'x'", "POST", "/api/messages", {"body": msg(replyTo="x")}, 400, "invalid_field", "replyTo"),
    ("replyTo as 0", "POST", "/api/messages", {"body": msg(replyTo=0)}, 400, "invalid_field", "replyTo"),
    ("payload as a list", "POST", "/api/messages", {"body": msg(payload=[1])}, 400, "invalid_field", "payload"),
    ("replyTo that does not exist", "POST", "/api/messages", {"body": msg(replyTo=9999)}, 404, "not_found", "replyTo"),
    ("empty body text", "POST", "/api/messages", {"body": msg(body="")}, 400, "invalid_field", "body"),
    ("blank body text", "POST", "/api/messages", {"body": msg(body="   ")}, 400, "invalid_field", "body"),
    ("unknown direct target", "POST", "/api/messages", {"body": msg(to="ghost")}, 404, "unknown_agent", "ghost"),
    ("unknown sender", "POST", "/api/messages", {"body": msg(**{"from": "ghost"})}, 404, "unknown_agent", "ghost"),
    ("to = tag:", "POST", "/api/messages", {"body": msg(to="tag:")}, 400, "invalid_field", "to"),
    ("to = cap:", "POST", "/api/messages", {"body": msg(to="cap:")}, 400, "invalid_field", "to"),
    ("to = label:", "POST", "/api/messages", {"body": msg(to="label:")}, 400, "invalid_field", "to"),
    ("to with spaces", "POST", "/api/messages", {"body": msg(to="not an id")}, 400, "invalid_field", "to"),
    ("text/plain", "POST", "/api/messages", {"raw": json.dumps(msg()), "headers": TEXT}, 415, "unsupported_media_type", None),
    ("no content type", "POST", "/api/messages", {"raw": json.dumps(msg()), "headers": {"Content-Type": None}},
     415, "unsupported_media_type", None),
    ("300 KB body", "POST", "/api/messages", {"body": msg(body="x" * 300 * 1024)}, 413, "payload_too_large", None),
    ("tags as a number", "POST", "/api/agents", {"body": {"id": "fresh", "tags": 5}}, 400, "invalid_field", "tags"),
    ("channels empty", "POST", "/api/agents", {"body": {"id": "fresh", "channels": []}}, 400, "invalid_field", "channels"),
    ("approvalMode unknown", "POST", "/api/agents", {"body": {"id": "fresh", "approvalMode": "lax"}}, 400, "invalid_field",
     "approvalMode"),
    ("register broadcast", "POST", "/api/agents", {"body": {"id": "broadcast"}}, 400, "invalid_field", "id"),
    ("register tag:x", "POST", "/api/agents", {"body": {"id": "tag:x"}}, 400, "invalid_field", "id"),
    ("register cap:x", "POST", "/api/agents", {"body": {"id": "cap:x"}}, 400, "invalid_field", "id"),
    ("register label:x", "POST", "/api/agents", {"body": {"id": "label:x"}}, 400, "invalid_field", "id"),
    ("register with no id nor session", "POST", "/api/agents", {"body": {"machine": "m"}}, 400, "invalid_field", "id"),
    ("register human", "POST", "/api/agents", {"body": {"id": "human"}}, 403, "forbidden", "human"),
    ("register system", "POST", "/api/agents", {"body": {"id": "system"}}, 403, "forbidden", "system"),
    ("wait=abc", "GET", "/api/agents/b/inbox?wait=abc", {}, 400, "invalid_field", "wait"),
    ("wait=999", "GET", "/api/agents/b/inbox?wait=999", {}, 400, "invalid_field", "wait"),
    ("wait=-1", "GET", "/api/agents/b/inbox?wait=-1", {}, 400, "invalid_field", "wait"),
    ("limit=0", "GET", "/api/agents/b/inbox?limit=0", {}, 400, "invalid_field", "limit"),
    ("limit=501", "GET", "/api/agents/b/inbox?limit=501", {}, 400, "invalid_field", "limit"),
    ("since=-1", "GET", "/api/agents/b/inbox?since=-1", {}, 400, "invalid_field", "since"),
    ("since=1e3", "GET", "/api/agents/b/inbox?since=1e3", {}, 400, "invalid_field", "since"),
    ("unread=maybe", "GET", "/api/agents/b/inbox?unread=maybe", {}, 400, "invalid_field", "unread"),
    ("inbox of nobody", "GET", "/api/agents/ghost/inbox", {}, 404, "unknown_agent", "ghost"),
    ("unknown route", "GET", "/api/nope", {}, 404, "not_found", None),
    ("unknown sub-route", "GET", "/api/agents/b/nope", {}, 404, "not_found", None),
    ("unknown route, POST", "POST", "/api/nope", {"body": {}}, 404, "not_found", None),
    ("unknown page", "GET", "/nope.html", {}, 404, "not_found", None),
    ("message id not a number", "GET", "/api/messages/abc", {}, 404, "not_found", None),
    ("message that does not exist", "GET", "/api/messages/9999", {}, 404, "not_found", None),
    ("foreign Origin on a send", "POST", "/api/messages", {"body": msg(), "headers": {"Origin": "http://evil.example"}},
     403, "forbidden", None),
    ("foreign Origin on a delete", "DELETE", "/api/agents/a", {"headers": {"Origin": "https://evil.example"}},
     403, "forbidden", None),
    ("foreign Origin on a register", "POST", "/api/agents", {"body": {"id": "fresh"}, "headers": {"Origin": "null"}},
     403, "forbidden", None),
    ("foreign Host on a read", "GET", "/api/agents", {"headers": {"Host": "evil.example"}}, 403, "forbidden", None),
    ("foreign Host with a port", "GET", "/api/agents", {"headers": {"Host": "evil.example:4850"}}, 403, "forbidden", None),
    ("foreign Host on a send", "POST", "/api/messages", {"body": msg(), "headers": {"Host": "rebind.example"}},
     403, "forbidden", None),
]

# (method, path, the methods Allow must list)
WRONG_METHODS = [
    ("PUT", "/api/messages", {"GET", "POST"}),
    ("DELETE", "/api/messages", {"GET", "POST"}),
    ("DELETE", "/api/messages/1", {"GET"}),
    ("GET", "/api/messages/1/claim", {"POST"}),
    ("POST", "/api/agents/b/inbox", {"GET"}),
    ("PATCH", "/api/health", {"GET"}),
]


def test_bad_requests_are_refused_and_store_nothing(seeded):
    relay = seeded
    before = snapshot(relay)
    failures = []
    for name, method, path, kw, status, code, word in CASES:
        r = relay.request(method, path, **kw)
        assert_envelope(r)
        if (r.status, r.code) != (status, code):
            failures.append("%s: expected %s %s, got %r" % (name, status, code, r))
            continue
        if word is not None and word not in r.json["error"]["message"]:
            failures.append("%s: the message does not name %r: %r" % (name, word, r.json["error"]["message"]))
        after = snapshot(relay)
        if after != before:
            failures.append("%s: changed stored data (counts %r -> %r)" % (name, counts(before), counts(after)))
            before = after
    assert not failures, "\n".join(failures)
    # the relay still works, and the store is exactly as it was
    assert relay.post("/api/messages", msg(body="still fine")).status == 201
    assert counts(snapshot(relay))["messages"] == counts(before)["messages"] + 1
    assert_no_traceback(relay)


def test_wrong_methods_get_405_with_allow(seeded):
    relay = seeded
    before = snapshot(relay)
    for method, path, allowed in WRONG_METHODS:
        r = relay.request(method, path, body={} if method != "GET" else None)
        assert (r.status, r.code) == (405, "method_not_allowed"), (method, path, r)
        assert_envelope(r)
        allow = {m.strip() for m in r.headers.get("allow", "").split(",") if m.strip()}
        assert allow == allowed, (method, path, r.headers)
    assert snapshot(relay) == before
    assert_no_traceback(relay)


def test_the_relays_own_origin_and_host_are_welcome(seeded):
    """The guards above refuse strangers only: the same requests from the relay's own page pass."""
    relay = seeded
    own = "http://127.0.0.1:%d" % relay.port
    r = relay.post("/api/messages", msg(body="from the page"), headers={"Origin": own})
    assert r.status == 201, r
    for host in ("localhost:%d" % relay.port, "127.0.0.1", "[::1]:%d" % relay.port):
        r = relay.get("/api/agents", headers={"Host": host})
        assert r.status == 200, (host, r)
    r = relay.post("/api/messages", msg(body="page on localhost"),
                   headers={"Host": "localhost:%d" % relay.port, "Origin": "http://localhost:%d" % relay.port})
    assert r.status == 201, r
    assert_no_traceback(relay)


def test_the_allowed_hosts_variable_admits_a_name(relay_factory):
    relay = relay_factory(env={"AGENT_RELAY_ALLOWED_HOSTS": "relay.lan, other.lan"})
    assert relay.get("/api/agents", headers={"Host": "relay.lan:4850"}).status == 200
    assert relay.get("/api/agents", headers={"Host": "other.lan"}).status == 200
    r = relay.get("/api/agents", headers={"Host": "evil.example"})
    assert (r.status, r.code) == (403, "forbidden"), r
    assert_no_traceback(relay)


def test_half_sent_requests_do_not_block_others(seeded):
    relay = seeded
    stalled = []
    try:
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
            s.sendall(b"GET /api/heal" if i % 2 else b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            stalled.append(s)
        started = time.monotonic()
        r = relay.get("/api/health")
        served = time.monotonic() - started
        assert r.status == 200 and r.json["ok"] is True, r
        assert served < 1.0, "a normal request took %.2f s behind 20 stalled clients" % served
        started = time.monotonic()
        r = relay.post("/api/messages", msg(body="past the stalled ones"))
        assert r.status == 201 and time.monotonic() - started < 1.0, r
    finally:
        for s in stalled:
            s.close()
    assert relay.get("/api/health").status == 200
    assert_no_traceback(relay)


def raw_long_poll(relay, path):
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (path, relay.port)).encode())
    return s


def wait_not_listening(relay, agent_id, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not relay.get("/api/agents/" + agent_id).json["listening"]:
            return
        time.sleep(0.02)
    raise AssertionError("%s still listening" % agent_id)


def wait_listening(relay, agent_id, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if relay.get("/api/agents/" + agent_id).json["listening"]:
            return
        time.sleep(0.01)
    raise AssertionError("%s never started listening" % agent_id)


def test_a_client_that_hangs_up_mid_long_poll_leaves_no_traceback(seeded):
    relay = seeded
    since = relay.get("/api/cursor").json["cursor"]

    # hangs up, and the wait simply runs out
    s = raw_long_poll(relay, "/api/agents/a/inbox?since=%d&wait=1" % since)
    wait_listening(relay, "a")
    s.close()
    wait_not_listening(relay, "a")

    # hangs up, then a message arrives and wakes the abandoned long-poll
    s = raw_long_poll(relay, "/api/agents/a/inbox?since=%d&wait=10" % since)
    wait_listening(relay, "a")
    s.shutdown(socket.SHUT_RDWR)
    s.close()
    m = relay.send("b", "a", "nobody is listening on that connection")
    wait_not_listening(relay, "a")
    # the abandoned answer was not counted as delivered: the next poll gets it
    assert relay.sql("SELECT * FROM receipts WHERE agent_id = 'a' AND message_id = ?", (m["id"],)) == []
    got = relay.inbox("a", since=since)
    assert [x["id"] for x in got["messages"]] == [m["id"]]

    # and a stream that hangs up
    s = raw_long_poll(relay, "/api/events?agentId=a")
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    s.close()
    relay.send("b", "a", "wakes the stream writer")
    wait_not_listening(relay, "a")
    assert relay.get("/api/health").status == 200
    assert_no_traceback(relay)


HEAD_CASES = [
    # (what, the raw head after the request line, status, code, a word the message must hold)
    ("HTTP/2 on the request line", None, 505, "invalid_field", "HTTP/1.1"),
    ("a header without a colon", "X-Broken header\r\n", 400, "invalid_field", "malformed header"),
    ("a folded header line", "X-Long: one\r\n  two\r\n", 400, "invalid_field", "folded"),
    ("a space before the colon", "Content-Type : application/json\r\n", 400, "invalid_field", "malformed header"),
    ("a 70 KiB header line", "X-Big: " + "x" * 70000 + "\r\n", 431, "payload_too_large", "64 KiB"),
    ("101 header lines", "".join("X-H%d: v\r\n" % i for i in range(101)), 431, "payload_too_large", "100 header"),
]


@pytest.mark.parametrize("what,extra,status,code,word", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_malformed_request_heads_are_refused_and_send_nothing(seeded, what, extra, status, code, word):
    """The relay reads request heads itself: each malformed head gets a clear error in the envelope and stores nothing."""
    from conftest import raw_exchange
    relay = seeded
    before = snapshot(relay)
    body = json.dumps(msg(body="must not be stored")).encode()
    line = "POST /api/messages HTTP/2.0\r\n" if extra is None else "POST /api/messages HTTP/1.1\r\n"
    head = line + "Host: 127.0.0.1\r\n" + (extra or "") + "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    got, headers, raw = raw_exchange(relay.port, head.encode("latin-1") + body)
    assert got == status, (got, raw[:300])
    err = json.loads(raw)["error"]
    assert err["code"] == code and word in err["message"], err
    assert headers.get("connection") == "close"
    assert snapshot(relay) == before
    assert relay.post("/api/messages", msg(body="still fine")).status == 201
    assert_no_traceback(relay)


def test_request_heads_are_read_as_clients_send_them(seeded):
    """Header names in any case, repeated fields (the first wins), spaces around values, a bare LF line end,
    Connection: close on HTTP/1.1 and keep-alive on HTTP/1.0, and Expect: 100-continue."""
    from conftest import raw_exchange
    relay = seeded
    body = json.dumps(msg(body="odd but valid")).encode()
    head = ("POST /api/messages HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-TYPE:   application/json  \r\n"
            "Content-Length: %d\nX-Agent-Relay-Token: first\r\nX-Agent-Relay-Token: second\r\nConnection: close\r\n\r\n" % len(body))
    status, headers, raw = raw_exchange(relay.port, head.encode() + body)
    assert status == 201 and json.loads(raw)["message"]["body"] == "odd but valid", raw
    assert headers.get("connection") == "close"
    # HTTP/1.0 with keep-alive: two requests on one connection
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    try:
        one = b"GET /api/health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        s.sendall(one + one.replace(b"keep-alive", b"close"))
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        assert got.count(b"HTTP/1.1 200 OK") == 2, got
    finally:
        s.close()
    # Expect: 100-continue gets its interim answer before the body is sent
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    try:
        s.sendall(("POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   "Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" % len(body)).encode())
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        assert b"201 Created" in got, got
    finally:
        s.close()
    assert_no_traceback(relay)
