"""Callbacks to an integration: a real HTTP receiver on 127.0.0.1 that fails,
goes away, or is slow. Every event arrives once acknowledged, in order per
task, signed; retries survive a SIGKILL; a hopeless receiver ends `failed`."""
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clock_shift import shift, shifted_relay

TOKEN = "tracker-token-123"
SECRET = "callback-secret-xyz"


class Receiver:
    """A webhook receiver: records every request, answers 500 while failing, or nothing while down."""

    def __init__(self):
        self.lock = threading.Lock()
        self.log = []  # one entry per request: {t, status, event, signature, delivery, raw, body}
        self.fail_next = 0
        self.failing = False
        self.sleep = 0.0
        self.redirect = None  # a Location to answer 302 with, instead of acknowledging
        self.arrived = threading.Event()
        self.server = None
        self.port = 0

    def start(self, port=0):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.arrived.set()
                if outer.sleep:
                    time.sleep(outer.sleep)
                with outer.lock:
                    status = 200
                    if outer.redirect:
                        status = 302
                    elif outer.failing or outer.fail_next > 0:
                        status = 500
                        outer.fail_next = max(0, outer.fail_next - 1)
                    outer.log.append({
                        "t": time.monotonic(), "status": status, "event": self.headers.get("X-Agent-Relay-Event"),
                        "signature": self.headers.get("X-Agent-Relay-Signature"),
                        "delivery": self.headers.get("X-Agent-Relay-Delivery"), "raw": raw, "method": self.command,
                        "body": json.loads(raw.decode()) if raw else None,
                    })
                reply = b'{"ok": true}' if status == 200 else b"receiver error"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status == 302:
                    self.send_header("Location", outer.redirect)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST  # a followed 302 arrives as a GET: recorded like any request

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self):
        return "http://127.0.0.1:%d/hooks/agent-relay" % self.port

    def entries(self, acked=None):
        with self.lock:
            return [e for e in self.log if acked is None or (e["status"] == 200) == acked]


@pytest.fixture
def receiver():
    made = []

    def make():
        r = Receiver().start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def integration(url, secret=SECRET, name="tracker", token=TOKEN):
    item = {"name": name, "token": token, "scopes": ["tasks:create"], "targets": ["tag:oncall"], "channels": [],
            "callbackUrl": url}
    if secret:
        item["callbackSecret"] = secret
    return item


def start(relay_factory, integrations, **env):
    env["AGENT_RELAY_INTEGRATIONS"] = json.dumps(integrations)
    return relay_factory(env=env)


def fire(relay, key, title="Something broke", status="firing", token=TOKEN):
    r = relay.post("/api/integrations/events", {"dedupeKey": key, "title": title, "status": status},
                   headers={"Authorization": "Bearer " + token})
    assert r.status in (200, 201), r
    return r.json["task"]


def callbacks(relay, **query):
    r = relay.get("/api/callbacks", query=query)
    assert r.status == 200, r
    return r.json["callbacks"]


def wait_for(what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for %s" % getattr(what, "__name__", what))


def signed(entry, secret):
    want = "sha256=" + hmac.new(secret.encode(), entry["raw"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, entry["signature"] or "")


def test_failing_receiver_gets_every_event_once_in_order_and_signed(relay_factory, receiver):
    rx = receiver()
    rx.fail_next = 3
    relay = start(relay_factory, [integration(rx.url)])
    relay.register("fixer", tags=["oncall"])

    task = fire(relay, "db:down", "Database unreachable")
    tid = task["id"]
    assert relay.post("/api/tasks/%d/claim" % tid, {"agentId": "fixer"}).status == 200
    assert relay.patch("/api/tasks/%d/status" % tid, {"agentId": "fixer", "progress": "failing over"}).status == 200
    assert fire(relay, "db:down", status="resolved")["status"] == "done"
    # written before delivery: four rows exist at once
    assert [r["event"] for r in relay.sql("SELECT event FROM callbacks WHERE task_id = ? ORDER BY id", (tid,))] == [
        "task.created", "task.claimed", "task.status", "task.status"]

    # while the receiver fails, the first callback waits for its retry and the rest wait behind it
    wait_for(lambda: rx.entries())
    pending = wait_for(lambda: [c for c in callbacks(relay, taskId=tid, status="pending") if c["attempts"] >= 1])
    assert pending[0]["event"] == "task.created" and "500" in pending[0]["lastError"]
    assert pending[0]["nextAttemptAt"] > pending[0]["createdAt"]

    done = wait_for(lambda: (lambda cs: len(cs) == 4 and all(c["status"] == "delivered" for c in cs) and cs)(
        callbacks(relay, taskId=tid)))
    log = rx.entries()
    assert [(e["event"], e["status"]) for e in log] == [
        ("task.created", 500), ("task.created", 500), ("task.created", 500), ("task.created", 200),
        ("task.claimed", 200), ("task.status", 200), ("task.status", 200)]
    assert [e["body"]["attempt"] for e in log] == [1, 2, 3, 4, 1, 1, 1]
    # retries back off: 1 s, then 2 s, then 4 s (lower bounds only)
    gaps = [b["t"] - a["t"] for a, b in zip(log, log[1:4])]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9 and gaps[2] >= 3.9, gaps
    acked = rx.entries(acked=True)
    assert len({e["delivery"] for e in acked}) == 4
    for e in log:
        assert signed(e, SECRET), e["signature"]
        assert not signed(e, TOKEN)
        assert e["event"] == e["body"]["event"]
        assert e["body"]["integration"] == "tracker" and e["body"]["task"]["id"] == tid
    assert acked[1]["body"]["task"]["claimedBy"] == "fixer" and acked[1]["body"]["task"]["status"] == "claimed"
    assert acked[2]["body"]["task"]["progress"] == "failing over"
    assert acked[3]["body"]["task"]["status"] == "done"

    listed = sorted(done, key=lambda c: c["id"])
    assert [(c["event"], c["attempts"], c["lastError"]) for c in listed] == [
        ("task.created", 4, None), ("task.claimed", 1, None), ("task.status", 1, None), ("task.status", 1, None)]
    assert all(c["deliveredAt"] and c["nextAttemptAt"] is None and c["taskId"] == tid for c in listed)
    rows = relay.sql("SELECT status, attempts FROM callbacks WHERE task_id = ? ORDER BY id", (tid,))
    assert rows == [{"status": "delivered", "attempts": 4}] + [{"status": "delivered", "attempts": 1}] * 3
    assert relay.get("/api/stats").json["callbacks"] == {"pending": 0, "failed": 0}


def test_pending_callbacks_survive_sigkill(relay_factory, receiver):
    rx = receiver()
    port = rx.port
    rx.failing = True
    relay = start(relay_factory, [integration(rx.url)])
    relay.register("fixer", tags=["oncall"])
    a = fire(relay, "disk:a", "Disk A full")
    assert relay.post("/api/tasks/%d/claim" % a["id"], {"agentId": "fixer"}).status == 200
    b = fire(relay, "disk:b", "Disk B full")
    wait_for(lambda: len({e["body"]["task"]["id"] for e in rx.entries()}) == 2)
    rx.stop()  # now the receiver is gone: connections are refused
    wait_for(lambda: any("refused" in (c["lastError"] or "").lower() or "connect" in (c["lastError"] or "").lower()
                         for c in callbacks(relay, status="pending")), timeout=10)

    relay.kill()
    stored = relay.sql("SELECT task_id, event, status FROM callbacks ORDER BY id")
    assert [(r["task_id"], r["event"], r["status"]) for r in stored] == [
        (a["id"], "task.created", "pending"), (a["id"], "task.claimed", "pending"), (b["id"], "task.created", "pending")]
    assert not rx.entries(acked=True)

    rx.start(port=port)
    rx.failing = False
    restarted = time.monotonic()
    relay.start()
    # a change after the restart queues behind the old ones
    assert relay.patch("/api/tasks/%d/status" % a["id"], {"agentId": "fixer", "status": "done"}).status == 200
    wait_for(lambda: len(callbacks(relay, status="delivered")) == 4)
    acked = rx.entries(acked=True)
    assert all(e["t"] >= restarted for e in acked)
    per_task = {}
    for e in acked:
        per_task.setdefault(e["body"]["task"]["id"], []).append(e["event"])
    assert per_task == {a["id"]: ["task.created", "task.claimed", "task.status"], b["id"]: ["task.created"]}
    assert len({e["delivery"] for e in acked}) == 4
    assert all(signed(e, SECRET) for e in rx.entries())
    assert relay.sql("SELECT COUNT(*) AS n FROM callbacks WHERE status != 'delivered'")[0]["n"] == 0


def test_hopeless_receiver_ends_failed(relay_factory, receiver):
    rx = receiver()
    rx.failing = True
    # no callbackSecret: the signature is keyed by the integration token
    relay = start(relay_factory, [integration(rx.url, secret=None)], AGENT_RELAY_CALLBACK_MAX_ATTEMPTS="2")
    relay.register("fixer", tags=["oncall"])
    task = fire(relay, "net:flap", "Network flapping")
    assert relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "fixer"}).status == 200

    failed = wait_for(lambda: (lambda cs: len(cs) == 2 and cs)(callbacks(relay, status="failed")), timeout=20)
    assert sorted((c["event"], c["attempts"]) for c in failed) == [("task.claimed", 2), ("task.created", 2)]
    assert all("500" in c["lastError"] and c["nextAttemptAt"] is None for c in failed)
    assert callbacks(relay, status="pending") == []
    log = rx.entries()
    assert [(e["event"], e["body"]["attempt"]) for e in log] == [
        ("task.created", 1), ("task.created", 2), ("task.claimed", 1), ("task.claimed", 2)]
    assert all(signed(e, TOKEN) for e in log)
    assert relay.get("/api/stats").json["callbacks"] == {"pending": 0, "failed": 2}
    assert relay.sql("SELECT status, attempts FROM callbacks ORDER BY id") == [{"status": "failed", "attempts": 2}] * 2
    r = relay.get("/api/callbacks", query={"status": "lost"})
    assert r.status == 400 and r.code == "invalid_field"


def test_redirect_is_a_failed_attempt_and_never_followed(relay_factory, receiver):
    elsewhere = receiver()
    rx = receiver()
    rx.redirect = elsewhere.url + "?stolen=1"
    relay = start(relay_factory, [integration(rx.url)], AGENT_RELAY_CALLBACK_MAX_ATTEMPTS="2")
    task = fire(relay, "dns:moved", "Receiver moved")

    first = wait_for(lambda: [c for c in callbacks(relay, taskId=task["id"]) if c["attempts"] >= 1])[0]
    assert first["status"] == "pending" and first["deliveredAt"] is None, first
    assert "302" in first["lastError"] and rx.redirect in first["lastError"], first
    failed = wait_for(lambda: callbacks(relay, taskId=task["id"], status="failed"), timeout=20)
    assert [(c["event"], c["attempts"], c["deliveredAt"]) for c in failed] == [("task.created", 2, None)]
    assert "302" in failed[0]["lastError"] and rx.redirect in failed[0]["lastError"]
    # the configured receiver saw both attempts; the redirect target never saw a request
    assert [(e["event"], e["status"], e["body"]["attempt"]) for e in rx.entries()] == [
        ("task.created", 302, 1), ("task.created", 302, 2)]
    assert elsewhere.entries() == [] and not elsewhere.arrived.is_set()
    assert relay.sql("SELECT status, attempts, delivered_at FROM callbacks") == [
        {"status": "failed", "attempts": 2, "delivered_at": None}]
    assert relay.get("/api/stats").json["callbacks"] == {"pending": 0, "failed": 1}


def test_slow_receiver_does_not_slow_the_api(relay_factory, receiver):
    rx = receiver()
    rx.sleep = 5.0
    relay = start(relay_factory, [integration(rx.url)])
    relay.register("fixer", tags=["oncall"])
    first = fire(relay, "slow:0", "First")
    assert rx.arrived.wait(10), "the first delivery never reached the receiver"
    # the receiver is now holding a delivery for 5 s; the API answers meanwhile
    for i in range(1, 6):
        t0 = time.monotonic()
        r = relay.post("/api/integrations/events", {"dedupeKey": "slow:%d" % i, "title": "Alert %d" % i},
                       headers={"Authorization": "Bearer " + TOKEN})
        elapsed = time.monotonic() - t0
        assert r.status == 201, r
        assert elapsed < 1.0, "an integration event took %.2f s while a callback was in flight" % elapsed
    t0 = time.monotonic()
    assert relay.post("/api/tasks/%d/claim" % first["id"], {"agentId": "fixer"}).status == 200
    assert time.monotonic() - t0 < 1.0
    assert not rx.entries()  # the slow delivery is still in flight
    assert len(callbacks(relay, status="pending")) == 7


# -- clock jumps: a retry waits what it was scheduled to wait, on the monotonic clock ----------------------------------


def test_a_retry_is_not_held_back_by_a_clock_set_back(relay_factory, receiver, tmp_path):
    rx = receiver()
    rx.failing = True
    relay = shifted_relay(relay_factory, tmp_path, env={"AGENT_RELAY_INTEGRATIONS": json.dumps([integration(rx.url)])})
    task = fire(relay, "clock:back", "Clock set back")
    wait_for(lambda: rx.entries())  # the first try failed: the retry is due a second later
    shift(relay, -3600)
    rx.failing = False
    delivered = wait_for(lambda: [c for c in callbacks(relay, taskId=task["id"]) if c["status"] == "delivered"])
    assert delivered[0]["attempts"] >= 2
    # the stored times are the wall clock's: the delivery is stamped an hour back
    assert delivered[0]["deliveredAt"] < delivered[0]["createdAt"] - 3500 * 1000


def test_a_retry_is_not_sent_early_by_a_clock_set_forward(relay_factory, receiver, tmp_path):
    rx = receiver()
    rx.failing = True
    relay = shifted_relay(relay_factory, tmp_path, env={"AGENT_RELAY_INTEGRATIONS": json.dumps([integration(rx.url)])})
    first = fire(relay, "clock:forward", "Clock set forward")
    wait_for(lambda: rx.entries())
    shift(relay, 3600)
    rx.failing = False
    fire(relay, "clock:other", "Another task")  # its callback wakes the worker, which looks at what is due
    tries = lambda: [e for e in rx.entries() if e["body"]["task"]["id"] == first["id"]]  # noqa: E731
    log = wait_for(lambda: (lambda es: len(es) >= 2 and es)(tries()))
    assert log[1]["t"] - log[0]["t"] >= 0.9  # the 1 s back-off still held (a lower bound)
    assert log[1]["status"] == 200
