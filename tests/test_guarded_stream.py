"""What a guarded agent's own stream (`/api/events?agentId=X`) carries: nothing that is held from it.

The contract: a message from another agent, or work that enters from outside (an integration event's task and its
message), is held for a guarded recipient until a person approves it, and nothing held reaches the agent by any
route: not its inbox, not its narrowed stream, not a task route. Every event that carries a held message's or
task's text is checked here: `message.created`, `message.claimed`, `message.released`, `message.rejected`,
`task.created` and `task.updated` (claims, releases, progress, occurrences). The stream is read up to a fence (a
person's message to the agent, which is never held), and nothing before the fence may contain the held text.
Once a person approves, the agent gets the message on its stream, and the task's later changes too.
"""
import json

from conftest import wait_for
from test_stream import Stream

SECRET_TITLE = "Rotate the root keys"
SECRET_BODY = "the old keys are in vault/prod/root"


def until_fence(relay, stream, agent_id, name):
    """Sends a person's message to the agent (never held) and returns the events its stream sent before it."""
    fence = relay.send("human", agent_id, name)
    got = stream.until_event("message.created", lambda d: d["message"]["id"] == fence["id"], timeout=15)
    return got[:-1]


def leaks(events, *texts):
    """The events whose data contains any of the texts."""
    return [(e["id"], e["event"]) for e in events if any(t in json.dumps(e["data"]) for t in texts)]


def inbox_ids(relay, agent_id):
    return [m["id"] for m in relay.inbox(agent_id, since=0)["messages"]]


def test_a_task_held_for_a_guarded_agent_stays_off_its_stream_through_claims_releases_and_changes(relay):
    relay.register("boss")
    relay.register("g", approvalMode="guarded", tags=["x"])
    relay.register("w", tags=["x"])
    s = Stream(relay, "/api/events?agentId=g")
    w = Stream(relay, "/api/events?agentId=w")
    try:
        assert s.status == 200 and w.status == 200
        r = relay.post("/api/tasks", {"from": "boss", "target": "tag:x", "title": SECRET_TITLE, "body": SECRET_BODY,
                                      "dedupeKey": "keys"})
        assert r.status == 201, r
        task = r.json["task"]
        mid = task["messageId"]
        assert relay.get("/api/messages/%d" % mid).json["receipts"][0] == {
            "agentId": "g", "state": "held", "deliveredAt": None, "readAt": None}
        # another agent works on it: claims and releases through both routes, progress, and a repeat of the alert
        assert relay.post("/api/messages/%d/claim" % mid, {"agentId": "w"}).status == 200
        assert relay.post("/api/messages/%d/release" % mid, {"agentId": "w"}).status == 200
        assert relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "w"}).status == 200
        assert relay.patch("/api/tasks/%d/status" % task["id"], {"agentId": "w", "progress": "half way"}).status == 200
        assert relay.patch("/api/tasks/%d/status" % task["id"], {"agentId": "w", "status": "open"}).status == 200
        again = relay.post("/api/tasks", {"from": "boss", "target": "tag:x", "title": SECRET_TITLE, "dedupeKey": "keys"})
        assert again.status == 200 and again.json["task"]["occurrenceCount"] == 2
        # a plain claimable message and a direct one that a person rejects
        job = relay.send("boss", "tag:x", SECRET_BODY + " (job)", claimable=True)
        assert relay.post("/api/messages/%d/claim" % job["id"], {"agentId": "w"}).status == 200
        assert relay.post("/api/messages/%d/release" % job["id"], {"agentId": "w"}).status == 200
        refused = relay.send("boss", "g", SECRET_BODY + " (refused)")
        assert relay.post("/api/messages/%d/reject" % refused["id"], {"agentId": "g"}).status == 200

        leaked = leaks(until_fence(relay, s, "g", "fence one"), SECRET_TITLE, SECRET_BODY)
        assert not leaked, "held text on g's stream: %r" % leaked
        # the open agent saw all of it: the held text is kept from g only
        seen_by_w = w.until_event("message.released", lambda d: d["message"]["id"] == job["id"], timeout=15)
        kinds = {e["event"] for e in seen_by_w if leaks([e], SECRET_TITLE, SECRET_BODY)}
        assert kinds == {"message.created", "message.claimed", "message.released", "task.created", "task.updated"}, kinds
        # nor do its inbox or the task routes give it away
        fence_id = relay.inbox("g", since=0)["messages"][-1]["id"]
        assert inbox_ids(relay, "g") == [fence_id]
        r = relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "g"})
        assert r.status == 403 and r.code == "not_addressed", r

        # a person approves it for g: g gets it on its stream, and the task's later changes too
        assert relay.post("/api/messages/%d/approve" % mid, {"agentId": "g"}).status == 200
        got = s.until_event("message.approved", lambda d: d["message"]["id"] == mid, timeout=15)
        assert got[-1]["data"]["message"]["subject"] == SECRET_TITLE and got[-1]["data"]["message"]["body"] == SECRET_BODY
        assert relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "g"}).status == 200
        got = s.until_event("task.updated", lambda d: d["task"]["id"] == task["id"], timeout=15)
        assert got[-1]["data"]["task"]["title"] == SECRET_TITLE and got[-1]["data"]["task"]["claimedBy"] == "g"
        assert inbox_ids(relay, "g") == [mid, fence_id]
        # what was rejected and the job still held stay off it
        leaked = leaks(until_fence(relay, s, "g", "fence two"), "(job)", "(refused)")
        assert not leaked, "held or rejected text on g's stream: %r" % leaked
    finally:
        s.close()
        w.close()


def test_work_from_an_integration_is_held_for_a_guarded_agent(relay_factory):
    integ = {"name": "pager", "token": "pager-token-123", "scopes": ["tasks:create"], "targets": ["tag:x"]}
    relay = relay_factory(env={"AGENT_RELAY_INTEGRATIONS": json.dumps([integ])})
    pager = {"Authorization": "Bearer pager-token-123"}
    relay.register("g", approvalMode="guarded", tags=["x"])
    relay.register("w", tags=["x"])
    s = Stream(relay, "/api/events?agentId=g")
    try:
        assert s.status == 200
        r = relay.post("/api/integrations/events", {"dedupeKey": "disk", "title": SECRET_TITLE, "body": SECRET_BODY},
                       headers=pager)
        assert r.status == 201, r
        task = r.json["task"]
        mid = task["messageId"]
        states = {x["agentId"]: x["state"] for x in relay.get("/api/messages/%d" % mid).json["receipts"]}
        assert states == {"g": "held"}, states
        assert inbox_ids(relay, "g") == []
        assert inbox_ids(relay, "w") == [mid]  # an open agent gets it as before
        r = relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "g"})
        assert r.status == 403 and r.code == "not_addressed", r
        assert relay.post("/api/messages/%d/claim" % mid, {"agentId": "g"}).status == 403
        r = relay.post("/api/integrations/events", {"dedupeKey": "disk", "title": SECRET_TITLE}, headers=pager)
        assert r.status == 200 and r.json["task"]["occurrenceCount"] == 2
        leaked = leaks(until_fence(relay, s, "g", "fence one"), SECRET_TITLE, SECRET_BODY)
        assert not leaked, "held text on g's stream: %r" % leaked

        # a guarded agent that the work reaches late (it registers while the work is open) waits for a person too
        relay.register("late", approvalMode="guarded", tags=["x"])
        assert inbox_ids(relay, "late") == []
        assert relay.sql("SELECT state FROM receipts WHERE message_id = ? AND agent_id = 'late'", (mid,)) == [{"state": "held"}]

        # a person's own task is not held (as a person's message is not)
        mine = relay.post("/api/tasks", {"target": "tag:x", "title": "a person's task"}).json["task"]
        assert mine["messageId"] in inbox_ids(relay, "g")

        assert relay.post("/api/messages/%d/approve" % mid, {"agentId": "g"}).status == 200
        got = s.until_event("message.approved", lambda d: d["message"]["id"] == mid, timeout=15)
        assert got[-1]["data"]["message"]["body"] == SECRET_BODY
        assert mid in inbox_ids(relay, "g")
        assert relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "g"}).status == 200
        assert wait_for(lambda: relay.get("/api/tasks/%d" % task["id"]).json["task"]["claimedBy"] == "g")
        assert mid not in inbox_ids(relay, "late")  # approved for g only
    finally:
        s.close()
