"""The benchmark's client side: raw HTTP/1.1 keep-alive connections driven by one selector loop.

Why not threads with http.client: on a 2-core machine the load generator
competes with the server for CPU. http.client parses every response's headers
with the email package and a thread per connection adds GIL hand-offs, so the
client would cost about as much as the server and the figures would measure
the client. Here one thread drives every connection through epoll, requests
are pre-encoded bytes and a response is found by its Content-Length, so a
request costs the client a few tens of microseconds, well under what either
server spends on it. The bare baseline server and the relay are driven by the
same code, so their figures are comparable.

Also runnable as `python3 benchmarks/loadgen.py hold ...`: a process that
holds many long-polls and streams open on a relay (used for the scale and
idle items).
"""
import argparse
import json
import os
import re
import selectors
import signal
import socket
import sys
import time

CONTENT_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)


def request_bytes(method, path, port, body=None, headers=None):
    """One HTTP/1.1 request, pre-encoded."""
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1:%d" % port]
    data = b""
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode("utf-8")
        lines.append("Content-Type: application/json")
        lines.append("Content-Length: %d" % len(data))
    for k, v in (headers or {}).items():
        lines.append("%s: %s" % (k, v))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def take_response(buf):
    """(status, body, bytes used) for the first complete response in buf, or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end + 2])
    m = CONTENT_LENGTH_RE.search(head)
    n = int(m.group(1)) if m else 0
    total = end + 4 + n
    if len(buf) < total:
        return None
    return int(head[9:12]), bytes(buf[end + 4:total]), total


def connect(port, timeout=30.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Http:
    """A blocking keep-alive client for set-up and control requests (not for measured traffic)."""

    def __init__(self, port, headers=None):
        self.port = port
        self.headers = headers or {}
        self.sock = None
        self.buf = bytearray()

    def call(self, method, path, body=None, headers=None, timeout=60.0):
        h = dict(self.headers)
        h.update(headers or {})
        data = request_bytes(method, path, self.port, body, h)
        for attempt in (1, 2):
            if self.sock is None:
                self.sock = connect(self.port, timeout)
                self.buf = bytearray()
            self.sock.settimeout(timeout)
            try:
                self.sock.sendall(data)
                while True:
                    r = take_response(self.buf)
                    if r is not None:
                        status, raw, used = r
                        del self.buf[:used]
                        return status, (json.loads(raw.decode("utf-8")) if raw else None)
                    chunk = self.sock.recv(262144)
                    if not chunk:
                        raise ConnectionError("the server closed the connection")
                    self.buf += chunk
            except (ConnectionError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _Conn:
    __slots__ = ("sock", "buf", "sent_at")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.sent_at = 0.0


def closed_loop(port, make_request, conns, duration=None, count=None, warmup=0.0, ok=(200, 201), limit_s=300.0):
    """`conns` keep-alive connections, each with one request in flight, until `duration` seconds
    (after `warmup`) or `count` requests. make_request(i) returns the i-th request's bytes.

    Returns {requests, seconds, rps, errors, p50_ms, p99_ms, first_error}."""
    sel = selectors.DefaultSelector()
    states = []
    for _ in range(conns):
        st = _Conn(connect(port))
        states.append(st)
        sel.register(st.sock, selectors.EVENT_READ, st)
    issued = 0
    done = 0
    errors = 0
    first_error = None
    lat = []
    clock = time.perf_counter
    t_start = clock()
    window_from = t_start + warmup
    window_to = window_from + duration if duration else None
    last_done = t_start

    def issue(st):
        nonlocal issued
        data = make_request(issued)
        issued += 1
        st.sent_at = clock()
        st.sock.sendall(data)

    for st in states:
        if count is not None and issued >= count:
            break
        issue(st)
    in_flight = issued
    try:
        while in_flight:
            if clock() - t_start > limit_s:
                raise RuntimeError("load run did not finish within %.0f s" % limit_s)
            for key, _ in sel.select(1.0):
                st = key.data
                chunk = st.sock.recv(262144)
                if not chunk:
                    raise ConnectionError("the server closed a keep-alive connection")
                st.buf += chunk
                while True:
                    r = take_response(st.buf)
                    if r is None:
                        break
                    status, body, used = r
                    del st.buf[:used]
                    now = clock()
                    in_flight -= 1
                    if status not in ok:
                        errors += 1
                        if first_error is None:
                            first_error = "%d %s" % (status, body[:200].decode("utf-8", "replace"))
                    if window_to is None:
                        done += 1
                        last_done = now
                        lat.append(now - st.sent_at)
                        more = issued < count
                    else:
                        if st.sent_at >= window_from and now <= window_to:
                            done += 1
                            lat.append(now - st.sent_at)
                        more = now < window_to
                    if more:
                        issue(st)
                        in_flight += 1
    finally:
        for st in states:
            sel.unregister(st.sock)
            st.sock.close()
        sel.close()
    seconds = (last_done - t_start) if window_to is None else duration
    return {
        "requests": done,
        "seconds": round(seconds, 3),
        "rps": round(done / seconds, 1) if seconds > 0 else 0.0,
        "errors": errors,
        "first_error": first_error,
        "p50_ms": round(percentile(lat, 50) * 1000, 3) if lat else None,
        "p99_ms": round(percentile(lat, 99) * 1000, 3) if lat else None,
    }


# -- delivery latency -----------------------------------------------------------


class _Stream:
    """An SSE response read incrementally: frames are split on blank lines."""

    __slots__ = ("sock", "buf", "head_done")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.head_done = False

    def frames(self):
        out = []
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            status = int(bytes(self.buf[9:12]))
            if status != 200:
                raise RuntimeError("stream answered %d: %r" % (status, bytes(self.buf[:300])))
            del self.buf[:end + 4]
            self.head_done = True
        while True:
            end = self.buf.find(b"\n\n")
            if end < 0:
                return out
            out.append(bytes(self.buf[:end]))
            del self.buf[:end + 2]


def wait_for_listeners(ctl, polls=None, streams=None, timeout=30.0):
    """Until the relay's /api/stats counts at least this many open long-polls / streams."""
    deadline = time.monotonic() + timeout
    while True:
        status, stats = ctl.call("GET", "/api/stats")
        if status == 200 and (polls is None or stats["longPolls"] >= polls) and (streams is None or stats["streams"] >= streams):
            return stats
        if time.monotonic() > deadline:
            raise RuntimeError("the relay holds %s long-polls and %s streams; expected %s and %s"
                               % (stats.get("longPolls"), stats.get("streams"), polls, streams))
        time.sleep(0.0005)


def delivery_latency(port, kind, agents, sender, samples, limit_s=300.0, others=0):
    """Send to one of `agents` at a time; time from just before the send is written until the
    message reaches that agent's long-poll (kind "poll") or stream (kind "stream").

    Every agent in `agents` has a waiting long-poll / an open narrowed stream throughout
    (`others` of the same kind are held open by someone else meanwhile).
    Returns latencies in milliseconds."""
    ctl = Http(port)
    sel = selectors.DefaultSelector()
    clock = time.perf_counter
    status, cur = ctl.call("GET", "/api/cursor")
    cursor0 = cur["cursor"]
    waiters = []
    for a in agents:
        s = connect(port)
        if kind == "poll":
            st = _Conn(s)
            st.sent_at = cursor0  # (reused: the since= this poll asks for)
            s.sendall(request_bytes("GET", "/api/agents/%s/inbox?wait=60&since=%d" % (a, cursor0), port))
        else:
            st = _Stream(s)
            s.sendall(request_bytes("GET", "/api/events?agentId=%s" % a, port))
        waiters.append(st)
        sel.register(s, selectors.EVENT_READ, ("w", len(waiters) - 1))
    snd = _Conn(connect(port))
    sel.register(snd.sock, selectors.EVENT_READ, ("s", 0))
    lat = []
    t_begin = time.monotonic()

    def rearm(i, since):
        waiters[i].sent_at = since
        waiters[i].sock.sendall(request_bytes("GET", "/api/agents/%s/inbox?wait=60&since=%d" % (agents[i], since), port))

    def settle():
        if kind == "poll":
            wait_for_listeners(ctl, polls=len(agents) + others)
        else:
            wait_for_listeners(ctl, streams=len(agents) + others)

    try:
        settle()
        for n in range(samples):
            if time.monotonic() - t_begin > limit_s:
                raise RuntimeError("latency run did not finish within %.0f s" % limit_s)
            i = n % len(agents)
            target = agents[i]
            req = request_bytes("POST", "/api/messages", port, {"from": sender, "to": target, "body": "probe %d" % n})
            t0 = clock()
            snd.sock.sendall(req)
            t_got = None
            sent_id = None
            got_ids = []
            while t_got is None or sent_id is None:
                for key, _ in sel.select(10.0):
                    role, j = key.data
                    if role == "s":
                        chunk = snd.sock.recv(65536)
                        if not chunk:
                            raise ConnectionError("the relay closed the sender's connection")
                        snd.buf += chunk
                        r = take_response(snd.buf)
                        if r is not None:
                            del snd.buf[:r[2]]
                            if r[0] != 201:
                                raise RuntimeError("send answered %d: %r" % (r[0], r[1][:300]))
                            sent_id = json.loads(r[1])["message"]["id"]
                        continue
                    w = waiters[j]
                    chunk = w.sock.recv(262144)
                    if not chunk:
                        raise ConnectionError("the relay closed a waiting connection")
                    now = clock()
                    w.buf += chunk
                    if kind == "poll":
                        r = take_response(w.buf)
                        if r is None:
                            continue
                        del w.buf[:r[2]]
                        if r[0] != 200:
                            raise RuntimeError("long-poll answered %d: %r" % (r[0], r[1][:300]))
                        out = json.loads(r[1])
                        ids = [m["id"] for m in out["messages"]]
                        if j == i and ids:
                            t_got = now
                            got_ids = ids
                        rearm(j, max(out["cursor"], w.sent_at))
                    else:
                        for fr in w.frames():
                            if j == i and t_got is None and b"event: message.created" in fr:
                                data = fr.split(b"data: ", 1)[1]
                                got_ids = [json.loads(data)["message"]["id"]]
                                t_got = now
            if sent_id not in got_ids:
                raise RuntimeError("agent %s received %r, not the message just sent (%s)" % (target, got_ids, sent_id))
            lat.append((t_got - t0) * 1000.0)
            if kind == "poll":
                settle()  # the re-armed poll is parked again before the next send
    finally:
        for st in waiters:
            st.sock.close()
        snd.sock.close()
        sel.close()
        ctl.close()
    return lat


def release_listeners(port, agents, sender, timeout=30.0):
    """End the relay's side of long-polls and streams whose clients have hung up.

    A long-poll notices a closed client only when it has something to answer, and a stream
    only when a write fails (an event or the next keep-alive ping, 15 s by default); until
    then each holds a thread. So each agent still listed as listening gets a message (the
    long-poll then sees its client gone and keeps the message for the next poll; a stream's
    write fails), until none listens. Returns how many messages it took."""
    ctl = Http(port)
    wanted = set(agents)
    sent = 0
    deadline = time.monotonic() + timeout
    try:
        while True:
            status, out = ctl.call("GET", "/api/agents")
            left = [a["id"] for a in out["agents"] if a["listening"] and a["id"] in wanted]
            if not left:
                return sent
            if time.monotonic() > deadline:
                raise RuntimeError("%d agents still listening after their clients hung up" % len(left))
            for a in left:
                status, _ = ctl.call("POST", "/api/messages", {"from": sender, "to": a, "body": "wake up: the client is gone"})
                sent += 1
            time.sleep(0.02)
    finally:
        ctl.close()


# -- holding many long-polls and streams (a separate process) --------------------------


def hold(port, poll_agents, stream_agents, batch=200):
    """Open a long-poll per poll agent and a narrowed stream per stream agent and keep them open
    (re-arming long-polls that answer) until stdin closes or SIGTERM."""
    sel = selectors.DefaultSelector()
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    polls = {}
    n = 0
    todo = [("poll", a) for a in poll_agents] + [("stream", a) for a in stream_agents]
    for k in range(0, len(todo), batch):
        for kind, a in todo[k:k + batch]:
            s = connect(port)
            if kind == "poll":
                s.sendall(request_bytes("GET", "/api/agents/%s/inbox?wait=60" % a, port))
                polls[s.fileno()] = a
                sel.register(s, selectors.EVENT_READ, _Conn(s))
            else:
                s.sendall(request_bytes("GET", "/api/events?agentId=%s" % a, port))
                sel.register(s, selectors.EVENT_READ, None)
            n += 1
        time.sleep(0.05)  # let the relay accept them before the next batch (listen backlog)
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    sys.stdout.write("ready %d\n" % n)
    sys.stdout.flush()
    while not stop:
        for key, _ in sel.select(1.0):
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):
                    stop.append(1)
                continue
            s = key.fileobj
            try:
                chunk = s.recv(262144)
            except OSError:
                chunk = b""
            if not chunk:
                sel.unregister(s)
                s.close()
                continue
            st = key.data
            if st is None:
                continue  # stream frames are dropped
            st.buf += chunk
            r = take_response(st.buf)
            if r is not None:
                del st.buf[:r[2]]
                s.sendall(request_bytes("GET", "/api/agents/%s/inbox?wait=60" % polls[s.fileno()], port))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description="hold long-polls and streams open on a relay")
    p.add_argument("command", choices=["hold"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--polls", default="", help="comma-separated agent ids, one long-poll each")
    p.add_argument("--streams", default="", help="comma-separated agent ids, one narrowed stream each")
    p.add_argument("--poll-range", default="", help="PREFIX:FIRST:COUNT: long-polls for agents PREFIX<FIRST> onwards")
    p.add_argument("--stream-range", default="", help="PREFIX:FIRST:COUNT: narrowed streams for agents PREFIX<FIRST> onwards")
    args = p.parse_args(argv)
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    def ids(listed, ranged):
        out = [a for a in listed.split(",") if a]
        if ranged:
            prefix, first, count = ranged.rsplit(":", 2)
            out += ["%s%d" % (prefix, i) for i in range(int(first), int(first) + int(count))]
        return out

    return hold(args.port, ids(args.polls, args.poll_range), ids(args.streams, args.stream_range))


if __name__ == "__main__":
    sys.exit(main())
