#!/usr/bin/env python3
"""Soak: a relay under a steady mixed load for a while, watched for leaks and lost messages.

    python3 benchmarks/soak.py [--seconds 600] [--warm-up-max 180] [--sample-every 2] [--report soak.json]

Starts its own relay (a temporary database, a shared token, one integration
whose callbacks go to a receiver in this process) and runs, until the time is
up, at a steady pace:

- stable agents that long-poll their inbox by cursor, heartbeat, claim the
  tasks they are sent and finish them (which calls the integration back);
- agents that come and go: register, heartbeat, long-poll briefly, end their
  session (half of them purged);
- senders: direct, tag fan-out, broadcast and claimable messages;
- an integration firing and resolving alerts (deduplicated into tasks);
- streams that disconnect and resume with Last-Event-ID.

The load first runs as a warm-up, until the relay's bounded caches have
filled: the in-memory ring of recent events (the global stream has seen as
many events, or as much event data, as the ring keeps before it is cut: the
relay's Hub.RING and Hub.RING_BYTES), and with it SQLite's page caches and
the heap. That takes about 45 s here and is capped by --warm-up-max; then
the load runs --seconds more. Samples from the warm-up are reported, not
judged.

Every few seconds it samples the relay's resident memory, threads and open
file descriptors (/proc, Linux). At the end it checks that:

- no request got an answer other than the ones its operation allows (e.g. 409
  for a lost claim race);
- every acknowledged message is stored with the body that was sent;
- every stable agent got every message addressed to it exactly once;
- the global stream saw every event once, in order, across its reconnects;
- every callback was delivered, and signed correctly;
- memory, threads and descriptors are flat after the warm-up: the last
  third's average is compared with the first third's (threads and
  descriptors within a few, memory within 10% + 8 MiB, which covers what
  the bounded caches still add: the ring's size swings between its cuts, and
  SQLite's page caches fill up to their cap as the database grows; here
  they add 5 to 8 MiB);
- the relay stops cleanly (exit 0) and logged no traceback.

Exit status 0 when all hold, 1 otherwise; the figures are printed either way
(and written as JSON with --report). Traffic stays on 127.0.0.1 and every
loop ends with the run.
"""
import argparse
import hashlib
import hmac
import http.client
import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELAY_PY = os.path.join(ROOT, "agent_relay.py")
TOKEN = "soak-token-0123456789"
INTEG_TOKEN = "soak-integration-token"
SECRET = "soak-callback-secret"
STABLE = 6


class Run:
    """Shared state of one soak run."""

    def __init__(self, seconds):
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.acked = {}  # message id -> sha1 of the body
        self.unexpected = []  # (operation, status, body excerpt)
        self.counts = {}  # operation -> number of requests
        self.received = {}  # stable agent -> list of message ids, in order
        self.stream_ids = []  # event ids the global stream saw, across reconnects
        self.stream_bytes = 0  # and the size of their data
        self.callbacks_seen = set()
        self.bad_signatures = 0
        self.samples = []
        self.errors = []  # exceptions in workers
        self.sent = threading.Event()  # the senders and the integration have stopped: nothing more will arrive

    def running(self):
        return time.monotonic() < self.deadline

    def note(self, op, status, allowed, body=b""):
        with self.lock:
            self.counts[op] = self.counts.get(op, 0) + 1
            if status not in allowed:
                self.unexpected.append((op, status, body[:200].decode("utf-8", "replace")))


class Client:
    def __init__(self, port, run):
        self.port = port
        self.run = run
        self.conn = None

    def call(self, op, method, path, body=None, allowed=(200, 201), timeout=30, headers=None):
        hdrs = {"Authorization": "Bearer " + TOKEN}
        if body is not None:
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        data = json.dumps(body).encode("utf-8") if body is not None else None
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            self.conn.timeout = timeout
            if self.conn.sock is not None:
                self.conn.sock.settimeout(timeout)
            try:
                self.conn.request(method, path, body=data, headers=hdrs)
                r = self.conn.getresponse()
                raw = r.read()
                if (r.getheader("Connection") or "").lower() == "close":
                    self.close()
                break
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest) as e:
                self.close()
                if attempt == 2 or method != "GET":
                    self.run.note(op, "connection: %s" % e.__class__.__name__, allowed)
                    return None, None
        self.run.note(op, r.status, allowed, raw)
        try:
            return r.status, (json.loads(raw.decode("utf-8")) if raw else None)
        except ValueError:
            self.run.note(op, "not JSON", allowed, raw)
            return r.status, None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def pace(lo=0.005, hi=0.03):
    time.sleep(random.uniform(lo, hi))


# -- workers ----------------------------------------------------------------------


def stable_agent(port, run, i):
    """Follows its cursor with long-polls; claims and finishes the tasks it is sent."""
    me = "stable-%d" % i
    c = Client(port, run)
    got = run.received.setdefault(me, [])
    cursor = 0
    last_beat = 0.0
    while run.running():
        status, out = c.call("inbox", "GET", "/api/agents/%s/inbox?since=%d&wait=2&limit=50" % (me, cursor), timeout=40)
        if status != 200 or out is None:
            time.sleep(0.1)
            continue
        for m in out["messages"]:
            got.append(m["id"])
            task_id = (m.get("payload") or {}).get("taskId")
            if m["kind"] == "task" and task_id and random.random() < 0.5:
                s, _ = c.call("claim", "POST", "/api/messages/%d/claim" % m["id"], {"agentId": me}, allowed=(200, 409))
                if s == 200:
                    c.call("progress", "PATCH", "/api/tasks/%d/status" % task_id, {"agentId": me, "progress": "working"},
                           allowed=(200, 409))
                    c.call("finish", "PATCH", "/api/tasks/%d/status" % task_id,
                           {"agentId": me, "status": random.choice(["done", "failed"]), "result": {"by": me}},
                           allowed=(200, 409))
        cursor = out["cursor"]
        if time.monotonic() - last_beat > 5:
            last_beat = time.monotonic()
            c.call("heartbeat", "POST", "/api/agents/%s/heartbeat" % me, {"status": random.choice(["online", "busy"])})
    # drain what is left, without waiting, once nothing more can arrive (a send in flight at the deadline is
    # stored after it)
    run.sent.wait(90)
    while True:
        status, out = c.call("inbox", "GET", "/api/agents/%s/inbox?since=%d&limit=500" % (me, cursor))
        if status != 200 or not out["messages"]:
            break
        got.extend(m["id"] for m in out["messages"])
        cursor = out["cursor"]
    c.close()


def churner(port, run, n):
    """Agents that come and go."""
    c = Client(port, run)
    gen = 0
    while run.running():
        gen += 1
        me = "eph-%d-%d" % (n, gen)
        s, card = c.call("register", "POST", "/api/agents", {"id": me, "tags": ["eph"], "machine": "m%d" % n,
                                                             "instanceId": "i-%d" % gen})
        if s not in (200, 201):
            continue
        for _ in range(random.randint(1, 3)):
            c.call("heartbeat", "POST", "/api/agents/%s/heartbeat" % me, {"instanceId": "i-%d" % gen})
            c.call("inbox", "GET", "/api/agents/%s/inbox?wait=1" % me, timeout=30)
            pace()
        c.call("leave", "DELETE", "/api/agents/%s%s" % (me, "?purge=true" if gen % 2 else ""))
        pace(0.05, 0.2)
    c.close()


def sender(port, run, n):
    c = Client(port, run)
    k = 0
    while run.running():
        k += 1
        kind = k % 10
        if kind < 5:
            to = "stable-%d" % random.randrange(STABLE)
        elif kind < 8:
            to = "tag:stable"
        elif kind == 8:
            to = "broadcast"
        else:
            to = "tag:eph"
        body = "soak %d/%d %s" % (n, k, "x" * random.randint(0, 400))
        msg = {"from": "sender-%d" % n, "to": to, "body": body, "idempotencyKey": "s%d-%d" % (n, k)}
        if random.random() < 0.1:
            msg["claimable"] = True
        s, out = c.call("send", "POST", "/api/messages", msg, allowed=(201,))
        if s == 201:
            with run.lock:
                run.acked[out["message"]["id"]] = hashlib.sha1(body.encode("utf-8")).hexdigest()
        if k % 25 == 0:
            c.call("history", "GET", "/api/messages?limit=20&agent=stable-0")
            c.call("stats", "GET", "/api/stats")
        pace()
    c.close()


def integration(port, run):
    c = Client(port, run)
    k = 0
    while run.running():
        k += 1
        key = "alert-%d" % random.randrange(30)
        status = "resolved" if random.random() < 0.2 else "firing"
        c.call("integration", "POST", "/api/integrations/events",
               {"dedupeKey": key, "title": "disk usage on %s" % key, "status": status, "severity": "warning"},
               headers={"Authorization": "Bearer " + INTEG_TOKEN})
        if k % 20 == 0:
            c.call("tasks", "GET", "/api/tasks?limit=50")
            c.call("callbacks", "GET", "/api/callbacks?limit=50")
        pace(0.05, 0.15)
    c.close()


def streamer(port, run, path, record):
    """Reads a stream for a few seconds, hangs up, resumes with Last-Event-ID."""
    last = None
    while run.running():
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        headers = "Host: 127.0.0.1\r\nAuthorization: Bearer %s\r\n" % TOKEN
        if last is not None:
            headers += "Last-Event-ID: %d\r\n" % last
        s.sendall(("GET %s HTTP/1.1\r\n%s\r\n" % (path, headers)).encode())
        s.settimeout(1.0)
        buf = b""
        until = time.monotonic() + random.uniform(3, 10)
        head_ok = False
        try:
            while time.monotonic() < until and run.running():
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                buf += chunk
                if not head_ok and b"\r\n\r\n" in buf:
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    head_ok = True
                    run.note("stream", int(head.split(b" ", 2)[1]), (200,))
                while head_ok and b"\n\n" in buf:
                    frame, _, buf = buf.partition(b"\n\n")
                    m = re.search(rb"^id: (\d+)$", frame, re.M)
                    if m:
                        last = int(m.group(1))
                        data = re.search(rb"^data: (.*)$", frame, re.M)
                        if record and data:  # an id without data is the cursor a stream starts from, not an event
                            run.stream_ids.append(last)
                            run.stream_bytes += len(data.group(1).decode("utf-8"))
        finally:
            s.close()
        pace(0.05, 0.3)


def sampler(pid, port, run, every):
    c = Client(port, run)
    while run.running():
        try:
            with open("/proc/%d/status" % pid) as f:
                status = f.read()
            rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
            threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
            fds = len(os.listdir("/proc/%d/fd" % pid))
        except (OSError, AttributeError):
            break
        parts = {k: int(v) for k, v in re.findall(r"(RssAnon|RssFile|RssShmem):\s+(\d+) kB", status)}
        s, stats = c.call("stats", "GET", "/api/stats")
        run.samples.append({"t": round(time.monotonic() - run.start, 1), "rssKiB": rss, "threads": threads, "fds": fds,
                            "anonKiB": parts.get("RssAnon"), "fileKiB": parts.get("RssFile"), "shmemKiB": parts.get("RssShmem"),
                            "longPolls": (stats or {}).get("longPolls"), "streams": (stats or {}).get("streams")})
        end = time.monotonic() + every
        while run.running() and time.monotonic() < end:
            time.sleep(0.1)
    c.close()


class Receiver(BaseHTTPRequestHandler):
    """The integration's callback endpoint: checks signatures, fails now and then to exercise retries."""

    protocol_version = "HTTP/1.1"
    run = None

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        want = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        ok = hmac.compare_digest(want, self.headers.get("X-Agent-Relay-Signature") or "")
        fail = random.random() < 0.05
        with self.run.lock:
            if not ok:
                self.run.bad_signatures += 1
            elif not fail:
                self.run.callbacks_seen.add(int(self.headers.get("X-Agent-Relay-Delivery")))
        self.send_response(503 if fail else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


# -- the run --------------------------------------------------------------------------


def start_relay(db, callback_url):
    integ = [{"name": "soak", "token": INTEG_TOKEN, "scopes": ["tasks:create"], "targets": ["tag:stable"],
              "callbackUrl": callback_url, "callbackSecret": SECRET}]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    # Agents that ended their session are removed after OFFLINE_PRUNE_MS (a week by default); 20 s here lets
    # the run reach the steady population of offline agents that a real relay reaches after a week.
    env.update({"AGENT_RELAY_TOKEN": TOKEN, "AGENT_RELAY_INTEGRATIONS": json.dumps(integ), "OFFLINE_PRUNE_MS": "20000",
                "AGENT_RELAY_INTEGRATION_RATE_LIMIT_PER_MINUTE": "100000", "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen([sys.executable, RELAY_PY, "serve", "--port", "0", "--db", db], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    output = []
    port = []
    ready = threading.Event()

    def pump():
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            output.append(line)
            m = re.search(r"listening on http://[^\s:]+:(\d+)", line)
            if m and not port:
                port.append(int(m.group(1)))
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(20):
        proc.kill()
        raise SystemExit("the relay did not start:\n" + "\n".join(output))
    return proc, port[0], output


def ring_size(relay_py):
    """How many events, and how many characters of their data, the relay under test keeps in memory before it cuts
    its ring of recent events (Hub.publish)."""
    spec = importlib.util.spec_from_file_location("agent_relay_soaked", relay_py)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return 2 * mod.Hub.RING, mod.Hub.RING_BYTES


def third_averages(samples, key):
    n = len(samples)
    if n < 3:
        return None, None
    k = max(1, n // 3)
    first = sum(s[key] for s in samples[:k]) / float(k)
    last = sum(s[key] for s in samples[-k:]) / float(k)
    return first, last


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600, help="how long the load runs after the warm-up (default 600)")
    ap.add_argument("--warm-up-max", type=float, default=180,
                    help="the warm-up ends when the relay's event ring has filled, or after this many seconds (default 180)")
    ap.add_argument("--sample-every", type=float, default=2.0, help="seconds between samples of memory, threads, fds")
    ap.add_argument("--report", help="also write the figures as JSON to this file")
    args = ap.parse_args(argv)
    if not os.path.isdir("/proc/self/fd"):
        raise SystemExit("soak.py samples the relay through /proc: run it on Linux")

    ring_events, ring_bytes = ring_size(RELAY_PY)
    run = Run(args.warm_up_max + args.seconds)
    Receiver.run = run
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    receiver.daemon_threads = True
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    tmp = tempfile.mkdtemp(prefix="relay-soak-")
    db = os.path.join(tmp, "relay.db")
    proc, port, output = start_relay(db, "http://127.0.0.1:%d/callback" % receiver.server_address[1])
    print("soak: relay pid %d on port %d, a warm-up (at most %.0f s) and %.0f s, database %s" % (
        proc.pid, port, args.warm_up_max, args.seconds, db), flush=True)

    setup = Client(port, run)
    for i in range(STABLE):
        setup.call("register", "POST", "/api/agents", {"id": "stable-%d" % i, "tags": ["stable"]})
    for n in range(2):
        setup.call("register", "POST", "/api/agents", {"id": "sender-%d" % n})
    # steady state first: the relay keeps up to 16 reader connections to SQLite, opened as concurrent reads need them
    warm = [threading.Thread(target=lambda: [Client(port, run).call("warm-up", "GET", "/api/messages?limit=5")
                                             for _ in range(3)]) for _ in range(24)]
    for w in warm:
        w.start()
    for w in warm:
        w.join()
    setup.close()

    run.start = time.monotonic()
    run.deadline = run.start + args.warm_up_max + args.seconds
    warm = None  # {"t": when the warm-up ended, ...}
    workers = [threading.Thread(target=stable_agent, args=(port, run, i)) for i in range(STABLE)]
    workers += [threading.Thread(target=churner, args=(port, run, n)) for n in range(2)]
    workers += [threading.Thread(target=sender, args=(port, run, n)) for n in range(2)]
    workers += [threading.Thread(target=integration, args=(port, run))]
    workers += [threading.Thread(target=streamer, args=(port, run, "/api/events", True)),
                threading.Thread(target=streamer, args=(port, run, "/api/events?agentId=stable-0", False)),
                threading.Thread(target=streamer, args=(port, run, "/api/events?types=message.created,task.updated", False))]
    workers += [threading.Thread(target=sampler, args=(proc.pid, port, run, args.sample_every))]

    def guarded(target, *a):
        try:
            target(*a)
        except Exception as e:  # a worker's own failure is a finding, not a crash of the run
            with run.lock:
                run.errors.append("%s: %r" % (target.__name__, e))

    workers = [threading.Thread(target=guarded, args=(w._target,) + w._args, daemon=True) for w in workers]
    producers = [w for w in workers if w._args[0] in (sender, integration)]  # what sends to the stable agents
    for w in workers:
        w.start()
    next_report = run.start + 30
    while run.running():
        time.sleep(0.5)
        now = time.monotonic()
        filled = len(run.stream_ids) >= ring_events or run.stream_bytes >= ring_bytes
        if warm is None and (filled or now - run.start >= args.warm_up_max):
            warm = {"t": round(now - run.start, 1), "ringFilled": filled, "events": len(run.stream_ids),
                    "eventDataMiB": round(run.stream_bytes / 1048576.0, 1)}
            run.deadline = now + args.seconds
            print("soak: warm-up over at t=%.0fs (%s: %d events, %.1f MiB of event data); judging the next %.0f s" % (
                warm["t"], "the event ring has filled" if filled else "--warm-up-max, before the event ring filled",
                warm["events"], warm["eventDataMiB"], args.seconds), flush=True)
        if time.monotonic() >= next_report and run.samples:
            next_report += 30
            s = run.samples[-1]
            print("soak: t=%4.0fs rss=%6.1f MiB threads=%3d fds=%3d acked=%d unexpected=%d" % (
                s["t"], s["rssKiB"] / 1024.0, s["threads"], s["fds"], len(run.acked), len(run.unexpected)), flush=True)
    for w in producers:
        w.join(60)
    run.sent.set()
    for w in workers:
        w.join(60)

    # -- accounting ----------------------------------------------------------
    findings = []
    check = Client(port, run)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s, out = check.call("callbacks", "GET", "/api/callbacks?status=pending&limit=1")
        if s == 200 and not out["callbacks"]:
            break
        time.sleep(0.5)
    check.close()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "killed after 20 s"
    receiver.shutdown()

    import sqlite3

    con = sqlite3.connect("file:%s?mode=ro" % db, uri=True)
    stored = {}
    ids = sorted(run.acked)
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        for mid, body in con.execute("SELECT id, body FROM messages WHERE id IN (%s)" % ",".join("?" * len(chunk)), chunk):
            stored[mid] = hashlib.sha1(body.encode("utf-8")).hexdigest()
    missing = [m for m in ids if m not in stored]
    changed = [m for m in ids if m in stored and stored[m] != run.acked[m]]
    if missing:
        findings.append("%d acknowledged messages are not stored (e.g. %s)" % (len(missing), missing[:5]))
    if changed:
        findings.append("%d stored messages differ from what was sent (e.g. %s)" % (len(changed), changed[:5]))
    for i in range(STABLE):
        me = "stable-%d" % i
        floor = con.execute("SELECT floor_id FROM agents WHERE id = ?", (me,)).fetchone()[0]
        expected = [r[0] for r in con.execute(
            "SELECT id FROM messages WHERE to_target IN (?, 'tag:stable', 'broadcast') AND from_agent != ? AND id > ? "
            "ORDER BY id", (me, me, floor))]
        got = run.received.get(me, [])
        if len(got) != len(set(got)):
            findings.append("%s received %d messages twice" % (me, len(got) - len(set(got))))
        if sorted(set(got)) != expected:
            lost = sorted(set(expected) - set(got))
            findings.append("%s: %d messages addressed to it never arrived (e.g. %s), %d arrived unaddressed" % (
                me, len(lost), lost[:5], len(set(got) - set(expected))))
    sids = run.stream_ids
    if sids and sids != list(range(sids[0], sids[0] + len(sids))):
        dup = len(sids) - len(set(sids))
        gaps = sorted(set(range(sids[0], max(sids) + 1)) - set(sids))
        findings.append("the global stream saw %d events twice and missed %d (e.g. %s) across reconnects" % (dup, len(gaps), gaps[:5]))
    cb = dict(con.execute("SELECT status, COUNT(*) FROM callbacks GROUP BY status").fetchall())
    delivered = {r[0] for r in con.execute("SELECT id FROM callbacks WHERE status = 'delivered'")}
    if cb.get("failed") or cb.get("pending"):
        findings.append("callbacks not delivered: %s" % cb)
    if delivered - run.callbacks_seen:
        findings.append("%d callbacks marked delivered were never received" % len(delivered - run.callbacks_seen))
    if run.bad_signatures:
        findings.append("%d callbacks had a wrong signature" % run.bad_signatures)
    integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    if integrity != "ok":
        findings.append("integrity_check: %s" % integrity)
    con.close()
    if run.unexpected:
        kinds = {}
        for op, status, _ in run.unexpected:
            kinds[(op, status)] = kinds.get((op, status), 0) + 1
        findings.append("%d unexpected answers: %s; first: %s" % (len(run.unexpected), kinds, run.unexpected[0]))
    if run.errors:
        findings.append("worker errors: %s" % run.errors[:5])
    if code != 0:
        findings.append("the relay exited with %s on SIGTERM" % code)
    if any("Traceback" in line for line in output):
        findings.append("the relay logged a traceback:\n" + "\n".join(output[-40:]))

    flat = {}
    # threads and descriptors follow the open connections, which vary by a few from one sample to the next
    limits = {"rssKiB": lambda f: f * 1.10 + 8 * 1024, "threads": lambda f: f + 8, "fds": lambda f: f + 10}
    judged = [s for s in run.samples if warm is not None and s["t"] >= warm["t"]]
    for key, limit in limits.items():
        first, last = third_averages(judged, key)
        if first is None:
            findings.append("too few samples to judge %s" % key)
            continue
        flat[key] = {"firstThird": round(first, 1), "lastThird": round(last, 1), "limit": round(limit(first), 1),
                     "ok": last <= limit(first)}
        if not flat[key]["ok"]:
            findings.append("%s grew: first third %.1f, last third %.1f (limit %.1f)" % (key, first, last, limit(first)))

    elapsed = run.deadline - run.start
    report = {"seconds": args.seconds, "warmUp": warm, "requests": sum(run.counts.values()), "byOperation": run.counts,
              "acknowledgedMessages": len(run.acked), "callbacksDelivered": len(delivered), "streamEvents": len(sids),
              "flat": flat, "samples": run.samples, "findings": findings, "ok": not findings}
    print("soak: %d requests in %.0f s (%.0f/s), %d messages acknowledged and all accounted for: %s" % (
        report["requests"], elapsed, report["requests"] / max(elapsed, 1), len(run.acked),
        "yes" if not (missing or changed) else "NO"))
    if judged:
        print("soak: rss %.1f MiB at the start, %.1f MiB at the end of the warm-up (t=%.0fs), %.1f MiB at most after it" % (
            run.samples[0]["rssKiB"] / 1024.0, judged[0]["rssKiB"] / 1024.0, warm["t"], max(s["rssKiB"] for s in judged) / 1024.0))
    print("soak: %-8s %12s %12s %12s" % ("", "first third", "last third", "limit"))
    for key, f in flat.items():
        scale, unit = (1024.0, " MiB") if key == "rssKiB" else (1.0, "")
        print("soak: %-8s %12s %12s %12s %s" % (key.replace("KiB", ""), "%.1f%s" % (f["firstThird"] / scale, unit),
                                               "%.1f%s" % (f["lastThird"] / scale, unit), "%.1f%s" % (f["limit"] / scale, unit),
                                               "ok" if f["ok"] else "GREW"))
    for f in findings:
        print("soak: FINDING: " + f)
    print("soak: %s" % ("ok" if not findings else "FAILED (%d findings)" % len(findings)), flush=True)
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0 if not findings else 1


if __name__ == "__main__":
    sys.exit(main())
