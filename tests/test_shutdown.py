"""Graceful stop: SIGTERM while many long-polls and streams are open.

Every long-poll gets a complete 200 answer, every stream ends on a frame
boundary, the process exits 0 within seconds, writes acknowledged while it was
stopping are kept, and the next start finds everything.
"""
import http.client
import json
import signal
import socket
import threading
import time

from conftest import wait_for

POLLS = 70
STREAMS = 30


def raw_get(port, path, timeout=60):
    """Sends a GET on a fresh socket and reads until the relay closes it or answers in full. Returns (head, body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path).encode())
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


def parse_frames(body):
    """The SSE body as a list of {field: value} frames; fails on a frame cut in half."""
    assert body.endswith(b"\n\n"), "the stream ended inside a frame: %r" % body[-200:]
    frames = []
    for block in body.decode("utf-8").split("\n\n")[:-1]:
        frame = {}
        for line in block.split("\n"):
            assert line, "empty line inside a frame"
            if line.startswith(":"):
                continue
            field, sep, value = line.partition(": ")
            assert sep and field in ("id", "event", "data", "retry"), "malformed line %r" % line
            frame[field] = value
        if "data" in frame:
            assert "id" in frame and "event" in frame
            json.loads(frame["data"])
        frames.append(frame)
    return frames


def test_sigterm_answers_open_long_polls_and_streams_and_exits_zero(relay):
    for i in range(POLLS):
        relay.register("p%d" % i)
    relay.register("writer")
    relay.register("quiet")
    before = relay.send("writer", "quiet", "before the stop")
    results = {}

    def poll(i):
        results[("poll", i)] = raw_get(relay.port, "/api/agents/p%d/inbox?wait=30" % i)

    def stream(i):
        path = "/api/events?agentId=p%d" % i if i % 2 else "/api/events"
        results[("stream", i)] = raw_get(relay.port, path)

    threads = [threading.Thread(target=poll, args=(i,), daemon=True) for i in range(POLLS)]
    threads += [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(STREAMS)]
    for t in threads:
        t.start()
    assert wait_for(lambda: (lambda s: s["longPolls"] == POLLS and s["streams"] == STREAMS)(relay.get("/api/stats").json))

    # a writer keeps going while the relay stops; what it was told was stored must be there afterwards
    acked = []
    stop_writing = threading.Event()

    def write():
        c = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
        n = 0
        try:
            while not stop_writing.is_set():
                body = json.dumps({"from": "writer", "to": "quiet", "body": "during the stop %d" % n}).encode()
                c.request("POST", "/api/messages", body=body, headers={"Content-Type": "application/json"})
                r = c.getresponse()
                out = json.loads(r.read())
                if r.status == 201:
                    acked.append(out["message"]["id"])
                else:
                    assert r.status == 503 and out["error"]["code"] == "unavailable", (r.status, out)
                n += 1
        except (OSError, http.client.HTTPException):
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert wait_for(lambda: len(acked) >= 20)
    t0 = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    code = relay.proc.wait(20)
    elapsed = time.monotonic() - t0
    stop_writing.set()
    writer.join(15)
    for t in threads:
        t.join(15)
    assert code == 0, relay.log
    assert elapsed < 10, "the relay took %.1f s to stop" % elapsed
    assert "Traceback" not in relay.log, relay.log

    assert len(results) == POLLS + STREAMS
    for (kind, i), (head, body) in sorted(results.items()):
        assert head.startswith("HTTP/1.1 200"), (kind, i, head)
        if kind == "poll":
            length = int([h for h in head.split("\r\n") if h.lower().startswith("content-length:")][0].split(":")[1])
            assert len(body) == length, "a long-poll answer was cut short"
            out = json.loads(body)
            assert out["messages"] == [] and out["cursor"] >= 0
        else:
            frames = parse_frames(body)
            if i % 2 == 0:  # the global streams saw the writer's messages
                assert any(f.get("event") == "message.created" for f in frames)

    relay.start()
    stored = {r["id"] for r in relay.sql("SELECT id FROM messages")}
    assert before["id"] in stored
    assert set(acked) <= stored, "a message acknowledged during the stop is missing"
    assert relay.sql("PRAGMA integrity_check") == [{"integrity_check": "ok"}]
    assert len(relay.get("/api/agents").json["agents"]) >= POLLS + 2
    assert relay.inbox("quiet", since=0)["messages"][0]["id"] == before["id"]


def test_idle_keep_alive_connections_do_not_hold_up_the_stop(relay):
    """Clients that keep a connection open between requests (the CLI, the dashboard) must not delay exit."""
    conns = []
    for _ in range(20):
        c = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
        c.request("GET", "/api/health")
        assert c.getresponse().read()
        conns.append(c)
    half = socket.create_connection(("127.0.0.1", relay.port))
    half.sendall(b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
    time.sleep(0.2)
    t0 = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.proc.wait(20) == 0
    elapsed = time.monotonic() - t0
    assert elapsed < 3, "idle connections held the stop up for %.1f s" % elapsed
    for c in conns:
        c.close()
    half.close()
    assert "Traceback" not in relay.log
