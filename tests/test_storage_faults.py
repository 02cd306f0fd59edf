"""Storage faults: the database turns read-only, the disk fills up, another process holds the write lock.

Each is a real fault, not a mock: `chattr +i` on the database files (root
ignores file modes, not the immutable flag), a size-limited tmpfs filled to the
brim, and a second SQLite connection holding `BEGIN EXCLUSIVE`. While the fault
lasts, writes get 503 `unavailable` with a message that names the problem,
within a bounded time (requests do not pile up behind one stuck write); reads
keep working; the process stays up without a traceback; a refused write stores
nothing. Once the fault is gone the relay takes writes again by itself, and
nothing it acknowledged is lost (checked across a restart).

A damaged database file (pages overwritten, or not a database at all) stops
the start with a message that says how to restore it, and damage met while
serving is 503 `database_corrupt` from then on, logged once.
"""
import concurrent.futures
import hashlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid

import pytest

from conftest import wait_for


def run(cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)


def chattr_works(directory):
    if not shutil.which("chattr"):
        return False
    probe = os.path.join(directory, "probe")
    open(probe, "w").close()
    ok = run(["chattr", "+i", probe]).returncode == 0
    if ok:
        run(["chattr", "-i", probe])
    os.unlink(probe)
    return ok


def send(relay, body, frm="alice", to="bob"):
    return relay.post("/api/messages", {"from": frm, "to": to, "body": body})


def fault_session(relay, inject, remove, words):
    """Drives one fault from start to recovery; returns nothing, asserts everything."""
    relay.register("alice")
    relay.register("bob")
    acked = [send(relay, "before the fault %d" % i).json["message"]["id"] for i in range(5)]
    inbox_before = relay.inbox("bob", since=0)["messages"]
    assert [m["id"] for m in inbox_before] == acked

    inject()
    try:
        # writes: 503 unavailable, saying what is wrong; several at once do not queue up behind each other
        refused = ["refused during the fault %s" % uuid.uuid4().hex for _ in range(6)]
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(refused)) as pool:
            answers = list(pool.map(lambda b: (send(relay, b), time.monotonic() - started), refused))
        for r, took in answers:
            assert r.status == 503, r
            assert r.code == "unavailable" and any(w in r.json["error"]["message"] for w in words), r.json
            assert r.headers.get("retry-after")
            assert took < 6, "a write waited %.1f s for its 503" % took
        r = relay.post("/api/agents", {"id": "newcomer"})
        assert r.status == 503 and r.code == "unavailable", r
        assert relay.get("/api/agents/newcomer").status == 404, "a refused registration left the agent behind in memory"

        # reads keep working
        assert relay.get("/api/health").status == 200
        assert relay.get("/api/agents/alice").status == 200
        history = relay.get("/api/messages?limit=50")
        assert history.status == 200 and sorted(m["id"] for m in history.json["messages"]) == acked
        inbox = relay.get("/api/agents/bob/inbox?since=0")
        assert inbox.status == 200 and [m["id"] for m in inbox.json["messages"]] == acked
        assert relay.get("/api/stats").status == 200
        assert relay.proc.poll() is None
    finally:
        remove()

    # the relay recovers by itself: no restart, the next write goes through
    deadline = time.monotonic() + 15
    while True:
        r = send(relay, "after the fault")
        if r.status == 201 or time.monotonic() > deadline:
            break
        assert r.status == 503, r
        time.sleep(0.2)
    assert r.status == 201, r
    acked.append(r.json["message"]["id"])
    assert relay.post("/api/agents", {"id": "newcomer"}).status == 201
    assert "Traceback" not in relay.log, relay.log

    relay.restart()
    stored = {row["body"]: row["id"] for row in relay.sql("SELECT id, body FROM messages")}
    assert sorted(stored.values()) == acked, "an acknowledged message was lost, or a refused one was stored"
    assert not any(b.startswith("refused during the fault") for b in stored)
    assert relay.sql("PRAGMA integrity_check") == [{"integrity_check": "ok"}]
    assert relay.get("/api/agents/newcomer").status == 200


def test_read_only_database_files(relay):
    directory = os.path.dirname(relay.db_path)
    if not chattr_works(directory):
        pytest.skip("this filesystem does not support chattr +i (the immutable flag)")
    # The database, its write-ahead log and their directory. Not the -shm file: SQLite maps it into memory in
    # every process, and the kernel answers a write to a mapped immutable file with SIGBUS, which no program
    # can catch (a real `chmod` does not touch an open mapping, so that case does not happen outside a test).
    paths = [relay.db_path, relay.db_path + "-wal", directory]

    def inject():
        for p in paths:
            assert run(["chattr", "+i", p]).returncode == 0

    def remove():
        for p in paths:
            run(["chattr", "-i", p])

    try:
        fault_session(relay, inject, remove, ["read-only"])
    finally:
        remove()


@pytest.fixture
def small_disk():
    """A 4 MiB tmpfs of its own, unmounted afterwards."""
    mnt = tempfile.mkdtemp(prefix="relay-disk-")
    r = run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt])
    if r.returncode != 0:
        os.rmdir(mnt)
        pytest.skip("cannot mount a tmpfs here (%s)" % r.stdout.decode(errors="replace").strip())
    try:
        yield mnt
    finally:
        run(["umount", "-l", mnt])
        os.rmdir(mnt)


def fill(directory):
    """Writes a file until the filesystem is full; returns its path."""
    path = os.path.join(directory, "filler")
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass
    # leave not even a page for the write-ahead log
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass
    return path


def test_disk_full(relay_factory, small_disk):
    relay = relay_factory(db_path=os.path.join(small_disk, "relay.db"))
    filler = os.path.join(small_disk, "filler")
    try:
        fault_session(relay, lambda: fill(small_disk), lambda: os.path.exists(filler) and os.unlink(filler), ["full"])
    finally:
        relay.stop()


def test_another_process_holds_the_write_lock(relay):
    holder = sqlite3.connect(relay.db_path, isolation_level=None, timeout=10)

    def inject():
        holder.execute("BEGIN EXCLUSIVE")

    def remove():
        if holder.in_transaction:
            holder.execute("ROLLBACK")

    try:
        fault_session(relay, inject, remove, ["locked"])
    finally:
        holder.close()


def test_a_short_lock_is_waited_out(relay):
    """A backup or a quick manual query holding the lock briefly does not fail anyone's write."""
    relay.register("alice")
    relay.register("bob")
    holder = sqlite3.connect(relay.db_path, isolation_level=None, timeout=10)
    holder.execute("BEGIN EXCLUSIVE")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        later = pool.submit(send, relay, "waits for a moment")
        time.sleep(0.3)
        holder.execute("COMMIT")
        r = later.result(10)
    holder.close()
    assert r.status == 201, r


def test_start_on_a_database_it_cannot_open_says_so(relay_factory, tmp_path):
    """A database that cannot be opened stops the start with a message naming it, not a traceback."""
    relay = relay_factory(start=False, db_path=str(tmp_path / "not-a-db"))
    os.makedirs(relay.db_path)  # a directory where the file should be
    with pytest.raises(RuntimeError) as e:
        relay.start(timeout=10)
    assert relay.proc.wait(10) == 2
    assert "AGENT_RELAY_DB" in str(e.value) and "Traceback" not in str(e.value)


def test_start_on_a_read_only_database_says_so(relay):
    """Restarted onto a database it may not write (immutable here), the relay refuses to start, naming the file."""
    relay.register("alice")
    relay.stop()
    directory = os.path.dirname(relay.db_path)
    if not chattr_works(directory):
        pytest.skip("this filesystem does not support chattr +i (the immutable flag)")
    paths = [relay.db_path, directory]
    try:
        for p in paths:
            assert run(["chattr", "+i", p]).returncode == 0
        with pytest.raises(RuntimeError) as e:
            relay.start(timeout=10)
        assert relay.proc.wait(10) == 2
        assert "AGENT_RELAY_DB" in str(e.value) and "Traceback" not in str(e.value), str(e.value)
    finally:
        for p in paths:
            run(["chattr", "-i", p])
    relay.start()
    assert relay.get("/api/agents/alice").status == 200



# -- a damaged database file ----------------------------------------------------


def write_messages(relay, count=120):
    """Messages of 1.5 KB each, so that they fill most pages of the file; returns their ids."""
    relay.register("alice")
    relay.register("bob")
    return [relay.send("alice", "bob", "%04d %s" % (i, "x" * 1500))["id"] for i in range(count)]


def damage(path, first, last):
    """Overwrites the pages from `first` to `last` (fractions of the file) with a byte no b-tree page starts with."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(100)[16:18], "big")
    pages = os.path.getsize(path) // size
    assert pages > 20, "too few pages to damage only some of them"
    with open(path, "r+b") as f:
        for n in range(int(pages * first), int(pages * last)):
            f.seek(n * size)
            f.write(b"\xa5" * size)


def quick_check(path):
    con = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return [r[0] for r in con.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as e:
        return [str(e)]
    finally:
        con.close()


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_refused_with_restore_advice(relay, what):
    """The start stops with one message naming the file and saying how to restore it; the file is left as it was."""
    before = digest(relay.db_path)
    with pytest.raises(RuntimeError) as e:
        relay.start(timeout=20)
    assert relay.proc.wait(10) == 2
    out = str(e.value)
    assert "Traceback" not in out, out
    assert wait_for(lambda: relay.output) and len(relay.output) == 1, relay.output  # one message, on one line
    for words in (relay.db_path, what, "agent-relay backup", "litestream restore", "-wal", "move"):
        assert words in out, "%r missing from: %s" % (words, out)
    assert "writable" not in out, out  # it is not a permissions problem, and does not say so
    assert digest(relay.db_path) == before, "the refused start changed the damaged file"


def test_start_on_a_database_with_damaged_pages_refuses_and_says_how_to_restore(relay):
    write_messages(relay)
    relay.stop()
    assert not os.path.exists(relay.db_path + "-wal"), "a clean stop leaves one file"
    damage(relay.db_path, 0.45, 0.55)
    assert quick_check(relay.db_path) != ["ok"], "the damage must be one that quick_check notices"
    assert_refused_with_restore_advice(relay, "is damaged")


def test_start_on_a_file_that_is_not_a_database_refuses_the_same_way(relay_factory):
    relay = relay_factory(start=False)
    with open(relay.db_path, "wb") as f:
        f.write(os.urandom(64 * 1024))
    assert_refused_with_restore_advice(relay, "is not an SQLite database")


def damage_lines(relay):
    return [line for line in relay.output if "damaged" in line.lower()]


def test_damage_found_while_serving_is_503_database_corrupt_and_logged_once(relay):
    acked = write_messages(relay)
    relay.restart()  # the pages are in the database file now, and in no connection's cache
    damage(relay.db_path, 0.25, 0.75)
    con = sqlite3.connect("file:%s?mode=ro" % relay.db_path, uri=True)
    with pytest.raises(sqlite3.DatabaseError):
        con.execute("SELECT SUM(LENGTH(body)) FROM messages").fetchone()  # the damage is where reads go
    con.close()

    r = relay.get("/api/messages", query={"limit": 200})
    assert r.status == 503 and r.code == "database_corrupt", r
    assert "damaged" in r.json["error"]["message"] and r.headers.get("retry-after"), r.json
    # from then on, every request that needs the database is refused the same way, writes included
    answers = [
        relay.get("/api/messages", query={"limit": 200}),
        relay.get("/api/messages/%d" % acked[0]),
        relay.get("/api/agents/bob/inbox?since=0"),
        relay.get("/api/stats"),
        relay.post("/api/messages", {"from": "alice", "to": "bob", "body": "after the damage"}),
        relay.post("/api/agents", {"id": "newcomer"}),
        relay.get("/api/health"),
    ]
    for a in answers:
        assert a.status == 503 and a.code == "database_corrupt", a
    assert relay.get("/api/agents/newcomer").status == 404, "a refused registration left the agent behind in memory"
    assert wait_for(lambda: damage_lines(relay), timeout=10)
    assert relay.stop() == 0
    assert len(damage_lines(relay)) == 1, relay.log  # one line, not one per request or per sweep
    line = damage_lines(relay)[0]
    assert relay.db_path in line and "database_corrupt" in line and "agent-relay backup" in line, line
    assert "Traceback" not in relay.log, relay.log
    # and it does not start on the damaged file again
    with pytest.raises(RuntimeError) as e:
        relay.start(timeout=20)
    assert relay.proc.wait(10) == 2 and "is damaged" in str(e.value), str(e.value)
