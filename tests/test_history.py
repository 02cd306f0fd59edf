"""History filtered by agent: GET /api/messages?agent=X is what X sent and what X may see, newest first.

What X may see is what reaches it (addressed to its id, a tag, capability or label it has, or broadcast; a fan-out
within its channels; never its own fan-out) and is neither held for it nor rejected for it. The answer is
checked against the rule applied to the whole stored history, page by page, with every other filter.
"""
import random

import pytest


def may_see(agent, m, hidden):
    """The contract's rule, for a message `m` of the stored history; `hidden` is what is held or rejected for agent."""
    if m["id"] in hidden:
        return False
    if m["from"] == agent["id"]:
        return True
    to = m["to"]
    targets = {agent["id"], "broadcast"} | {"tag:" + t for t in agent["tags"]} | {"cap:" + c for c in agent["capabilities"]}
    if agent.get("label"):
        targets.add("label:" + agent["label"])
    if to not in targets:
        return False
    if to == agent["id"]:
        return True
    return "all" in agent["channels"] or m.get("channel") in agent["channels"]


def pages(relay, query, limit):
    """Every page of the filtered history, following `before`; checks `more` on the way."""
    out, before = [], None
    while True:
        q = dict(query, limit=limit)
        if before is not None:
            q["before"] = before
        r = relay.get("/api/messages", query=q)
        assert r.status == 200, r
        got = r.json["messages"]
        assert len(got) <= limit
        out += got
        if not r.json["more"]:
            return out
        assert len(got) == limit
        before = got[-1]["id"]


@pytest.fixture
def crowd(relay):
    """Agents with tags, capabilities, labels and channels, a guarded one, and a few hundred messages between them."""
    agents = [
        {"id": "ana", "tags": ["web"], "capabilities": ["py"], "label": "lead", "channels": ["all"]},
        {"id": "bo", "tags": ["web", "db"], "capabilities": [], "label": None, "channels": ["all"]},
        {"id": "cy", "tags": [], "capabilities": ["py"], "label": None, "channels": ["ops"]},
        {"id": "gd", "tags": ["db"], "capabilities": [], "label": None, "channels": ["all"], "approvalMode": "guarded"},
        {"id": "eve", "tags": [], "capabilities": [], "label": None, "channels": ["all"]},
    ]
    for a in agents:
        fields = {k: v for k, v in a.items() if k != "id" and v is not None}
        relay.register(a["id"], **fields)
    rnd = random.Random(7)
    targets = [a["id"] for a in agents] + ["broadcast", "tag:web", "tag:db", "cap:py", "label:lead"]
    for i in range(300):
        frm = rnd.choice([a["id"] for a in agents] + ["human"])
        to = rnd.choice(targets)
        if to == frm:
            continue
        fields = {}
        if rnd.random() < 0.3:
            fields["channel"] = rnd.choice(["ops", "dev"])
        relay.send(frm, to, "message %d about %s" % (i, rnd.choice(["deploys", "tests", "docs"])), **fields)
    held = [m for m in relay.get("/api/messages?held=true&limit=500").json["messages"]]
    assert held, "the guarded agent should have messages held for it"
    # a person decides on some: one approved, one rejected, the rest stay held
    assert relay.post("/api/messages/%d/approve" % held[0]["id"], {"agentId": "gd"}).status == 200
    assert relay.post("/api/messages/%d/reject" % held[1]["id"], {"agentId": "gd"}).status == 200
    return relay, agents


def stored(relay):
    return pages(relay, {}, 500)


def hidden_for(relay, agent_id):
    return {r["message_id"] for r in relay.sql(
        "SELECT message_id FROM receipts WHERE agent_id = ? AND state IN ('held', 'rejected')", (agent_id,))}


def test_history_by_agent_is_what_it_sent_and_may_see_never_what_is_held_for_it(crowd):
    relay, agents = crowd
    everything = stored(relay)
    assert len(everything) > 250
    for agent in agents:
        hidden = hidden_for(relay, agent["id"])
        want = [m["id"] for m in everything if may_see(agent, m, hidden)]
        got = [m["id"] for m in pages(relay, {"agent": agent["id"]}, 7)]
        assert got == want, agent["id"]
        if agent["id"] == "gd":
            assert hidden and not hidden & set(got)  # held and rejected stay out; the approved one is in
            approved = [r["message_id"] for r in relay.sql("SELECT message_id FROM receipts WHERE agent_id = 'gd' "
                                                            "AND state = 'approved'")]
            assert approved and set(approved) <= set(got)


@pytest.mark.parametrize("extra", [{"from": "human"}, {"to": "tag:web"}, {"channel": "ops"}, {"q": "deploys"},
                                   {"held": "true"}], ids=["from", "to", "channel", "q", "held"])
def test_history_by_agent_keeps_the_other_filters(crowd, extra):
    relay, agents = crowd
    everything = stored(relay)
    held_ids = {m["id"] for m in relay.get("/api/messages?held=true&limit=500").json["messages"]}

    def keep(m):
        if "from" in extra and m["from"] != extra["from"]:
            return False
        if "to" in extra and m["to"] != extra["to"]:
            return False
        if "channel" in extra and m.get("channel") != extra["channel"]:
            return False
        if "q" in extra and extra["q"] not in (m.get("subject") or "") + m["body"]:
            return False
        return "held" not in extra or m["id"] in held_ids

    for agent in agents:
        hidden = hidden_for(relay, agent["id"])
        want = [m["id"] for m in everything if may_see(agent, m, hidden) and keep(m)]
        assert [m["id"] for m in pages(relay, dict(extra, agent=agent["id"]), 5)] == want, (agent["id"], extra)


def test_history_of_an_unknown_agent_is_404(relay):
    r = relay.get("/api/messages?agent=nobody")
    assert r.status == 404 and r.code == "unknown_agent"
