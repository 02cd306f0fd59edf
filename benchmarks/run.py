#!/usr/bin/env python3
"""Agent Relay benchmarks: one command, standard library only.

    python3 benchmarks/run.py            # full run, a few minutes
    python3 benchmarks/run.py --quick    # a few hundred requests per item, seconds

Starts the relay (`agent_relay.py serve --port 0 --db <temp>`) and a bare
baseline server as separate processes, drives both from this process with the
same raw keep-alive client (benchmarks/loadgen.py), prints a table with a
"met" or "not met" line per target and writes benchmarks/results/latest.json.

Items (numbered as in the issue that asked for them):
 1. send throughput with 1, 8 and 32 keep-alive clients against the bare
    baseline, in alternating rounds so that both see the same machine; raw
    SQLite commits/s with the relay's own pragmas and schema, and the cost of a
    send-shaped commit just before and just after the send runs (read beside
    the ratios, it tells a slow disk or a busy machine from a slow relay);
 2. delivery latency, send to receipt, to a long-poll and to a stream, with
    1 and with 100 agents waiting;
 3. scale: 1,000, 5,000, 10,000 and 15,000 waiting connections, a sixth of
    them streams and the rest long-polls (held by separate processes; a level
    the descriptor limit cannot hold is skipped and says so), each on a new
    relay: RSS, threads and send throughput against the same relay with none
    waiting, delivery latency to one more long-poll, SQLite's commit cost and
    the load average at the time, and RSS once they have left;
 4. inbox latency with 1,000 and with 100,000 stored messages;
 5. idle CPU over 10 s with 200 waiting long-polls;
 6. task ingress: integration events/s for new keys and for a dedupe storm;
 7. memory of streams whose clients never read: 100 streams replaying 50 MB
    of history from a tiny receive window, relay RSS before and at the peak
    (benchmarks/stream_memory.py, which also runs alone);
 8. what a lease check adds to a hook call: `agent-relay hook claude
    pre-tool-use` for an Edit with the check off, with no lease in the scope
    and with 200, as processes and inside one process
    (benchmarks/lease_hook.py, which also runs alone);
 9. search latency (GET /api/search) with 100,000 and 1,000,000 stored
    messages: FTS5, and the scan (AGENT_RELAY_SEARCH=like) on the same rows;
10. history filtered by agent (GET /api/messages?agent=) with 10,000, 100,000
    and 1,000,000 stored messages, written straight into a stopped relay's
    database as item 4's are.

The figures are only comparable within a run: every ratio is against a
baseline measured in the same run. The machine (cores, CPU, Python, SQLite),
the load average at the start, as each item begins and at the end, and the
descriptor limit are printed and written with the results. Nothing here is a test assertion; the test
suite runs `--quick` once so that the benchmark keeps working.
"""
import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RELAY = [os.path.join(ROOT, "agent_relay.py")]  # the relay under test (--relay)
sys.path.insert(0, HERE)

from loadgen import Http, closed_loop, delivery_latency, percentile, release_listeners, request_bytes, wait_for_listeners  # noqa: E402  (benchmarks/loadgen.py)
import stream_memory  # noqa: E402  (benchmarks/stream_memory.py)
import lease_hook  # noqa: E402  (benchmarks/lease_hook.py)

INTEGRATION = {"name": "bench", "token": "bench-integration-token-0001", "scopes": ["tasks:create"],
               "targets": ["tag:oncall"], "channels": []}
BODY_TEXT = "The migration is done; tests pass on the branch. Please review when you can."

FULL = {
    "rounds": 5, "duration": 2.0, "warmup": 0.5, "count": None, "clients": [1, 8, 32],
    "latency_samples": 1000, "latency_many": 100,
    "scale_levels": [1000, 5000, 10000, 15000], "scale_primary": 10000, "scale_stretch": 15000,
    "scale_latency_samples": 300, "scale_settle_s": 8.0,
    "inbox_sizes": (1000, 100000), "inbox_samples": 300,
    "history_sizes": (10000, 100000, 1000000), "history_samples": 100,
    "idle_waiters": 200, "idle_seconds": 10.0,
    "sqlite_rounds": 3, "sqlite_seconds": 1.5, "sqlite_count": None,
    "memory_streams": 100, "memory_history_mb": 50.0,
    "hook_runs": 100, "hook_inprocess_runs": 500, "hook_leases": 200,
    "search_sizes": (100000, 1000000), "search_samples": 300, "scan_samples": 14,
}
QUICK = {
    "rounds": 1, "duration": None, "warmup": 0.0, "count": 300, "clients": [1, 8, 32],
    "latency_samples": 60, "latency_many": 100,
    "scale_levels": [100, 200, 300], "scale_primary": 200, "scale_stretch": 300,
    "scale_latency_samples": 30, "scale_settle_s": 1.0,
    "inbox_sizes": (1000, 10000), "inbox_samples": 40,
    "history_sizes": (1000, 3000, 10000), "history_samples": 20,
    "idle_waiters": 20, "idle_seconds": 2.0,
    "sqlite_rounds": 1, "sqlite_seconds": None, "sqlite_count": 300,
    "memory_streams": 100, "memory_history_mb": 50.0,  # the promise's own figures: a few seconds
    "hook_runs": 5, "hook_inprocess_runs": 30, "hook_leases": 200,
    "search_sizes": (2000, 10000), "search_samples": 40, "scan_samples": 14,
}

# -- small helpers ------------------------------------------------------------


def say(text=""):
    print(text, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def r3(x):
    return None if x is None else round(x, 3)


def machine_info():
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor() or "unknown",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in load] if load else None,
    }


def file_digest(path):
    """The first 16 hex digits of the file's SHA-256: which relay the figures belong to."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def raise_fd_limit(want=65536):
    """Raises this process's descriptor limit, which the relay and the holder processes inherit, as far as it goes:
    the hard limit up to `want` where the process may (a privileged one; never past fs.nr_open), then the soft limit
    to the hard one. Returns {"soft", "hard", "at_start": [soft, hard], "hard_raise": None or why not}, or None where
    there is no such limit (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    try:
        soft, hard = start = resource.getrlimit(resource.RLIMIT_NOFILE)
        why = None
        if hard != resource.RLIM_INFINITY and hard < want:
            try:
                with open("/proc/sys/fs/nr_open") as f:
                    want = min(want, int(f.read()))
            except (OSError, ValueError):
                pass
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            except (ValueError, OSError) as e:
                why = str(e)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        top = hard if hard != resource.RLIM_INFINITY else want
        if soft < top:
            resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return {"soft": soft, "hard": hard, "at_start": list(start), "hard_raise": why}
    except (ValueError, OSError):
        return None


def proc_status(pid):
    """RSS (MB), peak RSS (MB) and thread count of a process, from /proc/<pid>/status."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024.0
            elif k == "Threads":
                out[k] = int(v)
    return {"rss_mb": round(out.get("VmRSS", 0), 1), "peak_rss_mb": round(out.get("VmHWM", 0), 1), "threads": out.get("Threads")}


def cpu_seconds(pid):
    """utime + stime of a process in seconds, from /proc/<pid>/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


# -- the servers ---------------------------------------------------------------


class Server:
    """A server process (the relay or the baseline) with its port, pid and output."""

    def __init__(self, name, cmd, env=None):
        self.name = name
        self.lines = []
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=HERE)
        self.port = None
        found = threading.Event()

        def pump():
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.lines.append(line)
                if "listening on http://" in line and not found.is_set():
                    self.port = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + 60
        while not found.wait(0.02):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("%s did not start:\n%s" % (name, "\n".join(self.lines[-30:])))
        self.startup_s = time.perf_counter() - t0
        self.pid = self.proc.pid

    def check(self):
        if self.proc.poll() is not None:
            raise RuntimeError("%s exited with %s:\n%s" % (self.name, self.proc.returncode, "\n".join(self.lines[-30:])))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def relay_env():
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("AGENT_RELAY_") or k in ("HOST", "PORT", "STALE_TTL_MS", "OFFLINE_PRUNE_MS", "RETENTION_DAYS"):
            del env[k]
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_relay(db):
    cmd = [sys.executable, RELAY[0], "serve", "--port", "0", "--db", db,
           "--integrations", json.dumps([INTEGRATION]), "--integration-rate-limit-per-minute", "100000000"]
    return Server("relay", cmd, relay_env())


def start_baseline():
    return Server("baseline", [sys.executable, os.path.join(HERE, "baseline_server.py"), "--port", "0"], relay_env())


def register(port, ids, tags=None, clients=8):
    """Register agents through the API (8 keep-alive clients)."""
    ids = list(ids)
    if not ids:
        return
    reqs = [request_bytes("POST", "/api/agents", port, dict({"id": a}, **({"tags": tags} if tags else {}))) for a in ids]
    out = closed_loop(port, lambda i: reqs[i], min(clients, len(ids)), count=len(ids))
    if out["errors"]:
        raise RuntimeError("registering agents failed: %s" % out["first_error"])


def send_request(port):
    return request_bytes("POST", "/api/messages", port, {"from": "bench-sender", "to": "bench-sink", "body": BODY_TEXT})


def load(port, make_request, clients, cfg):
    out = closed_loop(port, make_request, clients, duration=cfg["duration"], count=cfg["count"], warmup=cfg["warmup"])
    if out["errors"]:
        raise RuntimeError("%d requests failed, the first: %s" % (out["errors"], out["first_error"]))
    return out


def paired_rounds(relay, baseline, clients, cfg):
    """Baseline and relay, `rounds` times, alternating which goes first; returns both series and their ratios."""
    rb, bb = send_request(relay.port), send_request(baseline.port)
    runs = []
    for k in range(cfg["rounds"]):
        order = ("baseline", "relay") if k % 2 == 0 else ("relay", "baseline")
        got = {}
        for who in order:
            if who == "relay":
                got[who] = load(relay.port, lambda i: rb, clients, cfg)
                relay.check()
            else:
                got[who] = load(baseline.port, lambda i: bb, clients, cfg)
        runs.append({"baseline_rps": got["baseline"]["rps"], "relay_rps": got["relay"]["rps"],
                     "ratio": round(got["relay"]["rps"] / got["baseline"]["rps"], 3),
                     "relay_p50_ms": got["relay"]["p50_ms"], "relay_p99_ms": got["relay"]["p99_ms"],
                     "baseline_p50_ms": got["baseline"]["p50_ms"]})
    return {
        "baseline_rps": median([r["baseline_rps"] for r in runs]),
        "relay_rps": median([r["relay_rps"] for r in runs]),
        "ratio": r3(median([r["ratio"] for r in runs])),
        "runs": runs,
    }


# -- item 1: throughput, and SQLite's own ceiling ------------------------------------


def bench_sqlite(cfg, tmp):
    """Commits/s through the relay's own Storage (its pragmas, its schema, its write path)."""
    spec = importlib.util.spec_from_file_location("agent_relay_under_test", RELAY[0])
    agent_relay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent_relay)
    path = os.path.join(tmp, "sqlite-only.db")
    st = agent_relay.Storage(path)
    row = ("bench-sender", "bench-sink", None, BODY_TEXT, "chat", None, 0, None, None, None, "{}", "{}", 0)
    msg_sql = ("INSERT INTO messages(from_agent, to_target, subject, body, kind, channel, claimable, reply_to, thread_id, "
               "idempotency_key, payload, meta, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)")
    ev_sql = "INSERT INTO events(type, agent_id, audience, data, created_at) VALUES (?,?,?,?,?)"
    ev_data = json.dumps({"message": {"id": 1, "body": BODY_TEXT}})

    def run(both):
        n = 0
        t0 = time.perf_counter()
        while True:
            with st.write() as c:
                c.execute(msg_sql, row)
                if both:
                    c.execute(ev_sql, ("message.created", None, ",bench-sender,bench-sink,", ev_data, 0))
            n += 1
            if cfg["sqlite_count"] is not None:
                if n >= cfg["sqlite_count"]:
                    break
            elif n % 100 == 0 and time.perf_counter() - t0 >= cfg["sqlite_seconds"]:
                break
        return n / (time.perf_counter() - t0)

    try:
        one = median([run(False) for _ in range(cfg["sqlite_rounds"])])
        two = median([run(True) for _ in range(cfg["sqlite_rounds"])])
    finally:
        st.close()
    return {
        "commits_per_s": round(one, 1), "us_per_commit": round(1e6 / one, 1),
        "send_shaped_commits_per_s": round(two, 1), "us_per_send_shaped_commit": round(1e6 / two, 1),
        "pragmas": "journal_mode=WAL, synchronous=NORMAL, busy_timeout=5000 (agent_relay.Storage)",
        "note": "one INSERT INTO messages per BEGIN IMMEDIATE/COMMIT; send-shaped adds the events INSERT a send makes",
    }


def bench_throughput(relay, baseline, cfg):
    out = {}
    for c in cfg["clients"]:
        out[str(c)] = paired_rounds(relay, baseline, c, cfg)
        r = out[str(c)]
        say("   %3d clients  baseline %9.0f/s   relay %9.0f/s   ratio %.3f" % (c, r["baseline_rps"], r["relay_rps"], r["ratio"]))
    return out


# -- item 2: delivery latency ---------------------------------------------------------


def bench_latency(relay, cfg):
    n_many = cfg["latency_many"]
    polls = ["lp%d" % i for i in range(n_many)]
    streams = ["st%d" % i for i in range(n_many)]
    register(relay.port, polls + streams)
    out = {}
    for kind, agents in (("long_poll", polls), ("stream", streams)):
        for label, group in (("1", agents[:1]), (str(n_many), agents)):
            lat = delivery_latency(relay.port, "poll" if kind == "long_poll" else "stream", group, "bench-sender",
                                   cfg["latency_samples"])
            release_listeners(relay.port, group, "bench-sender")
            relay.check()
            cell = {"waiting": len(group), "samples": len(lat), "p50_ms": r3(percentile(lat, 50)),
                    "p95_ms": r3(percentile(lat, 95)), "p99_ms": r3(percentile(lat, 99)), "max_ms": r3(max(lat))}
            out["%s_%s" % (kind, label)] = cell
            say("   %-10s %4d waiting   p50 %7.3f ms   p95 %7.3f ms   p99 %7.3f ms"
                % (kind.replace("_", "-"), len(group), cell["p50_ms"], cell["p95_ms"], cell["p99_ms"]))
    return out


# -- item 3: scale ----------------------------------------------------------------------


class Holder:
    """A separate process holding long-polls and streams open on the relay (benchmarks/loadgen.py hold)."""

    def __init__(self, port, polls, streams):
        cmd = [sys.executable, os.path.join(HERE, "loadgen.py"), "hold", "--port", str(port),
               "--polls", ",".join(polls), "--streams", ",".join(streams)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=HERE)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("ready"):
            self.close()
            raise RuntimeError("the holder process did not start (%r)" % line)

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Crowd:
    """Long-polls and narrowed streams held open by several holder processes (benchmarks/loadgen.py hold), at most
    `per_process` connections each: agents w0.. hold long-polls and s0.. streams. Started together, so that the
    crowd connects in parallel; close() ends them, and with them every connection."""

    def __init__(self, port, polls, streams, per_process=4000):
        self.procs = []
        todo = [("--poll-range", "w", polls), ("--stream-range", "s", streams)]
        try:
            for flag, prefix, count in todo:
                for first in range(0, count, per_process):
                    n = min(per_process, count - first)
                    cmd = [sys.executable, os.path.join(HERE, "loadgen.py"), "hold", "--port", str(port),
                           flag, "%s:%d:%d" % (prefix, first, n)]
                    self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=HERE))
            for proc in self.procs:
                line = proc.stdout.readline().decode()
                if not line.startswith("ready"):
                    raise RuntimeError("a holder process did not start (%r)" % line)
        except BaseException:
            self.close()
            raise

    def close(self):
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


def commit_cost(tmp):
    """SQLite's cost of a send-shaped commit on this disk, now (a second of bench_sqlite): read beside a send ratio,
    it tells a slow disk from a slow relay."""
    out = bench_sqlite({"sqlite_rounds": 1, "sqlite_seconds": 1.0, "sqlite_count": None}, tmp)
    try:
        os.remove(os.path.join(tmp, "sqlite-only.db"))
    except OSError:
        pass
    return {"us_per_commit": out["us_per_commit"], "us_per_send_shaped_commit": out["us_per_send_shaped_commit"]}


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def scale_level(relay, baseline, n, cfg, tmp):
    """One level of item 3: n connections waiting (a sixth of them streams, the rest long-polls)."""
    streams = n // 6
    polls = n - streams
    register(relay.port, ["w%d" % i for i in range(polls)] + ["s%d" % i for i in range(streams)] + ["scale-extra"])
    none = paired_rounds(relay, baseline, 8, cfg)  # send throughput with none waiting, on the same relay
    commit_before = commit_cost(tmp)
    time.sleep(1.0)
    before = proc_status(relay.pid)  # where the crowd finds it: after the same send load it will see
    ctl = Http(relay.port)
    t0 = time.perf_counter()
    crowd = Crowd(relay.port, polls, streams)
    try:
        stats = wait_for_listeners(ctl, polls=polls, streams=streams, timeout=300)
        held_in = time.perf_counter() - t0
        time.sleep(1.0)
        held = proc_status(relay.pid)
        held["fds"] = len(os.listdir("/proc/%d/fd" % relay.pid))
        load_at = loadavg()
        tp = paired_rounds(relay, baseline, 8, cfg)
        after_load = proc_status(relay.pid)
        commit_held = commit_cost(tmp)
        lat = delivery_latency(relay.port, "poll", ["scale-extra"], "bench-sender", cfg["scale_latency_samples"],
                               others=polls)
        status, stats_after = ctl.call("GET", "/api/stats")
    finally:
        crowd.close()
    # the crowd leaves: every hang-up is noticed where it waits, and what it held is given back
    t1 = time.perf_counter()
    deadline = time.monotonic() + 120
    while True:
        status, now = ctl.call("GET", "/api/stats")
        if now["longPolls"] == 0 and now["streams"] == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the relay still holds %d long-polls and %d streams after their clients left"
                               % (now["longPolls"], now["streams"]))
        time.sleep(0.05)
    noticed_in = time.perf_counter() - t1
    ctl.close()
    time.sleep(cfg["scale_settle_s"])
    left = proc_status(relay.pid)
    left["fds"] = len(os.listdir("/proc/%d/fd" % relay.pid))
    relay.check()
    out = {
        "waiting": n, "long_polls": stats["longPolls"], "streams": stats["streams"],
        "still_held_after_load": {"long_polls": stats_after["longPolls"], "streams": stats_after["streams"]},
        "seconds_to_hold_all": round(held_in, 2), "seconds_to_notice_all_gone": round(noticed_in, 2),
        "before": before, "held": held, "after_load": after_load, "after_they_left": left,
        "rss_mb": max(held["rss_mb"], after_load["rss_mb"]), "threads": max(held["threads"], after_load["threads"]),
        "rss_back_mb": round(left["rss_mb"] - before["rss_mb"], 1),
        "send_none_waiting": none, "send_while_held": tp,
        "relay_rps": tp["relay_rps"], "relay_rps_none_waiting": none["relay_rps"],
        "vs_none_waiting": r3(tp["relay_rps"] / none["relay_rps"]),
        "vs_none_waiting_normalised": r3(tp["ratio"] / none["ratio"]),
        "delivery_to_one_more": {"samples": len(lat), "p50_ms": r3(percentile(lat, 50)), "p99_ms": r3(percentile(lat, 99)),
                                 "max_ms": r3(max(lat))},
        "sqlite_before": commit_before, "sqlite_while_held": commit_held, "loadavg_while_held": load_at,
    }
    say("   %5d waiting (%d long-polls, %d streams, held in %.1f s): RSS %.1f MB (%.1f before), %d threads, %d fds"
        % (n, out["long_polls"], out["streams"], held_in, out["rss_mb"], before["rss_mb"], out["threads"], held["fds"]))
    say("         send, 8 clients: %.0f/s none waiting, %.0f/s while held = %.3f (normalised by the baseline: %.3f); "
        "SQLite %.0f us per send-shaped commit (%.0f before); load %s"
        % (none["relay_rps"], tp["relay_rps"], out["vs_none_waiting"], out["vs_none_waiting_normalised"],
           commit_held["us_per_send_shaped_commit"], commit_before["us_per_send_shaped_commit"], load_at))
    say("         delivery to one more long-poll: p50 %.3f ms, p99 %.3f ms; all gone noticed in %.2f s; RSS %.1f MB "
        "%.0f s after they left (%+.1f MB), %d threads"
        % (out["delivery_to_one_more"]["p50_ms"], out["delivery_to_one_more"]["p99_ms"], noticed_in, left["rss_mb"],
           cfg["scale_settle_s"], out["rss_back_mb"], left["threads"]))
    return out


def bench_scale(start, baseline, cfg, item1, tmp, fds):
    """Item 3: 1,000 to 15,000 waiting connections, each level on a relay of its own (a new database). `fds` is what
    raise_fd_limit made of the descriptor limit, which the relay and the holders inherit."""
    fd_limit = fds["soft"] if fds else None
    levels = []
    for n in cfg["scale_levels"]:
        need = n + 400  # the relay's own descriptors and the load's connections beside the crowd
        if fd_limit is not None and fd_limit < need:
            levels.append({"waiting": n, "skipped": "the descriptor limit is %d; %d connections need about %d" % (fd_limit, n, need)})
            say("   %5d waiting: skipped (%s)" % (n, levels[-1]["skipped"]))
            continue
        relay = start("scale-%d" % n)
        try:
            levels.append(scale_level(relay, baseline, n, cfg, tmp))
        finally:
            relay.stop()
    first = levels[0]
    ref = item1["8"]
    return {
        "levels": levels, "fd_limit": fd_limit, "fd_limits": fds,
        # the first level against item 1, as this item measured before it had levels
        "long_polls": first["long_polls"], "streams": first["streams"], "rss_mb": first["rss_mb"], "threads": first["threads"],
        "relay_rps": first["relay_rps"], "vs_item1": r3(first["relay_rps"] / ref["relay_rps"]),
        "vs_item1_normalised": r3(first["send_while_held"]["ratio"] / ref["ratio"]),
        "note": "each level: a sixth streams, the rest long-polls, held by separate processes (loadgen.py hold); "
                "vs_none_waiting = relay send/s with 8 clients while they wait / the same relay's send/s just before "
                "they came; _normalised divides each by its own same-time baseline first; rss_back_mb = RSS after they "
                "left (scale_settle_s later) less RSS before they came",
    }


# -- item 4: inbox cost as history grows -------------------------------------------------------


def fill_history(db, n, reader, sender, peers):
    """Write n messages (with their events and receipts) straight into a stopped relay's database.

    A tenth is addressed to the reader directly, a twentieth is broadcast, a twentieth goes to a
    tag the reader has, the rest to other agents; the reader has seen and read everything up to
    the newest (its cursor), as a long-lived agent has."""
    now = int(time.time() * 1000)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    start = con.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]
    ev_start = con.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
    msgs, events, receipts = [], [], []
    for k in range(n):
        mid = start + k + 1
        r = k % 20
        if r < 2:
            to, frm = reader, peers[k % len(peers)]
        elif r == 2:
            to, frm = "broadcast", peers[k % len(peers)]
        elif r == 3:
            to, frm = "tag:team", sender
        else:
            to, frm = peers[k % len(peers)], sender if k % 3 else peers[(k + 1) % len(peers)]
        if to == frm:
            to = reader
        ts = now - (n - k) * 1000
        body = "message %d: %s" % (mid, BODY_TEXT)
        msgs.append((mid, frm, to, body, ts))
        audience = sorted({frm, to}) if not to.startswith(("tag:", "broadcast")) else [frm, reader]
        events.append((ev_start + k + 1, ",%s," % ",".join(audience),
                       json.dumps({"message": {"id": mid, "from": frm, "to": to, "body": body, "createdAt": ts}}), ts))
        if to == reader or to in ("broadcast", "tag:team"):
            receipts.append((mid, reader, "read" if k % 2 else "delivered", ts + 5, ts + 50 if k % 2 else None))
        elif not to.startswith("tag:"):
            receipts.append((mid, to, "delivered", ts + 5, None))
    con.execute("BEGIN")
    con.executemany(
        "INSERT INTO messages(id, from_agent, to_target, body, kind, payload, meta, created_at) "
        "VALUES (?,?,?,?,'chat','{}','{}',?)", msgs)
    con.executemany(
        "INSERT INTO events(id, type, agent_id, audience, data, created_at) VALUES (?,'message.created',NULL,?,?,?)", events)
    con.executemany("INSERT INTO receipts(message_id, agent_id, state, delivered_at, read_at) VALUES (?,?,?,?,?)", receipts)
    con.execute("UPDATE agents SET cursor = ? WHERE id = ?", (start + n, reader))
    con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def timed(ctl, method, path, body=None, expect=200):
    t0 = time.perf_counter()
    status, out = ctl.call(method, path, body)
    dt = (time.perf_counter() - t0) * 1000.0
    if status != expect:
        raise RuntimeError("%s %s answered %d: %r" % (method, path, status, out))
    return dt, out


def await_index(ctl):
    """Rows written straight into a stopped relay's file are put in its search index by the relay once it starts (its
    indexer, in the background). One search waits until they all are (a search first indexes what is left), so that
    the measurements that follow do not share the machine with that work."""
    t0 = time.perf_counter()
    ctl.call("GET", "/api/search?q=warmup", timeout=600)
    return round(time.perf_counter() - t0, 1)


def inbox_at(size, cfg, tmp):
    db = os.path.join(tmp, "inbox-%d.db" % size)
    reader, sender = "inbox-reader", "inbox-sender"
    peers = ["peer-%d" % i for i in range(20)]
    relay = start_relay(db)
    try:
        ctl = Http(relay.port)
        ctl.call("POST", "/api/agents", {"id": reader, "tags": ["team"]})
        for a in [sender] + peers:
            ctl.call("POST", "/api/agents", {"id": a})
        ctl.close()
    finally:
        relay.stop()
    t0 = time.perf_counter()
    fill_history(db, size, reader, sender, peers)
    fill_s = time.perf_counter() - t0
    relay = start_relay(db)
    try:
        ctl = Http(relay.port)
        snd = Http(relay.port)
        index_s = await_index(ctl)
        status, stats = ctl.call("GET", "/api/stats")
        stored = stats["messages"]["total"]
        k = cfg["inbox_samples"]
        new, empty, history = [], [], []
        # warm the relay's reader connections and SQLite's page cache the same way for both sizes
        status, cur = ctl.call("GET", "/api/cursor")
        for _ in range(5):
            ctl.call("GET", "/api/agents/%s/inbox?since=%d" % (reader, cur["cursor"]))
        for i in range(k):
            status, sent = snd.call("POST", "/api/messages", {"from": sender, "to": reader, "body": "new %d" % i})
            dt, out = timed(ctl, "GET", "/api/agents/%s/inbox" % reader)
            if [m["id"] for m in out["messages"]] != [sent["message"]["id"]]:
                raise RuntimeError("inbox returned %r, expected only message %s" % ([m["id"] for m in out["messages"]], sent["message"]["id"]))
            new.append(dt)
            dt, out = timed(ctl, "GET", "/api/agents/%s/inbox?since=%d" % (reader, out["cursor"]))
            if out["messages"]:
                raise RuntimeError("an inbox past the cursor returned messages")
            empty.append(dt)
        for i in range(max(10, k // 3)):
            dt, out = timed(ctl, "GET", "/api/agents/%s/inbox?since=0&limit=100" % reader)
            if len(out["messages"]) != 100:
                raise RuntimeError("the history page held %d messages, expected 100" % len(out["messages"]))
            history.append(dt)
        ctl.close()
        snd.close()
        relay.check()
        rss = proc_status(relay.pid)
    finally:
        relay.stop()

    def summary(xs):
        return {"samples": len(xs), "p50_ms": r3(percentile(xs, 50)), "p95_ms": r3(percentile(xs, 95))}

    return {
        "messages": stored, "fill_s": round(fill_s, 2), "index_s": index_s, "relay_startup_s": round(relay.startup_s, 3), "rss_mb": rss["rss_mb"],
        "new_message": summary(new), "nothing_new": summary(empty), "history_first_page": summary(history),
    }


def bench_inbox(cfg, tmp):
    small, large = cfg["inbox_sizes"]
    out = {"small": inbox_at(small, cfg, tmp), "large": inbox_at(large, cfg, tmp)}
    for key in ("new_message", "nothing_new", "history_first_page"):
        a, b = out["small"][key]["p50_ms"], out["large"][key]["p50_ms"]
        out["ratio_" + key] = r3(b / a) if a else None
    out["note"] = ("new_message: a message is sent, then the agent's inbox call (no since: resumes from its cursor) returns it "
                   "and records its delivery; nothing_new: since=cursor, nothing to return; history_first_page: since=0, "
                   "limit=100. Medians of the client-side time of each call.")
    for key, label in (("new_message", "new message (from cursor)"), ("nothing_new", "nothing new (since=cursor)"),
                       ("history_first_page", "history page (since=0)")):
        say("   %-27s %7d msgs: p50 %6.3f ms   %7d msgs: p50 %6.3f ms   ratio %.2f"
            % (label, out["small"]["messages"], out["small"][key]["p50_ms"], out["large"]["messages"],
               out["large"][key]["p50_ms"], out["ratio_" + key]))
    return out


# -- item 10: history filtered by agent as it grows ---------------------------------------------------


def fill_messages(db, n, reader, rare, sender, peers, chunk=100000):
    """Write n messages (and their receipts) straight into a stopped relay's database, in chunks.

    A tenth go to the reader directly, a twentieth are broadcast and a twentieth go to a tag the reader has; one
    in a thousand goes to `rare`; the rest pass between other agents. One in two hundred of the reader's own is
    held for it (awaiting approval), as a guarded agent's are. No events are written: history does not read them."""
    now = int(time.time() * 1000)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    start = con.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]
    for base in range(0, n, chunk):
        msgs, receipts = [], []
        for k in range(base, min(n, base + chunk)):
            mid = start + k + 1
            r = k % 20
            frm = peers[k % len(peers)]
            if k % 1000 == 500:
                to = rare
            elif r < 2:
                to = reader
            elif r == 2:
                to = "broadcast"
            elif r == 3:
                to, frm = "tag:team", sender
            else:
                to = peers[(k + 1) % len(peers)]
            ts = now - (n - k) * 10
            msgs.append((mid, frm, to, "message %d: %s" % (mid, BODY_TEXT), ts))
            if to == reader:
                receipts.append((mid, reader, "held" if k % 200 == 1 else "read", ts + 5, None))
            elif to not in ("broadcast", "tag:team"):
                receipts.append((mid, to, "delivered", ts + 5, None))
        con.execute("BEGIN")
        con.executemany("INSERT INTO messages(id, from_agent, to_target, body, kind, payload, meta, created_at) "
                        "VALUES (?,?,?,?,'chat','{}','{}',?)", msgs)
        con.executemany("INSERT INTO receipts(message_id, agent_id, state, delivered_at, read_at) VALUES (?,?,?,?,?)", receipts)
        con.execute("COMMIT")
    con.execute("UPDATE agents SET cursor = ? WHERE id IN (?, ?)", (start + n, reader, rare))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def history_at(size, cfg, tmp):
    db = os.path.join(tmp, "history-%d.db" % size)
    reader, rare, sender = "hist-reader", "hist-ops-only", "hist-sender"
    peers = ["peer-%d" % i for i in range(20)]
    relay = start_relay(db)
    try:
        ctl = Http(relay.port)
        ctl.call("POST", "/api/agents", {"id": reader, "tags": ["team"]})
        ctl.call("POST", "/api/agents", {"id": rare, "channels": ["ops"]})  # so broadcasts without a channel miss it
        for a in [sender] + peers:
            ctl.call("POST", "/api/agents", {"id": a})
        ctl.close()
    finally:
        relay.stop()
    t0 = time.perf_counter()
    fill_messages(db, size, reader, rare, sender, peers)
    fill_s = time.perf_counter() - t0
    relay = start_relay(db)
    out = {"messages": None, "fill_s": round(fill_s, 1)}
    try:
        ctl = Http(relay.port)
        out["index_s"] = await_index(ctl)
        status, stats = ctl.call("GET", "/api/stats")
        out["messages"] = stats["messages"]["total"]
        for who in (reader, rare):
            path = "/api/messages?agent=%s&limit=50" % who
            for _ in range(5):  # the same warm-up for every size
                ctl.call("GET", path)
            times = []
            for _ in range(cfg["history_samples"]):
                dt, page = timed(ctl, "GET", path)
                times.append(dt)
            out["reader" if who == reader else "channel_only"] = {"samples": len(times), "p50_ms": r3(percentile(times, 50)),
                                                          "p95_ms": r3(percentile(times, 95)), "page": len(page["messages"])}
        ctl.close()
        relay.check()
    finally:
        relay.stop()
        try:
            os.remove(db)
        except OSError:
            pass
    return out


def bench_history(cfg, tmp):
    sizes = cfg["history_sizes"]
    cells = [history_at(n, cfg, tmp) for n in sizes]
    out = {"sizes": cells}
    for who in ("reader", "channel_only"):
        out["ratio_" + who] = r3(cells[-1][who]["p50_ms"] / cells[0][who]["p50_ms"])
    out["note"] = ("GET /api/messages?agent=X&limit=50, the first page, medians of the client-side time. reader: an agent a "
                   "fifth of the history is addressed to (directly, by broadcast, by tag), one in two hundred of its own "
                   "held for it (the target is on this one); channel_only: an agent in the channel 'ops' only, which one "
                   "message in a thousand is addressed to directly and which no broadcast reaches: its broadcast branch "
                   "filters by channel as it reads, back through every broadcast (there is no index on the channel).")
    for cell in cells:
        say("   %8d msgs (written in %.0f s): reader p50 %6.3f ms, channel-only agent p50 %6.3f ms"
            % (cell["messages"], cell["fill_s"], cell["reader"]["p50_ms"], cell["channel_only"]["p50_ms"]))
    say("   %d msgs / %d msgs: reader %.2fx, channel-only agent %.2fx" % (cells[-1]["messages"], cells[0]["messages"],
                                                                        out["ratio_reader"], out["ratio_channel_only"]))
    return out


# -- item 9: search ------------------------------------------------------------------------------------

# Bodies are 10 to 24 words drawn from a vocabulary of 5,000 with a Zipf-like skew (the commonest word is in about a
# third of the messages, as "the" would be), plus words planted at known rates, which the queries look for.
SEARCH_VOCABULARY = 5000
SEARCH_PLANTED = [  # (words, share of messages)
    (["kubernetes"], 0.001), (["migration"], 0.01), (["deploy"], 0.01), (["disk", "full"], 0.001),
    (["rollback"], 0.002), (["rollout"], 0.002), (["rolled"], 0.001), (["flaky"], 0.003), (["checkout"], 0.003),
]
SEARCH_QUERIES = [  # (label, query, with the reader's visibility)
    ("rare word (0.1%)", "kubernetes", False),
    ("word (1%)", "migration", False),
    ("two words, 1% each", "migration deploy", False),
    ("phrase (0.1%)", '"disk full"', False),
    ("prefix (0.5%)", "roll*", False),
    ("word (0.3%), as an agent (sees 10%)", "flaky", True),
    ("commonest word (~30%)", "w0", False),
]


def search_words(rng, weights):
    n = rng.randint(10, 24)
    return rng.choices(range(SEARCH_VOCABULARY), cum_weights=weights, k=n)


def fill_search_history(db, n, reader, sender, peers):
    """Write n messages straight into a stopped relay's database, with the search index and its triggers taken
    out first (a row at a time through triggers would take as long as the relay's own sends); the index is then
    built as the relay's start builds it (Storage.sync_search). Returns the seconds the index build took."""
    import random

    rng = random.Random(n)
    total, cum = 0.0, []
    for k in range(SEARCH_VOCABULARY):
        total += 1.0 / (k + 3)
        cum.append(total)
    now = int(time.time() * 1000)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        con.execute("DROP TRIGGER %s" % name)
    for table in ("messages_fts", "tasks_fts"):
        con.execute("DROP TABLE IF EXISTS %s" % table)
    start = con.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]
    con.execute("BEGIN")
    batch = []
    for k in range(n):
        words = ["w%d" % w for w in search_words(rng, cum)]
        for planted, share in SEARCH_PLANTED:
            if rng.random() < share:
                at = rng.randint(0, len(words))
                words[at:at] = planted
        r = k % 10
        to, frm = (reader, peers[k % len(peers)]) if r == 0 else (peers[k % len(peers)], sender)
        batch.append((start + k + 1, frm, to, " ".join(words), now - (n - k) * 100))
        if len(batch) >= 10000:
            con.executemany("INSERT INTO messages(id, from_agent, to_target, body, kind, payload, meta, created_at) "
                            "VALUES (?,?,?,?,'chat','{}','{}',?)", batch)
            batch = []
    if batch:
        con.executemany("INSERT INTO messages(id, from_agent, to_target, body, kind, payload, meta, created_at) "
                        "VALUES (?,?,?,?,'chat','{}','{}',?)", batch)
    con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    # the index, built by the relay's own code at the next open (Storage.sync_search finds it gone)
    spec = importlib.util.spec_from_file_location("agent_relay_under_test", RELAY[0])
    agent_relay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent_relay)
    t0 = time.perf_counter()
    agent_relay.Storage(db).close()
    return time.perf_counter() - t0


def search_at(size, cfg, tmp):
    db = os.path.join(tmp, "search-%d.db" % size)
    reader, sender = "search-reader", "search-sender"
    peers = ["peer-%d" % i for i in range(20)]
    relay = start_relay(db)
    try:
        ctl = Http(relay.port)
        for a in [reader, sender] + peers:
            ctl.call("POST", "/api/agents", {"id": a})
        ctl.close()
    finally:
        relay.stop()
    t0 = time.perf_counter()
    build_s = fill_search_history(db, size, reader, sender, peers)
    fill_s = time.perf_counter() - t0 - build_s
    out = {"messages": size, "fill_s": round(fill_s, 1), "index_build_s": round(build_s, 1),
           "db_mb": round(os.path.getsize(db) / 1048576.0, 1)}

    def measure(engine, samples):
        relay = start_relay(db) if engine == "fts5" else Server("relay", [sys.executable, RELAY[0], "serve", "--port", "0",
                                                                           "--db", db, "--search", "like"], relay_env())
        try:
            ctl = Http(relay.port)
            status, health = ctl.call("GET", "/api/health")
            if health.get("search") != engine:
                raise RuntimeError("the relay searches with %r, not %s" % (health.get("search"), engine))
            # a send is found by the search that follows it (the search indexes what the indexer has not reached)
            status, sent = ctl.call("POST", "/api/messages", {"from": sender, "to": reader, "body": "zeppelin over the bay"})
            status, found = ctl.call("GET", "/api/search?q=zeppelin")
            if sent["message"]["id"] not in [r["message"]["id"] for r in found["results"]]:
                raise RuntimeError("a message just sent was not found: %r" % found)
            per, lat = {}, []
            for label, q, as_agent in SEARCH_QUERIES:  # warm the page cache the same way for both sizes
                ctl.call("GET", "/api/search?q=%s%s" % (urllib.parse.quote(q, safe=""), "&agent=" + reader if as_agent else ""))
            for i in range(samples):
                label, q, as_agent = SEARCH_QUERIES[i % len(SEARCH_QUERIES)]
                dt, res = timed(ctl, "GET", "/api/search?q=%s&limit=20%s" % (urllib.parse.quote(q, safe=""), "&agent=" + reader if as_agent else ""))
                lat.append(dt)
                per.setdefault(label, {"query": q, "samples": [], "results": len(res["results"]), "more": res["more"]})["samples"].append(dt)
            ctl.close()
            relay.check()
        finally:
            relay.stop()
        queries = {k: {"query": v["query"], "p50_ms": r3(percentile(v["samples"], 50)), "results": v["results"],
                       "more": v["more"]} for k, v in per.items()}
        return {"samples": len(lat), "p50_ms": r3(percentile(lat, 50)), "p99_ms": r3(percentile(lat, 99)),
                "max_ms": r3(max(lat)), "queries": queries}

    out["fts5"] = measure("fts5", cfg["search_samples"])
    out["like"] = measure("like", cfg["scan_samples"])  # the start drops the index: the scan is measured last
    return out


def relay_searches(tmp):
    """Whether the relay under test has GET /api/search (an older version measured with --relay has not)."""
    relay = start_relay(os.path.join(tmp, "probe.db"))
    try:
        ctl = Http(relay.port)
        status, health = ctl.call("GET", "/api/health")
        ctl.close()
    finally:
        relay.stop()
    return "search" in health


def bench_search(cfg, tmp):
    if not relay_searches(tmp):
        say("   skipped: this relay has no GET /api/search")
        return {"skipped": "the relay under test has no GET /api/search"}
    out = {}
    for size in cfg["search_sizes"]:
        cell = out[str(size)] = search_at(size, cfg, tmp)
        say("   %9d msgs: filled in %.1f s, index built in %.1f s (%.0f MB)" % (size, cell["fill_s"], cell["index_build_s"], cell["db_mb"]))
        for engine in ("fts5", "like"):
            c = cell[engine]
            say("   %9d msgs  %-4s  p50 %8.3f ms   p99 %8.3f ms   (%d searches)" % (size, engine, c["p50_ms"], c["p99_ms"], c["samples"]))
    out["note"] = ("each sample is one GET /api/search (limit 20) of a set of queries taken in turn: %s. The rows are "
                   "written into a stopped relay's database, the index built by the relay's own migration step, then "
                   "the relay started on it (FTS5), and last started with --search like (the scan)."
                   % "; ".join("%s: %s" % (label, q) for label, q, _a in SEARCH_QUERIES))
    return out


# -- item 5: idle cost ----------------------------------------------------------------------------


def bench_idle(relay, cfg):
    polls = ["w%d" % i for i in range(cfg["idle_waiters"])]
    register(relay.port, polls)
    holder = Holder(relay.port, polls, [])
    try:
        ctl = Http(relay.port)
        wait_for_listeners(ctl, polls=len(polls), timeout=60)
        ctl.close()
        time.sleep(1.0)
        c0, t0 = cpu_seconds(relay.pid), time.monotonic()
        time.sleep(cfg["idle_seconds"])
        c1, t1 = cpu_seconds(relay.pid), time.monotonic()
        status = proc_status(relay.pid)
    finally:
        holder.close()
    release_listeners(relay.port, polls, "bench-sender")
    pct = (c1 - c0) / (t1 - t0) * 100.0
    out = {"waiters": len(polls), "seconds": round(t1 - t0, 2), "cpu_seconds": round(c1 - c0, 3),
           "cpu_percent_of_core": round(pct, 3), "threads": status["threads"], "rss_mb": status["rss_mb"]}
    say("   %d long-polls waiting, %.1f s: %.3f s CPU = %.2f%% of a core" % (len(polls), t1 - t0, c1 - c0, pct))
    return out


# -- item 6: task ingress --------------------------------------------------------------------------


def bench_ingress(relay, cfg):
    port = relay.port
    auth = {"Authorization": "Bearer " + INTEGRATION["token"]}
    run_id = "%x" % int(time.time() * 1000)

    def new_key(i):
        return request_bytes("POST", "/api/integrations/events", port,
                             {"dedupeKey": "alert-%s-%d" % (run_id, i), "title": "Disk full on db-%d" % i, "severity": "high"}, auth)

    storm = request_bytes("POST", "/api/integrations/events", port,
                          {"dedupeKey": "storm-" + run_id, "title": "CPU high on web-1", "severity": "warning"}, auth)
    out = {}
    for name, make in (("new_keys", new_key), ("dedupe_storm", lambda i: storm)):
        runs = [load(port, make, 8, cfg) for _ in range(cfg["rounds"])]
        relay.check()
        out[name] = {"clients": 8, "events_per_s": median([r["rps"] for r in runs]), "p50_ms": median([r["p50_ms"] for r in runs]),
                     "p99_ms": median([r["p99_ms"] for r in runs]), "runs": [r["rps"] for r in runs]}
        say("   %-13s 8 clients: %8.0f events/s   p50 %.3f ms" % (name.replace("_", " "), out[name]["events_per_s"], out[name]["p50_ms"]))
    ctl = Http(port)
    status, tasks = ctl.call("GET", "/api/tasks?limit=5")
    ctl.close()
    storm_task = [t for t in tasks["tasks"] if t["dedupeKey"] == "storm-" + run_id]
    out["dedupe_storm"]["occurrence_count"] = storm_task[0]["occurrenceCount"] if storm_task else None
    return out


# -- item 7: streams whose clients never read ------------------------------------------------------


def bench_stream_memory(relay, cfg):
    return stream_memory.measure(relay.port, relay.pid, streams=cfg["memory_streams"], history_mb=cfg["memory_history_mb"],
                                 say=say)


# -- item 8: what a lease check adds to a hook call ----------------------------------------------------
def bench_lease_hook(relay, cfg):
    return lease_hook.measure(relay.port, RELAY[0], runs=cfg["hook_runs"], inproc_runs=cfg["hook_inprocess_runs"],
                              leases=cfg["hook_leases"], say=say)


# -- targets, table, JSON ------------------------------------------------------------------------------


def targets(res):
    t = []

    def add(name, value, limit, met, unit="", detail=""):
        t.append({"target": name, "value": value, "limit": limit, "met": bool(met), "unit": unit, "detail": detail})

    tp8 = res["throughput"]["8"]
    beside = res["throughput_beside"]
    add("send throughput, 8 clients, relay/baseline", tp8["ratio"], ">= 0.6 (stretch 0.7)", tp8["ratio"] >= 0.6,
        detail="stretch 0.7 %s; SQLite %s us per send-shaped commit just before, %s just after (%s alone at the start); "
        "load average %s" % ("met" if tp8["ratio"] >= 0.7 else "not met", beside["sqlite_before"]["us_per_send_shaped_commit"],
                             beside["sqlite_after"]["us_per_send_shaped_commit"], res["sqlite"]["us_per_send_shaped_commit"],
                             beside["loadavg_before"]))
    lp1, lpn = res["latency"]["long_poll_1"], res["latency"]["long_poll_%d" % res["config"]["latency_many"]]
    add("long-poll delivery p50, 1 waiting", lp1["p50_ms"], "<= 1.5 ms", lp1["p50_ms"] <= 1.5, "ms")
    add("long-poll delivery p99, 1 waiting", lp1["p99_ms"], "<= 5 ms", lp1["p99_ms"] <= 5.0, "ms")
    add("long-poll delivery p99, %d waiting" % lpn["waiting"], lpn["p99_ms"], "<= 15 ms", lpn["p99_ms"] <= 15.0, "ms")
    sc = res["scale"]
    add("RSS holding %d long-polls + %d streams" % (sc["long_polls"], sc["streams"]), sc["rss_mb"], "<= 200 MB",
        sc["rss_mb"] <= 200.0, "MB")
    add("send throughput while holding them / item 1", sc["vs_item1"], ">= 0.8", sc["vs_item1"] >= 0.8,
        detail="normalised by same-time baseline: %s" % sc["vs_item1_normalised"])
    levels = {lv["waiting"]: lv for lv in sc["levels"]}
    cfg = res["config"]
    main = levels.get(cfg["scale_primary"])
    if main is None or "skipped" in main:
        why = main["skipped"] if main else "not run"
        for name in ("RSS", "threads", "send throughput / none waiting", "delivery p99 to one more waiter"):
            add("%d waiting: %s" % (cfg["scale_primary"], name), "not run", "see below", False, detail=why)
    else:
        n = main["waiting"]
        lat = main["delivery_to_one_more"]
        add("%d waiting: RSS" % n, main["rss_mb"], "<= 300 MB", main["rss_mb"] <= 300.0, "MB")
        add("%d waiting: threads" % n, main["threads"], "<= 100", main["threads"] <= 100)
        add("%d waiting: send throughput / none waiting" % n, main["vs_none_waiting"], ">= 0.8", main["vs_none_waiting"] >= 0.8,
            detail="normalised by same-time baseline: %s; SQLite %s us per send-shaped commit while held (%s before)"
            % (main["vs_none_waiting_normalised"], main["sqlite_while_held"]["us_per_send_shaped_commit"],
               main["sqlite_before"]["us_per_send_shaped_commit"]))
        add("%d waiting: delivery p99 to one more waiter" % n, lat["p99_ms"], "<= 20 ms", lat["p99_ms"] <= 20.0, "ms",
            detail="p50 %s ms" % lat["p50_ms"])
    top = levels.get(cfg["scale_stretch"])
    if top is None or "skipped" in top:
        add("%d waiting: RSS, threads, send ratio, delivery p99" % cfg["scale_stretch"], "not run",
            "<= 300 MB, <= 100, >= 0.8, <= 20 ms", False, detail=top["skipped"] if top else "not run")
    else:
        ok = (top["rss_mb"] <= 300.0 and top["threads"] <= 100 and top["vs_none_waiting"] >= 0.8
              and top["delivery_to_one_more"]["p99_ms"] <= 20.0)
        add("%d waiting: RSS, threads, send ratio, delivery p99" % top["waiting"],
            "%s MB, %s, %s, %s ms" % (top["rss_mb"], top["threads"], top["vs_none_waiting"], top["delivery_to_one_more"]["p99_ms"]),
            "<= 300 MB, <= 100, >= 0.8, <= 20 ms", ok)
    ran = [lv for lv in sc["levels"] if "skipped" not in lv]
    last = ran[-1]
    add("RSS after the %d leave, above where it started" % last["waiting"], last["rss_back_mb"], "<= 50 MB",
        last["rss_back_mb"] <= 50.0, "MB", detail="%s MB before, %s MB held, %s MB after; %s threads after"
        % (last["before"]["rss_mb"], last["rss_mb"], last["after_they_left"]["rss_mb"], last["after_they_left"]["threads"]))
    hs = res["history"]
    add("history ?agent= latency, %d msgs / %d msgs" % (hs["sizes"][-1]["messages"], hs["sizes"][0]["messages"]),
        hs["ratio_reader"], "<= 2", hs["ratio_reader"] <= 2.0,
        detail="%s ms at %d msgs; an agent in one channel only: %sx (no target)"
        % (hs["sizes"][-1]["reader"]["p50_ms"], hs["sizes"][-1]["messages"], hs["ratio_channel_only"]))
    ib = res["inbox"]
    add("inbox latency, %d msgs / %d msgs" % (ib["large"]["messages"], ib["small"]["messages"]), ib["ratio_new_message"],
        "<= 2", ib["ratio_new_message"] <= 2.0)
    idle = res["idle"]
    add("idle CPU, %d waiting long-polls" % idle["waiters"], idle["cpu_percent_of_core"], "<= 1% of a core",
        idle["cpu_percent_of_core"] <= 1.0, "%")
    sm = res["stream_memory"]
    add("RSS added by %d never-reading streams replaying %.0f MB" % (sm["streams_asked"], sm["history_mb"]), sm["growth_mb"],
        "<= %.0f MB" % sm["target_mb"], sm["met"], "MB", detail="%.3f MB per stream" % sm["per_stream_mb"])
    lh = res["lease_hook"]
    add("time a lease check adds to a hook call, %d leases in the scope (p50, the check alone)" % lh["leases_in_scope"],
        lh["added_ms"], "<= %.0f ms" % lh["target_added_ms"], lh["met"], "ms",
        detail="whole hook processes with the check / without: x%.3f (%.1f ms without)"
               % (lh["process_ratio"], lh["process"]["off"]["p50_ms"]))
    if not res["search"].get("skipped"):
        big = res["search"][str(res["config"]["search_sizes"][-1])]
        add("search p99 with FTS5, %d messages" % big["messages"], big["fts5"]["p99_ms"], "<= 50 ms",
            big["fts5"]["p99_ms"] <= 50.0, "ms", detail="p50 %s ms; the scan: p50 %s ms, p99 %s ms"
            % (big["fts5"]["p50_ms"], big["like"]["p50_ms"], big["like"]["p99_ms"]))
    return t


def print_summary(res):
    m = res["machine"]
    say("")
    say("=" * 78)
    say("Agent Relay benchmark (%s mode): %s cores, %s, Python %s, SQLite %s"
        % (res["mode"], m["nproc"], m["cpu"], m["python"], m["sqlite"]))
    say("load average at start %s, at end %s" % (m["loadavg_at_start"], m.get("loadavg_at_end")))
    say("load average (1 min) as each item began: %s" % ", ".join(
        "%s %s" % (k, v[0] if v else "?") for k, v in res.get("loadavg_at_item_start", {}).items()))
    say("-" * 78)
    say("1. send throughput (messages/s)     baseline       relay    ratio")
    for c, r in res["throughput"].items():
        say("   %3s keep-alive clients      %10.0f  %10.0f    %.3f" % (c, r["baseline_rps"], r["relay_rps"], r["ratio"]))
    s = res["sqlite"]
    say("   SQLite alone: %.0f commits/s (%.0f us each); send-shaped (message + event row) %.0f/s (%.0f us)"
        % (s["commits_per_s"], s["us_per_commit"], s["send_shaped_commits_per_s"], s["us_per_send_shaped_commit"]))
    b = res["throughput_beside"]
    say("   beside the send runs: SQLite %.0f us per send-shaped commit before, %.0f us after; load average %s, %s"
        % (b["sqlite_before"]["us_per_send_shaped_commit"], b["sqlite_after"]["us_per_send_shaped_commit"],
           b["loadavg_before"], b["loadavg_after"]))
    say("2. delivery latency, send to receipt      p50 ms    p95 ms    p99 ms")
    for k, v in res["latency"].items():
        kind = "long-poll" if k.startswith("long_poll") else "stream"
        say("   %-9s %4d agents waiting     %8.3f  %8.3f  %8.3f" % (kind, v["waiting"], v["p50_ms"], v["p95_ms"], v["p99_ms"]))
    sc = res["scale"]
    fl = sc.get("fd_limits")
    say("3. scale: waiting connections (a sixth streams), descriptor limit %s%s" % (sc["fd_limit"], (
        " (was %s soft, %s hard at the start%s)" % (fl["at_start"][0], fl["at_start"][1],
                                                    "; a higher hard limit was refused: %s" % fl["hard_raise"] if fl["hard_raise"] else ""))
        if fl else ""))
    say("   waiting    RSS MB  threads  send/s none  send/s held  ratio  p50 ms  p99 ms  RSS after  SQLite us  load")
    for lv in sc["levels"]:
        if "skipped" in lv:
            say("   %7d    skipped: %s" % (lv["waiting"], lv["skipped"]))
            continue
        say("   %7d  %8.1f  %7d  %11.0f  %11.0f  %5.3f  %6.3f  %6.3f  %+7.1f MB  %9.0f  %s"
            % (lv["waiting"], lv["rss_mb"], lv["threads"], lv["relay_rps_none_waiting"], lv["relay_rps"], lv["vs_none_waiting"],
               lv["delivery_to_one_more"]["p50_ms"], lv["delivery_to_one_more"]["p99_ms"], lv["rss_back_mb"],
               lv["sqlite_while_held"]["us_per_send_shaped_commit"], lv["loadavg_while_held"]))
    say("   first level against item 1: send %.0f/s = %.3f of item 1 (normalised %.3f)"
        % (sc["relay_rps"], sc["vs_item1"], sc["vs_item1_normalised"]))
    ib = res["inbox"]
    say("4. inbox latency, p50 ms           %8d msgs  %8d msgs   ratio" % (ib["small"]["messages"], ib["large"]["messages"]))
    for key, label in (("new_message", "new message (from cursor)"), ("nothing_new", "nothing new (since=cursor)"),
                       ("history_first_page", "history page (since=0)")):
        say("   %-30s %10.3f  %10.3f   %5.2f" % (label, ib["small"][key]["p50_ms"], ib["large"][key]["p50_ms"], ib["ratio_" + key]))
    lh = res["lease_hook"]
    say("8. lease check in a hook call, p50 ms        off     empty   %4d leases" % lh["leases_in_scope"])
    for kind, label in (("process", "hook process"), ("inprocess", "in one process")):
        f = lh[kind]
        say("   %-30s %8.2f  %8.2f  %8.2f   (x%.3f, x%.3f)" % (label, f["off"]["p50_ms"], f["empty"]["p50_ms"],
                                                               f["leases"]["p50_ms"], f["empty"]["ratio"], f["leases"]["ratio"]))
    say("9. search latency, ms             p50 fts5  p99 fts5   p50 scan  p99 scan   index build")
    for size in res["config"]["search_sizes"] if not res["search"].get("skipped") else ():
        c = res["search"][str(size)]
        say("   %9d messages          %9.3f %9.3f  %9.1f %9.1f   %6.1f s"
            % (size, c["fts5"]["p50_ms"], c["fts5"]["p99_ms"], c["like"]["p50_ms"], c["like"]["p99_ms"], c["index_build_s"]))
        for label, q in c["fts5"]["queries"].items():
            say("     %-38s fts5 p50 %8.3f ms, scan p50 %9.1f ms, %s results%s" % (
                label, q["p50_ms"], c["like"]["queries"].get(label, {}).get("p50_ms") or 0, q["results"],
                " (more)" if q["more"] else ""))
    idle = res["idle"]
    say("5. idle: %d long-polls, %.0f s: %.3f s CPU = %.2f%% of a core, %d threads, RSS %.1f MB"
        % (idle["waiters"], idle["seconds"], idle["cpu_seconds"], idle["cpu_percent_of_core"], idle["threads"], idle["rss_mb"]))
    ig = res["ingress"]
    say("6. task ingress, 8 clients: new keys %.0f events/s, dedupe storm %.0f events/s"
        % (ig["new_keys"]["events_per_s"], ig["dedupe_storm"]["events_per_s"]))
    sm = res["stream_memory"]
    say("7. never-reading streams: %d replaying %.1f MB, RSS %.1f MB before, peak %.1f MB: %.1f MB added, %.3f MB per stream"
        % (sm["streams_opened"], sm["history_mb"], sm["rss_before_mb"], sm["rss_peak_mb"], sm["growth_mb"], sm["per_stream_mb"]))
    hs = res["history"]
    say("10. history ?agent= (first page), p50 ms: %s" % ", ".join(
        "%d msgs: %.3f (channel-only agent %.3f)" % (c["messages"], c["reader"]["p50_ms"], c["channel_only"]["p50_ms"])
        for c in hs["sizes"]))
    say("-" * 78)
    say("targets:")
    for t in res["targets"]:
        say("   [%s] %s: %s%s (target %s)%s" % ("met    " if t["met"] else "not met", t["target"], t["value"],
                                                   (" " + t["unit"]) if t["unit"] else "", t["limit"],
                                                   ("; " + t["detail"]) if t["detail"] else ""))
    if res["mode"] == "quick":
        say("   (quick mode: a few hundred requests per item; the figures show that it runs, not how fast)")
    say("=" * 78)


def main(argv=None):
    p = argparse.ArgumentParser(description="Agent Relay benchmarks (see the README's Performance section).")
    p.add_argument("--quick", action="store_true", help="a few hundred requests per item (seconds); for the test suite")
    p.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"), help="where to write the JSON results")
    p.add_argument("--relay", default=RELAY[0], help="the agent_relay.py to measure (default: this checkout's); "
                   "to compare two versions, run once with each")
    args = p.parse_args(argv)
    RELAY[0] = os.path.abspath(args.relay)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # stop the servers on the way out
    cfg = dict(QUICK if args.quick else FULL)
    fds = raise_fd_limit()
    t_start = time.time()
    res = {"mode": "quick" if args.quick else "full", "started_at": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine_info(), "relay": RELAY[0], "relay_sha256": file_digest(RELAY[0]), "config": {k: v for k, v in cfg.items()},
           "fd_limit": fds["soft"] if fds else None, "fd_limits": fds}
    say("Agent Relay benchmark (%s mode); writing %s" % (res["mode"], args.out))
    tmp = tempfile.mkdtemp(prefix="agent-relay-bench-")
    relay = baseline = None
    try:
        timing = res["item_seconds"] = {}
        loads = res["loadavg_at_item_start"] = {}

        def item(key, title, fn, *a):
            say(title)
            loads[key] = loadavg()
            t0 = time.perf_counter()
            res[key] = fn(*a)
            timing[key] = round(time.perf_counter() - t0, 1)

        def fresh_relay(name):
            """A relay on a new database, with the sender and the sink of item 1 registered."""
            srv = start_relay(os.path.join(tmp, name + ".db"))
            register(srv.port, ["bench-sender", "bench-sink"])
            register(srv.port, ["oncall-1"], tags=["oncall"])
            return srv

        item("sqlite", "1. raw SQLite commits with the relay's pragmas", bench_sqlite, cfg, tmp)
        say("   %.0f commits/s; send-shaped %.0f/s" % (res["sqlite"]["commits_per_s"], res["sqlite"]["send_shaped_commits_per_s"]))
        baseline = start_baseline()
        relay = fresh_relay("relay")
        res["relay_startup_s"] = round(relay.startup_s, 3)
        item("latency", "2. delivery latency, send to receipt", bench_latency, relay, cfg)
        # SQLite's commit cost on this disk just before and just after, to read beside the ratios
        beside = res["throughput_beside"] = {"sqlite_before": commit_cost(tmp), "loadavg_before": loadavg()}
        item("throughput", "1. send throughput (messages/s), relay against the bare baseline", bench_throughput, relay, baseline, cfg)
        beside.update({"sqlite_after": commit_cost(tmp), "loadavg_after": loadavg()})
        say("   beside it: SQLite %.0f us per send-shaped commit before, %.0f us after; load average %s before, %s after"
            % (beside["sqlite_before"]["us_per_send_shaped_commit"], beside["sqlite_after"]["us_per_send_shaped_commit"],
               beside["loadavg_before"], beside["loadavg_after"]))
        item("ingress", "6. task ingress (integration events/s)", bench_ingress, relay, cfg)
        relay.stop()
        # items 3 and 5 each start from a new database, as item 1 did, so that nothing an earlier item
        # left behind (history, agents going offline one by one as they fall silent) is counted in them
        relay = None
        item("scale", "3. scale: %s waiting connections" % ", ".join(str(n) for n in cfg["scale_levels"]),
             bench_scale, fresh_relay, baseline, cfg, res["throughput"], tmp, fds)
        baseline.stop()
        baseline = None
        relay = fresh_relay("idle")
        item("idle", "5. idle cost", bench_idle, relay, cfg)
        relay.stop()
        relay = None
        item("inbox", "4. inbox latency as history grows", bench_inbox, cfg, tmp)
        item("history", "10. history filtered by agent as it grows", bench_history, cfg, tmp)
        relay = fresh_relay("streams")
        item("stream_memory", "7. memory of %d streams that never read, replaying %.0f MB"
             % (cfg["memory_streams"], cfg["memory_history_mb"]), bench_stream_memory, relay, cfg)
        relay.stop()
        relay = fresh_relay("leases")
        item("lease_hook", "8. what a lease check adds to a hook call (%d hook processes per case)" % cfg["hook_runs"],
             bench_lease_hook, relay, cfg)
        relay.stop()
        relay = None
        item("search", "9. search latency as history grows", bench_search, cfg, tmp)
    finally:
        for srv in (relay, baseline):
            if srv is not None:
                srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    res["duration_s"] = round(time.time() - t_start, 1)
    res["targets"] = targets(res)
    print_summary(res)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    say("wrote %s (%.0f s)" % (args.out, res["duration_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
