"""The live stream (GET /api/events, Server-Sent Events) as a client reads it.

Streams are read over a raw socket and parsed frame by frame (`id:`, `event:`,
`data:`, `:` comments), so the tests see exactly the bytes a browser's
EventSource or a curl one-liner sees. What a stream carries is checked against
what the relay stored in its events table, and replay is checked across a
restart, when the relay's in-memory ring is empty and events come from storage.
"""
import http.client
import json
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import wait_for

CONTRACT_TYPES = {
    "agent.registered", "agent.updated", "agent.offline", "agent.removed",
    "message.created", "message.read", "message.claimed", "message.released",
    "message.held", "message.approved", "message.rejected", "message.delivered", "message.replied",
    "task.created", "task.updated", "callback.delivered", "callback.failed", "lease.acquired", "lease.released",
}
FAST_PING = {"AGENT_RELAY_SSE_PING_MS": "200"}



class Stream:
    """One SSE connection over a raw socket: sends the GET, then parses blocks as they arrive.

    A block is a dict: "id" (int), "event", "data" (decoded JSON), "comments"
    (list of comment texts), "retry"; only the fields the block had.
    """

    def __init__(self, relay, path="/api/events", headers=None, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", relay.port), timeout=timeout)
        hdrs = {"Host": "127.0.0.1:%d" % relay.port, "Accept": "text/event-stream"}
        if relay.token:
            hdrs["Authorization"] = "Bearer " + relay.token
        hdrs.update(headers or {})
        head = "GET %s HTTP/1.1\r\n" % path + "".join("%s: %s\r\n" % kv for kv in hdrs.items()) + "\r\n"
        self.sock.sendall(head.encode("latin-1"))
        self.buf = b""
        raw_head = self._read_until(b"\r\n\r\n", timeout)
        lines = raw_head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.body = None
        if self.status != 200:
            n = int(self.headers.get("content-length", "0"))
            while len(self.buf) < n:
                self._fill(timeout)
            self.body = json.loads(self.buf[:n].decode("utf-8")) if n else None
        self.blocks = []  # every block read so far

    def _fill(self, timeout):
        self.sock.settimeout(max(0.001, timeout))
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the relay closed the stream")
        self.buf += data

    def _read_until(self, sep, timeout):
        deadline = time.monotonic() + timeout
        while sep not in self.buf:
            self._fill(deadline - time.monotonic())
        out, _, self.buf = self.buf.partition(sep)
        return out

    def block(self, timeout=10.0):
        """The next block; raises socket.timeout when none arrives in time."""
        raw = self._read_until(b"\n\n", timeout).decode("utf-8")
        b = {}
        for line in raw.split("\n"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "":
                b.setdefault("comments", []).append(value)
            elif field == "id":
                b["id"] = int(value)
            elif field == "data":
                assert "data" not in b, "one data line per event: %r" % raw
                b["data"] = json.loads(value)
            elif field in ("event", "retry"):
                b[field] = value
            else:
                raise AssertionError("unknown SSE field %r in %r" % (field, raw))
        self.blocks.append(b)
        return b

    def events_until(self, pred, timeout=10.0):
        """Read events (comments skipped) until pred(events) holds; returns the events read in this call."""
        got = []
        deadline = time.monotonic() + timeout
        while not pred(got):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("stream: condition not met in %.0f s; got %r" % (timeout, [(e["id"], e["event"]) for e in got]))
            try:
                b = self.block(left)
            except socket.timeout:
                continue
            if "event" in b:
                got.append(b)
        return got

    def until_event(self, type_, pred=lambda data: True, timeout=10.0):
        """Events up to and including the first of type_ whose data satisfies pred."""
        return self.events_until(lambda evs: bool(evs) and evs[-1]["event"] == type_ and pred(evs[-1]["data"]), timeout)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def vanish(self):
        """Drop the connection with a reset, as a killed process or a lost network does."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()


def stored(relay, after=0):
    return [(r["id"], r["type"]) for r in relay.sql("SELECT id, type FROM events WHERE id > ? ORDER BY id", (after,))]


def ids_increase(events):
    ids = [e["id"] for e in events]
    assert all(isinstance(i, int) for i in ids)
    assert all(a < b for a, b in zip(ids, ids[1:])), ids
    return ids


def marker(relay, name):
    """A registration used as a fence: everything before it in a stream was sent before it."""
    relay.register(name)
    return lambda data: data.get("agent", {}).get("id") == name


def is_agent(name):
    return lambda data: data.get("agent", {}).get("id") == name


# ---------------------------------------------------------------------------


def test_registration_message_claim_and_task_change_arrive_in_order(relay):
    s = Stream(relay)
    try:
        assert s.status == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        assert s.headers.get("cache-control") == "no-cache"
        first = s.block()
        assert first.get("retry") == "2000" and first.get("comments") == ["connected"]

        relay.register("worker", tags=["build"])
        msg = relay.send("human", "worker", "take this one", claimable=True)
        assert relay.post("/api/messages/%d/claim" % msg["id"], {"agentId": "worker"}).status == 200
        task = relay.post("/api/tasks", {"title": "Fix the build", "target": "tag:build"}).json["task"]
        assert relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "worker"}).status == 200
        assert relay.patch("/api/tasks/%d/status" % task["id"], {"agentId": "worker", "progress": 50}).status == 200
        got = s.until_event("task.updated", lambda d: d["task"]["progress"] == 50)
    finally:
        s.close()

    kinds = [e["event"] for e in got]
    for t in ("agent.registered", "message.created", "message.claimed", "task.created", "task.updated"):
        assert t in kinds, kinds
    assert kinds.index("agent.registered") < kinds.index("message.created") < kinds.index("message.claimed") < kinds.index("task.created")
    ids_increase(got)
    by = {}
    for e in got:
        by.setdefault(e["event"], e["data"])  # the first of each type (creating a task also creates its message)
    assert by["agent.registered"]["agent"]["id"] == "worker" and by["agent.registered"]["agent"]["tags"] == ["build"]
    assert by["message.created"]["message"]["id"] == msg["id"] and by["message.created"]["message"]["body"] == "take this one"
    assert by["message.claimed"]["message"]["claimedBy"] == "worker"
    assert by["task.created"]["task"]["id"] == task["id"] and by["task.created"]["task"]["title"] == "Fix the build"
    assert got[-1]["data"]["task"]["claimedBy"] == "worker" and got[-1]["data"]["task"]["status"] == "claimed"
    # What the stream said is what the relay stored, id for id.
    assert [(e["id"], e["event"]) for e in got] == stored(relay)[: len(got)]


class _Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_every_event_type_of_the_contract_is_emitted_well_formed(relay_factory):
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    integrations = [
        {"name": "tracker", "token": "tracker-token-1", "scopes": ["tasks:create"], "targets": ["tag:oncall"],
         "callbackUrl": "http://127.0.0.1:%d/hook" % receiver.server_address[1]},
        {"name": "gone", "token": "gone-token-123", "scopes": ["tasks:create"], "targets": ["tag:oncall"],
         "callbackUrl": "http://127.0.0.1:%d/hook" % _closed_port()},
    ]
    relay = relay_factory(env={"AGENT_RELAY_INTEGRATIONS": json.dumps(integrations), "AGENT_RELAY_CALLBACK_MAX_ATTEMPTS": "1"})
    s = Stream(relay)
    try:
        relay.register("w1", tags=["oncall"])
        relay.register("guard", approvalMode="guarded")
        assert relay.patch("/api/agents/w1", {"label": "builder"}).status == 200
        m = relay.send("human", "w1", "work item", claimable=True)
        assert relay.post("/api/messages/%d/claim" % m["id"], {"agentId": "w1"}).status == 200
        assert relay.post("/api/messages/%d/release" % m["id"], {"agentId": "w1"}).status == 200
        assert relay.post("/api/messages/%d/read" % m["id"], {"agentId": "w1"}).status == 200
        upto = relay.send("human", "w1", "read up to here")
        assert relay.post("/api/agents/w1/read", {"upTo": m["id"] + 1}).json["count"] == 1
        chat = relay.send("human", "w1", "are you there?")
        assert chat["id"] in [x["id"] for x in relay.inbox("w1")["messages"]]
        answer = relay.send("w1", "human", "here", replyTo=chat["id"])
        held1 = relay.send("w1", "guard", "please approve")
        held2 = relay.send("w1", "guard", "please reject")
        assert relay.post("/api/messages/%d/approve" % held1["id"], {"agentId": "guard"}).status == 200
        assert relay.post("/api/messages/%d/reject" % held2["id"], {"agentId": "guard"}).status == 200
        task = relay.post("/api/tasks", {"title": "Rotate keys", "target": "w1"}).json["task"]
        assert relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "w1"}).status == 200
        lease = relay.post("/api/leases", {"agentId": "w1", "paths": ["src/api/"], "reason": "rotating keys"}).json["lease"]
        assert relay.delete("/api/leases/%d?agentId=w1" % lease["id"]).status == 200
        for name, token in (("tracker", "tracker-token-1"), ("gone", "gone-token-123")):
            r = relay.post("/api/integrations/events", {"dedupeKey": "disk-" + name, "title": "Disk full"},
                           headers={"Authorization": "Bearer " + token})
            assert r.status == 201, r
        assert relay.delete("/api/agents/guard").status == 200
        assert relay.delete("/api/agents/guard?purge=true").status == 200
        got = s.events_until(lambda evs: {e["event"] for e in evs} >= CONTRACT_TYPES, timeout=15)
    finally:
        s.close()
        receiver.shutdown()

    ids_increase(got)
    # the spec documents each type and its data (components/schemas/Event, a oneOf over Event.<type>)
    spec = relay.spec_check()
    documented = {ref["$ref"].rsplit("/", 1)[1][len("Event."):] for ref in spec.spec["components"]["schemas"]["Event"]["oneOf"]}
    assert documented >= CONTRACT_TYPES, sorted(CONTRACT_TYPES - documented)
    for e in got:
        assert e["event"] in CONTRACT_TYPES, e
        problem = spec.component_problem("Event", {k: e[k] for k in ("id", "event", "data")})
        assert problem is None, (problem, e)
        d = e["data"]
        kind = e["event"]
        if kind.startswith("agent."):
            assert isinstance(d["agent"]["id"], str) and "status" in d["agent"]
        elif kind == "message.read":
            assert d["agentId"] == "w1" and d["messageId"] in (m["id"], upto["id"])
        elif kind == "message.delivered":
            assert d["agentId"] == "w1" and d["messageId"] == chat["id"] and isinstance(d["deliveredAt"], int)
        elif kind == "message.replied":
            assert d == {"messageId": chat["id"], "agentId": "w1", "replyId": answer["id"]}
        elif kind in ("message.held", "message.approved", "message.rejected"):
            assert d["agentId"] == "guard" and d["message"]["from"] == "w1"
        elif kind.startswith("message."):
            assert isinstance(d["message"]["id"], int)
        elif kind.startswith("task."):
            assert isinstance(d["task"]["id"], int) and d["task"]["status"] in ("open", "claimed", "blocked", "done", "failed", "canceled")
        elif kind.startswith("lease."):
            assert d["lease"]["id"] == lease["id"] and d["lease"]["paths"] == ["src/api/"] and d["lease"]["agentId"] == "w1"
            assert (d.get("cause"), d["lease"]["releasedAt"] is None) == ((None, True) if kind == "lease.acquired" else ("released", False))
        else:
            assert d["callback"]["status"] == kind.split(".")[1]
    first = {}
    for e in got:
        first.setdefault(e["event"], e["data"])
    assert first["agent.updated"]["agent"]["label"] == "builder"
    assert first["agent.offline"]["agent"]["id"] == "guard" and first["agent.offline"]["agent"]["status"] == "offline"
    assert first["agent.removed"]["agent"]["id"] == "guard"
    assert first["message.released"]["message"]["claimedBy"] is None
    assert first["message.held"]["message"]["id"] == held1["id"]
    assert first["message.approved"]["message"]["id"] == held1["id"]
    assert first["message.rejected"]["message"]["id"] == held2["id"]
    stored_ids = dict(stored(relay))
    assert all(stored_ids[e["id"]] == e["event"] for e in got)


def test_the_api_reference_lists_every_event_type():
    """docs/api.md's table of stream events names every type the contract has (each is emitted: see above)."""
    from conftest import ROOT

    with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as f:
        text = f.read()
    table = text[text.index("| Event | `data` |"):]
    table = table[:table.index("\n\n")]
    missing = sorted(t for t in CONTRACT_TYPES if "`%s`" % t not in table)
    assert not missing, "docs/api.md's event table lacks %r" % missing


def test_a_stream_without_a_cursor_states_where_it_starts_so_a_client_that_drops_at_once_misses_nothing(relay_factory):
    relay = relay_factory()
    relay.register("a")
    relay.register("b")
    s = Stream(relay)
    first = s.block()  # the preamble: an id without data, which an SSE client keeps as its Last-Event-ID
    assert "event" not in first and "data" not in first, first
    start = first["id"]
    assert start == stored(relay)[-1][0]  # the newest event when it opened
    s.vanish()  # gone before any event came
    relay.send("a", "b", "sent while nobody listened")
    again = Stream(relay, headers={"Last-Event-ID": str(start)})
    try:
        got = again.until_event("message.created")
        assert [e["data"]["message"]["body"] for e in got if e["event"] == "message.created"] == ["sent while nobody listened"]
        assert all(e["id"] > start for e in got)
    finally:
        again.close()


def test_reconnect_with_last_event_id_gets_exactly_what_it_missed_also_after_a_restart(relay_factory):
    relay = relay_factory(env=FAST_PING)
    relay.register("a")
    relay.register("b")
    s = Stream(relay)
    relay.send("a", "b", "one")
    relay.send("a", "b", "two")
    seen = s.until_event("message.created", lambda d: d["message"]["body"] == "two")
    last = seen[-1]["id"]
    s.close()

    # Missed while away: a message, a label change, an agent.
    relay.send("b", "a", "three")
    relay.patch("/api/agents/a", {"label": "alpha"})
    relay.register("c")
    missed = stored(relay, last)
    assert len(missed) == 3

    def replay(path, headers=None):
        """Events a new stream sends before a fence registered after it opened, and the fence's id."""
        st = Stream(relay, path, headers=headers)
        try:
            assert st.status == 200, st.body
            fence = marker(relay, "fence-%d" % len(stored(relay)))
            got = st.until_event("agent.registered", fence)
            return [(e["id"], e["event"]) for e in got[:-1]], got[-1]["id"]
        finally:
            st.close()

    def missed_before(fence_id):
        return [e for e in stored(relay, last) if e[0] < fence_id]

    # From memory (the ring), by header and by ?since=; the header wins over the query.
    for path, headers in (("/api/events", {"Last-Event-ID": str(last)}), ("/api/events?since=%d" % last, None),
                          ("/api/events?since=0", {"Last-Event-ID": str(last)})):
        got, fence_id = replay(path, headers)
        assert got == missed_before(fence_id) and got[:3] == missed

    # After a restart the ring is empty: the same cursor replays the same events from storage.
    relay.restart()
    got, fence_id = replay("/api/events", {"Last-Event-ID": str(last)})
    assert got == missed_before(fence_id) and got[:3] == missed
    relay.restart(kill=True)
    got, fence_id = replay("/api/events?since=%d" % last)
    assert got == missed_before(fence_id) and got[:3] == missed
    # Without a cursor a stream starts at the newest event: nothing old is replayed.
    assert replay("/api/events")[0] == []
    got, fence_id = replay("/api/events?since=0")
    assert got == [e for e in stored(relay) if e[0] < fence_id]

    # A cursor from another database (ahead of this relay) starts live instead of going silent.
    head = stored(relay)[-1][0]
    st = Stream(relay, headers={"Last-Event-ID": str(head + 1000)})
    try:
        relay.register("after-cursor")
        got = st.until_event("agent.registered", is_agent("after-cursor"))
        assert [e["data"]["agent"]["id"] for e in got] == ["after-cursor"]
    finally:
        st.close()

    bad = Stream(relay, headers={"Last-Event-ID": "yesterday"})
    assert bad.status == 400 and bad.body["error"]["code"] == "invalid_field" and "Last-Event-ID" in bad.body["error"]["message"]
    bad.close()


def test_an_agents_stream_carries_its_own_messages_only_and_marks_it_listening(relay):
    relay.register("alice")
    relay.register("bob", tags=["x"], capabilities=["review"])
    relay.register("carol", tags=["y"])
    assert relay.get("/api/agents/bob").json["listening"] is False
    s = Stream(relay, "/api/events?agentId=bob")
    try:
        assert s.status == 200
        assert wait_for(lambda: relay.get("/api/agents/bob").json["listening"] is True)
        assert relay.get("/api/agents/carol").json["listening"] is False
        assert relay.get("/api/stats").json["agents"]["listening"] == 1

        to_bob = relay.send("alice", "bob", "direct to bob")
        relay.send("alice", "carol", "direct to carol")
        relay.send("carol", "alice", "carol to alice")
        fan = [relay.send("alice", "tag:x", "tag x"), relay.send("alice", "cap:review", "cap review"),
               relay.send("carol", "broadcast", "everyone")]
        relay.send("alice", "tag:y", "tag y is carol")
        own = relay.send("bob", "carol", "bob writes to carol")
        relay.patch("/api/agents/carol", {"label": "not-bob"})
        relay.register("dave")
        relay.patch("/api/agents/bob", {"label": "bobby"})
        got = s.until_event("agent.updated", is_agent("bob"))
    finally:
        s.close()

    ids_increase(got)
    created = [e["data"]["message"] for e in got if e["event"] == "message.created"]
    assert [m["id"] for m in created] == [to_bob["id"]] + [m["id"] for m in fan] + [own["id"]]
    assert [e["event"] for e in got if not e["event"].startswith("message.")] == ["agent.updated"]
    for e in got:
        if "agent" in e["data"]:
            assert e["data"]["agent"]["id"] == "bob"
    # The messages it was shown are the ones its inbox holds.
    inbox = relay.inbox("bob", since=0)["messages"]
    assert [m["id"] for m in inbox] == [to_bob["id"]] + [m["id"] for m in fan]

    # The relay notices the closed stream on its own (well before a 15 s keep-alive would write).
    assert wait_for(lambda: relay.get("/api/agents/bob").json["listening"] is False, timeout=5)
    assert relay.get("/api/stats").json["streams"] == 0


def test_types_filter_and_narrowing_refusals(relay):
    relay.register("a")
    relay.register("b")
    s = Stream(relay, "/api/events?types=message.created,agent.updated")
    try:
        relay.register("c")
        relay.send("a", "b", "hello")
        relay.post("/api/messages/1/read", {"agentId": "b"})
        relay.patch("/api/agents/c", {"label": "last"})
        got = s.until_event("agent.updated", is_agent("c"))
    finally:
        s.close()
    assert [e["event"] for e in got] == ["message.created", "agent.updated"]
    assert got[0]["data"]["message"]["body"] == "hello"
    assert "agent.registered" in [t for _, t in stored(relay)] and "message.read" in [t for _, t in stored(relay)]

    unknown = Stream(relay, "/api/events?agentId=nobody")
    assert unknown.status == 404 and unknown.body["error"]["code"] == "unknown_agent"
    unknown.close()
    bad = Stream(relay, "/api/events?since=abc")
    assert bad.status == 400 and bad.body["error"]["code"] == "invalid_field"
    bad.close()


def test_keep_alive_comments_arrive_at_the_configured_interval(relay_factory):
    relay = relay_factory(env=FAST_PING)
    s = Stream(relay)
    try:
        pings = []
        while len(pings) < 3:
            b = s.block(timeout=5)
            assert "event" not in b
            if b.get("comments") == ["ping"]:
                pings.append(time.monotonic())
        # Events still flow between keep-alives.
        relay.register("between")
        s.until_event("agent.registered", is_agent("between"))
    finally:
        s.close()


def test_a_stream_needs_the_token_in_a_header_not_the_url(relay_factory):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": "stream-token-123"})
    no = Stream(relay, headers={"Authorization": ""})
    assert no.status == 401 and no.body["error"]["code"] == "unauthorized"
    no.close()
    in_url = Stream(relay, "/api/events?token=stream-token-123", headers={"Authorization": ""})
    assert in_url.status in (400, 401) and "URL" in in_url.body["error"]["message"]
    in_url.close()
    ok = Stream(relay, headers={"X-Agent-Relay-Token": "stream-token-123", "Authorization": ""})
    try:
        assert ok.status == 200
        relay.register("tokened")
        ok.until_event("agent.registered", is_agent("tokened"))
    finally:
        ok.close()


def _threads(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to count the relay's threads")
def test_clients_that_vanish_mid_stream_leave_no_thread_behind(relay):
    # The default keep-alive (15 s): the relay must notice the hang-ups by itself, not at the next ping.
    for a in ("src", "w0", "w1", "w2"):
        relay.register(a)
    assert relay.get("/api/stats").json["streams"] == 0
    baseline = _threads(relay.proc.pid)
    streams = [Stream(relay), Stream(relay, "/api/events?agentId=w0"), Stream(relay, "/api/events?agentId=w1"),
               Stream(relay, "/api/events?types=message.created"), Stream(relay, "/api/events?agentId=w2&since=0")]
    assert all(s.status == 200 for s in streams)
    assert wait_for(lambda: relay.get("/api/stats").json["streams"] == len(streams))
    # (they wait in the waiting room, without a thread each; tests/test_waiting_room.py counts the threads)
    for s in streams:
        s.block()  # connected

    # A burst in flight while the clients disappear: some reset, some close politely.
    stop = threading.Event()

    def burst():
        c = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
        try:
            for n in range(300):
                if stop.is_set():
                    break
                body = json.dumps({"from": "src", "to": "w%d" % (n % 3), "body": "x" * 2000})
                c.request("POST", "/api/messages", body=body, headers={"Content-Type": "application/json"})
                c.getresponse().read()
        finally:
            c.close()  # its connection thread on the relay ends too

    t = threading.Thread(target=burst, daemon=True)
    t.start()
    streams[0].events_until(lambda evs: len(evs) >= 3)  # the burst is flowing
    for i, s in enumerate(streams):
        s.vanish() if i % 2 else s.close()
    stop.set()
    t.join(30)

    assert wait_for(lambda: relay.get("/api/stats").json["streams"] == 0, timeout=8), relay.get("/api/stats").json
    assert all(relay.get("/api/agents/" + a).json["listening"] is False for a in ("w0", "w1", "w2"))
    assert wait_for(lambda: _threads(relay.proc.pid) <= baseline, timeout=8), (_threads(relay.proc.pid), baseline)
    # And the relay still streams to a new client.
    s = Stream(relay)
    try:
        relay.register("still-here")
        s.until_event("agent.registered", is_agent("still-here"))
    finally:
        s.close()
