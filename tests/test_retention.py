"""Retention: rows older than RETENTION_DAYS go, open work and held messages stay.

Each test builds real state through HTTP, stops the relay, moves the
timestamps of the rows meant to be old 30 days back with sqlite3, starts the
relay again and lets its sweeper's first retention pass run. What remains is
checked through HTTP and in the database.
"""
import json
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import wait_for

DAY_MS = 86400000
# A short stale TTL makes the sweeper pass every second; the first pass also applies retention.
ENV = {"STALE_TTL_MS": "4000", "RETENTION_DAYS": "14"}



def age_rows(db_path, days, upto):
    """Move every row with an id up to upto[table] back by `days` (the relay must be stopped)."""
    old = int(time.time() * 1000) - days * DAY_MS
    con = sqlite3.connect(db_path)
    with con:
        con.execute("UPDATE messages SET created_at = ? WHERE id <= ?", (old, upto["messages"]))
        con.execute("UPDATE tasks SET created_at = ?, updated_at = ?, first_seen_at = ?, last_seen_at = ? WHERE id <= ?",
                    (old, old, old, old, upto["tasks"]))
        con.execute("UPDATE task_events SET created_at = ? WHERE id <= ?", (old, upto["task_events"]))
        con.execute("UPDATE events SET created_at = ? WHERE id <= ?", (old, upto["events"]))
        con.execute("UPDATE callbacks SET created_at = ?, delivered_at = CASE WHEN delivered_at IS NULL THEN NULL ELSE ? END "
                    "WHERE id <= ?", (old, old, upto["callbacks"]))
    con.close()
    return old


def max_ids(relay):
    out = {}
    for table in ("messages", "tasks", "task_events", "events", "callbacks"):
        out[table] = relay.sql("SELECT COALESCE(MAX(id), 0) AS n FROM %s" % table)[0]["n"]
    return out


def pass_done(relay, marker):
    """True once the sweeper has passed at least twice since start: `marker`, registered after the start, went
    offline, and the retention pass of the first sweep (which runs before the next sweep) has finished."""
    return relay.get("/api/agents/" + marker).json["status"] == "offline"


class Receiver(object):
    """A callback receiver on loopback that answers 200."""

    def __init__(self):
        got = self.got = []

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = "http://127.0.0.1:%d/hook" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_old_rows_go_and_open_work_and_held_messages_stay(relay_factory):
    receiver = Receiver()
    integrations = [
        {"name": "ok", "token": "ok-integration-token", "scopes": ["tasks:create"], "targets": ["tag:ops"],
         "callbackUrl": receiver.url},
        {"name": "down", "token": "down-integration-token", "scopes": ["tasks:create"], "targets": ["tag:ops"],
         "callbackUrl": "http://127.0.0.1:1/hook"},
    ]
    env = dict(ENV, AGENT_RELAY_INTEGRATIONS=json.dumps(integrations), AGENT_RELAY_CALLBACK_MAX_ATTEMPTS="1")
    relay = relay_factory(env=env)
    try:
        relay.register("alice", tags=["ops"])
        relay.register("bob", tags=["ops"])
        relay.register("gate", approvalMode="guarded")

        # Old rows that must go.
        chat = relay.send("alice", "bob", "old chat")
        bulk = [relay.send("alice", "bob", "bulk %d" % i)["id"] for i in range(1100)]  # several 500-row batches
        relay.inbox("bob", limit=500)  # receipts for some of them
        approved = relay.send("alice", "gate", "approved long ago")
        assert relay.post("/api/messages/%d/approve" % approved["id"], {}).status == 200
        done = relay.post("/api/tasks", {"title": "finished", "target": "tag:ops", "from": "alice"}).json["task"]
        assert relay.post("/api/tasks/%d/claim" % done["id"], {"agentId": "bob"}).status == 200
        assert relay.patch("/api/tasks/%d/status" % done["id"], {"agentId": "bob", "status": "done"}).status == 200
        canceled = relay.post("/api/tasks", {"title": "never mind", "target": "tag:ops", "from": "alice"}).json["task"]
        assert relay.patch("/api/tasks/%d/status" % canceled["id"], {"status": "canceled"}).status == 200
        fired = relay.post("/api/integrations/events", {"dedupeKey": "disk", "title": "disk full"},
                           headers={"Authorization": "Bearer ok-integration-token"})
        assert fired.status == 201, fired
        ok_task = fired.json["task"]
        r = relay.post("/api/integrations/events", {"dedupeKey": "disk", "status": "resolved"},
                       headers={"Authorization": "Bearer ok-integration-token"})
        assert r.status == 200 and r.json["task"]["status"] == "done"
        assert wait_for(lambda: len(relay.sql("SELECT id FROM callbacks WHERE status = 'delivered'")) == 2)

        # Old rows that must stay: open work, held messages, failed callbacks.
        unclaimed = relay.send("alice", "tag:ops", "anyone?", claimable=True)
        claimed = relay.send("alice", "tag:ops", "mine", claimable=True)
        assert relay.post("/api/agents/bob/heartbeat", {}).status == 200  # silent through the bulk: back before it claims
        assert relay.post("/api/messages/%d/claim" % claimed["id"], {"agentId": "bob"}).status == 200
        held = relay.send("alice", "gate", "waiting for a person")
        open_task = relay.post("/api/tasks", {"title": "still open", "target": "tag:ops", "from": "alice"}).json["task"]
        busy_task = relay.post("/api/tasks", {"title": "in progress", "target": "tag:ops", "from": "alice"}).json["task"]
        assert relay.post("/api/tasks/%d/claim" % busy_task["id"], {"agentId": "bob"}).status == 200
        r = relay.post("/api/integrations/events", {"dedupeKey": "cpu", "title": "cpu hot"},
                       headers={"Authorization": "Bearer down-integration-token"})
        assert r.status == 201
        assert wait_for(lambda: relay.sql("SELECT status FROM callbacks WHERE integration = 'down'") == [{"status": "failed"}])
        upto = max_ids(relay)

        # Recent rows that must stay.
        recent = relay.send("alice", "bob", "fresh")
        recent_done = relay.post("/api/tasks", {"title": "done today", "target": "tag:ops", "from": "alice"}).json["task"]
        assert relay.patch("/api/tasks/%d/status" % recent_done["id"], {"status": "canceled"}).status == 200
        recent_events = relay.sql("SELECT id FROM events WHERE id > ?", (upto["events"],))
        assert recent_events

        relay.stop()
        age_rows(relay.db_path, 30, upto)
        relay.start()
        relay.register("marker")
        assert wait_for(lambda: pass_done(relay, "marker"))

        def exists(path):
            return relay.get(path).status == 200

        # Gone, through HTTP and in the database.
        for mid in (chat["id"], approved["id"], bulk[0], bulk[-1], done["messageId"], canceled["messageId"], ok_task["messageId"]):
            r = relay.get("/api/messages/%d" % mid)
            assert r.status == 404 and r.code == "not_found", (mid, r)
        for tid in (done["id"], canceled["id"], ok_task["id"]):
            assert relay.get("/api/tasks/%d" % tid).status == 404
        assert relay.sql("SELECT COUNT(*) AS n FROM messages WHERE id IN (%s)" % ",".join(map(str, bulk)))[0]["n"] == 0
        gone_msgs = [chat["id"], approved["id"], done["messageId"], canceled["messageId"], ok_task["messageId"]] + bulk
        marks = ",".join(map(str, gone_msgs))
        assert relay.sql("SELECT COUNT(*) AS n FROM receipts WHERE message_id IN (%s)" % marks)[0]["n"] == 0
        assert relay.sql("SELECT COUNT(*) AS n FROM redeliveries WHERE message_id IN (%s)" % marks)[0]["n"] == 0
        assert relay.sql("SELECT COUNT(*) AS n FROM task_events WHERE task_id IN (?,?,?)",
                         (done["id"], canceled["id"], ok_task["id"]))[0]["n"] == 0
        assert relay.sql("SELECT COUNT(*) AS n FROM events WHERE id <= ?", (upto["events"],))[0]["n"] == 0
        assert relay.get("/api/callbacks?status=delivered").json["callbacks"] == []
        assert relay.sql("SELECT COUNT(*) AS n FROM callbacks WHERE status = 'delivered'")[0]["n"] == 0
        history = [m["id"] for m in relay.get("/api/messages?limit=500").json["messages"]]
        assert chat["id"] not in history and bulk[-1] not in history

        # Kept: open work (claimed or not), active tasks with their messages and events, held messages,
        # failed callbacks, and everything recent.
        for mid in (unclaimed["id"], claimed["id"], held["id"], open_task["messageId"], busy_task["messageId"], recent["id"]):
            assert exists("/api/messages/%d" % mid), mid
        for tid in (open_task["id"], busy_task["id"], recent_done["id"]):
            r = relay.get("/api/tasks/%d" % tid)
            assert r.status == 200 and r.json["events"], tid
        assert [c["taskId"] for c in relay.get("/api/callbacks?status=failed").json["callbacks"]] != []
        assert len(relay.sql("SELECT id FROM events WHERE id IN (%s)" % ",".join(str(e["id"]) for e in recent_events))) == len(recent_events)
        held_now = relay.get("/api/messages?held=true").json["messages"]
        assert [m["id"] for m in held_now] == [held["id"]]
        assert relay.sql("SELECT state FROM receipts WHERE message_id = ? AND agent_id = 'gate'", (held["id"],)) == [{"state": "held"}]

        # The kept work still works: the held message can be approved and reaches its agent;
        # the unclaimed message can be claimed.
        assert relay.post("/api/messages/%d/approve" % held["id"], {}).status == 200
        assert held["id"] in [m["id"] for m in relay.inbox("gate")["messages"]]
        assert relay.post("/api/agents/bob/heartbeat", {}).status == 200  # offline since the restart: back first
        assert relay.post("/api/messages/%d/claim" % unclaimed["id"], {"agentId": "bob"}).status == 200

        # Nothing comes back across a restart.
        relay.restart()
        assert relay.get("/api/messages/%d" % chat["id"]).status == 404
        assert relay.get("/api/tasks/%d" % open_task["id"]).status == 200
    finally:
        receiver.close()


def test_retention_days_zero_keeps_everything(relay_factory):
    relay = relay_factory(env=dict(ENV, RETENTION_DAYS="0"))
    relay.register("alice")
    relay.register("bob")
    sent = [relay.send("alice", "bob", "keep %d" % i)["id"] for i in range(5)]
    task = relay.post("/api/tasks", {"title": "old and done", "target": "bob", "from": "alice"}).json["task"]
    assert relay.patch("/api/tasks/%d/status" % task["id"], {"status": "canceled"}).status == 200
    upto = max_ids(relay)
    relay.stop()
    age_rows(relay.db_path, 400, upto)
    relay.start()
    relay.register("marker")
    assert wait_for(lambda: pass_done(relay, "marker"))
    for mid in sent:
        assert relay.get("/api/messages/%d" % mid).status == 200
    assert relay.get("/api/tasks/%d" % task["id"]).status == 200
    assert relay.sql("SELECT COUNT(*) AS n FROM events WHERE id <= ?", (upto["events"],))[0]["n"] == upto["events"]
