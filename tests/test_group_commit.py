"""Group commit: sends that arrive together share one transaction, and each still gets its own answer.

Over HTTP: many clients at once, some refused, some repeated with an idempotency key; every acknowledged
message is stored exactly once, a refused one not at all, and all of it survives SIGKILL. A request queued
behind a batch is answered by the thread that commits it: pipelined sends still get their answers in order, and
a client that stops reading holds up nobody else. In process, against a real database: a batch whose job fails
after writing is rolled back and its other jobs run again alone; a deferred request is answered after the
commit, by the leading thread or, when no request thread waits, by the committer thread.
"""
import json
import os
import socket
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import agent_relay  # noqa: E402
from conftest import wait_for  # noqa: E402


def test_concurrent_sends_each_get_their_own_answer_and_all_survive_sigkill(relay):
    for a in ("s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "sink"):
        relay.register(a)
    answers = {}
    barrier = threading.Barrier(8)

    def client(k):
        sender = "s%d" % k
        assert relay.get("/api/health").status == 200  # a warm keep-alive connection, so the sends leave together
        barrier.wait(10)
        for i in range(40):
            body = {"from": sender, "to": "sink", "body": "%s #%d" % (sender, i)}
            if i % 10 == 3:
                body["replyTo"] = 10 ** 9  # refused inside the transaction: not found
            if i % 10 == 5:
                body["idempotencyKey"] = "%s-key" % sender  # the same key each time: stored once
            r = relay.post("/api/messages", body)
            answers[(sender, i)] = (r.status, r.json)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 8 * 40

    stored = {r["id"]: r for r in relay.sql("SELECT id, from_agent, body, idempotency_key FROM messages")}
    kept = {}
    for (sender, i), (status, body) in answers.items():
        if i % 10 == 3:
            assert status == 404 and body["error"]["code"] == "not_found", body
            continue
        if i % 10 == 5:
            assert status in (200, 201), body
            kept.setdefault(sender, set()).add(body["message"]["id"])
            continue
        assert status == 201, body
        m = body["message"]
        assert stored[m["id"]]["body"] == "%s #%d" % (sender, i) == m["body"]
        assert stored[m["id"]]["from_agent"] == sender
    for sender, ids in kept.items():
        assert len(ids) == 1, (sender, ids)  # every repeat answered with the first one's id
        assert stored[ids.pop()]["body"] == "%s #5" % sender
    # 40 per client: 4 refused, 4 repeats of one idempotent send (3 of them duplicates)
    assert len(stored) == 8 * (40 - 4 - 3)
    assert not [r for r in stored.values() if r["body"].endswith(("#3", "#13", "#23", "#33"))]
    # the events that streams replay: one message.created per stored message, in id order
    created = [json.loads(e["data"])["message"]["id"] for e in relay.sql(
        "SELECT data FROM events WHERE type = 'message.created' ORDER BY id")]
    assert created == sorted(stored)
    relay.restart(kill=True)
    assert len(relay.sql("SELECT id FROM messages")) == len(stored)
    assert [m["id"] for m in relay.inbox("sink", limit=500)["messages"]] == sorted(stored)


def make_relay(tmp_path):
    relay = agent_relay.Relay(agent_relay.Config.from_sources({}, {"db": str(tmp_path / "relay.db"), "port": "0"}))
    auth = agent_relay.Auth(relay, {}, False)
    for a in ("a", "b"):
        relay.agents.register({"id": a}, auth)
    return relay


def write(t, body):
    # messages are added only through Tx.insert, which hands out their ids
    t.insert("messages", agent_relay.Messages.MESSAGE_COLUMNS,
             ("a", "b", None, body, "chat", None, 0, None, None, None, "{}", "{}", 0, None))  # recipients: None (direct)
    return body


def run_in_one_batch(relay, jobs):
    """The jobs, each from its own thread, queued while a first job waits for the writer: they all form its batch."""
    results = {}
    relay.db.lock.acquire()  # the first leader waits here for the write lock, and takes the queued jobs once it has it

    def go(name, job):
        try:
            results[name] = ("ok", relay.writer.group_tx(job))
        except Exception as e:  # noqa: BLE001 - the test inspects what each caller got
            results[name] = ("error", e)

    first = threading.Thread(target=go, args=("first", lambda t: write(t, "first")))
    first.start()
    assert wait_for(lambda: relay.writer._leading and len(relay.writer._jobs) == 1, timeout=5, every=0.001)  # it leads, its job queued
    threads = [threading.Thread(target=go, args=(name, job)) for name, job in jobs]
    for th in threads:
        th.start()
    assert wait_for(lambda: len(relay.writer._jobs) == len(jobs) + 1, timeout=5, every=0.001)  # all of them queued behind it
    relay.db.lock.release()
    for th in [first] + threads:
        th.join(10)
    return results


def bodies(relay):
    return sorted(r[0] for r in relay.db.query("SELECT body FROM messages"))


def test_a_job_that_refuses_before_writing_fails_alone(tmp_path):
    relay = make_relay(tmp_path)
    try:
        def refuse(t):
            raise agent_relay.ApiError(404, "not_found", "nothing here")

        results = run_in_one_batch(relay, [("x", lambda t: write(t, "x")), ("refuse", refuse), ("y", lambda t: write(t, "y"))])
        assert results["x"] == ("ok", "x") and results["y"] == ("ok", "y") and results["first"] == ("ok", "first")
        assert results["refuse"][0] == "error" and results["refuse"][1].status == 404
        assert bodies(relay) == ["first", "x", "y"]
    finally:
        relay.stop()
        relay.close()


def test_a_job_that_fails_after_writing_rolls_its_batch_back_and_the_others_run_alone(tmp_path):
    relay = make_relay(tmp_path)
    try:
        def half(t):
            write(t, "half-written")
            raise ValueError("failed after writing")

        results = run_in_one_batch(relay, [("x", lambda t: write(t, "x")), ("half", half), ("y", lambda t: write(t, "y"))])
        assert results["half"][0] == "error" and str(results["half"][1]) == "failed after writing"
        assert results["x"] == ("ok", "x") and results["y"] == ("ok", "y")
        assert bodies(relay) == ["first", "x", "y"]  # nothing of the failed job, the others exactly once
        # the relay goes on: the next send is a batch of its own again
        assert relay.writer.group_tx(lambda t: write(t, "after")) == "after"
        assert not relay.writer._leading and not relay.writer._jobs
    finally:
        relay.stop()
        relay.close()


def test_held_rows_are_read_back_in_their_transaction_and_ids_follow_a_rollback(tmp_path):
    """New messages and events are held and written one statement per table; a read in the same transaction
    sees them, and after a rollback the next rows take the ids the rolled-back ones had (none skipped, none
    reused), as SQLite's own choice would."""
    relay = make_relay(tmp_path)
    try:
        auth = agent_relay.Auth(relay, {}, False)
        first, _ = relay.messages.send({"from": "a", "to": "b", "body": "one"}, auth)
        head = relay.db.query_one("SELECT MAX(id) FROM events")[0]

        def held_then_read(t):
            out, _ = relay.messages.create("a", "b", "two", t=t)
            seen = t.execute("SELECT body FROM messages WHERE id = ?", (out["message"]["id"],)).fetchone()
            assert seen is not None and seen[0] == "two"  # written before the read
            raise ValueError("rolled back after writing")

        results = run_in_one_batch(relay, [("held", held_then_read)])
        assert results["held"][0] == "error" and str(results["held"][1]) == "rolled back after writing"
        assert bodies(relay) == ["first", "one"]
        second, _ = relay.messages.send({"from": "a", "to": "b", "body": "three"}, auth)
        assert second["message"]["id"] == first["message"]["id"] + 2  # "first" (the helper's write) took the id between
        stored = relay.db.query("SELECT id, type FROM events WHERE id > ? ORDER BY id", (head,))
        assert [r["type"] for r in stored] == ["message.created"] and stored[0]["id"] == head + 1
        assert relay.hub.head == head + 1  # what streams were told matches what is stored
        rows = relay.db.query("SELECT name, seq FROM sqlite_sequence WHERE name IN ('messages', 'events') ORDER BY name")
        assert [(r["name"], r["seq"]) for r in rows] == [("events", head + 1), ("messages", second["message"]["id"])]
    finally:
        relay.stop()
        relay.close()


def busy_senders(relay, stop, names):
    """Clients that keep sending until `stop` is set, so that batches keep forming."""
    def client(name):
        while not stop.is_set():
            assert relay.post("/api/messages", {"from": name, "to": "sink", "body": "busy"}).status == 201

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    return threads


def read_answers(sock, n, timeout=30):
    """n HTTP answers from a socket, in the order they come: [(status, body dict)]."""
    sock.settimeout(timeout)
    buf, out = b"", []
    while len(out) < n:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            length = [int(l.split(b":", 1)[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0]
            if len(rest) >= length:
                out.append((int(head.split(b" ", 2)[1]), json.loads(rest[:length])))
                buf = rest[length:]
                continue
        chunk = sock.recv(1 << 20)
        assert chunk, "the relay closed the connection after %d answers" % len(out)
        buf += chunk
    return out


def send_request(port, body):
    data = json.dumps(body).encode()
    return (b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (port, len(data))) + data


def test_pipelined_sends_are_answered_in_order_while_batches_run(relay):
    for a in ("b0", "b1", "b2", "p", "sink"):
        relay.register(a)
    stop = threading.Event()
    threads = busy_senders(relay, stop, ["b0", "b1", "b2"])
    try:
        s = socket.create_connection(("127.0.0.1", relay.port))
        bodies = [{"from": "p", "to": "sink", "body": "p%d" % i} for i in range(60)]
        bodies[20]["replyTo"] = 10 ** 9  # refused: its answer still comes in its place
        s.sendall(b"".join(send_request(relay.port, b) for b in bodies))
        answers = read_answers(s, len(bodies))
        s.close()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert answers[20][0] == 404 and answers[20][1]["error"]["code"] == "not_found"
    kept = [a for i, a in enumerate(answers) if i != 20]
    assert [a[0] for a in kept] == [201] * 59
    assert [a[1]["message"]["body"] for a in kept] == ["p%d" % i for i in range(60) if i != 20]
    ids = [a[1]["message"]["id"] for a in kept]
    assert ids == sorted(ids)
    stored = {r["id"]: r["body"] for r in relay.sql("SELECT id, body FROM messages WHERE from_agent = 'p'")}
    assert [stored[i] for i in ids] == ["p%d" % i for i in range(60) if i != 20]


def test_a_client_that_stops_reading_holds_up_no_other_sender(relay):
    for a in ("b0", "b1", "slow", "quick", "sink"):
        relay.register(a)
    big = "x" * 60000
    n = 120  # about 7 MB of answers: more than the sockets between them hold
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", relay.port))
    data = b"".join(send_request(relay.port, {"from": "slow", "to": "sink", "body": big + str(i)}) for i in range(n))
    writer = threading.Thread(target=slow.sendall, args=(data,), daemon=True)
    stop = threading.Event()
    threads = busy_senders(relay, stop, ["b0", "b1"])  # so that the slow client's sends are answered by other threads
    try:
        writer.start()
        assert wait_for(lambda: len(relay.sql("SELECT id FROM messages WHERE from_agent = 'slow'")) >= 3)
        time.sleep(0.5)  # its answers have filled the sockets: the relay is stuck writing to it
        started = time.monotonic()
        for i in range(30):
            r = relay.post("/api/messages", {"from": "quick", "to": "sink", "body": "q%d" % i})
            assert r.status == 201, r.json
        quick = time.monotonic() - started
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    answers = read_answers(slow, n, timeout=60)
    writer.join(30)
    slow.close()
    assert quick < 10, quick  # not held up by the slow client (its socket would time out after 30 s)
    assert [a[1]["message"]["body"] for a in answers] == [big + str(i) for i in range(n)]
    assert len(relay.sql("SELECT id FROM messages WHERE from_agent = 'slow'")) == n


def test_a_request_queued_behind_a_batch_is_answered_after_the_commit_by_the_thread_that_ran_it(tmp_path):
    relay = make_relay(tmp_path)
    answers = {}

    def then_for(name):
        def then(outcome):
            try:
                answers[name] = ("ok", outcome(), threading.current_thread().name)
            except Exception as e:  # noqa: BLE001 - the test inspects what each request got
                answers[name] = ("error", e, threading.current_thread().name)
        return then

    def refuse(t):
        raise agent_relay.ApiError(404, "not_found", "nothing here")

    try:
        # queued while a leader waits for the writer: it joins that batch, and the leader answers it
        relay.db.lock.acquire()
        first = threading.Thread(target=lambda: answers.setdefault("first", relay.writer.group_tx(lambda t: write(t, "first"))),
                                 name="first")
        first.start()
        assert wait_for(lambda: relay.writer._leading and len(relay.writer._jobs) == 1, timeout=5, every=0.001)
        assert relay.writer.group_tx(lambda t: write(t, "later"), then=then_for("later")) is agent_relay.DEFERRED
        assert relay.writer.group_tx(refuse, then=then_for("refused")) is agent_relay.DEFERRED
        assert "later" not in answers and bodies(relay) == []  # nothing answered before its commit
        relay.db.lock.release()
        first.join(10)
        assert answers["first"] == "first"
        assert answers["later"] == ("ok", "later", "first")
        assert answers["refused"][0] == "error" and answers["refused"][1].status == 404 and answers["refused"][2] == "first"
        # queued while a batch runs, with no request thread waiting to lead the next one: the committer does
        gate, inside = threading.Event(), threading.Event()

        def slow(t):
            inside.set()
            gate.wait(10)
            return write(t, "slow")

        lead = threading.Thread(target=lambda: answers.setdefault("slow", relay.writer.group_tx(slow)), name="leader")
        lead.start()
        assert inside.wait(10)
        assert relay.writer.group_tx(lambda t: write(t, "next"), then=then_for("next")) is agent_relay.DEFERRED
        gate.set()
        lead.join(10)
        assert wait_for(lambda: "next" in answers, timeout=10, every=0.01)
        assert answers["next"] == ("ok", "next", "committer")
        assert bodies(relay) == ["first", "later", "next", "slow"]
        assert wait_for(lambda: not relay.writer._leading and not relay.writer._jobs, timeout=5, every=0.01)
        # a request with nothing running leads its own batch, deferred or not
        assert relay.writer.group_tx(lambda t: write(t, "alone"), then=then_for("alone")) == "alone" and "alone" not in answers
    finally:
        relay.stop()
        relay.close()
    assert not relay.writer._committer  # closing ends the committer thread
