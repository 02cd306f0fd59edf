"""Request framing, as RFC 9112 section 6 has it: where a request's body ends is decided once, from its head.

A body is delimited by a Content-Length of digits only (repeats of one value, as separate fields or a
comma list, are taken as that value; different values are refused) or by `Transfer-Encoding: chunked`,
whose chunk sizes are hex digits only (optionally followed by `;extensions`), whose data must end where
its size says, with CRLF, and which counts against AGENT_RELAY_MAX_BODY_BYTES as it arrives. Both at
once, any other transfer coding, or a transfer coding on HTTP/1.0 is refused. Every refusal is an error
in the relay's envelope, closes the connection (what follows on the wire is never read as another
request) and stores nothing.
"""
import json
import socket

import pytest

from conftest import raw_exchange

BODY = json.dumps({"from": "a", "to": "b", "body": "framed"}).encode()
HEALTH = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def post(framing, body, version="HTTP/1.1"):
    """A send with these framing header lines (each ending in CRLF) and this body, exactly as given."""
    head = ("POST /api/messages %s\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" % version).encode()
    return head + framing.encode("latin-1") + b"\r\n" + body


def chunked(*chunks, last=b"0\r\n\r\n"):
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + last


def converse(port, data, timeout=10):
    """Sends `data` on one connection and reads until the relay closes it. Returns (the answers' status
    codes in order, the bytes received, whether the relay closed the connection within `timeout`)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got, closed = b"", False
    try:
        s.sendall(data)
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            got += chunk
    finally:
        s.close()
    statuses, rest = [], got
    while rest.startswith(b"HTTP/1.1 "):
        head, _, rest = rest.partition(b"\r\n\r\n")
        statuses.append(int(head.split(b" ")[1]))
        length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
        rest = rest[length[0] if length else len(rest):]
    assert not rest, "not an answer: %r" % rest[:200]
    return statuses, got, closed


def error_of(got):
    body = got.partition(b"\r\n\r\n")[2]
    return json.loads(body.decode("utf-8"))["error"]


def stored(relay):
    return relay.sql("SELECT COUNT(*) AS n FROM messages")[0]["n"]


@pytest.fixture
def seeded(relay):
    relay.register("a")
    relay.register("b")
    return relay


# (what, the request, status, code, a word the message must hold)
REFUSED = [
    ("a chunk size of -1", post("Transfer-Encoding: chunked\r\n", b"-1\r\n" + BODY), 400, "invalid_field", "chunk size"),
    ("a chunk size written 0x2d", post("Transfer-Encoding: chunked\r\n", b"0x%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)),
     400, "invalid_field", "chunk size"),
    ("a chunk size with a sign", post("Transfer-Encoding: chunked\r\n", b"+%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)),
     400, "invalid_field", "chunk size"),
    ("a chunk size line past its bound", post("Transfer-Encoding: chunked\r\n", b"0" * 5000 + b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)),
     400, "invalid_field", "chunk size"),
    ("chunk data longer than its size", post("Transfer-Encoding: chunked\r\n",
                                             b"%x\r\n%sXYZ\r\n0\r\n\r\n" % (len(BODY), BODY)), 400, "invalid_field", "CRLF"),
    ("trailers past the body limit", post("Transfer-Encoding: chunked\r\n",
                                          chunked(BODY, last=b"0\r\n" + b"X-Pad: %s\r\n" % (b"p" * 200) * 1500 + b"\r\n")),
     413, "payload_too_large", "262144"),
    ("Content-Length: +N", post("Content-Length: +%d\r\n" % len(BODY), BODY), 400, "invalid_field", "Content-Length"),
    ("Content-Length with an underscore", post("Content-Length: %s_%s\r\n" % (str(len(BODY))[0], str(len(BODY))[1:]), BODY),
     400, "invalid_field", "Content-Length"),
    ("Content-Length: 0x2d", post("Content-Length: 0x%x\r\n" % len(BODY), BODY), 400, "invalid_field", "Content-Length"),
    ("an empty Content-Length", post("Content-Length: \r\n", BODY), 400, "invalid_field", "Content-Length"),
    ("a Content-Length of 30 digits", post("Content-Length: %s\r\n" % ("9" * 30), BODY), 413, "payload_too_large", "262144"),
    ("two different Content-Lengths", post("Content-Length: %d\r\nContent-Length: 10\r\n" % len(BODY), BODY),
     400, "invalid_field", "Content-Length"),
    ("a Content-Length list of different values", post("Content-Length: %d, 10\r\n" % len(BODY), BODY),
     400, "invalid_field", "Content-Length"),
    ("Content-Length and chunked", post("Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(BODY), chunked(BODY)),
     400, "invalid_field", "Transfer-Encoding"),
    ("chunked and Content-Length", post("Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(BODY), chunked(BODY)),
     400, "invalid_field", "Transfer-Encoding"),
    ("Transfer-Encoding: gzip", post("Transfer-Encoding: gzip\r\n", BODY), 501, "invalid_field", "gzip"),
    ("Transfer-Encoding: gzip, chunked", post("Transfer-Encoding: gzip, chunked\r\n", chunked(BODY)), 501, "invalid_field", "gzip"),
    ("gzip and chunked as two fields", post("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", chunked(BODY)),
     501, "invalid_field", "gzip"),
    ("chunked twice", post("Transfer-Encoding: chunked, chunked\r\n", chunked(chunked(BODY))), 400, "invalid_field", "once"),
    ("chunked not last", post("Transfer-Encoding: chunked, identity\r\n", chunked(BODY)), 501, "invalid_field", "identity"),
    ("an empty Transfer-Encoding", post("Transfer-Encoding: \r\nContent-Length: %d\r\n" % len(BODY), BODY),
     400, "invalid_field", "Transfer-Encoding"),
    ("chunked on HTTP/1.0", post("Transfer-Encoding: chunked\r\n", chunked(BODY), version="HTTP/1.0"),
     400, "invalid_field", "HTTP/1.0"),
]


@pytest.mark.parametrize("what,data,status,code,word", REFUSED, ids=[c[0] for c in REFUSED])
def test_ambiguous_or_malformed_framing_is_refused_closes_and_stores_nothing(seeded, what, data, status, code, word):
    relay = seeded
    before = stored(relay)
    # a second request follows on the wire: it must not be read as one, so exactly one answer comes, then the close
    statuses, got, closed = converse(relay.port, data + HEALTH)
    assert statuses == [status], (what, got[:400])
    err = error_of(got)
    assert err["code"] == code and word in err["message"], (what, err)
    assert b"\r\nConnection: close\r\n" in got.partition(b"\r\n\r\n")[0] + b"\r\n", got[:300]
    assert closed, "%s: the relay kept the connection open after refusing it" % what
    assert stored(relay) == before
    assert relay.get("/api/health").status == 200
    assert "Traceback" not in relay.log


@pytest.mark.parametrize("body", [b"%x\r\n%s" % (len(BODY) + 10, BODY), b"%x\r\n%s\r\n" % (len(BODY), BODY),
                                  b"%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n" % (len(BODY), BODY)],
                         ids=["in a chunk's data", "before the last chunk", "in the trailers"])
def test_a_chunked_body_that_ends_early_is_refused(seeded, body):
    """The client sends part of a chunked body and shuts its side: 400 naming the problem, nothing stored."""
    relay = seeded
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    got = b""
    try:
        s.sendall(post("Transfer-Encoding: chunked\r\n", body))
        s.shutdown(socket.SHUT_WR)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    assert got.startswith(b"HTTP/1.1 400 "), got[:300]
    err = error_of(got)
    assert err["code"] == "invalid_field" and "ended" in err["message"], err
    assert stored(relay) == 0


def test_a_chunked_body_counts_against_the_limit_as_it_arrives(relay_factory):
    """413 as soon as the chunks announced pass AGENT_RELAY_MAX_BODY_BYTES, without waiting for the rest."""
    relay = relay_factory(env={"AGENT_RELAY_MAX_BODY_BYTES": "2048"})
    relay.register("a")
    relay.register("b")
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    try:
        s.sendall(post("Transfer-Encoding: chunked\r\n", b"400\r\n" + b" " * 1024 + b"\r\n" + b"401\r\n" + b" " * 100))
        got = b""
        while True:  # the relay answers and closes although the second chunk is still incomplete
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    assert got.startswith(b"HTTP/1.1 413 "), got[:300]
    assert error_of(got)["code"] == "payload_too_large"
    assert stored(relay) == 0


ACCEPTED = [
    ("chunked in several chunks", "Transfer-Encoding: chunked\r\n", chunked(BODY[:10], BODY[10:20], BODY[20:])),
    ("chunked, any case", "transfer-encoding: Chunked\r\n", chunked(BODY)),
    ("upper-case hex and leading zeros", "Transfer-Encoding: chunked\r\n",
     b"%04X\r\n%s\r\n0000\r\n\r\n" % (len(BODY), BODY)),
    ("chunk extensions and a trailer", "Transfer-Encoding: chunked\r\n",
     b"%x ;name=value;other\r\n%s\r\n0;last\r\nX-Checksum: 1\r\n\r\n" % (len(BODY), BODY)),
    ("bare LF line ends", "Transfer-Encoding: chunked\r\n", b"%x\n%s\n0\n\n" % (len(BODY), BODY)),
    ("the same Content-Length twice", "Content-Length: %d\r\nContent-Length: %d\r\n" % (len(BODY), len(BODY)), BODY),
    ("a Content-Length list of one value", "Content-Length: %d, %d\r\n" % (len(BODY), len(BODY)), BODY),
    ("Content-Length with leading zeros", "Content-Length: 000%d\r\n" % len(BODY), BODY),
    ("Content-Length with 30 leading zeros", "Content-Length: %s%d\r\n" % ("0" * 30, len(BODY)), BODY),
]


@pytest.mark.parametrize("what,framing,body", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_well_framed_bodies_are_read_and_the_connection_kept(seeded, what, framing, body):
    relay = seeded
    statuses, got, closed = converse(relay.port, post(framing, body) + HEALTH + HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert statuses == [201, 200, 200], (what, got[:600])
    assert closed
    assert relay.sql("SELECT body FROM messages") == [{"body": "framed"}]


def test_a_body_on_a_read_still_ends_its_connection(seeded):
    """Framing is decided for every request: a read that carries a chunked body is answered, then the connection ends."""
    relay = seeded
    statuses, got, closed = converse(relay.port, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     + chunked(BODY) + HEALTH)
    assert statuses == [200] and closed, got[:400]
    status, _, _ = raw_exchange(relay.port, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1x\r\n\r\n")
    assert status == 400
