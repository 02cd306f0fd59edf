"""Slow clients and the connection cap.

- A request's head must arrive within AGENT_RELAY_HEAD_TIMEOUT_MS of its first byte and its body within
  AGENT_RELAY_BODY_TIMEOUT_MS: a client that trickles a byte at a time (which resets the socket's own
  timeout at every byte) gets 408 `request_timeout` and the connection ends. An idle keep-alive connection
  between requests is not a slow client.
- At most AGENT_RELAY_MAX_CONNECTIONS connections are open at once (by default sized from the descriptor
  limit): the next one gets an immediate 503 `unavailable` with Retry-After and is closed, and the relay
  serves again as soon as the crowd leaves. Long-polls and streams count. When descriptors run out anyway
  (the cap set above the limit), new connections still get 503 instead of hanging in the backlog.

Deadlines are set short here so that each test takes a few seconds; no test asserts a time.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import RELAY_PY, raw_exchange, wait_for

DEADLINES = {"AGENT_RELAY_HEAD_TIMEOUT_MS": "1500", "AGENT_RELAY_BODY_TIMEOUT_MS": "1500"}
BODY = json.dumps({"from": "a", "to": "b", "body": "trickled"}).encode()


def answer_in(got):
    """(status, headers, body) once `got` holds a whole answer, else None."""
    head, sep, body = got.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if len(body) < int(headers.get("content-length", 0)):
        return None
    return int(lines[0].split(" ")[1]), headers, body


def trickle(port, head, rest, every=0.25, give_up=20.0):
    """Sends `head` at once, then `rest` a byte at a time, one every `every` seconds (far inside any socket
    timeout), until the relay answers or `give_up` seconds pass. Returns (the answer or None, whether the
    relay closed the connection after it)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    got, answer, closed = b"", None, False
    try:
        s.sendall(head)
        s.settimeout(every)
        end = time.monotonic() + give_up
        i = 0
        while time.monotonic() < end and answer is None:
            if i < len(rest):
                try:
                    s.sendall(rest[i:i + 1])
                except OSError:
                    pass  # the relay has answered and closed: read what it said
                i += 1
            try:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                got += chunk
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed = True
                break
            answer = answer_in(got)
        if answer is not None and not closed:
            s.settimeout(10)
            try:
                closed = s.recv(65536) == b""
            except ConnectionResetError:
                closed = True
    finally:
        s.close()
    return answer or answer_in(got), closed


def stored(relay):
    return relay.sql("SELECT COUNT(*) AS n FROM messages")[0]["n"]


@pytest.fixture
def slow(relay_factory):
    relay = relay_factory(env=DEADLINES)
    relay.register("a")
    relay.register("b")
    return relay


HEAD = b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
TRICKLES = [
    ("the request line", b"", HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY, "head", "AGENT_RELAY_HEAD_TIMEOUT_MS"),
    ("the headers", HEAD, b"Content-Length: %d\r\nX-Padding: %s\r\n\r\n" % (len(BODY), b"p" * 200) + BODY, "head",
     "AGENT_RELAY_HEAD_TIMEOUT_MS"),
    ("a body with Content-Length", HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY), BODY, "body", "AGENT_RELAY_BODY_TIMEOUT_MS"),
    ("a chunked body", HEAD + b"Transfer-Encoding: chunked\r\n\r\n",
     b"".join(b"1\r\n%s\r\n" % BODY[i:i + 1] for i in range(len(BODY))) + b"0\r\n\r\n", "body", "AGENT_RELAY_BODY_TIMEOUT_MS"),
]


@pytest.mark.parametrize("what,head,rest,part,variable", TRICKLES, ids=[t[0] for t in TRICKLES])
def test_a_client_that_trickles_gets_408_and_the_connection_ends(slow, what, head, rest, part, variable):
    relay = slow
    answer, closed = trickle(relay.port, head, rest)
    assert answer is not None, "%s: no answer while the client trickled" % what
    status, headers, body = answer
    assert status == 408, (what, answer)
    err = json.loads(body)["error"]
    assert err["code"] == "request_timeout" and part in err["message"] and variable in err["message"], err
    assert headers.get("connection") == "close"
    assert closed, "%s: the connection stayed open after the 408" % what
    assert stored(relay) == 0
    assert relay.get("/api/health").status == 200
    assert "Traceback" not in relay.log


def test_an_idle_keep_alive_connection_is_not_a_slow_client(slow):
    """Between requests a connection may wait (up to the idle timeout): the head's clock starts at its first byte.
    A long-poll that outlasts the deadlines is answered as usual."""
    relay = slow
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=15)
    try:
        def ask(data):
            s.sendall(data)
            got = b""
            while answer_in(got) is None:
                chunk = s.recv(65536)
                assert chunk, "the relay closed the connection: %r" % got
                got += chunk
            return answer_in(got)

        send = HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
        assert ask(send)[0] == 201
        time.sleep(2.5)  # idle for longer than both deadlines
        assert ask(send)[0] == 201
        status, _, body = ask(b"GET /api/agents/b/inbox?since=1000&wait=3 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 200 and json.loads(body)["messages"] == [], body
        assert ask(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[0] == 200
    finally:
        s.close()
    assert stored(relay) == 2


def crowd(relay, streams=0, polls=0, idle=0):
    """Opens connections that stay open: streams, long-polls, and connections that have sent nothing yet."""
    socks = []
    for kind, n in (("stream", streams), ("poll", polls), ("idle", idle)):
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
            if kind == "stream":
                s.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            elif kind == "poll":
                s.sendall(b"GET /api/agents/b/inbox?since=1000&wait=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            socks.append(s)
    return socks


def assert_turned_away(port):
    status, headers, body = raw_exchange(port, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=15)
    assert status == 503, (status, body[:300])
    err = json.loads(body)["error"]
    assert err["code"] == "unavailable" and "too many connections" in err["message"], err
    assert headers.get("retry-after", "").isdigit() and headers.get("connection") == "close", headers


def test_past_the_cap_a_connection_gets_503_at_once_and_the_relay_recovers(relay_factory):
    relay = relay_factory(env={"AGENT_RELAY_MAX_CONNECTIONS": "20"})
    relay.register("a")
    relay.register("b")
    socks = crowd(relay, streams=5, polls=10, idle=5)  # accepted in order, so these 20 are counted before the next
    try:
        for s in socks[:5]:  # the streams are being served (the long-polls wait)
            assert s.recv(12) == b"HTTP/1.1 200"
        assert_turned_away(relay.port)
        assert_turned_away(relay.port)
    finally:
        for s in socks:
            s.close()
    # as the crowd leaves, its connections close, and the relay serves again
    assert wait_for(lambda: raw_exchange(relay.port, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[0] == 200, timeout=30)
    assert relay.post("/api/messages", {"from": "a", "to": "b", "body": "after the crowd"}).status == 201
    assert [m["body"] for m in relay.inbox("b", since=0)["messages"]] == ["after the crowd"]
    assert "Traceback" not in relay.log


WRAPPER = """import os, resource, sys
limit = int(os.environ["RELAY_TEST_NOFILE"])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
os.execv(sys.executable, [sys.executable, %r] + sys.argv[1:])
""" % RELAY_PY


def relay_sockets(pid):
    """How many sockets the relay process has open (Linux: /proc): its connections, plus a few of its own."""
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            n += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
        except OSError:
            pass  # closed meanwhile
    return n


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lowers the descriptor limit of a Linux process")
@pytest.mark.parametrize("cap", [None, "1000"], ids=["the default cap, sized from the limit", "a cap above the limit"])
def test_with_few_descriptors_the_relay_answers_503_and_recovers(relay_factory, tmp_path, cap):
    """Two crowds, one after the other, each larger than the descriptor limit. While a crowd holds the relay at its
    limit, a few of it leave and others take their place. With the cap above the limit, descriptors run out:
    the log says so once per crowd (not again for each client let in as another leaves), and says when the crowd
    has gone."""
    wrapper = tmp_path / "lowered.py"
    wrapper.write_text(WRAPPER)
    env = {"RELAY_TEST_NOFILE": "64"}
    if cap:
        env["AGENT_RELAY_MAX_CONNECTIONS"] = cap
    relay = relay_factory(env=env, script=str(wrapper))
    relay.register("a")
    relay.register("b")
    pid = relay.proc.pid  # the wrapper execs the relay in its own process
    socks = []
    try:
        for _ in range(2):  # twice: the relay recovers from the first crowd
            before = relay_sockets(pid)
            socks = crowd(relay, polls=4, idle=76)
            assert_turned_away(relay.port)
            for _ in range(3):  # at the limit, five leave and ten more come: five get in, the rest get 503
                held = relay_sockets(pid)
                leaving, socks = socks[4:9], socks[:4] + socks[9:]  # idle ones the relay accepted (it accepts in order)
                for s in leaving:
                    s.close()
                assert wait_for(lambda: relay_sockets(pid) <= held - len(leaving), timeout=30), "the relay kept them open"
                socks += crowd(relay, idle=10)
                assert_turned_away(relay.port)
            for s in socks:
                s.close()
            # the crowd has gone once the relay has closed its side of every connection
            assert wait_for(lambda: relay_sockets(pid) <= before, timeout=30), (relay_sockets(pid), before)
            status = raw_exchange(relay.port, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[0]
            assert status == 200
            assert relay.post("/api/messages", {"from": "a", "to": "b", "body": "still here"}).status == 201
    finally:
        for s in socks:
            s.close()
    assert relay.proc.poll() is None
    assert "Traceback" not in relay.log
    if cap:  # descriptors ran out: said once per crowd, and its end once too
        assert wait_for(lambda: relay.log.count("accepting connections again") == 2), relay.log
        assert relay.log.count("out of file descriptors") == 2, relay.log
    else:  # the default cap is met before descriptors run out
        assert "out of file descriptors" not in relay.log, relay.log


@pytest.mark.parametrize("variable,value", [("AGENT_RELAY_MAX_CONNECTIONS", "0"), ("AGENT_RELAY_HEAD_TIMEOUT_MS", "soon"),
                                            ("AGENT_RELAY_BODY_TIMEOUT_MS", "-1")])
def test_a_bad_limit_stops_the_start_and_names_itself(tmp_path, variable, value):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    env[variable] = value
    p = subprocess.run([sys.executable, RELAY_PY, "serve", "--port", "0", "--db", str(tmp_path / "r.db")], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=30)
    out = p.stdout.decode()
    assert p.returncode == 2 and variable in out and "Traceback" not in out, out
