"""The inbox: long-polls that answer the moment a message arrives, and the
relay-kept cursor that hands every message to a client exactly once.

A client that only follows the cursor (inbox without `since`, over and over)
must see every message once, including those that become deliverable after its
cursor passed them: a held message approved by a person, claimable work given
back to the pool.
"""
import threading
import time


def wait_until(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError("timed out waiting for " + what)


def listening(relay, agent_id):
    return relay.get("/api/agents/" + agent_id).json["listening"]


class Poll(threading.Thread):
    """One long-poll on its own connection; records when the answer arrived."""

    def __init__(self, relay, agent_id, **query):
        threading.Thread.__init__(self, daemon=True)
        self.relay, self.agent_id, self.query = relay, agent_id, query
        self.result = self.done_at = self.started_at = None

    def run(self):
        self.started_at = time.monotonic()
        self.result = self.relay.inbox(self.agent_id, **self.query)
        self.done_at = time.monotonic()

    def begin(self):
        self.start()
        wait_until(lambda: listening(self.relay, self.agent_id), what="the long-poll of " + self.agent_id)
        return self


def ids(answer):
    return [m["id"] for m in answer["messages"]]


def stored_cursor(relay, agent_id):
    return relay.sql("SELECT cursor FROM agents WHERE id = ?", (agent_id,))[0]["cursor"]


# -- long-poll ------------------------------------------------------------------


def test_long_poll_answers_within_half_a_second_of_a_matching_send(relay):
    relay.register("waiter", tags=["ops"])
    relay.register("sender")
    since = relay.get("/api/cursor").json["cursor"]
    for to in ("waiter", "tag:ops", "broadcast"):
        poll = Poll(relay, "waiter", since=since, wait=5).begin()
        sent_at = time.monotonic()
        msg = relay.send("sender", to, "wake up (%s)" % to)
        poll.join(6)
        assert poll.result is not None, "the long-poll never answered"
        assert ids(poll.result) == [msg["id"]]
        assert poll.result["cursor"] == msg["id"]
        elapsed = poll.done_at - sent_at
        assert elapsed < 0.5, "long-poll answered %.3f s after the send to %s" % (elapsed, to)
        since = msg["id"]
    # what was handed over is recorded as delivered
    rows = relay.sql("SELECT message_id, state FROM receipts WHERE agent_id = 'waiter' ORDER BY message_id")
    assert [(r["message_id"], r["state"]) for r in rows] == [(i, "delivered") for i in range(1, 4)]


def test_long_poll_without_since_is_woken_too(relay):
    relay.register("waiter")
    relay.register("sender")
    relay.inbox("waiter")  # sets the relay-kept cursor
    poll = Poll(relay, "waiter", wait=5).begin()
    sent_at = time.monotonic()
    msg = relay.send("sender", "waiter", "hi")
    poll.join(6)
    assert ids(poll.result) == [msg["id"]]
    assert poll.done_at - sent_at < 0.5


def test_a_send_that_does_not_concern_the_waiter_does_not_wake_it(relay):
    relay.register("waiter", tags=["ops"], channels=["ops"])
    relay.register("bystander", tags=["dev"])
    relay.register("sender")
    since = relay.get("/api/cursor").json["cursor"]
    poll = Poll(relay, "waiter", since=since, wait=2).begin()
    relay.send("sender", "bystander", "direct to someone else")
    relay.send("sender", "tag:dev", "a tag it lacks")
    relay.send("sender", "broadcast", "fan-out off its channel", channel="dev")
    relay.send("sender", "tag:ops", "its tag, but no channel")
    poll.join(5)
    assert poll.result == {"messages": [], "cursor": since, "more": False}
    waited = poll.done_at - poll.started_at
    assert 1.8 <= waited < 4.0, "returned after %.2f s; expected about the 2 s it asked for" % waited
    assert stored_cursor(relay, "waiter") == since


def test_an_empty_long_poll_returns_after_wait_with_the_given_cursor(relay):
    relay.register("quiet")
    relay.register("sender")
    for _ in range(3):
        relay.send("sender", "quiet", "old")
    since = relay.get("/api/cursor").json["cursor"]
    assert since == 3
    started = time.monotonic()
    r = relay.get("/api/agents/quiet/inbox?since=%d&wait=1" % since)
    waited = time.monotonic() - started
    assert r.status == 200, r
    assert r.json["messages"] == [] and r.json["cursor"] == since
    assert 0.9 <= waited < 3.0, "wait=1 returned after %.2f s" % waited
    # and a since beyond every message is returned as it was
    r = relay.get("/api/agents/quiet/inbox?since=1000&wait=1")
    assert r.status == 200 and r.json["messages"] == [] and r.json["cursor"] == 1000, r


# -- the cursor ---------------------------------------------------------------------


def test_without_since_the_relay_resumes_from_the_cursor_it_handed_out(relay):
    relay.register("reader")
    relay.register("sender")
    sent, seen = [], []
    assert relay.inbox("reader") == {"messages": [], "cursor": 0, "more": False}
    for batch in (3, 1, 0, 4, 2):
        sent += [relay.send("sender", "reader", "round %d" % i)["id"] for i in range(batch)]
        got = relay.inbox("reader")
        seen += ids(got)
        assert seen == sent, "repeat or skip after a round of %d" % batch
        assert got["cursor"] == (sent[-1] if sent else 0)
        assert stored_cursor(relay, "reader") == got["cursor"]
    # noise for others does not move it, nor show up
    relay.register("other")
    relay.send("sender", "other", "not yours")
    got = relay.inbox("reader")
    assert got["messages"] == [] and got["cursor"] == sent[-1]
    # an explicit since does not lose the relay's place
    assert ids(relay.inbox("reader", since=0)) == sent
    last = relay.send("sender", "reader", "after an explicit since")["id"]
    assert ids(relay.inbox("reader")) == [last]


def test_get_cursor_is_the_newest_message_id(relay):
    assert relay.get("/api/cursor").json == {"cursor": 0}
    relay.register("a")
    relay.register("b")
    for i in range(4):
        m = relay.send("a", "b", "m%d" % i)
        r = relay.get("/api/cursor")
        assert r.status == 200 and r.json == {"cursor": m["id"]}, r
    assert r.json["cursor"] == relay.sql("SELECT MAX(id) AS n FROM messages")[0]["n"]
    # a client that skips history with it sees only what comes next
    skip = r.json["cursor"]
    m = relay.send("a", "b", "new")
    assert ids(relay.inbox("b", since=skip)) == [m["id"]]


def test_limit_and_more(relay):
    relay.register("reader")
    relay.register("sender")
    sent = [relay.send("sender", "reader", "m%d" % i)["id"] for i in range(5)]
    pages, since = [], 0
    while True:
        got = relay.inbox("reader", since=since, limit=2)
        pages.append((ids(got), got["more"]))
        since = got["cursor"]
        if not got["more"]:
            break
    assert pages == [(sent[0:2], True), (sent[2:4], True), ([sent[4]], False)]
    assert ids(relay.inbox("reader", since=0, limit=5)) == sent
    assert relay.inbox("reader", since=0, limit=5)["more"] is False
    # following the relay's cursor with a limit also walks through everything once
    relay.register("follower")
    sent2 = [relay.send("sender", "follower", "n%d" % i)["id"] for i in range(5)]
    walked = []
    for _ in range(4):
        got = relay.inbox("follower", limit=2)
        walked += ids(got)
    assert walked == sent2 and got["more"] is False


def test_unread_and_the_read_flag(relay):
    relay.register("reader")
    relay.register("sender")
    m = [relay.send("sender", "reader", "m%d" % i)["id"] for i in range(4)]
    r = relay.post("/api/messages/%d/read" % m[1], {"agentId": "reader"})
    assert r.status == 200, r
    got = relay.inbox("reader", since=0)
    assert {x["id"]: x["read"] for x in got["messages"]} == {m[0]: False, m[1]: True, m[2]: False, m[3]: False}
    assert ids(relay.inbox("reader", since=0, unread="true")) == [m[0], m[2], m[3]]
    r = relay.post("/api/agents/reader/read", {"upTo": m[2]})
    assert r.status == 200 and r.json["count"] == 2, r
    assert ids(relay.inbox("reader", since=0, unread="true")) == [m[3]]
    states = {r["message_id"]: r["state"] for r in relay.sql("SELECT * FROM receipts WHERE agent_id = 'reader'")}
    assert states == {m[0]: "read", m[1]: "read", m[2]: "read", m[3]: "delivered"}


def test_messages_from_before_registration_are_not_delivered_except_open_work(relay):
    relay.register("sender")
    relay.register("early", tags=["workers"])
    old_chat = relay.send("sender", "tag:workers", "chat from before")
    old_direct = relay.send("sender", "broadcast", "broadcast from before")
    open_work = relay.send("sender", "tag:workers", "work nobody took", claimable=True)
    taken = relay.send("sender", "tag:workers", "work already taken", claimable=True)
    r = relay.post("/api/messages/%d/claim" % taken["id"], {"agentId": "early"})
    assert r.status == 200, r
    relay.register("late", tags=["workers"])
    relay.register("late2", tags=["workers"])
    # following the relay's cursor: only the open work, once
    assert ids(relay.inbox("late")) == [open_work["id"]]
    assert ids(relay.inbox("late")) == []
    # reading from the start: the same
    assert ids(relay.inbox("late2", since=0)) == [open_work["id"]]
    new = relay.send("sender", "tag:workers", "after")
    assert ids(relay.inbox("late")) == [new["id"]]
    assert ids(relay.inbox("late", since=0)) == [open_work["id"], new["id"]]
    # the late agent may claim the open work, and not the rest
    assert relay.post("/api/messages/%d/claim" % open_work["id"], {"agentId": "late"}).status == 200
    assert old_chat["id"] not in ids(relay.inbox("late", since=0))
    assert old_direct["id"] not in ids(relay.inbox("late", since=0))
    stored = {r["message_id"] for r in relay.sql("SELECT message_id FROM receipts WHERE agent_id = 'late'")}
    assert stored == {open_work["id"], new["id"]}


# -- late deliveries to a client that follows the cursor ---------------------------------


def follow(relay, agent_id):
    return ids(relay.inbox(agent_id))


def receipt_state(relay, message_id, agent_id):
    r = relay.get("/api/messages/%d" % message_id)
    assert r.status == 200, r
    states = {x["agentId"]: x["state"] for x in r.json["receipts"]}
    return states.get(agent_id)


def test_an_approved_held_message_reaches_the_cursor_follower_once(relay):
    relay.register("guarded", approvalMode="guarded")
    relay.register("asker")
    assert follow(relay, "guarded") == []
    held = relay.send("asker", "guarded", "may I?")
    assert receipt_state(relay, held["id"], "guarded") == "held"
    later = relay.send("human", "guarded", "a person's message is not held")
    # the cursor moves past the held message
    assert follow(relay, "guarded") == [later["id"]]
    assert stored_cursor(relay, "guarded") == later["id"]
    r = relay.post("/api/messages/%d/approve" % held["id"], {})
    assert r.status == 200, r
    assert receipt_state(relay, held["id"], "guarded") == "approved"
    assert follow(relay, "guarded") == [held["id"]]
    assert follow(relay, "guarded") == []
    assert receipt_state(relay, held["id"], "guarded") == "delivered"
    nxt = relay.send("human", "guarded", "next")
    assert follow(relay, "guarded") == [nxt["id"]]


def test_an_approval_wakes_a_long_poll(relay):
    relay.register("guarded", approvalMode="guarded")
    relay.register("asker")
    relay.inbox("guarded")
    held = relay.send("asker", "guarded", "may I?")
    poll = Poll(relay, "guarded", wait=5).begin()
    sent_at = time.monotonic()
    assert relay.post("/api/messages/%d/approve" % held["id"], {"agentId": "guarded"}).status == 200
    poll.join(6)
    assert ids(poll.result) == [held["id"]]
    assert poll.done_at - sent_at < 0.5


def test_a_rejected_message_never_reaches_the_cursor_follower(relay):
    relay.register("guarded", approvalMode="guarded")
    relay.register("asker")
    relay.inbox("guarded")
    held = relay.send("asker", "guarded", "let me in")
    after = relay.send("human", "guarded", "hello")
    assert follow(relay, "guarded") == [after["id"]]
    r = relay.post("/api/messages/%d/reject" % held["id"], {"agentId": "guarded"})
    assert r.status == 200, r
    assert receipt_state(relay, held["id"], "guarded") == "rejected"
    assert follow(relay, "guarded") == []
    nxt = relay.send("human", "guarded", "next")
    assert follow(relay, "guarded") == [nxt["id"]]
    assert held["id"] not in ids(relay.inbox("guarded", since=0))
    assert relay.sql("SELECT state FROM receipts WHERE message_id = ? AND agent_id = 'guarded'", (held["id"],)) == [
        {"state": "rejected"}
    ]


def test_released_work_reaches_the_cursor_follower_once(relay):
    relay.register("boss")
    relay.register("w1", tags=["pool"])
    relay.register("w2", tags=["pool"])
    for w in ("w1", "w2"):
        follow(relay, w)
    work = relay.send("boss", "tag:pool", "fix the build", claimable=True)
    assert follow(relay, "w1") == [work["id"]]
    assert follow(relay, "w2") == [work["id"]]
    assert relay.post("/api/messages/%d/claim" % work["id"], {"agentId": "w1"}).status == 200
    # w3 comes after the claim: claimed work is not its to see
    relay.register("w3", tags=["pool"])
    assert follow(relay, "w3") == []
    filler = relay.send("boss", "tag:pool", "chatter")
    assert follow(relay, "w2") == [filler["id"]]
    assert follow(relay, "w3") == [filler["id"]]
    r = relay.post("/api/messages/%d/release" % work["id"], {"agentId": "w1"})
    assert r.status == 200 and r.json["message"]["claimedBy"] is None, r
    # back in the pool: each other agent it reaches gets it once more, though their cursors passed it
    assert follow(relay, "w3") == [work["id"]]
    assert follow(relay, "w3") == []
    assert follow(relay, "w2") == [work["id"]]
    assert follow(relay, "w2") == []
    assert relay.sql("SELECT COUNT(*) AS n FROM redeliveries WHERE agent_id IN ('w2', 'w3')")[0]["n"] == 0
    r = relay.post("/api/messages/%d/claim" % work["id"], {"agentId": "w3"})
    assert r.status == 200 and r.json["message"]["claimedBy"] == "w3", r
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (work["id"],))[0]["claimed_by"] == "w3"
