#!/usr/bin/env python3
"""What one request costs, without the network and without the machine's noise.

    python3 benchmarks/cost.py                  # CPU microseconds per send: relay, bare baseline, SQLite alone
    python3 benchmarks/cost.py --instructions   # instructions per send, counted by valgrind (apt install valgrind)
    python3 benchmarks/cost.py --relay OTHER.py # another version of agent_relay.py

Feeds N pipelined `POST /api/messages` requests through the relay's own
request handler over a loopback TCP connection, in this process and on one thread, and
divides the handler thread's CPU time by N; the same for the baseline's
handler (benchmarks/baseline_server.py). `--instructions` runs the same under
valgrind (callgrind) twice, with N and with 6N requests, and reports the
difference per request: a count that does not move with the load on the
machine, for comparing two versions of the relay. System calls are not
counted there (valgrind counts user-space instructions only).
"""
import argparse
import importlib.util
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from loadgen import request_bytes  # noqa: E402

BODY = {"from": "bench-sender", "to": "bench-sink", "body": "The migration is done; tests pass on the branch. Please review when you can."}


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Server:
    """What a request handler asks of its server: here a connection has a thread of its own (no worker pool, no
    waiting room), as on the relay's thread-per-connection path."""

    pool = None
    room = None
    waits = 0

    def __init__(self):
        self.active = set()
        self.active_lock = threading.Lock()

    def connection_closed(self):
        pass

    def handle_error(self, request, client_address):
        raise


def tcp_pair():
    """Two ends of a loopback TCP connection (the relay's handler sets TCP options a socketpair does not have)."""
    lsn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(1)
    b = socket.create_connection(lsn.getsockname())
    a, _ = lsn.accept()
    lsn.close()
    return a, b


def feed(handler_class, n):
    """n pipelined requests through one handler; returns the handler thread's CPU seconds."""
    a, b = tcp_pair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    req = request_bytes("POST", "/api/messages", 4850, BODY)

    def drain():
        while b.recv(1 << 20):
            pass

    def write():
        for k in range(0, n, 100):
            b.sendall(req * min(100, n - k))
        b.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=drain), threading.Thread(target=write)]
    for t in threads:
        t.start()
    t0 = time.thread_time()
    h = handler_class(a, ("127.0.0.1", 0), _Server())
    if hasattr(h, "serve"):  # a relay whose server runs the connection (since the waiting room), not its constructor
        try:
            h.handle()
        finally:
            h.finish()
    cpu = time.thread_time() - t0
    a.close()
    for t in threads:
        t.join()
    return cpu


def handler_for(which, relay_path, db):
    """The request handler class of the baseline or of a relay on `db` (with its two agents registered)."""
    if which == "baseline":
        bs = load(os.path.join(HERE, "baseline_server.py"), "baseline_server")
        return type("H", (bs.Handler,), {"disable_nagle_algorithm": False, "timeout": None}), None
    ar = load(relay_path, "agent_relay_under_test")
    relay = ar.Relay(ar.Config.from_sources({}, {"db": db, "port": "0"}))
    auth = ar.Auth(relay, {}, False)
    agents = relay.agents if hasattr(relay.agents, "register") else relay  # the agent directory (an older relay: itself)
    for a in ("bench-sender", "bench-sink"):
        agents.register({"id": a}, auth)
    # a timeout, as the relay's server sets one: its request deadlines count against it
    h = type("H", (ar.Handler,), {"relay": relay, "api": ar.Api(relay), "timeout": 30, "disable_nagle_algorithm": False})
    return h, relay


def sqlite_only(relay_path, n, db):
    """The storage work of one send alone: the message row and its event row in one transaction."""
    ar = load(relay_path, "agent_relay_under_test")
    st = ar.Storage(db)
    row = ("bench-sender", "bench-sink", None, BODY["body"], "chat", None, 0, None, None, None, "{}", "{}", 0)
    event = ("message.created", None, ",bench-sender,bench-sink,", '{"message":{"id":1,"body":"%s"}}' % BODY["body"], 0)
    t0 = time.thread_time()
    for _ in range(n):
        with st.write() as c:
            c.execute("INSERT INTO messages(from_agent, to_target, subject, body, kind, channel, claimable, reply_to, "
                      "thread_id, idempotency_key, payload, meta, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
            c.execute("INSERT INTO events(type, agent_id, audience, data, created_at) VALUES (?,?,?,?,?)", event)
    cpu = time.thread_time() - t0
    st.close()
    return cpu


def run_once(which, relay_path, n, db):
    if which == "sqlite":
        return sqlite_only(relay_path, n, db)
    h, relay = handler_for(which, relay_path, db)
    try:
        feed(h, 50)  # warm: statement cache, reader pool, imports
        return feed(h, n)
    finally:
        if relay is not None:
            relay.stop()
            relay.close()


_DBS = itertools.count()


def fresh_db(tmp, memory):
    return ":memory:" if memory else os.path.join(tmp, "cost-%d.db" % next(_DBS))


def instructions(which, relay_path, n, tmp, memory):
    exe = shutil.which("valgrind")
    if not exe:
        raise SystemExit("valgrind is not installed (apt install valgrind)")
    counts = []
    for k in (n, 6 * n):
        db = fresh_db(tmp, memory)
        cmd = [exe, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, os.path.abspath(__file__),
               "--one", which, "--relay", relay_path, "-n", str(k), "--db", db]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout.decode("utf-8", "replace")
        m = re.search(r"Collected : (\d+)", out)
        if not m:
            raise SystemExit("valgrind did not report a count:\n" + out[-2000:])
        counts.append(int(m.group(1)))
    return (counts[1] - counts[0]) / (5.0 * n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--relay", default=os.path.join(os.path.dirname(HERE), "agent_relay.py"))
    p.add_argument("-n", type=int, default=3000, help="requests per measurement")
    p.add_argument("--instructions", action="store_true", help="count instructions with valgrind instead of timing")
    p.add_argument("--memory", action="store_true", help="relay on :memory: (no file I/O) instead of a temp file")
    p.add_argument("--one", choices=["relay", "baseline", "sqlite"], help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    relay_path = os.path.abspath(args.relay)
    if args.one:  # one measured run (under valgrind)
        run_once(args.one, relay_path, args.n, args.db)
        return 0
    tmp = tempfile.mkdtemp(prefix="agent-relay-cost-")
    try:
        if args.instructions:
            n = max(50, args.n // 15)
            base = instructions("baseline", relay_path, n, tmp, args.memory)
            rel = instructions("relay", relay_path, n, tmp, args.memory)
            sql = instructions("sqlite", relay_path, n, tmp, args.memory)
            print("instructions per send: relay %.0f, bare baseline %.0f (baseline/relay %.3f); "
                  "its SQLite transaction alone %.0f" % (rel, base, base / rel, sql))
        else:
            base = sorted(run_once("baseline", relay_path, args.n, None) for _ in range(3))[1] / args.n
            rel = sorted(run_once("relay", relay_path, args.n, fresh_db(tmp, args.memory)) for _ in range(3))[1] / args.n
            sql = sorted(run_once("sqlite", relay_path, args.n, fresh_db(tmp, args.memory)) for _ in range(3))[1] / args.n
            print("CPU per send (median of 3): relay %.1f us, bare baseline %.1f us (baseline/relay %.3f); "
                  "its SQLite transaction alone %.1f us" % (rel * 1e6, base * 1e6, base / rel, sql * 1e6))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
