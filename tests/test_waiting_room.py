"""The waiting room: connections that wait hold no thread.

Requests run on a pool of workers; an idle keep-alive connection between requests, a long-poll that has to
wait and a stream between events wait in one thread's selector. What a client sees must not change: a hang-up
is noticed at once where the connection waits (the agent stops listening, and a message it was waiting for is
kept for its next poll), requests pipelined behind a parked connection are answered in order, thousands of
waiting connections cost a bounded number of threads, and SIGTERM with thousands parked answers every long-poll
and ends every stream on a frame boundary. The thread-per-connection path (Windows, where select() takes 512
sockets) still serves all of it.

No test here asserts a time: waits are bounded only so that a broken relay fails instead of hanging.
"""
import json
import os
import selectors
import signal
import socket
import sys
import time

import pytest

from conftest import RELAY_PY, hang_up, wait_for

LINUX = sys.platform.startswith("linux")
QUIET = {"AGENT_RELAY_SSE_PING_MS": "600000"}  # no keep-alive comment could notice a hang-up in these tests


def threads_of(pid):
    return len(os.listdir("/proc/%d/task" % pid))


def open_files(need):
    """Raises this process's descriptor limit (the relay inherits it); skips when `need` are not to be had."""
    try:
        import resource
    except ImportError:
        pytest.skip("no resource module")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(hard, max(soft, need))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < need:
        pytest.skip("needs %d descriptors, the limit is %d" % (need, want))


def request(method, path, body=None, close=False):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1"]
    data = b""
    if body is not None:
        data = json.dumps(body).encode()
        lines += ["Content-Type: application/json", "Content-Length: %d" % len(data)]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def take_answer(buf):
    """(status, headers, body, rest) for the first whole answer in buf, else None."""
    head, sep, rest = buf.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers.get("content-length", 0))
    if len(rest) < n:
        return None
    return int(lines[0].split(" ")[1]), headers, rest[:n], rest[n:]


def read_answers(s, count, timeout=30):
    s.settimeout(timeout)
    buf, out = b"", []
    while len(out) < count:
        got = take_answer(buf)
        if got is not None:
            out.append(got[:3])
            buf = got[3]
            continue
        chunk = s.recv(65536)
        assert chunk, "the relay closed the connection after %d answers: %r" % (len(out), buf[:300])
        buf += chunk
    return out


def listening(relay, agent):
    return relay.get("/api/agents/" + agent).json["listening"]


def stats(relay):
    return relay.get("/api/stats").json


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_parked_stream_notices_its_client_hang_up_at_once(relay_factory, reset):
    relay = relay_factory(env=QUIET)
    relay.register("src")
    relay.register("w")
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    s.sendall(request("GET", "/api/events?agentId=w"))
    assert s.recv(12) == b"HTTP/1.1 200"
    assert wait_for(lambda: listening(relay, "w"))
    relay.send("src", "w", "one event while it waits")
    hang_up(s) if reset else s.close()
    # nothing else would end it: no keep-alive comment is due for ten minutes, and no event comes
    assert wait_for(lambda: not listening(relay, "w") and stats(relay)["streams"] == 0, timeout=30), stats(relay)
    assert relay.proc.poll() is None and "Traceback" not in relay.log


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_parked_long_poll_notices_its_client_hang_up_and_the_message_waits_for_the_next_poll(relay_factory, reset):
    relay = relay_factory(env=QUIET)
    relay.register("src")
    relay.register("w")
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    s.sendall(request("GET", "/api/agents/w/inbox?wait=60"))
    assert wait_for(lambda: listening(relay, "w") and stats(relay)["longPolls"] == 1)
    hang_up(s) if reset else s.close()
    assert wait_for(lambda: not listening(relay, "w") and stats(relay)["longPolls"] == 0, timeout=30), stats(relay)
    m = relay.send("src", "w", "for the next poll")
    assert [x["id"] for x in relay.inbox("w")["messages"]] == [m["id"]]  # from its kept cursor
    assert relay.sql("SELECT state FROM receipts WHERE agent_id = 'w'") == [{"state": "delivered"}]
    assert relay.inbox("w")["messages"] == []  # exactly once
    assert "Traceback" not in relay.log


def test_requests_pipelined_behind_a_parked_connection_are_answered_in_order(relay):
    relay.register("a")
    relay.register("b")
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
    try:
        s.sendall(request("GET", "/api/health"))
        assert read_answers(s, 1)[0][0] == 200
        time.sleep(0.3)  # idle for longer than a worker looks for its next request: it waits in the room
        # the next requests come in one write, and are answered one after the other
        s.sendall(request("POST", "/api/messages", {"from": "a", "to": "b", "body": "first"})
                  + request("GET", "/api/agents/b/inbox?since=0") + request("GET", "/api/health"))
        (st1, _, b1), (st2, _, b2), (st3, _, _) = read_answers(s, 3)
        assert (st1, st2, st3) == (201, 200, 200)
        assert [m["body"] for m in json.loads(b2)["messages"]] == ["first"]
        # a long-poll that has to wait, with a request behind it: the request is answered after the poll
        cursor = json.loads(b2)["cursor"]
        s.sendall(request("GET", "/api/agents/b/inbox?wait=60&since=%d" % cursor) + request("GET", "/api/health"))
        assert wait_for(lambda: stats(relay)["longPolls"] == 1)
        relay.send("a", "b", "second")
        (st1, _, b1), (st2, _, b2) = read_answers(s, 2)
        assert (st1, st2) == (200, 200)
        assert [m["body"] for m in json.loads(b1)["messages"]] == ["second"] and json.loads(b2)["ok"] is True
    finally:
        s.close()
    assert "Traceback" not in relay.log


def open_crowd(port, idle, polls, streams):
    """Connections that stay open: `idle` keep-alive connections that made one request each, then long-polls for
    agents p0.., then narrowed streams for agents s0... Returns the sockets, the idle ones first."""
    socks = []
    for _ in range(idle):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(request("GET", "/api/health"))
        socks.append(s)
    for s in socks:
        assert read_answers(s, 1)[0][0] == 200
    for i in range(polls):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(request("GET", "/api/agents/p%d/inbox?wait=60" % i, close=True))
        socks.append(s)
    for i in range(streams):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(request("GET", "/api/events?agentId=s%d" % i))
        socks.append(s)
    return socks


def register_many(relay, ids):
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=60)
    try:
        for k in range(0, len(ids), 100):
            batch = ids[k:k + 100]
            s.sendall(b"".join(request("POST", "/api/agents", {"id": a}) for a in batch))
            assert all(a[0] in (200, 201) for a in read_answers(s, len(batch), timeout=60))
    finally:
        s.close()


@pytest.mark.skipif(not LINUX, reason="counts the relay's threads in /proc")
def test_thousands_of_waiting_connections_cost_a_bounded_number_of_threads(relay_factory):
    idle, polls, streams = 2000, 1000, 200
    open_files(idle + polls + streams + 500)
    relay = relay_factory(env=dict(QUIET, AGENT_RELAY_WORKERS="16"))
    register_many(relay, ["p%d" % i for i in range(polls)] + ["s%d" % i for i in range(streams)] + ["src"])
    before = threads_of(relay.proc.pid)
    socks = open_crowd(relay.port, idle, polls, streams)
    try:
        assert wait_for(lambda: (lambda st: st["longPolls"] == polls and st["streams"] == streams)(stats(relay)), timeout=120), stats(relay)
        held = threads_of(relay.proc.pid)
        # the pool's workers (16 at most at work), the waiting room, and the relay's own: not one per connection
        assert held <= before + 16 + 4, (before, held)
        assert held < 100
        # and they are all still served: a message reaches its long-poll
        relay.send("src", "p7", "still served")
        s = socks[idle + 7]
        (status, _, body), = read_answers(s, 1)
        assert status == 200 and [m["body"] for m in json.loads(body)["messages"]] == ["still served"]
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: (lambda st: st["longPolls"] == 0 and st["streams"] == 0)(stats(relay)), timeout=60)
    # once they have left, so have the threads started for them
    assert wait_for(lambda: threads_of(relay.proc.pid) <= before + 1, timeout=30), (before, threads_of(relay.proc.pid))
    assert "Traceback" not in relay.log


def read_until_closed(socks, timeout=60):
    """Reads every socket until the relay closes it; returns what each got."""
    sel = selectors.DefaultSelector()
    got = {}
    for s in socks:
        s.setblocking(False)
        got[s] = b""
        sel.register(s, selectors.EVENT_READ)
    try:
        while sel.get_map():
            ready = sel.select(timeout)
            assert ready, "%d connections were neither answered nor closed" % len(sel.get_map())
            for key, _ in ready:
                try:
                    chunk = key.fileobj.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    got[key.fileobj] += chunk
                else:
                    sel.unregister(key.fileobj)
    finally:
        sel.close()
    return got


def whole_frames(body):
    """The SSE body ends on a frame boundary and every frame with data is whole."""
    assert body.endswith(b"\n\n"), body[-200:]
    for block in body.decode("utf-8").split("\n\n")[:-1]:
        fields = dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":") and ": " in line)
        if "data" in fields:
            assert "id" in fields and "event" in fields
            json.loads(fields["data"])


@pytest.mark.skipif(not LINUX, reason="counts the relay's threads in /proc")
def test_sigterm_with_thousands_parked_answers_them_all_and_exits_cleanly(relay_factory):
    idle, polls, streams = 1000, 2000, 500
    open_files(idle + polls + streams + 500)
    relay = relay_factory(env=QUIET)
    register_many(relay, ["p%d" % i for i in range(polls)] + ["s%d" % i for i in range(streams)])
    socks = open_crowd(relay.port, idle, polls, streams)
    try:
        assert wait_for(lambda: (lambda st: st["longPolls"] == polls and st["streams"] == streams)(stats(relay)), timeout=120), stats(relay)
        assert threads_of(relay.proc.pid) < 100
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.proc.wait(60) == 0, relay.log
        got = read_until_closed(socks)
    finally:
        for s in socks:
            s.close()
    assert "Traceback" not in relay.log, relay.log
    for s in socks[:idle]:
        assert got[s] == b""  # waiting for a next request that never came: closed, nothing to answer
    for s in socks[idle:idle + polls]:
        status, _, body, rest = take_answer(got[s])
        assert status == 200 and rest == b"", got[s][:300]
        assert json.loads(body)["messages"] == []
    for s in socks[idle + polls:]:
        head, _, body = got[s].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), got[s][:300]
        whole_frames(body)


WRAPPER = """import sys
sys.path.insert(0, %r)
import agent_relay
agent_relay.WAITING_ROOM = False  # as on Windows: a thread per connection
sys.exit(agent_relay.main(sys.argv[1:]))
""" % os.path.dirname(RELAY_PY)


def test_without_the_waiting_room_a_thread_per_connection_serves_the_same(relay_factory, tmp_path):
    wrapper = tmp_path / "threads.py"
    wrapper.write_text(WRAPPER)
    relay = relay_factory(env={"AGENT_RELAY_SSE_PING_MS": "500"}, script=str(wrapper))
    relay.register("a")
    relay.register("b")
    relay.register("w")
    # a long-poll woken by a send, with a request pipelined behind it
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
    s.sendall(request("GET", "/api/agents/b/inbox?wait=60") + request("GET", "/api/health"))
    assert wait_for(lambda: stats(relay)["longPolls"] == 1)
    if LINUX:
        assert threads_of(relay.proc.pid) >= 4  # this path keeps a thread per connection
    relay.send("a", "b", "woken")
    (st1, _, b1), (st2, _, _) = read_answers(s, 2)
    assert (st1, st2) == (200, 200) and [m["body"] for m in json.loads(b1)["messages"]] == ["woken"]
    s.close()
    # a stream, whose hang-up is noticed
    t = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
    t.sendall(request("GET", "/api/events?agentId=w"))
    assert t.recv(12) == b"HTTP/1.1 200"
    assert wait_for(lambda: listening(relay, "w"))
    t.close()
    assert wait_for(lambda: not listening(relay, "w"), timeout=30)
    # and the stop answers what waits
    p = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
    p.sendall(request("GET", "/api/agents/a/inbox?wait=60", close=True))
    assert wait_for(lambda: stats(relay)["longPolls"] == 1)
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.proc.wait(30) == 0
    got = read_until_closed([p])
    assert take_answer(got[p])[0] == 200
    assert "Traceback" not in relay.log


def test_message_waits_do_not_hold_up_other_requests_when_they_outnumber_the_workers(relay_factory):
    """GET /api/messages/:id/wait waits where it runs (it is not parked in the room): more such waits than the pool
    has workers must not leave every other request queued behind them until their time runs out."""
    relay = relay_factory(env={"AGENT_RELAY_WORKERS": "2"})
    relay.register("a")
    relay.register("b")
    mid = relay.send("a", "b", "read me")["id"]
    waits = []
    try:
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", relay.port), timeout=60)
            s.sendall(request("GET", "/api/messages/%d/wait?until=read&timeout=60" % mid))
            waits.append(s)
        time.sleep(0.5)  # the waits have begun (nothing to look for: a broken relay fails below instead of hanging)
        # the others are still served, through the same pool: the read that ends the waits among them
        assert relay.get("/api/health", timeout=20).status == 200
        assert relay.post("/api/messages/%d/read" % mid, {"agentId": "b"}, timeout=20).status == 200
        for s in waits:
            (status, _, body), = read_answers(s, 1, timeout=20)
            assert status == 200 and json.loads(body)["reached"] is True
    finally:
        for s in waits:
            s.close()
    assert "Traceback" not in relay.log


@pytest.mark.skipif(not LINUX, reason="needs a descriptor limit above 3,000")
def test_a_wake_up_is_not_queued_behind_a_crowd_of_waits_that_run_out_together(relay_factory):
    """Clients that connected together wait in step: their waits run out together, and each asks again at once.
    Every one is answered (the pool runs these apart, a few at a time), and a message that arrives meanwhile
    reaches its waiting agent ahead of the rest of them, not after the whole crowd."""
    crowd = 2500
    open_files(crowd + 500)
    relay = relay_factory(env=QUIET)
    register_many(relay, ["p%d" % i for i in range(crowd)] + ["x", "src"])
    socks = []
    x = socket.create_connection(("127.0.0.1", relay.port), timeout=60)
    try:
        x.sendall(request("GET", "/api/agents/x/inbox?wait=60", close=True))
        assert wait_for(lambda: listening(relay, "x"))
        for i in range(crowd):
            s = socket.create_connection(("127.0.0.1", relay.port), timeout=60)
            s.sendall(request("GET", "/api/agents/p%d/inbox?wait=2" % i))
            socks.append(s)
        sel = selectors.DefaultSelector()
        for s in socks + [x]:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        order, got, sent = [], {s: b"" for s in socks + [x]}, False
        while len(order) < crowd + 1:
            ready = sel.select(60)
            assert ready, "%d answers of %d came" % (len(order), crowd + 1)
            for key, _ in ready:
                s = key.fileobj
                try:
                    chunk = s.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                got[s] += chunk
                if not chunk or take_answer(got[s]) is not None:
                    sel.unregister(s)
                    order.append(s)
                    if s is not x:
                        s.sendall(request("GET", "/api/agents/p%d/inbox?wait=60" % socks.index(s), close=True))
            if len(order) >= crowd // 3 and not sent:  # the crowd's time runs out, and it asks again: the message comes
                relay.send("src", "x", "ahead of the crowd")
                sent = len(order)
        sel.close()
    finally:
        for s in socks + [x]:
            s.close()
    status, _, body, _ = take_answer(got[x])
    assert status == 200 and [m["body"] for m in json.loads(body)["messages"]] == ["ahead of the crowd"]
    for s in socks:  # every wait that ran out was answered, empty
        status, _, body, _ = take_answer(got[s])
        assert status == 200 and json.loads(body)["messages"] == []
    # the woken wait was answered before most of the crowd whose time was up when it came
    assert order.index(x) < sent + crowd // 5, "sent after %d answers, the woken long-poll came %d of %d" % (
        sent, order.index(x) + 1, crowd + 1)
    assert "Traceback" not in relay.log
