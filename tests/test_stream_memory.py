"""What a stream costs the relay when its client reads slowly, or not at all.

A stream replays history page by page (a page is a few hundred events or about 64 KB of their data, whichever
is less, or one larger event) and writes it in pieces, so a client that never reads holds up only its own
thread and a small, bounded amount of memory. A client that takes nothing within the send deadline
(AGENT_RELAY_SSE_SEND_TIMEOUT_MS) has fallen too far behind: the relay closes its stream, and the client
resumes with Last-Event-ID from the last whole block it read, losing nothing.

The clients here are raw sockets with a tiny receive window (SO_RCVBUF before connecting); the relay's memory
is its VmRSS in /proc. No time is asserted: the deadline only has to pass before a generous wait_for does.
"""
import fcntl
import json
import os
import socket
import struct
import termios

import pytest

from conftest import hang_up, wait_for
from test_stream import Stream

MB = 1024 * 1024


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def unread(sock):
    """Bytes that have arrived on the socket and wait to be read."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def slow_stream(relay, path):
    """A stream whose client has a receive window of a few KB and reads nothing until the test says so."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window is agreed at the handshake
    s.settimeout(30)
    s.connect(("127.0.0.1", relay.port))
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (path, relay.port)).encode("latin-1"))
    return s


def read_to_end(s):
    """Everything the relay sent before it closed the connection."""
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return got
        got += chunk


def whole_blocks(raw):
    """The events in an SSE body: (id, type, data text) of each block that arrived whole; a cut-off end is dropped."""
    body = raw.partition(b"\r\n\r\n")[2]
    out = []
    for block in body.split(b"\n\n")[:-1]:  # the last part has no blank line after it: not (yet) an event
        fields = dict(line.split(b": ", 1) for line in block.split(b"\n") if line and not line.startswith(b":")
                      and b": " in line)
        if b"event" in fields:
            out.append((int(fields[b"id"]), fields[b"event"].decode(), fields[b"data"].decode("utf-8")))
    return out


def stored_events(relay, after=0):
    return [(r["id"], r["type"], r["data"]) for r in relay.sql("SELECT id, type, data FROM events WHERE id > ? ORDER BY id", (after,))]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the relay's memory from /proc")
def test_a_hundred_never_reading_streams_replaying_50_mb_add_less_than_100_mb(relay_factory):
    # a long send deadline: the streams stay open, stalled, while their cost is read
    relay = relay_factory(env={"AGENT_RELAY_SSE_SEND_TIMEOUT_MS": "600000"})
    relay.register("writer")
    relay.register("reader")
    for i in range(200):  # 50 MB of history, as 200 messages of 250 KB
        relay.send("writer", "reader", "%06d " % i + "x" * 249993)
    pid = relay.proc.pid
    before = rss(pid)
    peak = [before]

    def stalled(batch):
        peak[0] = max(peak[0], rss(pid))
        return all(unread(s) >= 2048 for s in batch)  # past the head: each replay has begun, and the window is full

    socks = []
    try:
        # in waves, so that a relay that holds a replay whole fails at the first wave instead of taking the machine
        while len(socks) < 100:
            batch = [slow_stream(relay, "/api/events?since=0") for _ in range(5)]
            socks += batch
            assert wait_for(lambda: stalled(batch), timeout=60), "the streams did not begin their replay"
            assert peak[0] - before < 100 * MB, "%d never-reading streams added %.0f MB" % (len(socks), (peak[0] - before) / MB)
        assert relay.get("/api/stats").json["streams"] == 100
        for _ in range(20):
            stalled(socks)
        growth = peak[0] - before
        assert growth < 100 * MB, "100 never-reading streams added %.0f MB" % (growth / MB)
    finally:
        for s in socks:
            hang_up(s)
    assert wait_for(lambda: relay.get("/api/stats").json["streams"] == 0, timeout=60)
    assert "Traceback" not in relay.log, relay.log


def test_a_stream_that_falls_too_far_behind_is_closed_and_resumes_from_its_last_whole_event(relay_factory):
    relay = relay_factory(env={"AGENT_RELAY_SSE_SEND_TIMEOUT_MS": "1000"})
    relay.register("writer")
    relay.register("reader")
    s = slow_stream(relay, "/api/events")
    try:
        assert wait_for(lambda: unread(s) > 0)  # the head: the stream is open
        for i in range(5):
            relay.send("writer", "reader", "small %d" % i)
        for i in range(100):  # 10 MB: more than the client's window and the relay's socket buffer hold
            relay.send("writer", "reader", "%03d " % i + "y" * 99996)
        # the client takes nothing for longer than the send deadline: the relay gives up on it
        assert wait_for(lambda: relay.get("/api/stats").json["streams"] == 0, timeout=15)
        received = whole_blocks(read_to_end(s))
    finally:
        s.close()
    everything = stored_events(relay)
    # what arrived is whole events in order, each with its id: a prefix of what is stored
    assert len(received) >= 5, received[:3]
    assert received == [e for e in everything if e[0] <= received[-1][0]][-len(received):]
    assert received[-1][0] < everything[-1][0], "the whole history fitted in the buffers: nothing fell behind"

    # reconnecting with the id of the last whole event gets every later one, once, in order
    last = received[-1][0]
    st = Stream(relay, headers={"Last-Event-ID": str(last)})
    try:
        assert st.status == 200
        relay.register("fence")
        got = st.until_event("agent.registered", lambda d: d["agent"]["id"] == "fence", timeout=30)
    finally:
        st.close()
    assert [(e["id"], e["event"], e["data"]) for e in got] == [(i, t, json.loads(d)) for i, t, d in stored_events(relay, last)]
    assert "Traceback" not in relay.log, relay.log


def test_a_replay_of_large_events_arrives_whole_and_in_order_from_storage_and_from_memory(relay_factory):
    relay = relay_factory()
    relay.register("writer")
    relay.register("reader")
    # 55 messages of 160,000 characters, not ASCII and with characters JSON escapes: more than the relay keeps in memory
    bodies = ["%02d %s" % (i, ("\u00e9t\u00e9 \U0001F600 \"q\" \\ " * 13000)[: 160000 - i]) for i in range(55)]
    for b in bodies:
        raw = json.dumps({"from": "writer", "to": "reader", "body": b}, ensure_ascii=False).encode("utf-8")
        assert relay.post("/api/messages", raw=raw).status == 201
    everything = stored_events(relay)
    assert sum(len(d) for _, _, d in everything) > 9 * MB  # the ring keeps about 8 MiB
    # the oldest come from storage, the newest from memory (the ring); after a restart all come from storage
    for restarted in (False, True):
        if restarted:
            relay.restart()
        st = Stream(relay, "/api/events?since=0", timeout=30)
        try:
            got = st.events_until(lambda evs: bool(evs) and evs[-1]["id"] == everything[-1][0], timeout=60)
        finally:
            st.close()
        assert [(e["id"], e["event"], e["data"]) for e in got] == [(i, t, json.loads(d)) for i, t, d in everything]
        assert [e["data"]["message"]["body"] for e in got if e["event"] == "message.created"] == bodies
