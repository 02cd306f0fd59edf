"""Delivery truth for the sender: what a send answers (held, listening), GET /api/messages/:id/wait, and the
receipt events (message.delivered, message.read, message.replied) on the stream and on the sender's narrowed
stream, against the real relay.

A wait is a long-poll: each test starts it in a thread with a long timeout, makes the change, and checks that the
thread ended with the state reached (a join bound far below the wait's own timeout shows that the change, not the
time, ended it). Waits that must not end are checked with a short timeout and `reached: false`.
"""
import json
import os
import sqlite3
import threading

import pytest

from conftest import ROOT, wait_for
from test_stream import Stream


class Wait:
    """GET /api/messages/:id/wait in a thread of its own (the relay fixture's client is per thread)."""

    def __init__(self, relay, message_id, **query):
        self.relay = relay
        self.path = "/api/messages/%d/wait" % message_id
        self.query = query
        self.resp = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.resp = self.relay.get(self.path, query=self.query, timeout=90)

    def result(self, within=20):
        self.thread.join(within)
        assert not self.thread.is_alive(), "the wait did not answer after the change"
        assert self.resp.status == 200, self.resp
        return self.resp.json


def long_polls(relay):
    return relay.get("/api/stats").json["longPolls"]


def waiting(relay, n):
    """Until n long-polls (the waits started) are parked in the relay."""
    assert wait_for(lambda: long_polls(relay) >= n, timeout=10), relay.get("/api/stats").json


def state(relay, message_id, until="delivered", every=False):
    r = relay.get("/api/messages/%d/wait" % message_id, query={"until": until, "timeout": 0, "all": 1 if every else 0})
    assert r.status == 200, r
    return r.json


def receipt(out, agent):
    return {r["agentId"]: r for r in out["receipts"]}.get(agent)


# -- the send answer ---------------------------------------------------------------------


def test_a_send_answers_whom_it_is_held_for_and_how_many_recipients_listen_now(relay):
    relay.register("sender")
    relay.register("polling", tags=["rev"])
    relay.register("streaming", tags=["rev"])
    relay.register("idle", tags=["rev"])
    relay.register("gate", tags=["rev"], approvalMode="guarded")
    stream = Stream(relay, "/api/events?agentId=streaming")
    poll = {}
    t = threading.Thread(target=lambda: poll.update(r=relay.get("/api/agents/polling/inbox?wait=30", timeout=60)), daemon=True)
    t.start()
    try:
        assert wait_for(lambda: relay.get("/api/agents/polling").json["listening"]
                        and relay.get("/api/agents/streaming").json["listening"])
        r = relay.post("/api/messages", {"from": "sender", "to": "tag:rev", "body": "review PR 42", "idempotencyKey": "k1"})
        assert r.status == 201, r
        out = r.json
        assert out["matched"] == ["gate", "idle", "polling", "streaming"]
        assert out["held"] == ["gate"]
        assert out["listening"] == 2 and out["online"] == 4
        t.join(20)
        assert poll["r"].json["messages"][0]["id"] == out["message"]["id"]

        # a repeat of the same send says the same about holds, and counts who listens now
        again = relay.post("/api/messages", {"from": "sender", "to": "tag:rev", "body": "review PR 42", "idempotencyKey": "k1"})
        assert again.status == 200 and again.json["duplicate"] is True
        assert again.json["held"] == ["gate"] and again.json["listening"] == 1  # the long-poll has answered

        # a direct message to a guarded agent: held for it, nobody listening
        direct = relay.post("/api/messages", {"from": "sender", "to": "gate", "body": "hello"}).json
        assert direct["held"] == ["gate"] and direct["listening"] == 0 and direct["matched"] == ["gate"]
        # a person's message is never held
        assert relay.post("/api/messages", {"from": "human", "to": "gate", "body": "hi"}).json["held"] == []
    finally:
        stream.close()


# -- the wait ------------------------------------------------------------------------


def test_a_wait_for_read_answers_when_the_recipient_reads_and_times_out_honestly_when_it_never_does(relay):
    relay.register("writer")
    relay.register("reviewer")
    m = relay.send("writer", "reviewer", "Migration looks clean, tests pass.")

    # nobody reads: the time runs out and the answer says so
    out = relay.get("/api/messages/%d/wait" % m["id"], query={"until": "read", "timeout": 1}).json
    assert out["reached"] is False and out["reachable"] is True
    assert out["message"]["id"] == m["id"] and out["receipts"] == [] and out["replies"] == []

    w = Wait(relay, m["id"], until="read", timeout=60)
    waiting(relay, 1)
    assert [x["id"] for x in relay.inbox("reviewer")["messages"]] == [m["id"]]  # delivered, not read: still waiting
    assert state(relay, m["id"])["reached"] is True and state(relay, m["id"], "read")["reached"] is False
    assert w.thread.is_alive()
    assert relay.post("/api/messages/%d/read" % m["id"], {"agentId": "reviewer"}).status == 200
    out = w.result()
    assert out["reached"] is True
    r = receipt(out, "reviewer")
    assert r["state"] == "read" and r["deliveredAt"] and r["readAt"]
    assert long_polls(relay) == 0

    # the state is stored: after a restart the wait answers at once
    relay.restart()
    assert state(relay, m["id"], "read")["reached"] is True


def test_a_wait_for_delivered_answers_when_the_inbox_hands_the_message_over(relay):
    relay.register("writer")
    relay.register("reviewer")
    m = relay.send("writer", "reviewer", "ping")
    w = Wait(relay, m["id"], timeout=60)  # until defaults to delivered
    waiting(relay, 1)
    relay.inbox("reviewer")
    out = w.result()
    assert out["reached"] is True and receipt(out, "reviewer")["state"] == "delivered"


def test_wait_refuses_bad_input_naming_the_field(relay):
    relay.register("a")
    m = relay.send("a", "a", "note to self")
    for query, field in ((dict(timeout=61), "timeout"), (dict(timeout=-1), "timeout"), (dict(timeout="x"), "timeout"),
                         (dict(until="answered"), "until"), (dict(all="maybe"), "all")):
        r = relay.get("/api/messages/%d/wait" % m["id"], query=query)
        assert r.status == 400 and r.code == "invalid_field" and r.json["error"]["field"] == field, (query, r)
    assert relay.get("/api/messages/999/wait").code == "not_found"
    assert relay.get("/api/messages/abc/wait").status == 404
    assert relay.post("/api/messages/%d/wait" % m["id"], {}).status == 405


def test_all_waits_for_every_recipient_matched_at_send_and_not_held_for(relay):
    relay.register("lead")
    relay.register("b", tags=["rev"])
    relay.register("c", tags=["rev"])
    relay.register("g", tags=["rev"], approvalMode="guarded")
    sent = relay.post("/api/messages", {"from": "lead", "to": "tag:rev", "body": "please look"}).json
    m = sent["message"]
    assert sent["held"] == ["g"]
    relay.register("late", tags=["rev"])  # matches now, was not matched at send: never counted

    w = Wait(relay, m["id"], timeout=60, all=1)
    waiting(relay, 1)
    relay.inbox("b")
    assert state(relay, m["id"])["reached"] is True  # one recipient is enough without all
    assert state(relay, m["id"], every=True)["reached"] is False
    assert w.thread.is_alive()
    relay.inbox("c")
    out = w.result()
    assert out["reached"] is True  # b and c; g is held, so it does not count
    assert receipt(out, "g")["state"] == "held" and receipt(out, "late") is None

    # once a person approves g, g counts too
    assert relay.post("/api/messages/%d/approve" % m["id"], {"agentId": "g"}).status == 200
    assert state(relay, m["id"], every=True)["reached"] is False
    relay.inbox("g")
    assert state(relay, m["id"], every=True)["reached"] is True

    # read by all: each must read
    relay.post("/api/messages/%d/read" % m["id"], {"agentId": "b"})
    relay.post("/api/messages/%d/read" % m["id"], {"agentId": "c"})
    assert state(relay, m["id"], "read", every=True)["reached"] is False
    relay.post("/api/agents/g/read", {"upTo": m["id"]})
    assert state(relay, m["id"], "read", every=True)["reached"] is True

    # who was matched at send time is stored: after a restart, `late` is still not counted
    relay.restart()
    assert state(relay, m["id"], "read", every=True)["reached"] is True
    assert relay.sql("SELECT recipients FROM messages WHERE id = ?", (m["id"],)) == [{"recipients": "b,c,g"}]


def test_the_sender_sees_held_then_rejected_and_a_wait_ends_once_nothing_can_reach_it(relay):
    relay.register("writer")
    relay.register("gate", approvalMode="guarded")
    stream = Stream(relay, "/api/events?agentId=writer")
    try:
        sent = relay.post("/api/messages", {"from": "writer", "to": "gate", "body": "deploy now"}).json
        m = sent["message"]
        assert sent["held"] == ["gate"]
        assert receipt(state(relay, m["id"]), "gate")["state"] == "held"
        w = Wait(relay, m["id"], timeout=60)
        waiting(relay, 1)
        assert relay.post("/api/messages/%d/reject" % m["id"], {"agentId": "gate"}).status == 200
        out = w.result()
        assert out["reached"] is False and out["reachable"] is False
        assert receipt(out, "gate")["state"] == "rejected"
        got = stream.until_event("message.rejected")
        kinds = [e["event"] for e in got]
        assert kinds.index("message.held") < kinds.index("message.rejected")
    finally:
        stream.close()
    # the guarded recipient never got it, by any route
    assert relay.inbox("gate")["messages"] == []


def test_a_wait_for_a_reply_answers_with_the_reply_and_a_reply_held_for_the_sender_counts_once_approved(relay):
    relay.register("asker", approvalMode="guarded")
    relay.register("helper")
    q = relay.send("asker", "helper", "what is the build number?")
    w = Wait(relay, q["id"], until="replied", timeout=60)
    waiting(relay, 1)
    relay.send("asker", "helper", "a follow-up of mine", replyTo=q["id"])  # the sender's own reply does not count
    assert state(relay, q["id"], "replied")["reached"] is False
    reply = relay.post("/api/messages", {"from": "helper", "to": "asker", "body": "7731", "replyTo": q["id"]}).json
    assert reply["held"] == ["asker"]  # asker is guarded: the reply waits for a person
    assert state(relay, q["id"], "replied")["reached"] is False
    assert [m["body"] for m in state(relay, q["id"], "replied")["replies"]] == ["a follow-up of mine"]
    assert w.thread.is_alive()
    assert relay.post("/api/messages/%d/approve" % reply["message"]["id"], {}).status == 200
    out = w.result()
    assert out["reached"] is True
    assert [m["body"] for m in out["replies"]] == ["a follow-up of mine", "7731"]


# -- the events --------------------------------------------------------------------------


def test_receipt_changes_reach_the_senders_narrowed_stream_and_no_other_agents(relay):
    relay.register("writer")
    relay.register("reviewer")
    relay.register("bystander")
    relay.register("gate", approvalMode="guarded")
    mine = Stream(relay, "/api/events?agentId=writer")
    other = Stream(relay, "/api/events?agentId=bystander")
    try:
        m = relay.send("writer", "reviewer", "Migration looks clean, tests pass.")
        relay.inbox("reviewer")
        relay.post("/api/messages/%d/read" % m["id"], {"agentId": "reviewer"})
        reply = relay.send("reviewer", "writer", "Approved.", replyTo=m["id"])
        got = mine.until_event("message.replied")
        by = {e["event"]: e["data"] for e in got}
        assert by["message.delivered"]["messageId"] == m["id"] and by["message.delivered"]["agentId"] == "reviewer"
        assert by["message.read"] == {"messageId": m["id"], "agentId": "reviewer"}
        assert by["message.replied"] == {"messageId": m["id"], "agentId": "reviewer", "replyId": reply["id"]}
        kinds = [e["event"] for e in got]
        assert kinds.index("message.delivered") < kinds.index("message.read") < kinds.index("message.replied")

        # a held message: the sender hears that it was delivered once approved; the text reaches nobody else
        held = relay.send("writer", "gate", "SECRET-PLAN-7")
        relay.post("/api/messages/%d/approve" % held["id"], {})
        relay.inbox("gate")
        mine.until_event("message.delivered", lambda d: d["messageId"] == held["id"] and d["agentId"] == "gate")
        relay.patch("/api/agents/bystander", {"label": "fence"})  # an event of its own: everything before it was sent
        other.until_event("agent.updated", lambda d: d["agent"]["label"] == "fence")
    finally:
        mine.close()
        other.close()
    seen_by_other = [(b.get("event"), b.get("data")) for b in other.blocks if "event" in b]
    assert not [e for e, d in seen_by_other if e.startswith("message.")], seen_by_other
    assert "SECRET-PLAN-7" not in repr(seen_by_other)


def test_one_delivered_event_per_message_stored_with_the_receipt_and_none_for_a_second_look(relay):
    relay.register("writer")
    relay.register("reader")
    ids = [relay.send("writer", "reader", "m%d" % i)["id"] for i in range(5)]
    assert [m["id"] for m in relay.inbox("reader")["messages"]] == ids

    def delivered_events():
        return relay.sql("SELECT data FROM events WHERE type = 'message.delivered' ORDER BY id")

    rows = delivered_events()
    assert len(rows) == 5
    receipts = relay.sql("SELECT message_id, delivered_at FROM receipts WHERE agent_id = 'reader' ORDER BY message_id")
    assert [r["message_id"] for r in receipts] == ids
    for row, rec in zip(rows, receipts):
        d = json.loads(row["data"])
        assert d["messageId"] == rec["message_id"] and d["deliveredAt"] == rec["delivered_at"]
    relay.inbox("reader", since=0)  # handed over again: no receipt changes, no event
    assert len(delivered_events()) == 5
    relay.restart(kill=True)
    assert len(delivered_events()) == 5 and state(relay, ids[-1])["reached"] is True


def test_a_read_up_to_an_id_is_one_read_event_per_message_to_each_sender(relay):
    relay.register("a")
    relay.register("b")
    relay.register("reader")
    m1 = relay.send("a", "reader", "one")
    m2 = relay.send("b", "reader", "two")
    s = Stream(relay, "/api/events?agentId=b")
    try:
        w = Wait(relay, m1["id"], until="read", timeout=60)
        waiting(relay, 1)
        assert relay.post("/api/agents/reader/read", {"upTo": m2["id"]}).json == {"count": 2}
        assert w.result()["reached"] is True
        got = s.until_event("message.read")
        assert got[-1]["data"] == {"messageId": m2["id"], "agentId": "reader"}
    finally:
        s.close()
    assert not [b for b in s.blocks if b.get("data", {}).get("messageId") == m1["id"]]  # a's message is not b's business


def test_a_narrowed_stream_records_delivery_of_what_it_hands_over(relay):
    relay.register("writer")
    relay.register("listener")
    s = Stream(relay, "/api/events?agentId=listener")
    try:
        assert wait_for(lambda: relay.get("/api/agents/listener").json["listening"])
        m = relay.send("writer", "listener", "over the stream")
        s.until_event("message.created", lambda d: d["message"]["id"] == m["id"])
        got = s.until_event("message.delivered", lambda d: d["messageId"] == m["id"])
        assert got[-1]["data"]["agentId"] == "listener"
    finally:
        s.close()
    out = state(relay, m["id"])
    assert out["reached"] is True and receipt(out, "listener")["state"] == "delivered"
    # the kept inbox cursor did not move: the inbox still hands it over once, and no second event is written
    assert [x["id"] for x in relay.inbox("listener")["messages"]] == [m["id"]]
    assert len(relay.sql("SELECT id FROM events WHERE type = 'message.delivered'")) == 1
    # a stream that does not carry message.created records nothing
    assert wait_for(lambda: not relay.get("/api/agents/listener").json["listening"])
    m2 = relay.send("writer", "listener", "not over the stream")
    s2 = Stream(relay, "/api/events?agentId=listener&types=agent.updated&since=0")
    try:
        relay.patch("/api/agents/listener", {"label": "x"})
        s2.until_event("agent.updated")
    finally:
        s2.close()
    assert state(relay, m2["id"])["reached"] is False


@pytest.mark.parametrize("until", ["delivered", "read", "replied"])
def test_a_wait_on_a_fanout_that_matched_nobody_answers_at_once(relay, until):
    relay.register("lonely")
    m = relay.send("lonely", "tag:nobody", "anyone?")
    out = relay.get("/api/messages/%d/wait" % m["id"], query={"until": until, "timeout": 60}, timeout=30).json
    assert out["reached"] is False and out["reachable"] is False


def test_messages_stored_before_the_relay_kept_recipients_can_be_waited_on(relay_factory):
    """A database the relay wrote before it kept who a fan-out reached (tests/fixtures/main-schema3.sql): a direct
    message's recipient is its `to`; a fan-out's are the agents it matches now."""
    relay = relay_factory(env={"RETENTION_DAYS": "0"}, start=False)
    con = sqlite3.connect(relay.db_path)
    with open(os.path.join(ROOT, "tests", "fixtures", "main-schema3.sql"), encoding="utf-8") as f:
        con.executescript(f.read())
    con.close()
    relay.start()
    out = state(relay, 1, "read")  # backend-agent -> reviewer, read before the upgrade
    assert out["reached"] is True and receipt(out, "reviewer")["state"] == "read"
    assert state(relay, 1, "replied")["reached"] is True  # reviewer answered it
    # to tag:review: reviewer and gate match it now; reviewer fetched it before the upgrade, and it is held for gate
    fanout = state(relay, 3, every=True)
    assert fanout["reached"] is True and receipt(fanout, "gate")["state"] == "held"
    assert relay.post("/api/messages/3/approve", {"agentId": "gate"}).status == 200
    assert state(relay, 3, every=True)["reached"] is False  # gate counts once approved
    relay.inbox("gate")
    assert state(relay, 3, every=True)["reached"] is True
    held = state(relay, 4)  # to the guarded gate, held since before the upgrade
    assert held["reached"] is False and receipt(held, "gate")["state"] == "held"
