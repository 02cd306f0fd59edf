#!/usr/bin/env python3
"""The connection cap, measured: what the relay holds at AGENT_RELAY_MAX_CONNECTIONS, and what the next gets.

    python3 benchmarks/connections.py              # a cap of 1000 (a third streams, a third long-polls, a third idle)
    python3 benchmarks/connections.py --cap 200    # any other cap
    python3 benchmarks/connections.py --quick      # a cap of 100, for a smoke run

Reports, for a relay held at its cap: how many connections it held, its RSS and threads before and at the
cap (and so the cost of one connection), what the next connection got and how long that took; then the
relay's CPU while new connections keep arriving and are turned away, and whether it serves again once the
crowd leaves. A second part lowers the relay's descriptor limit below its cap (prlimit-style, through a
small wrapper) so that descriptors run out before the cap: it reports what new connections get then and
the relay's CPU while they keep coming (the accept loop must not spin).

Nothing here is asserted: the figures are printed and written as JSON (benchmarks/results/connections.json).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run import RELAY, Server, cpu_seconds, machine_info, proc_status, raise_fd_limit, relay_env, say  # noqa: E402

WRAPPER = """import os, resource, sys
limit = int(os.environ["BENCH_NOFILE"])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


def fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def sockets(pid):
    """The relay's sockets: its connections, beside its listening socket and its own few."""
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            n += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
        except OSError:
            pass
    return n


def ask(port, path="/api/health", timeout=10):
    """One request on a fresh connection: (status, error code or None, seconds to the answer)."""
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = b""
    try:
        s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path).encode())
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    except socket.timeout:
        pass
    finally:
        s.close()
    took = time.perf_counter() - t0
    head, _, body = got.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return 0, None, took
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return int(head.split(b" ")[1]), code, took


def hold(port, n):
    """n connections that stay open: a third streams, a third long-polls, a third that have sent nothing."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        if i % 3 == 0:
            s.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        elif i % 3 == 1:
            s.sendall(b"GET /api/agents/bench-b/inbox?since=1000000&wait=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        socks.append(s)
    return socks


def wait_fds(pid, at_least, timeout=60):
    """Until the relay holds at least this many descriptors (a connection is one, with or without a thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fds(pid) >= at_least:
            return True
        time.sleep(0.1)
    return False


def cpu_while_knocking(relay, port, seconds):
    """The relay's CPU (share of one core) while a new connection arrives every 10 ms and is turned away,
    and what those connections got."""
    got = {}
    c0, t0 = cpu_seconds(relay.pid), time.monotonic()
    while time.monotonic() - t0 < seconds:
        status, code, _took = ask(port)
        got["%s %s" % (status, code)] = got.get("%s %s" % (status, code), 0) + 1
        time.sleep(0.01)
    return round((cpu_seconds(relay.pid) - c0) / (time.monotonic() - t0), 3), got


def register(port):
    for agent in ("bench-a", "bench-b"):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        body = json.dumps({"id": agent}).encode()
        s.sendall(b"POST /api/agents HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        while s.recv(65536):
            pass
        s.close()


def recovery(port, timeout=60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ask(port)[0] == 200:
            return round(time.monotonic() - t0, 2)
        time.sleep(0.1)
    return None


def at_the_cap(tmp, cap):
    env = relay_env()
    env["AGENT_RELAY_MAX_CONNECTIONS"] = str(cap)
    relay = Server("relay", [sys.executable, RELAY[0], "serve", "--port", "0", "--db", os.path.join(tmp, "cap.db")], env)
    socks = []
    try:
        register(relay.port)
        time.sleep(0.5)
        before = dict(proc_status(relay.pid), fds=fds(relay.pid), sockets=sockets(relay.pid))
        socks = hold(relay.port, cap)
        wait_fds(relay.pid, before["fds"] + cap)
        time.sleep(1.0)
        held = dict(proc_status(relay.pid), fds=fds(relay.pid), sockets=sockets(relay.pid))
        status, code, took = ask(relay.port)
        cpu, knocks = cpu_while_knocking(relay, relay.port, 3.0)
        for s in socks:
            s.close()
        socks = []
        back = recovery(relay.port)
        relay.check()
        out = {"cap": cap, "before": before, "at_cap": held, "connections_held": held["sockets"] - before["sockets"],
               "rss_per_connection_kb": round((held["rss_mb"] - before["rss_mb"]) * 1024 / cap, 1),
               "next": {"status": status, "code": code, "ms": round(took * 1000, 1)},
               "cpu_share_while_turning_away": cpu, "turned_away": knocks, "serves_again_after_s": back}
    finally:
        for s in socks:
            s.close()
        relay.stop()
    return out


def out_of_descriptors(tmp, limit, cap):
    wrapper = os.path.join(tmp, "lowered.py")
    with open(wrapper, "w") as f:
        f.write(WRAPPER)
    env = relay_env()
    env["AGENT_RELAY_MAX_CONNECTIONS"] = str(cap)
    env["BENCH_NOFILE"] = str(limit)
    relay = Server("relay", [sys.executable, wrapper, RELAY[0], "serve", "--port", "0", "--db", os.path.join(tmp, "fd.db")], env)
    socks = []
    try:
        register(relay.port)
        socks = hold(relay.port, limit + 20)  # more than there are descriptors
        time.sleep(1.0)
        held = dict(proc_status(relay.pid), fds=fds(relay.pid))
        status, code, took = ask(relay.port)
        cpu, knocks = cpu_while_knocking(relay, relay.port, 3.0)
        idle_c0 = cpu_seconds(relay.pid)
        time.sleep(2.0)  # nobody knocking: a spinning accept loop would show here
        idle_cpu = round((cpu_seconds(relay.pid) - idle_c0) / 2.0, 3)
        for s in socks:
            s.close()
        socks = []
        back = recovery(relay.port)
        relay.check()
        said = sum("out of file descriptors" in line for line in relay.lines)
        out = {"fd_limit": limit, "cap": cap, "held": held, "next": {"status": status, "code": code, "ms": round(took * 1000, 1)},
               "cpu_share_while_turning_away": cpu, "turned_away": knocks, "cpu_share_while_full_and_idle": idle_cpu,
               "log_lines": said, "serves_again_after_s": back}
    finally:
        for s in socks:
            s.close()
        relay.stop()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="The relay's connection cap, measured (report only).")
    p.add_argument("--cap", type=int, default=1000, help="AGENT_RELAY_MAX_CONNECTIONS for the first part (default 1000)")
    p.add_argument("--quick", action="store_true", help="a cap of 100, for a smoke run")
    p.add_argument("--out", default=os.path.join(HERE, "results", "connections.json"), help="where to write the JSON")
    p.add_argument("--relay", default=RELAY[0], help="the agent_relay.py to measure (default: this checkout's)")
    args = p.parse_args(argv)
    RELAY[0] = os.path.abspath(args.relay)
    cap = 100 if args.quick else args.cap
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    fds = raise_fd_limit()
    limit = fds["soft"] if fds else None
    if limit is not None and limit < cap + 200:
        say("this process may open %d descriptors; a cap of %d needs about %d" % (limit, cap, cap + 200))
        return 2
    res = {"machine": machine_info(), "relay": RELAY[0], "fd_limit_here": limit}
    tmp = tempfile.mkdtemp(prefix="agent-relay-conn-")
    try:
        say("1. a relay held at its cap of %d connections" % cap)
        a = res["cap"] = at_the_cap(tmp, cap)
        say("   idle: RSS %.1f MB, %d threads, %d descriptors" % (a["before"]["rss_mb"], a["before"]["threads"], a["before"]["fds"]))
        say("   at the cap: %d connections held, RSS %.1f MB (%.1f KB each), %d threads, %d descriptors"
            % (a["connections_held"], a["at_cap"]["rss_mb"], a["rss_per_connection_kb"], a["at_cap"]["threads"], a["at_cap"]["fds"]))
        say("   the next connection: %s %s in %.1f ms" % (a["next"]["status"], a["next"]["code"], a["next"]["ms"]))
        say("   new connections every 10 ms for 3 s: %s; relay CPU %.1f%% of a core"
            % (a["turned_away"], 100 * a["cpu_share_while_turning_away"]))
        say("   serves again %s s after the crowd left" % a["serves_again_after_s"])
        say("2. descriptors run out first (limit 64, cap 1000)")
        b = res["out_of_descriptors"] = out_of_descriptors(tmp, 64, 1000)
        say("   held: %d threads, %d descriptors; the next connection: %s %s in %.1f ms"
            % (b["held"]["threads"], b["held"]["fds"], b["next"]["status"], b["next"]["code"], b["next"]["ms"]))
        say("   new connections every 10 ms for 3 s: %s; relay CPU %.1f%% of a core; full and idle: %.1f%%"
            % (b["turned_away"], 100 * b["cpu_share_while_turning_away"], 100 * b["cpu_share_while_full_and_idle"]))
        say("   logged %d line(s) about it; serves again %s s after the crowd left" % (b["log_lines"], b["serves_again_after_s"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    say("wrote %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
