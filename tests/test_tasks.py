"""Closed-loop tasks: an alert storm becomes one task, claims race to one winner,
the lifecycle is recorded step by step, and released work goes back to the pool."""
import json
import threading

INTEG_TOKEN = "integ-alerts-token-1"
OTHER_TOKEN = "integ-other-token-22"
INTEGRATIONS = [
    {"name": "alerts", "token": INTEG_TOKEN, "scopes": ["tasks:create"], "targets": ["tag:oncall"], "channels": []},
    {"name": "other", "token": OTHER_TOKEN, "scopes": ["tasks:create"], "targets": ["tag:oncall"], "channels": []},
]


def start(relay_factory):
    return relay_factory(env={"AGENT_RELAY_INTEGRATIONS": json.dumps(INTEGRATIONS)})


def event(relay, body, token=INTEG_TOKEN):
    return relay.post("/api/integrations/events", body, headers={"Authorization": "Bearer " + token})


def task_messages(relay, agent_id):
    """Task announcements in the agent's inbox (following its cursor, as a client does)."""
    return [m for m in relay.inbox(agent_id)["messages"] if m["kind"] == "task"]


def event_types(relay, task_id):
    r = relay.get("/api/tasks/%d/events" % task_id)
    assert r.status == 200, r
    return [e["type"] for e in r.json["events"]]


# -- dedupe ------------------------------------------------------------------------
def test_alert_storm_is_one_task_announced_once(relay_factory):
    relay = start(relay_factory)
    for aid in ("oncall-1", "oncall-2"):
        relay.register(aid, tags=["oncall"])
    relay.register("bystander", tags=["frontend"])

    storm = {"dedupeKey": "disk-full:db1", "title": "Disk 95% full on db1", "severity": "critical",
             "externalUrl": "https://grafana.example/d/disk"}
    # 100 identical events from 10 senders at once
    answers = []
    lock = threading.Lock()

    def sender():
        for _ in range(10):
            r = event(relay, storm)
            with lock:
                answers.append(r)

    threads = [threading.Thread(target=sender) for _ in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(answers) == 100
    answers.sort(key=lambda a: -a.status)  # the one 201 first
    assert answers[0].status == 201 and answers[0].json["created"] is True, answers[0]
    assert all(a.status == 200 and a.json["created"] is False for a in answers[1:]), [a for a in answers if a.status != 200][:3]
    task_id = answers[0].json["task"]["id"]
    assert {a.json["task"]["id"] for a in answers} == {task_id}

    detail = relay.get("/api/tasks/%d" % task_id).json
    task = detail["task"]
    assert task["occurrenceCount"] == 100
    assert task["status"] == "open" and task["source"] == "integration:alerts" and task["target"] == "tag:oncall"
    assert task["severity"] == "critical" and task["externalUrl"] == storm["externalUrl"]
    assert task["lastSeenAt"] >= task["firstSeenAt"]
    types = [e["type"] for e in detail["events"]]
    assert types.count("created") == 1 and types.count("occurrence") == 99 and len(types) == 100

    # exactly one announcement per matching agent, none for the others
    for aid in ("oncall-1", "oncall-2"):
        msgs = task_messages(relay, aid)
        assert len(msgs) == 1, msgs
        assert msgs[0]["payload"]["taskId"] == task_id and msgs[0]["claimable"] is True
        assert msgs[0]["id"] == task["messageId"]
        assert task_messages(relay, aid) == []
    assert task_messages(relay, "bystander") == []
    assert relay.sql("SELECT COUNT(*) AS n FROM tasks")[0]["n"] == 1
    assert relay.sql("SELECT COUNT(*) AS n FROM messages WHERE kind = 'task'")[0]["n"] == 1
    assert relay.sql("SELECT occurrence_count FROM tasks WHERE id = ?", (task_id,))[0]["occurrence_count"] == 100

    # the dedupe survives a crash: the same key still counts on the same task
    relay.restart(kill=True)
    r = event(relay, storm)
    assert r.status == 200 and r.json["task"]["id"] == task_id and r.json["task"]["occurrenceCount"] == 101

    # resolved finishes it; the same key afterwards opens a new task with a new announcement
    r = event(relay, {"dedupeKey": storm["dedupeKey"], "status": "resolved"})
    assert r.status == 200 and r.json["task"]["id"] == task_id and r.json["task"]["status"] == "done", r
    assert event(relay, {"dedupeKey": storm["dedupeKey"], "status": "resolved"}).json == {"task": None}
    r = event(relay, storm)
    assert r.status == 201 and r.json["created"] is True and r.json["task"]["id"] != task_id
    assert r.json["task"]["occurrenceCount"] == 1
    msgs = task_messages(relay, "oncall-1")
    assert [m["payload"]["taskId"] for m in msgs] == [r.json["task"]["id"]]
    rows = relay.sql("SELECT id, status, occurrence_count FROM tasks ORDER BY id")
    assert [(x["status"], x["occurrence_count"]) for x in rows] == [("done", 101), ("open", 1)]


def test_agent_dedupe_is_scoped_to_its_source(relay_factory):
    relay = start(relay_factory)
    relay.register("dispatcher", tags=["ops"])
    relay.register("dispatcher-2", tags=["ops"])
    relay.register("worker", tags=["oncall"])
    body = {"from": "dispatcher", "title": "Rotate the TLS certificate", "target": "tag:oncall", "dedupeKey": "tls-rotate"}

    first = relay.post("/api/tasks", body)
    assert first.status == 201 and first.json["created"] is True, first
    again = relay.post("/api/tasks", body)
    assert again.status == 200 and again.json["created"] is False
    tid = first.json["task"]["id"]
    assert again.json["task"]["id"] == tid and again.json["task"]["occurrenceCount"] == 2
    assert first.json["task"]["source"] == "agent:dispatcher"

    # same key from an integration, from another integration, and from another agent: separate tasks
    a = event(relay, {"dedupeKey": "tls-rotate", "title": "Certificate expires in 7 days"})
    b = event(relay, {"dedupeKey": "tls-rotate", "title": "Certificate expires in 7 days"}, token=OTHER_TOKEN)
    c = relay.post("/api/tasks", dict(body, **{"from": "dispatcher-2"}))
    assert a.status == b.status == c.status == 201, (a, b, c)
    ids = {tid, a.json["task"]["id"], b.json["task"]["id"], c.json["task"]["id"]}
    assert len(ids) == 4
    assert relay.get("/api/tasks/%d" % tid).json["task"]["occurrenceCount"] == 2
    # each task announced once to the worker: four task messages, not five
    msgs = task_messages(relay, "worker")
    assert sorted(m["payload"]["taskId"] for m in msgs) == sorted(ids)
    rows = relay.sql("SELECT source, occurrence_count FROM tasks WHERE dedupe_key = 'tls-rotate' ORDER BY id")
    assert [(x["source"], x["occurrence_count"]) for x in rows] == [
        ("agent:dispatcher", 2), ("integration:alerts", 1), ("integration:other", 1), ("agent:dispatcher-2", 1)]


# -- claims ------------------------------------------------------------------------
def test_claim_race_has_one_winner_and_claims_the_message(relay_factory):
    relay = start(relay_factory)
    agents = ["w%02d" % i for i in range(20)]
    for aid in agents:
        relay.register(aid, tags=["oncall"])
    tid = event(relay, {"dedupeKey": "race", "title": "Restart the queue"}).json["task"]["id"]
    mid = relay.get("/api/tasks/%d" % tid).json["task"]["messageId"]

    barrier = threading.Barrier(len(agents))
    results = {}

    def claim(aid):
        barrier.wait()
        results[aid] = relay.post("/api/tasks/%d/claim" % tid, {"agentId": aid})

    threads = [threading.Thread(target=claim, args=(aid,)) for aid in agents]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    winners = [aid for aid, r in results.items() if r.status == 200]
    assert len(winners) == 1, {a: r.status for a, r in results.items()}
    winner = winners[0]
    losers = [r for aid, r in results.items() if aid != winner]
    assert len(losers) == 19
    assert all(r.status == 409 and r.code == "already_claimed" for r in losers), losers
    assert all(r.json["error"]["claimedBy"] == winner for r in losers)
    assert results[winner].json["task"]["claimedBy"] == winner and results[winner].json["task"]["status"] == "claimed"
    # stored on both the task and its announcing message
    assert relay.sql("SELECT status, claimed_by FROM tasks WHERE id = ?", (tid,)) == [{"status": "claimed", "claimed_by": winner}]
    assert [t["id"] for t in relay.get("/api/tasks", query={"claimedBy": winner}).json["tasks"]] == [tid]
    assert [t["id"] for t in relay.get("/api/tasks", query={"status": "claimed", "target": "tag:oncall"}).json["tasks"]] == [tid]
    assert relay.get("/api/tasks", query={"status": "open"}).json["tasks"] == []
    assert relay.get("/api/tasks", query={"status": "sleeping"}).code == "invalid_field"
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (mid,)) == [{"claimed_by": winner}]
    other = [a for a in agents if a != winner][0]
    r = relay.post("/api/messages/%d/claim" % mid, {"agentId": other})
    assert r.status == 409 and r.code == "already_claimed"
    assert event_types(relay, tid).count("claimed") == 1

    # the other way round: claiming the message claims the task
    t2 = event(relay, {"dedupeKey": "race-2", "title": "Rebuild the index"}).json["task"]
    r = relay.post("/api/messages/%d/claim" % t2["messageId"], {"agentId": other})
    assert r.status == 200 and r.json["message"]["claimedBy"] == other
    assert relay.get("/api/tasks/%d" % t2["id"]).json["task"]["claimedBy"] == other
    assert relay.sql("SELECT status, claimed_by FROM tasks WHERE id = ?", (t2["id"],)) == [{"status": "claimed", "claimed_by": other}]
    r = relay.post("/api/tasks/%d/claim" % t2["id"], {"agentId": winner})
    assert r.status == 409 and r.code == "already_claimed"


def test_task_lifecycle_is_recorded_and_done_is_final(relay_factory):
    relay = start(relay_factory)
    relay.register("owner", tags=["oncall"])
    relay.register("intruder", tags=["oncall"])
    alert = {"dedupeKey": "latency:api", "title": "p99 latency above 2 s", "severity": "warning"}
    tid = event(relay, alert).json["task"]["id"]
    assert event(relay, alert).status == 200  # a second occurrence

    assert relay.post("/api/tasks/%d/claim" % tid, {"agentId": "owner"}).status == 200
    r = relay.patch("/api/tasks/%d/status" % tid, {"agentId": "owner", "progress": {"step": "draining node 3", "pct": 40}})
    assert r.status == 200 and r.json["task"]["progress"] == {"step": "draining node 3", "pct": 40}
    r = relay.patch("/api/tasks/%d/status" % tid, {"agentId": "owner", "status": "blocked", "progress": "waiting for a maintenance window"})
    assert r.status == 200 and r.json["task"]["status"] == "blocked"
    r = relay.patch("/api/tasks/%d/status" % tid, {"agentId": "intruder", "status": "claimed"})
    assert r.status == 409 and r.code == "not_owner", r
    r = relay.patch("/api/tasks/%d/status" % tid, {"agentId": "intruder", "progress": "I'll take it"})
    assert r.status == 409 and r.code == "not_owner", r
    r = relay.patch("/api/tasks/%d/status" % tid, {"agentId": "owner", "status": "claimed"})
    assert r.status == 200 and r.json["task"]["status"] == "claimed"
    assert relay.sql("SELECT status, claimed_by, progress FROM tasks WHERE id = ?", (tid,)) == [
        {"status": "claimed", "claimed_by": "owner", "progress": json.dumps("waiting for a maintenance window")}]

    # the integration says it is over
    r = event(relay, {"dedupeKey": "latency:api", "status": "resolved"})
    assert r.status == 200 and r.json["task"]["status"] == "done"
    events = relay.get("/api/tasks/%d/events" % tid).json["events"]
    types = [e["type"] for e in events]
    assert types == ["created", "occurrence", "claimed", "progress", "status", "progress", "status", "resolved"], types
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert all(e["taskId"] == tid for e in events)
    by_type = {e["type"]: e for e in events}
    assert by_type["claimed"]["actor"] == "owner"
    assert by_type["resolved"]["actor"] == "integration:alerts"
    assert [e["data"] for e in events if e["type"] == "status"] == [{"from": "claimed", "to": "blocked"}, {"from": "blocked", "to": "claimed"}]

    # final: nothing changes any more, and nothing is stored by trying
    before = relay.sql("SELECT * FROM tasks WHERE id = ?", (tid,))
    for body in ({"agentId": "owner", "status": "claimed"}, {"agentId": "owner", "progress": "more"},
                 {"agentId": "owner", "status": "failed"}, {"status": "canceled"}, {"agentId": "owner", "status": "open"}):
        r = relay.patch("/api/tasks/%d/status" % tid, body)
        assert r.status == 409 and r.code == "invalid_transition", (body, r)
    r = relay.post("/api/tasks/%d/claim" % tid, {"agentId": "intruder"})
    assert r.status == 409 and r.code == "invalid_transition"
    r = relay.post("/api/messages/%d/claim" % relay.get("/api/tasks/%d" % tid).json["task"]["messageId"], {"agentId": "intruder"})
    assert r.status == 409 and r.code == "invalid_transition", r
    assert relay.sql("SELECT * FROM tasks WHERE id = ?", (tid,)) == before

    # the record survives a restart
    relay.restart()
    assert event_types(relay, tid) == types
    assert relay.get("/api/tasks/%d" % tid).json["task"]["status"] == "done"


def test_release_returns_work_to_the_pool_and_open_rules(relay_factory):
    relay = start(relay_factory)
    relay.register("holder", tags=["oncall"])
    relay.register("follower", tags=["oncall"])
    tid = event(relay, {"dedupeKey": "queue-stuck", "title": "Queue stuck"}).json["task"]["id"]
    mid = relay.get("/api/tasks/%d" % tid).json["task"]["messageId"]
    assert [m["id"] for m in task_messages(relay, "follower")] == [mid]  # its cursor moves past it
    assert relay.post("/api/tasks/%d/claim" % tid, {"agentId": "holder"}).status == 200
    assert relay.inbox("follower")["messages"] == []

    r = relay.patch("/api/tasks/%d/status" % tid, {"agentId": "holder", "status": "open"})
    assert r.status == 200 and r.json["task"]["status"] == "open" and r.json["task"]["claimedBy"] is None, r
    assert relay.sql("SELECT status, claimed_by FROM tasks WHERE id = ?", (tid,)) == [{"status": "open", "claimed_by": None}]
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (mid,)) == [{"claimed_by": None}]
    assert "released" in event_types(relay, tid)
    # the follower, following its cursor, gets the released work once
    again = relay.inbox("follower")["messages"]
    assert [m["id"] for m in again] == [mid]
    assert relay.inbox("follower")["messages"] == []
    # and it can take it
    r = relay.post("/api/tasks/%d/claim" % tid, {"agentId": "follower"})
    assert r.status == 200 and r.json["task"]["claimedBy"] == "follower"
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (mid,)) == [{"claimed_by": "follower"}]

    # open -> canceled is allowed; open -> done (or blocked) by PATCH is not
    t2 = relay.post("/api/tasks", {"title": "Old cleanup", "target": "tag:oncall"}).json["task"]["id"]
    t3 = relay.post("/api/tasks", {"title": "Another cleanup", "target": "tag:oncall"}).json["task"]["id"]
    for status in ("done", "blocked", "claimed"):
        r = relay.patch("/api/tasks/%d/status" % t3, {"status": status})
        assert r.status == 409 and r.code == "invalid_transition", (status, r)
    assert relay.sql("SELECT status FROM tasks WHERE id = ?", (t3,)) == [{"status": "open"}]
    r = relay.patch("/api/tasks/%d/status" % t2, {"status": "canceled"})
    assert r.status == 200 and r.json["task"]["status"] == "canceled"
    assert relay.sql("SELECT status FROM tasks WHERE id = ?", (t2,)) == [{"status": "canceled"}]
    # a canceled task's announcement is no longer open work
    r = relay.post("/api/messages/%d/claim" % relay.get("/api/tasks/%d" % t2).json["task"]["messageId"], {"agentId": "holder"})
    assert r.status == 409 and r.code == "invalid_transition", r
    assert relay.get("/api/stats").json["tasks"] == {"open": 1, "claimed": 1, "blocked": 0, "done": 0, "failed": 0, "canceled": 1}
