"""RelayClient against a real relay: one kept-alive connection, every route an agent uses, one error type
(the relay's envelope, or "unreachable"), long-polls, the event stream, tokens and agent keys, and the
once-only warning about a relay of another version."""
import sys
import threading
import time

import pytest

from conftest import ROOT
from test_cli import free_port

sys.path.insert(0, ROOT)
import agent_relay  # noqa: E402
from agent_relay import RelayClient, RelayError  # noqa: E402


def client_for(relay, **kw):
    return RelayClient(url=relay.url, token=relay.token, env={}, **kw)


def test_calls_share_one_kept_alive_connection(relay):
    c = client_for(relay)
    assert c.health()["ok"] is True
    sock = c._conn.sock
    c.register(id="k1")
    c.heartbeat("k1", status="busy")
    c.agents()
    c.cursor()
    assert c._conn.sock is sock, "each call should reuse the same connection"
    assert relay.sql("SELECT status FROM agents WHERE id = 'k1'") == [{"status": "busy"}]


def test_agent_and_message_routes(relay):
    c = client_for(relay)
    a = c.register(id="ann", tags=["db"], capabilities=["chat"])
    assert a["id"] == "ann" and a["tags"] == ["db"]
    c.register(id="ben", tags=["db"])
    assert {x["id"] for x in c.agents(tag="db")} == {"ann", "ben"}

    start = c.cursor()
    sent = c.send("ann", "ben", "first", subject="hello")
    mid = sent["message"]["id"]
    assert sent["matched"] == ["ben"] and mid > start
    box = c.inbox("ben")
    assert [m["id"] for m in box["messages"]] == [mid] and box["cursor"] == mid
    assert c.poll("ben")["messages"] == []  # the relay resumed from its cursor
    r = c.reply("ben", mid, "second")
    assert r["message"]["to"] == "ann" and r["message"]["replyTo"] == mid and r["message"]["threadId"] == mid
    assert [m["id"] for m in c.thread(mid)["messages"]] == [mid, r["message"]["id"]]

    c.mark_read("ben", mid)
    assert relay.sql("SELECT state FROM receipts WHERE message_id = ? AND agent_id = 'ben'", (mid,)) == [{"state": "read"}]
    assert c.read_upto("ann", r["message"]["id"])["count"] == 1

    work = c.send("ann", "tag:db", "take me", claimable=True)["message"]["id"]
    assert c.claim("ben", work)["message"]["claimedBy"] == "ben"
    with pytest.raises(RelayError) as e:
        c.register(id="cat", tags=["db"])
        c.claim("cat", work)
    assert (e.value.status, e.value.code, e.value.extra.get("claimedBy")) == (409, "already_claimed", "ben")
    assert c.release("ben", work)["message"]["claimedBy"] is None

    assert c.set_status("ann", "busy")["status"] == "busy"
    assert c.set_ready("ann", False)["ready"] is False
    assert c.set_label("ann", "lead")["label"] == "lead"
    assert c.delete("ann")["status"] == "offline"
    assert relay.sql("SELECT status, label, ready FROM agents WHERE id = 'ann'") == [{"status": "offline", "label": "lead", "ready": 0}]
    assert c.offline("ben", purge=True)["id"] == "ben"
    assert relay.sql("SELECT id FROM agents WHERE id = 'ben'") == []
    assert relay.get("/api/agents/ann").status == 200  # a session's end leaves the card; a purge does not
    assert (relay.get("/api/agents/ben").code, relay.get("/api/agents/ben/inbox").code) == ("unknown_agent",) * 2


def test_tasks(relay):
    c = client_for(relay)
    c.register(id="ops-1", tags=["ops"])
    t = c.create_task("Disk full", "tag:ops", dedupeKey="disk-1")["task"]
    assert [x["id"] for x in c.tasks(status="open")] == [t["id"]]
    assert c.claim_task("ops-1", t["id"])["task"]["claimedBy"] == "ops-1"
    assert c.task_status(t["id"], agent_id="ops-1", status="done", result="ok")["task"]["status"] == "done"
    assert [e["type"] for e in c.task(t["id"])["events"]][:2] == ["created", "claimed"]
    assert relay.sql("SELECT status FROM tasks WHERE id = ?", (t["id"],)) == [{"status": "done"}]


def test_one_error_type(relay):
    c = client_for(relay)
    c.register(id="e1")
    m = c.send("e1", "e1", "to myself")["message"]["id"]
    with pytest.raises(RelayError) as e:
        c.claim("e1", m)
    assert (e.value.status, e.value.code) == (400, "not_claimable")
    assert "not claimable" in e.value.message and str(e.value).endswith("(not_claimable)")
    with pytest.raises(RelayError) as e:
        c.send("nobody", "e1", "hi")
    assert (e.value.status, e.value.code) == (404, "unknown_agent")
    with pytest.raises(RelayError) as e:
        c.register(id="tag:bad")
    assert (e.value.status, e.value.code) == (400, "invalid_field")

    down = RelayClient(url="http://127.0.0.1:%d" % free_port(), env={})
    with pytest.raises(RelayError) as e:
        down.health()
    assert (e.value.status, e.value.code) == (0, "unreachable")
    assert "connection refused" in e.value.message and "AGENT_RELAY_URL" in e.value.message
    with pytest.raises(RelayError) as e:
        RelayClient(url="ftp://example", env={})
    assert e.value.code == "invalid_url"


def test_variables_and_token(relay_factory):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": "client-token-42"})
    env = {"AGENT_RELAY_URL": relay.url + "/", "AGENT_RELAY_TOKEN": "client-token-42"}
    c = RelayClient(env=env)
    assert c.url == relay.url and c.token == "client-token-42"
    assert c.register(id="tokened")["id"] == "tokened"
    assert RelayClient(env={"AGENT_RELAY_URL": relay.url}).health()["ok"] is True  # health needs no token
    with pytest.raises(RelayError) as e:
        RelayClient(env={"AGENT_RELAY_URL": relay.url}).agents()
    assert (e.value.status, e.value.code) == (401, "unauthorized")
    assert RelayClient(env={}).url == "http://localhost:4850"


def test_agent_key(relay_factory):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": "client-token-42", "AGENT_RELAY_AGENT_KEYS": "1",
                               "AGENT_RELAY_ADMIN_TOKEN": "admin-token-4242"})
    c = client_for(relay)
    card = c.register(id="keyed")
    assert card["agentKey"] and c.agent_key == card["agentKey"]
    assert c.heartbeat("keyed", status="busy")["ok"] is True
    other = client_for(relay)
    with pytest.raises(RelayError) as e:
        other.heartbeat("keyed", status="idle")
    assert (e.value.status, e.value.code) == (403, "forbidden")
    same = RelayClient(url=relay.url, token=relay.token, env={"AGENT_RELAY_AGENT_KEY": card["agentKey"]})
    assert same.heartbeat("keyed", status="idle")["agent"]["status"] == "idle"


def test_long_poll_wakes_on_arrival_and_follows_the_cursor(relay):
    c = client_for(relay)
    c.register(id="w1")
    c.register(id="w2")
    first = c.wait("w1", wait=1)
    assert first["messages"] == []
    since = first["cursor"]
    got = {}

    def waiter():
        got["out"] = client_for(relay).wait("w1", since=since, wait=30)

    th = threading.Thread(target=waiter)
    th.start()
    deadline = time.time() + 10
    while not c.agent("w1")["listening"] and time.time() < deadline:
        time.sleep(0.02)
    mid = c.send("w2", "w1", "wake up")["message"]["id"]
    th.join(10)
    assert not th.is_alive(), "the long-poll should answer when the message arrives, not at the end of its wait"
    assert [m["id"] for m in got["out"]["messages"]] == [mid] and got["out"]["cursor"] == mid
    assert c.wait("w1", since=mid, wait=1)["messages"] == []


def test_stream_with_last_event_id(relay):
    c = client_for(relay)
    c.register(id="s1")
    c.register(id="s2")
    m1 = c.send("s2", "s1", "one")["message"]["id"]
    events = c.stream(agent_id="s1", types=["message.created"], last_event_id=0)
    ev = next(events)
    assert ev.type == "message.created" and ev.data["message"]["id"] == m1 and isinstance(ev.id, int)
    events.close()
    m2 = c.send("s2", "s1", "two")["message"]["id"]
    resumed = c.stream(agent_id="s1", types=["message.created"], last_event_id=ev.id)
    ev2 = next(resumed)
    assert ev2.data["message"]["id"] == m2 and ev2.id > ev.id
    resumed.close()


def test_reconnects_after_a_relay_restart(relay):
    c = client_for(relay)
    c.register(id="r1")
    relay.restart(same_port=True)
    assert c.heartbeat("r1")["ok"] is True  # the old kept-alive connection died with the relay; a new one is made


def test_version_warning_once(relay, capsys):
    assert agent_relay.versions_differ("0.2.0", "0.1.9") is True
    assert agent_relay.versions_differ("1.1.0", "0.1.0") is True
    assert agent_relay.versions_differ("0.1.7", "0.1.0") is False
    assert agent_relay.versions_differ("garbage", "0.1.0") is False
    c = client_for(relay)
    c.health()
    assert capsys.readouterr().err == ""  # same version: silent
    agent_relay._VERSION_WARNED.discard(c.url)
    c.check_version("99.0.0")
    c.check_version("99.0.0")
    RelayClient(url=relay.url, env={}).check_version("99.0.0")
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "99.0.0" in err and agent_relay.__version__ in err
