"""Routing: who receives a message, for every form of `to`.

Five agents with different tags, capabilities, labels and channels exchange
messages to an agent id, tag:X, cap:X, label:X and broadcast; each inbox must
hold exactly the messages addressed to it (compared as full sets of ids), the
send answer's `matched` and `online` must name the same agents, and what the
relay stored must match what was sent.
"""
import pytest

# id -> card fields.  a4 listens only on the "ops" channel.
AGENTS = {
    "a1": {"tags": ["backend", "py"], "capabilities": ["chat", "review"], "label": "alpha"},
    "a2": {"tags": ["frontend"], "capabilities": ["chat"], "label": "beta"},
    "a3": {"tags": ["backend"], "capabilities": ["deploy"], "label": "alpha"},
    "a4": {"tags": ["backend", "ops"], "capabilities": ["chat", "deploy"], "label": "gamma", "channels": ["ops"]},
    "a5": {"tags": ["qa"], "capabilities": ["review"], "label": "beta"},
}

# (name, from, to, channel, the agents it must reach) -- written out by hand, not computed.
SENDS = [
    ("direct", "a1", "a2", None, {"a2"}),
    ("direct to an ops-only agent", "a1", "a4", None, {"a4"}),
    ("direct with a channel to an ops-only agent", "a2", "a4", "dev", {"a4"}),
    ("tag, no channel", "a2", "tag:backend", None, {"a1", "a3"}),
    ("tag, sender has the tag", "a1", "tag:backend", None, {"a3"}),
    ("tag on ops", "a2", "tag:backend", "ops", {"a1", "a3", "a4"}),
    ("tag on another channel", "a2", "tag:backend", "dev", {"a1", "a3"}),
    ("tag nobody has", "a1", "tag:nobody", None, set()),
    ("cap", "a3", "cap:review", None, {"a1", "a5"}),
    ("cap, an ops-only agent has it", "a5", "cap:chat", None, {"a1", "a2"}),
    ("cap on ops", "a5", "cap:deploy", "ops", {"a3", "a4"}),
    ("label", "a1", "label:alpha", None, {"a3"}),
    ("label, other", "a2", "label:beta", None, {"a5"}),
    ("label of the ops-only agent, no channel", "a1", "label:gamma", None, set()),
    ("label of the ops-only agent on ops", "a1", "label:gamma", "ops", {"a4"}),
    ("broadcast", "a1", "broadcast", None, {"a2", "a3", "a5"}),
    ("broadcast on ops", "a2", "broadcast", "ops", {"a1", "a3", "a4", "a5"}),
    ("broadcast on another channel", "a3", "broadcast", "dev", {"a1", "a2", "a5"}),
    ("broadcast from the ops-only agent", "a4", "broadcast", None, {"a1", "a2", "a3", "a5"}),
    ("from the person", "human", "tag:backend", None, {"a1", "a3"}),
    ("from the person, broadcast", "human", "broadcast", None, {"a1", "a2", "a3", "a5"}),
]


def inbox_ids(relay, agent_id):
    got = relay.inbox(agent_id, since=0, limit=500)
    assert got["more"] is False
    ids = [m["id"] for m in got["messages"]]
    assert ids == sorted(ids), "inbox is not oldest first: %r" % ids
    assert len(ids) == len(set(ids)), "inbox repeats a message: %r" % ids
    return set(ids), got["messages"]


def test_every_target_form_reaches_exactly_its_agents(relay):
    for aid, fields in AGENTS.items():
        card = relay.register(aid, **fields)
        assert card["channels"] == fields.get("channels", ["all"])

    expected = {aid: set() for aid in AGENTS}
    sent = {}
    for name, frm, to, channel, reach in SENDS:
        body = {"from": frm, "to": to, "body": "routing: " + name}
        if channel:
            body["channel"] = channel
        r = relay.post("/api/messages", body)
        assert r.status == 201, (name, r)
        msg = r.json["message"]
        assert (msg["from"], msg["to"], msg["channel"]) == (frm, to, channel), name
        assert r.json["matched"] == sorted(reach), name
        assert r.json["online"] == len(reach), name
        sent[msg["id"]] = (name, frm, to, channel)
        for aid in reach:
            expected[aid].add(msg["id"])

    for aid in AGENTS:
        ids, messages = inbox_ids(relay, aid)
        missing = sorted(sent[i][0] for i in expected[aid] - ids)
        extra = sorted(sent[i][0] for i in ids - expected[aid])
        assert ids == expected[aid], "%s: missing %r, unexpected %r" % (aid, missing, extra)
        for m in messages:
            # the sender never gets its own fan-out
            assert not (m["from"] == aid and m["to"] != aid), (aid, m)

    # the ops-only agent: fan-out on ops and direct messages, nothing else
    a4 = {sent[i][0] for i in inbox_ids(relay, "a4")[0]}
    assert a4 == {
        "direct to an ops-only agent",
        "direct with a channel to an ops-only agent",
        "tag on ops",
        "cap on ops",
        "label of the ops-only agent on ops",
        "broadcast on ops",
    }

    # built-in agents never receive fan-out
    for sid in ("human", "system"):
        assert relay.inbox(sid, since=0, limit=500)["messages"] == []

    # what is stored: one row per send, as sent
    rows = relay.sql("SELECT id, from_agent, to_target, channel FROM messages ORDER BY id")
    assert {r["id"]: (r["from_agent"], r["to_target"], r["channel"]) for r in rows} == {
        mid: (frm, to, ch) for mid, (_n, frm, to, ch) in sent.items()
    }
    # the deliveries are recorded per recipient, exactly for the expected messages
    for aid in AGENTS:
        stored = {r["message_id"] for r in relay.sql(
            "SELECT message_id FROM receipts WHERE agent_id = ? AND state = 'delivered'", (aid,))}
        assert stored == expected[aid], aid


def test_matched_and_online_count_an_offline_agent(relay):
    for aid, fields in AGENTS.items():
        relay.register(aid, **fields)

    r = relay.post("/api/messages", {"from": "a3", "to": "cap:review", "body": "before"})
    assert r.status == 201 and r.json["matched"] == ["a1", "a5"] and r.json["online"] == 2, r

    r = relay.delete("/api/agents/a5")
    assert r.status == 200 and r.json["status"] == "offline", r
    assert relay.sql("SELECT status FROM agents WHERE id = 'a5'")[0]["status"] == "offline"

    r = relay.post("/api/messages", {"from": "a3", "to": "cap:review", "body": "after"})
    assert r.status == 201, r
    assert r.json["matched"] == ["a1", "a5"]  # an offline agent still matches: its inbox keeps the message
    assert r.json["online"] == 1
    after_id = r.json["message"]["id"]

    r = relay.post("/api/messages", {"from": "a1", "to": "a5", "body": "direct to offline"})
    assert r.status == 201 and r.json["matched"] == ["a5"] and r.json["online"] == 0, r
    direct_id = r.json["message"]["id"]

    r = relay.post("/api/messages", {"from": "a2", "to": "broadcast", "body": "everyone"})
    assert r.status == 201 and r.json["matched"] == ["a1", "a3", "a5"] and r.json["online"] == 2, r
    bcast_id = r.json["message"]["id"]

    # the offline agent finds them when it comes back (and reading brings it back online)
    ids, _ = inbox_ids(relay, "a5")
    assert {after_id, direct_id, bcast_id} <= ids
    assert relay.get("/api/agents/a5").json["status"] == "online"
    r = relay.post("/api/messages", {"from": "a3", "to": "cap:review", "body": "back"})
    assert r.json["online"] == 2, r


@pytest.mark.parametrize("to", ["tag:backend", "cap:chat", "label:alpha", "broadcast"])
def test_sender_alone_in_its_fanout_gets_nothing(relay, to):
    relay.register("solo", tags=["backend"], capabilities=["chat"], label="alpha")
    relay.register("other", tags=["x"])
    r = relay.post("/api/messages", {"from": "solo", "to": to, "body": "to myself?"})
    assert r.status == 201, r
    expected = ["other"] if to == "broadcast" else []
    assert r.json["matched"] == expected and r.json["online"] == len(expected)
    assert relay.inbox("solo", since=0)["messages"] == []
