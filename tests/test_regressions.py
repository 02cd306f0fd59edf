"""Bugs found by reading the relay against its contract, each pinned by a test against the real relay."""
import json
import threading

from conftest import raw_exchange, wait_for


def raw_request(relay, data):
    status, _, body = raw_exchange(relay.port, data)
    return ("HTTP/1.1 %d " % status).encode() + body

def test_racing_session_end_and_purge_leave_no_ghost_agents(relay):
    """A purge racing a session end must not leave an agent the API shows but the database lacks."""
    for i in range(30):
        aid = "ghost-%d" % i
        relay.register(aid)
        results = []

        def end(path):
            results.append(relay.delete(path).status)

        threads = [threading.Thread(target=end, args=("/api/agents/%s" % aid,)),
                   threading.Thread(target=end, args=("/api/agents/%s?purge=true" % aid,))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        shown = relay.get("/api/agents/%s" % aid).status == 200
        stored = bool(relay.sql("SELECT id FROM agents WHERE id = ?", (aid,)))
        assert shown == stored, (aid, results, shown, stored)
    listed = {a["id"] for a in relay.get("/api/agents").json["agents"]}
    assert listed == {r["id"] for r in relay.sql("SELECT id FROM agents")}


def test_racing_heartbeats_and_patch_keep_routing_in_step_with_the_database(relay):
    ids = ["rt-%d" % i for i in range(10)]
    for a in ids:
        relay.register(a, tags=["t0"])
    stop = threading.Event()

    def beat(a):
        n = 0
        while not stop.is_set():
            relay.post("/api/agents/%s/heartbeat" % a, {"status": "busy" if n % 2 else "idle"})
            n += 1

    threads = [threading.Thread(target=beat, args=(a,)) for a in ids]
    for t in threads:
        t.start()
    try:
        for a in ids:
            assert relay.patch("/api/agents/%s" % a, {"tags": ["t1"]}).status == 200
    finally:
        stop.set()
        for t in threads:
            t.join()
    relay.register("sender")
    sent = relay.post("/api/messages", {"from": "sender", "to": "tag:t1", "body": "who has t1?"}).json
    assert sorted(sent["matched"]) == sorted(ids)
    for row in relay.sql("SELECT tags FROM agents WHERE id LIKE 'rt-%'"):
        assert json.loads(row["tags"]) == ["t1"]


def test_non_ascii_digits_in_a_path_id_are_not_found_not_a_500(relay):
    # the server reads the request line as Latin-1, so the byte 0xB2 is "²", which str.isdigit() accepts
    for path in (b"/api/messages/\xb2", b"/api/tasks/\xb9/events"):
        reply = raw_request(relay, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 404"), reply[:200]
        assert b'"not_found"' in reply
    assert "Traceback" not in relay.log


def test_an_offline_agent_that_hands_out_a_task_is_back_online(relay):
    relay.register("boss")
    relay.register("worker", tags=["w"])
    assert relay.delete("/api/agents/boss").json["status"] == "offline"
    r = relay.post("/api/tasks", {"from": "boss", "title": "Rotate the keys", "target": "tag:w"})
    assert r.status == 201, r
    assert relay.get("/api/agents/boss").json["status"] == "online"
    assert relay.sql("SELECT status FROM agents WHERE id = 'boss'") == [{"status": "online"}]


def test_releasing_a_task_is_published_once(relay):
    relay.register("w1", tags=["ops"])
    task = relay.post("/api/tasks", {"title": "Flaky deploy", "target": "tag:ops"}).json["task"]
    assert relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "w1"}).status == 200
    before = relay.sql("SELECT COUNT(*) AS n FROM events WHERE type = 'task.updated'")[0]["n"]
    assert relay.patch("/api/tasks/%d/status" % task["id"], {"agentId": "w1", "status": "open"}).status == 200
    after = relay.sql("SELECT COUNT(*) AS n FROM events WHERE type = 'task.updated'")[0]["n"]
    assert after - before == 1
    assert [e["type"] for e in relay.get("/api/tasks/%d/events" % task["id"]).json["events"]].count("released") == 1


def test_a_guarded_agent_cannot_claim_a_held_task_through_the_task_route(relay):
    relay.register("boss")
    relay.register("gd", tags=["g"], approvalMode="guarded")
    task = relay.post("/api/tasks", {"from": "boss", "title": "Drop the old table", "target": "tag:g"}).json["task"]
    assert relay.get("/api/messages/%d" % task["messageId"]).json["receipts"][0]["state"] == "held"
    r = relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "gd"})
    assert r.status == 403 and r.code == "not_addressed", r
    assert relay.post("/api/messages/%d/claim" % task["messageId"], {"agentId": "gd"}).status == 403
    r = relay.patch("/api/tasks/%d/status" % task["id"], {"agentId": "gd", "status": "canceled"})
    assert r.status == 403 and r.code == "not_addressed", r
    assert relay.sql("SELECT status, claimed_by FROM tasks") == [{"status": "open", "claimed_by": None}]
    # once a person approves it, the guarded agent may take it
    assert relay.post("/api/messages/%d/approve" % task["messageId"], {"agentId": "gd"}).status == 200
    assert relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "gd"}).status == 200


def test_a_since_beyond_the_newest_message_does_not_skip_later_ones(relay):
    relay.register("c1")
    relay.register("s")
    first = relay.send("s", "c1", "one")
    assert relay.inbox("c1", since=first["id"] + 1000000)["messages"] == []
    later = relay.send("s", "c1", "two")
    got = relay.inbox("c1")["messages"]  # follows the relay's cursor
    assert [m["id"] for m in got] == [first["id"], later["id"]] or [m["id"] for m in got] == [later["id"]]
    assert later["id"] in [m["id"] for m in got]


def test_late_deliveries_respect_the_limit_and_none_is_lost(relay):
    relay.register("boss")
    ids = [relay.send("boss", "tag:q", "job %d" % i, claimable=True)["id"] for i in range(12)]
    relay.register("late", tags=["q"])  # matches the queue after the jobs were sent
    seen = []
    for _ in range(5):
        out = relay.inbox("late", limit=5)
        assert len(out["messages"]) <= 5
        seen += [m["id"] for m in out["messages"]]
        if not out["more"] and not out["messages"]:
            break
    assert sorted(seen) == ids, "each queued job exactly once"


def test_a_persons_card_edit_is_not_the_agents_activity(relay):
    relay.register("idle-one")
    relay.delete("/api/agents/idle-one")
    card = relay.patch("/api/agents/idle-one", {"label": "renamed"}).json
    assert card["label"] == "renamed" and card["status"] == "offline"
    assert wait_for(lambda: relay.get("/api/agents/idle-one").json["status"] == "offline", timeout=1.0)


def test_malformed_framing_uses_the_contracts_error_codes(relay):
    reply = raw_request(relay, b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                               b"Content-Length: abc\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b'"invalid_field"' in reply and b"Content-Length" in reply
    reply = raw_request(relay, b"GET /api/health HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n")
    assert b'"code":"invalid_field"' in reply or b'"code": "invalid_field"' in reply, reply[:300]
    assert relay.sql("SELECT COUNT(*) AS n FROM messages") == [{"n": 0}]


def test_purging_a_guarded_agent_lets_go_of_what_was_held_for_it(relay):
    relay.register("boss")
    relay.register("gd", approvalMode="guarded")
    msg = relay.send("boss", "gd", "Please approve me")
    assert relay.sql("SELECT state FROM receipts WHERE message_id = ?", (msg["id"],)) == [{"state": "held"}]
    assert relay.delete("/api/agents/gd?purge=true").status == 200
    assert relay.sql("SELECT * FROM receipts WHERE message_id = ?", (msg["id"],)) == []
    assert relay.get("/api/messages?held=true").json["messages"] == []


def test_the_approval_mode_and_its_meta_copy_never_disagree(relay):
    relay.register("m1", meta={"approvalMode": "guarded", "team": "infra"})
    assert relay.get("/api/agents/m1").json["approvalMode"] == "guarded"
    card = relay.patch("/api/agents/m1", {"approvalMode": "read-only"}).json
    assert card["approvalMode"] == "read-only" and card["meta"] == {"approvalMode": "read-only", "team": "infra"}


def test_a_guarded_agent_never_sees_an_unapproved_message_that_reaches_it_late(relay):
    relay.register("boss")
    relay.register("gd", approvalMode="guarded")
    work = relay.send("boss", "tag:x", "Take this job", claimable=True)
    chat = relay.send("boss", "tag:x", "FYI for tag x")
    assert relay.patch("/api/agents/gd", {"tags": ["x"]}).status == 200  # now both reach it
    assert relay.inbox("gd")["messages"] == []
    held = {m["id"]: m["heldFor"] for m in relay.get("/api/messages?held=true").json["messages"]}
    assert held == {work["id"]: ["gd"], chat["id"]: ["gd"]}
    assert relay.post("/api/messages/%d/claim" % work["id"], {"agentId": "gd"}).status == 403
    # a person approves one: it arrives exactly once; the other stays held
    assert relay.post("/api/messages/%d/approve" % work["id"], {"agentId": "gd"}).status == 200
    assert [m["id"] for m in relay.inbox("gd")["messages"]] == [work["id"]]
    assert relay.inbox("gd")["messages"] == []
    # an open agent that becomes guarded: what it has not yet received waits for a person too
    relay.register("op", tags=["y"])
    pending = relay.send("boss", "tag:y", "Deploy now?")
    assert relay.patch("/api/agents/op", {"approvalMode": "guarded"}).status == 200
    assert relay.inbox("op")["messages"] == []
    assert relay.get("/api/messages/%d" % pending["id"]).json["receipts"] == [
        {"agentId": "op", "state": "held", "deliveredAt": None, "readAt": None}]
