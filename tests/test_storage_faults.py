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
serving is 503 `database_corrupt` from then on, logged once. A database file
deleted or replaced under the running relay is 503 `database_replaced` within
a second of the next write; the relay saves what it held beside the path.
"""
import concurrent.futures
import glob
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from conftest import RELAY_PY, wait_for


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
    assert sorted(r["message"]["id"] for r in relay.get("/api/search?q=before&limit=50").json["results"]) == acked

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
        found = relay.get("/api/search?q=before&limit=50")  # the index is searched as it stands (it takes no writes)
        assert found.status == 200 and sorted(r["message"]["id"] for r in found.json["results"]) == acked
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
    assert [x["message"]["id"] for x in relay.get("/api/search?q=after").json["results"]] == [acked[-1]]  # indexed again
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



# -- a damaged database, and one deleted or replaced under the relay ----------


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


def replaced_lines(relay):
    return [line for line in relay.output if "database_replaced" in line]


def rescued_copy(relay):
    copies = glob.glob(relay.db_path + ".rescued-*")
    return copies[0] if len(copies) == 1 and not copies[0].endswith(".partial") else None


def test_database_file_deleted_while_serving_is_503_and_what_it_held_is_saved(relay):
    acked = write_messages(relay, 10)
    os.unlink(relay.db_path)
    refused = []

    def refused_write():
        r = relay.post("/api/messages", {"from": "alice", "to": "bob", "body": "after the delete"})
        if r.status == 201:
            acked.append(r.json["message"]["id"])  # not noticed yet: this one must be kept too
            return False
        assert r.status == 503 and r.code == "database_replaced", r
        refused.append(r)
        return True

    assert wait_for(refused_write, timeout=10), "writes went on into a deleted file"
    assert "deleted" in refused[0].json["error"]["message"] and refused[0].headers.get("retry-after"), refused[0].json
    for r in (relay.post("/api/agents", {"id": "newcomer"}), relay.get("/api/messages"), relay.get("/api/health"),
              relay.post("/api/messages", {"from": "alice", "to": "bob", "body": "still refused"})):
        assert r.status == 503 and r.code == "database_replaced", r
    assert wait_for(lambda: replaced_lines(relay), timeout=10)
    line = replaced_lines(relay)[0]
    assert relay.db_path in line and "restart" in line, line
    assert not os.path.exists(relay.db_path), "the relay made a new file where the deleted one was"

    # what the relay acknowledged is saved beside the path, and the relay lets go of the deleted file: its -wal,
    # which SQLite leaves behind for a file that moved, is emptied, so nothing in it is replayed into the next one
    copy = wait_for(lambda: rescued_copy(relay), timeout=20)
    assert copy, relay.log
    wal = relay.db_path + "-wal"
    assert wait_for(lambda: not os.path.exists(wal) or os.path.getsize(wal) == 0, timeout=10), os.path.getsize(wal)
    assert wait_for(lambda: any(copy in line for line in relay.output), timeout=10), relay.log
    con = sqlite3.connect(copy)
    assert [r[0] for r in con.execute("SELECT id FROM messages ORDER BY id")] == acked
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    assert relay.stop() == 0
    assert len(replaced_lines(relay)) == 1 and "Traceback" not in relay.log, relay.log

    # recovery: put the copy at the path and start again
    os.replace(copy, relay.db_path)
    relay.start()
    assert [m["id"] for m in relay.inbox("bob", since=0, limit=100)["messages"]] == acked


def test_database_file_replaced_while_serving_is_503_and_a_restart_serves_the_new_file(relay):
    first = write_messages(relay, 5)
    backup = os.path.join(os.path.dirname(relay.db_path), "backup.db")
    p = subprocess.run([sys.executable, RELAY_PY, "backup", backup, "--db", relay.db_path],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert p.returncode == 0, p.stdout
    later = [relay.send("alice", "bob", "after the backup %d" % i)["id"] for i in range(3)]
    os.replace(backup, relay.db_path)  # a restore while the relay runs: the path now names another file

    def refused_write():
        r = relay.post("/api/messages", {"from": "alice", "to": "bob", "body": "into which file?"})
        if r.status == 201:
            later.append(r.json["message"]["id"])  # not noticed yet (the path is looked at once a second)
            return None
        assert r.status == 503 and r.code == "database_replaced", r
        return r

    r = wait_for(refused_write, timeout=10)
    assert r, "writes went on into the file that was replaced"
    assert "replaced" in r.json["error"]["message"], r.json
    for r in (relay.get("/api/messages"), relay.get("/api/health"), relay.post("/api/agents", {"id": "newcomer"})):
        assert r.status == 503 and r.code == "database_replaced", r
    assert wait_for(lambda: replaced_lines(relay), timeout=10)
    copy = wait_for(lambda: rescued_copy(relay), timeout=20)
    assert copy, relay.log
    con = sqlite3.connect(copy)
    assert [r[0] for r in con.execute("SELECT id FROM messages ORDER BY id")] == first + later
    con.close()
    assert relay.stop() == 0
    assert len(replaced_lines(relay)) == 1 and "Traceback" not in relay.log, relay.log

    relay.start()  # recovery is a restart: the relay serves the file now at the path
    assert [m["id"] for m in relay.get("/api/messages", query={"limit": 100}).json["messages"]] == first[::-1]
    r = relay.post("/api/messages", {"from": "alice", "to": "bob", "body": "after the restart"})
    assert r.status == 201, r
    assert relay.sql("PRAGMA integrity_check") == [{"integrity_check": "ok"}]
