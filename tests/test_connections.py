"""Slow clients.

- A request's head must arrive within AGENT_RELAY_HEAD_TIMEOUT_MS of its first byte and its body within
  AGENT_RELAY_BODY_TIMEOUT_MS: a client that trickles a byte at a time (which resets the socket's own
  timeout at every byte) gets 408 `request_timeout` and the connection ends. An idle keep-alive connection
  between requests is not a slow client.

Deadlines are set short here so that each test takes a few seconds; no test asserts a time.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import RELAY_PY

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


@pytest.mark.parametrize("variable,value", [("AGENT_RELAY_HEAD_TIMEOUT_MS", "soon"), ("AGENT_RELAY_BODY_TIMEOUT_MS", "-1")])
def test_a_bad_limit_stops_the_start_and_names_itself(tmp_path, variable, value):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    env[variable] = value
    p = subprocess.run([sys.executable, RELAY_PY, "serve", "--port", "0", "--db", str(tmp_path / "r.db")], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=30)
    out = p.stdout.decode()
    assert p.returncode == 2 and variable in out and "Traceback" not in out, out
