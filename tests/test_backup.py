"""`agent_relay.py backup DEST`: a consistent copy of the live database, taken while the relay serves.

The main test keeps a thread sending messages through HTTP as fast as it can
while the backup runs, then checks that the copy passes SQLite's integrity
check, holds every message the relay acknowledged before the backup began,
and serves as a relay's database.
"""
import os
import sqlite3
import subprocess
import sys
import threading

from conftest import RELAY_PY


def run_backup(*args, **kw):
    env = dict(os.environ)
    env.pop("AGENT_RELAY_DB", None)
    env.update(kw.pop("env", {}))
    p = subprocess.run([sys.executable, RELAY_PY, "backup"] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       stdin=subprocess.DEVNULL, env=env, timeout=120)
    p.out, p.err = p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
    return p


class Writer(threading.Thread):
    """Sends messages as fast as the relay acknowledges them, recording the ids it got a 2xx for."""

    def __init__(self, relay):
        threading.Thread.__init__(self, daemon=True)
        self.relay = relay
        self.acked = []
        self.failures = []
        self.done = threading.Event()
        self.started_enough = threading.Event()

    def run(self):
        i = 0
        while not self.done.is_set() and i < 200000:
            i += 1
            r = self.relay.post("/api/messages", {"from": "loader", "to": "sink", "body": "load %d " % i + "x" * 512})
            if 200 <= r.status < 300:
                self.acked.append(r.json["message"]["id"])
            else:
                self.failures.append(r)
            if len(self.acked) >= 500:
                self.started_enough.set()


def stored(path, sql):
    con = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_backup_during_a_write_load_holds_every_acknowledged_message(relay_factory, tmp_path):
    relay = relay_factory()
    relay.register("loader")
    relay.register("sink")
    writer = Writer(relay)
    writer.start()
    try:
        assert writer.started_enough.wait(60), writer.failures[:3]
        acked_before = list(writer.acked)  # everything the relay acknowledged before the backup began
        dest = str(tmp_path / "copy.db")
        p = run_backup(dest, "--db", relay.db_path)
        acked_after = len(writer.acked)
    finally:
        writer.done.set()
        writer.join(30)
    assert p.returncode == 0, p.err
    assert writer.failures == []
    assert acked_after > len(acked_before)  # the relay kept taking writes while the copy was made

    assert stored(dest, "PRAGMA integrity_check") == [("ok",)]
    ids = {row[0] for row in stored(dest, "SELECT id FROM messages")}
    missing = set(acked_before) - ids
    assert not missing, "acknowledged before the backup but not in it: %s" % sorted(missing)[:10]
    count = len(ids)
    assert "%d messages" % count in p.out and dest in p.out
    # A single self-contained file (no -wal beside it), readable by the owner only.
    assert stored(dest, "PRAGMA journal_mode") == [("delete",)]
    assert not os.path.exists(dest + "-wal")
    assert oct(os.stat(dest).st_mode & 0o777) == oct(0o600)

    # The relay itself lost nothing and still serves.
    assert relay.get("/api/messages/%d" % acked_before[-1]).status == 200

    # The copy is a working relay database.
    restored = relay_factory(db_path=dest)
    r = restored.get("/api/messages/%d" % acked_before[-1])
    assert r.status == 200 and r.json["message"]["from"] == "loader"
    assert restored.get("/api/agents/sink").status == 200


def test_backup_refuses_to_overwrite_and_says_what_is_wrong(relay_factory, tmp_path):
    relay = relay_factory()
    relay.register("a")
    first = relay.send("a", "a", "first")
    dest = tmp_path / "copy.db"
    dest.write_bytes(b"precious")

    p = run_backup(str(dest), "--db", relay.db_path)
    assert p.returncode == 2 and "--force" in p.err
    assert dest.read_bytes() == b"precious"

    relay.send("a", "a", "second")
    p = run_backup(str(dest), "--force", env={"AGENT_RELAY_DB": relay.db_path})  # the variable names the database
    assert p.returncode == 0, p.err
    assert [r[0] for r in stored(str(dest), "SELECT body FROM messages ORDER BY id")] == ["first", "second"]
    assert "2 messages" in p.out

    # A folder as DEST gets a dated file inside it.
    folder = tmp_path / "backups"
    folder.mkdir()
    p = run_backup(str(folder), "--db", relay.db_path)
    assert p.returncode == 0, p.err
    made = os.listdir(str(folder))
    assert len(made) == 1 and made[0].startswith("agent-relay-") and made[0].endswith(".db")
    assert stored(str(folder / made[0]), "SELECT id FROM messages WHERE id = %d" % first["id"]) == [(first["id"],)]

    for args, words in (
        ([str(tmp_path / "x.db"), "--db", str(tmp_path / "nothing-here.db")], "no database"),
        ([str(tmp_path / "no" / "such" / "dir" / "x.db"), "--db", relay.db_path], "does not exist"),
        ([str(tmp_path / "x.db"), "--db", ":memory:"], ":memory:"),
    ):
        p = run_backup(*args)
        assert p.returncode == 2 and words in p.err, (args, p.err)
    assert not os.path.exists(str(tmp_path / "x.db"))
    assert not os.path.exists(str(tmp_path / "nothing-here.db"))  # looking did not create it
