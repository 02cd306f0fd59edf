#!/usr/bin/env python3
"""What the start-up check of the database costs: the relay's start on a large database, cold and warm.

    python3 benchmarks/start_check.py                  # a 1024 MB database in a temporary folder
    python3 benchmarks/start_check.py --mb 300 --keep  # smaller; keep the file (its path is printed)
    python3 benchmarks/start_check.py --db FILE        # an existing relay database (it is not changed)
    python3 benchmarks/start_check.py --relay OTHER.py # also time another version of agent_relay.py

At start the relay reads the database file through once and runs PRAGMA
quick_check on it (Storage.check_file). This prints, for one file: how long a
plain sequential read of it takes (the disk's floor), quick_check alone, and
the relay's start until it listens, each with the file dropped from the page
cache first ("cold", posix_fadvise, Linux) and with it cached ("warm").
"""
import argparse
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELAY_PY = os.path.join(ROOT, "agent_relay.py")


def build(path, mb):
    """A relay database of about `mb` MB: messages of 800 characters, each with a receipt."""
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); import agent_relay; "
                    "agent_relay.Storage(%r).close()" % (ROOT, path)], check=True)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = OFF")
    rnd, n, ts = random.Random(1), 0, int(time.time() * 1000)
    while sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p)) < mb * 1024 * 1024:
        rows = []
        for _ in range(20000):
            n += 1
            rows.append((n, "agent-%d" % (n % 50), "agent-%d" % ((n + 1) % 50),
                         "".join(rnd.choice("abcdefghij klmnop") for _ in range(40)) * 20, ts + n))
        con.execute("BEGIN")
        con.executemany("INSERT INTO messages(id, from_agent, to_target, body, created_at) VALUES (?,?,?,?,?)", rows)
        con.executemany("INSERT INTO receipts(message_id, agent_id, state, delivered_at) VALUES (?,?,'delivered',?)",
                        [(r[0], r[2], r[4]) for r in rows])
        con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return n


def drop_cache(path):
    for p in (path, path + "-wal"):
        if os.path.exists(p):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn, path, cold):
    if cold:
        drop_cache(path)
    t = time.perf_counter()
    fn(path)
    return time.perf_counter() - t


def read_through(path):
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


def quick_check(path):
    con = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        assert con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    finally:
        con.close()


def relay_start(script):
    def start(path):
        proc = subprocess.Popen([sys.executable, script, "serve", "--port", "0", "--db", path],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        line = proc.stdout.readline().decode("utf-8", "replace")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if "listening" not in line:
            raise SystemExit("the relay did not start: %s" % line.strip())
    return start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="size of the database to build (default 1024)")
    ap.add_argument("--db", help="time this database (a copy of it) instead of building one")
    ap.add_argument("--relay", help="also time the start of another agent_relay.py")
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each (the median is printed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    if not hasattr(os, "posix_fadvise"):
        raise SystemExit("this needs os.posix_fadvise (Linux) to drop the file from the page cache")
    folder = tempfile.mkdtemp(prefix="relay-start-check-")
    path = os.path.join(folder, "relay.db")
    try:
        if args.db:
            shutil.copyfile(args.db, path)  # the relay's start writes to the file (WAL mode, its system agents)
            what = "a copy of %s" % args.db
        else:
            what = "%d messages" % build(path, args.mb)
        print("database: %s, %.0f MB, %s" % (path, os.path.getsize(path) / 1e6, what))
        rows = [("sequential read of the file", read_through), ("PRAGMA quick_check alone", quick_check),
                ("relay start until it listens", relay_start(RELAY_PY))]
        if args.relay:
            rows.append(("start of --relay %s" % os.path.basename(args.relay), relay_start(os.path.abspath(args.relay))))
        for label, fn in rows:
            cold = sorted(timed(fn, path, True) for _ in range(args.rounds))[args.rounds // 2]
            warm = sorted(timed(fn, path, False) for _ in range(args.rounds))[args.rounds // 2]
            print("%-40s cold %6.2f s   warm %6.2f s" % (label, cold, warm), flush=True)
    finally:
        if args.keep:
            print("kept %s" % folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
