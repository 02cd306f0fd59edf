"""Agent keys (AGENT_RELAY_AGENT_KEYS=1): no client acts as an agent without that agent's key,
and no agent acts as a person without the admin token.

Every call that acts as an agent is tried three ways: with no key, with
another agent's key (both 403, nothing stored), and with the right key or the
admin token (works). Person-only acts (sending as human, approving and
rejecting held messages, editing another agent's card, task changes without an
agent, changing an agent's approval mode) are 403 for agents, whatever key they
hold, and work with the admin token.
"""
import hashlib
import json

import pytest

from conftest import raw_exchange

TOKEN = "shared-token-for-tests"
ADMIN = "admin-token-for-tests"


@pytest.fixture
def relay(relay_factory):
    return relay_factory(env={"AGENT_RELAY_AGENT_KEYS": "1", "AGENT_RELAY_TOKEN": TOKEN, "AGENT_RELAY_ADMIN_TOKEN": ADMIN})


def key(k):
    return {"X-Agent-Relay-Agent-Key": k}


ADMIN_H = {"X-Agent-Relay-Admin-Token": ADMIN}


def snapshot(relay):
    return relay.sql("SELECT (SELECT COUNT(*) FROM messages) AS m, (SELECT COUNT(*) FROM receipts) AS r, "
                     "(SELECT group_concat(COALESCE(claimed_by, '-')) FROM messages) AS c, "
                     "(SELECT group_concat(id || status || approval_mode || tags || COALESCE(label, '')) FROM agents) AS a, "
                     "(SELECT group_concat(status || COALESCE(claimed_by, '-')) FROM tasks) AS t")


def register(relay, agent_id, **fields):
    fields["id"] = agent_id
    r = relay.post("/api/agents", fields)
    assert r.status == 201, r
    assert isinstance(r.json.get("agentKey"), str) and len(r.json["agentKey"]) >= 20
    return r.json["agentKey"]


@pytest.fixture
def world(relay):
    keys = {a: register(relay, a, tags=["team"]) for a in ("alice", "bob")}
    keys["guard"] = register(relay, "guard", approvalMode="guarded")
    work = relay.post("/api/messages", {"from": "alice", "to": "tag:team", "body": "a job", "claimable": True},
                      headers=key(keys["alice"])).json["message"]["id"]
    task = relay.post("/api/tasks", {"title": "t", "target": "tag:team", "from": "alice"}, headers=key(keys["alice"])).json["task"]
    held = [relay.post("/api/messages", {"from": "alice", "to": "guard", "body": "please deploy %d" % i},
                       headers=key(keys["alice"])).json["message"]["id"] for i in range(2)]
    return {"keys": keys, "work": work, "task": task["id"], "held": held[0], "held2": held[1]}


def acts_as_bob(w):
    """(method, path, body) of every call that acts as bob."""
    return [
        ("POST", "/api/messages", {"from": "bob", "to": "alice", "body": "hi"}),
        ("POST", "/api/agents/bob/heartbeat", {}),
        ("GET", "/api/agents/bob/inbox", None),
        ("PATCH", "/api/agents/bob", {"label": "b"}),
        ("POST", "/api/messages/%d/claim" % w["work"], {"agentId": "bob"}),
        ("POST", "/api/tasks/%d/claim" % w["task"], {"agentId": "bob"}),
        ("POST", "/api/messages/%d/read" % w["work"], {"agentId": "bob"}),
        ("POST", "/api/agents/bob/read", {"upTo": 100}),
        ("PATCH", "/api/tasks/%d/status" % w["task"], {"agentId": "bob", "progress": "half"}),
        ("POST", "/api/tasks", {"title": "from bob", "target": "alice", "from": "bob"}),
        ("POST", "/api/agents", {"id": "bob", "tags": ["team", "x"]}),
        ("DELETE", "/api/agents/bob", None),
    ]


def stream_status(relay, path, headers):
    headers = dict({"Authorization": "Bearer " + TOKEN}, **headers)
    lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1"] + ["%s: %s" % kv for kv in headers.items()]
    return raw_exchange(relay.port, ("\r\n".join(lines) + "\r\n\r\n").encode(), head_only=True)[0]


def test_the_key_is_given_once_and_never_shown_or_stored(relay):
    k = register(relay, "alice")
    for r in (relay.get("/api/agents/alice"), relay.get("/api/agents")):
        assert r.status == 200 and k not in r.body.decode() and "keyHash" not in r.body.decode()
    again = relay.post("/api/agents", {"id": "alice", "label": "a"}, headers=key(k))
    assert again.status == 200 and "agentKey" not in again.json
    stored = relay.sql("SELECT key_hash FROM agents WHERE id = 'alice'")[0]["key_hash"]
    assert stored == hashlib.sha256(k.encode()).hexdigest()
    raw = open(relay.db_path, "rb").read() + (open(relay.db_path + "-wal", "rb").read() if relay.sql("PRAGMA journal_mode") else b"")
    assert k.encode() not in raw
    events = relay.sql("SELECT data FROM events")
    assert all(k not in e["data"] for e in events)
    assert k not in relay.log


def test_no_client_acts_as_an_agent_without_its_key(relay, world):
    keys = world["keys"]
    for method, path, body in acts_as_bob(world):
        for headers in ({}, key(keys["alice"]), key("not-a-key"), key("")):
            before = snapshot(relay)
            r = relay.request(method, path, body=body, headers=headers)
            assert r.status == 403 and r.code == "forbidden", (method, path, headers, r)
            assert "X-Agent-Relay-Agent-Key" in r.json["error"]["message"]
            assert snapshot(relay) == before, (method, path)
    for headers in ({}, key(keys["alice"])):
        assert stream_status(relay, "/api/events?agentId=bob", headers) == 403
    # releasing a claim: bob claims with his key; alice cannot give it back for him
    assert relay.post("/api/messages/%d/claim" % world["work"], {"agentId": "bob"}, headers=key(keys["bob"])).status == 200
    r = relay.post("/api/messages/%d/release" % world["work"], {"agentId": "bob"}, headers=key(keys["alice"]))
    assert r.status == 403
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (world["work"],))[0]["claimed_by"] == "bob"


def test_the_rightful_key_and_the_admin_token_work(relay, world):
    keys = world["keys"]
    for headers in (key(keys["bob"]), ADMIN_H, {"Authorization": "Bearer " + ADMIN}):
        for method, path, body in acts_as_bob(world)[:-1]:
            r = relay.request(method, path, body=body, headers=headers)
            assert r.status in (200, 201), (method, path, headers, r)
        assert stream_status(relay, "/api/events?agentId=bob", headers) == 200
        r = relay.post("/api/messages/%d/release" % world["work"], {"agentId": "bob"}, headers=headers)
        assert r.status == 200, r
        r = relay.post("/api/tasks/%d/claim" % world["task"], {"agentId": "bob"}, headers=headers)
        assert r.status == 200, r
        assert relay.patch("/api/tasks/%d/status" % world["task"], {"agentId": "bob", "status": "open"}, headers=headers).status == 200
    assert relay.delete("/api/agents/bob", headers=key(keys["bob"])).status == 200
    # an offline agent comes back with its key
    assert relay.post("/api/agents/bob/heartbeat", {}, headers=key(keys["bob"])).json["agent"]["status"] == "online"


def test_no_agent_acts_as_a_person(relay, world):
    keys = world["keys"]
    person_acts = [
        ("POST", "/api/messages", {"from": "human", "to": "bob", "body": "as a person"}),
        ("POST", "/api/messages", {"from": "system", "to": "bob", "body": "as the relay"}),
        ("POST", "/api/messages/%d/approve" % world["held"], {"agentId": "guard"}),
        ("POST", "/api/messages/%d/reject" % world["held2"], {}),
        ("PATCH", "/api/agents/alice", {"label": "edited by bob"}),
        ("PATCH", "/api/tasks/%d/status" % world["task"], {"status": "canceled"}),
        ("POST", "/api/tasks", {"title": "no sender", "target": "bob"}),
        ("DELETE", "/api/agents/alice?purge=true", None),
    ]
    for method, path, body in person_acts:
        for headers in ({}, key(keys["bob"]), key(keys["guard"]), key(keys["alice"]) if "alice" not in path else {}):
            before = snapshot(relay)
            r = relay.request(method, path, body=body, headers=headers)
            assert r.status == 403, (method, path, headers, r)
            assert snapshot(relay) == before
    # the guarded agent cannot approve what is held for it, even with its own key
    r = relay.post("/api/messages/%d/approve" % world["held"], {"agentId": "guard"}, headers=key(keys["guard"]))
    assert r.status == 403 and "admin token" in r.json["error"]["message"]
    assert relay.get("/api/agents/guard/inbox?since=0", headers=key(keys["guard"])).json["messages"] == []
    # with the admin token every one of them works
    for method, path, body in person_acts[:-1]:
        r = relay.request(method, path, body=body, headers=ADMIN_H)
        assert r.status in (200, 201), (method, path, r)
    inbox = relay.get("/api/agents/guard/inbox?since=0", headers=key(keys["guard"])).json["messages"]
    assert [m["id"] for m in inbox] == [world["held"]]
    assert relay.get("/api/agents/alice").json["label"] == "edited by bob"


def test_an_agent_cannot_lift_its_own_guard(relay, world):
    """Changing an agent's approval mode is a person's act: otherwise a guarded or read-only agent could free itself."""
    keys = world["keys"]
    g = key(keys["guard"])
    before = snapshot(relay)
    for method, path, body in [("PATCH", "/api/agents/guard", {"approvalMode": "open"}),
                               ("PATCH", "/api/agents/guard", {"meta": {"approvalMode": "open"}}),
                               ("POST", "/api/agents", {"id": "guard", "approvalMode": "open"}),
                               ("DELETE", "/api/agents/guard?purge=true", None)]:
        r = relay.request(method, path, body=body, headers=g)
        assert r.status == 403, (method, path, r)
    assert snapshot(relay) == before
    assert relay.get("/api/agents/guard").json["approvalMode"] == "guarded"
    # its other fields stay its own to change, and re-registering as it is works
    assert relay.patch("/api/agents/guard", {"label": "g"}, headers=g).status == 200
    assert relay.post("/api/agents", {"id": "guard", "approvalMode": "guarded"}, headers=g).status == 200
    # a person may change it
    assert relay.patch("/api/agents/guard", {"approvalMode": "open"}, headers=ADMIN_H).json["approvalMode"] == "open"


def test_an_agent_from_before_keys_must_register_again(relay_factory):
    """Agents registered while keys were off have no key: nothing may act as them until they register again."""
    plain = relay_factory(env={"AGENT_RELAY_TOKEN": TOKEN})
    plain.register("old")
    plain.register("other")
    plain.stop()
    relay = relay_factory(env={"AGENT_RELAY_AGENT_KEYS": "1", "AGENT_RELAY_TOKEN": TOKEN, "AGENT_RELAY_ADMIN_TOKEN": ADMIN},
                          db_path=plain.db_path)
    r = relay.post("/api/messages", {"from": "old", "to": "other", "body": "impersonated"})
    assert r.status == 403 and "register" in r.json["error"]["message"]
    assert relay.get("/api/agents/old/inbox").status == 403
    r = relay.post("/api/agents", {"id": "old"})
    assert r.status == 200 and r.json["agentKey"]
    assert relay.post("/api/messages", {"from": "old", "to": "other", "body": "now with a key"},
                      headers=key(r.json["agentKey"])).status == 201
    # the key is issued once: registering again without it is refused
    assert relay.post("/api/agents", {"id": "old"}).status == 403


def test_the_page_is_still_served_and_integrations_still_work(relay_factory):
    integ = [{"name": "mon", "token": "integration-token-1", "scopes": ["tasks:create"], "targets": ["tag:team"]}]
    relay = relay_factory(env={"AGENT_RELAY_AGENT_KEYS": "1", "AGENT_RELAY_TOKEN": TOKEN, "AGENT_RELAY_ADMIN_TOKEN": ADMIN,
                               "AGENT_RELAY_INTEGRATIONS": json.dumps(integ)})
    r = relay.get("/", token=False)
    assert r.status == 200 and b"<html" in r.body.lower()
    r = relay.post("/api/integrations/events", {"dedupeKey": "k", "title": "disk"},
                   headers={"Authorization": "Bearer integration-token-1"}, token=False)
    assert r.status == 201, r
