"""Slow and broken clients: half-sent requests that stall, and clients that hang up mid-answer.

While 200 connections sit on half a request, a normal client is still served
within a second; clients that disconnect in the middle of a large answer, of a
stream or of a long-poll cost nothing lasting; a connection stalled in its
request's head gets 408 `request_timeout` and is dropped when the head's deadline
(AGENT_RELAY_HEAD_TIMEOUT_MS, 10 s by default) is up, one stalled in its body as
soon as its client closes, and then the relay's threads and file descriptors are
back where they were, with no traceback logged. (This file takes about 15 s: it
waits out the head's deadline.)
"""
import json
import os
import socket
import threading
import time

import pytest

from conftest import hang_up, wait_for


def counts(pid):
    with open("/proc/%d/status" % pid) as f:
        threads = int([line for line in f if line.startswith("Threads:")][0].split()[1])
    return threads, len(os.listdir("/proc/%d/fd" % pid))


def settle(pid, target, timeout=15):
    """Waits until the relay's (threads, fds) are back to `target` (or below); returns the last reading."""
    deadline = time.monotonic() + timeout
    now = counts(pid)
    while time.monotonic() < deadline:
        now = counts(pid)
        if now[0] <= target[0] and now[1] <= target[1]:
            break
        time.sleep(0.1)
    return now


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def warm_up(relay):
    """Fill the relay's reader pool and start its workers, so the baseline is the steady state."""
    threads = [threading.Thread(target=lambda: [relay.get("/api/messages?limit=5") for _ in range(5)]) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.fixture
def relay(relay_factory):
    # streams notice a vanished client when they next write: a 1 s keep-alive makes that prompt
    return relay_factory(env={"AGENT_RELAY_SSE_PING_MS": "1000"})


def test_stalled_and_vanishing_clients_cost_nothing_lasting(relay):
    pid = relay.proc.pid
    relay.register("alice")
    relay.register("bob")
    big = "x" * 60000
    for i in range(40):
        relay.send("alice", "bob", "%d %s" % (i, big))
    warm_up(relay)
    baseline = settle(pid, counts(pid), timeout=2)

    # 200 connections that send half a request and stall: half stop inside the headers, half inside the body
    stalled = []
    for i in range(200):
        s = connect(relay.port)
        if i % 2:
            s.sendall(b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
        else:
            s.sendall(b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"from\": \"alice\", ")
        stalled.append(s)
    time.sleep(0.5)
    busy = counts(pid)
    assert busy[0] >= baseline[0] + 150, "the stalled connections should each hold a handler (%r)" % (busy,)

    # a normal client is served promptly all the while
    r, took = timed(lambda: relay.get("/api/health"))
    assert r.status == 200 and took < 1.0, took
    r, took = timed(lambda: relay.post("/api/messages", {"from": "alice", "to": "bob", "body": "still here"}))
    assert r.status == 201 and took < 1.0, took

    # clients that hang up in the middle of a 2.4 MB answer
    for _ in range(30):
        s = connect(relay.port)
        s.sendall(b"GET /api/messages?limit=40 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.recv(1024)
        hang_up(s)
    # ... in the middle of a stream, and of a long-poll
    for i in range(30):
        s = connect(relay.port)
        path = "/api/events?since=0" if i % 2 else "/api/events?agentId=bob"
        s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path).encode())
        s.recv(1024)
        hang_up(s)
    for i in range(30):
        s = connect(relay.port)
        s.sendall(b"GET /api/agents/alice/inbox?wait=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.01)
        hang_up(s)
    # ... and before even finishing the request line
    for _ in range(30):
        s = connect(relay.port)
        s.sendall(b"GET /api/heal")
        hang_up(s)
    r, took = timed(lambda: relay.get("/api/agents/bob/inbox?since=0&limit=1"))
    assert r.status == 200 and took < 1.0, took

    # half the stalled clients give up; the relay answers the other half 408 and drops them at the head's deadline
    for s in stalled[::2]:
        s.close()
    after = settle(pid, baseline, timeout=45)
    for s in stalled[1::2]:
        s.settimeout(5)
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head, "a stalled connection got %r" % data[:200]
        assert json.loads(body)["error"]["code"] == "request_timeout", body
        s.close()
    assert after[0] <= baseline[0], "threads: %d before, %d after" % (baseline[0], after[0])
    assert after[1] <= baseline[1], "file descriptors: %d before, %d after" % (baseline[1], after[1])
    stats = relay.get("/api/stats").json
    assert stats["longPolls"] == 0 and stats["streams"] == 0, stats
    # the long-polls nobody was waiting for did not mark anything as delivered to alice
    assert relay.sql("SELECT COUNT(*) AS n FROM receipts WHERE agent_id = 'alice'") == [{"n": 0}]
    assert relay.proc.poll() is None
    assert "Traceback" not in relay.log, relay.log
    # and nothing the stalled clients half-sent was stored
    assert [m["body"] for m in relay.inbox("bob", since=40)["messages"]] == ["still here"]


def test_an_abandoned_long_poll_delivers_nothing(relay):
    """A long-poll whose client is gone does not swallow the message that wakes it."""
    relay.register("alice")
    relay.register("bob")
    s = connect(relay.port)
    s.sendall(b"GET /api/agents/bob/inbox?wait=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert wait_for(lambda: relay.get("/api/stats").json["longPolls"] == 1, timeout=5)
    hang_up(s)
    m = relay.send("alice", "bob", "for whoever polls next")
    out = relay.inbox("bob")
    assert [x["id"] for x in out["messages"]] == [m["id"]]
    assert json.loads(json.dumps(out))["messages"][0]["body"] == "for whoever polls next"
