"""Presence: the sweeper takes silent agents offline, gives their work back, and prunes long-offline ones.

Every test runs the real relay with a short STALE_TTL_MS, so the sweeper acts
within seconds. Waiting is done by polling what a client can see, with a
generous deadline; no test asserts how fast anything happened.
"""
import http.client
import json
import threading
import time

from clock_shift import shift, shifted_relay
from conftest import wait_for

STALE = "1500"



def status_of(relay, agent_id):
    r = relay.get("/api/agents/" + agent_id)
    return r.json["status"] if r.status == 200 else r.status


def stored_events(relay, types):
    marks = ",".join("?" * len(types))
    rows = relay.sql("SELECT id, type, agent_id, data FROM events WHERE type IN (%s) ORDER BY id" % marks, list(types))
    for row in rows:
        row["data"] = json.loads(row["data"])
    return rows


def read_sse(relay, path, until, timeout=10.0):
    """Read a stream until `until(events)` holds or the time is up; returns [(type, data)]."""
    c = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=timeout)
    c.request("GET", path)
    r = c.getresponse()
    assert r.status == 200
    events, kind, deadline = [], None, time.time() + timeout
    try:
        while time.time() < deadline and not until(events):
            line = r.fp.readline().decode("utf-8").rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind:
                events.append((kind, json.loads(line[6:])))
                kind = None
    finally:
        c.close()
    return events


class Heartbeat(threading.Thread):
    """An agent that heartbeats every 0.5 s, as a live client does."""

    def __init__(self, relay, agent_id):
        threading.Thread.__init__(self, daemon=True)
        self.relay, self.agent_id = relay, agent_id
        self.done = threading.Event()
        self.statuses = []

    def run(self):
        while not self.done.wait(0.5):
            r = self.relay.post("/api/agents/%s/heartbeat" % self.agent_id, {})
            self.statuses.append(r.status)


def test_silent_agent_goes_offline_and_its_claims_return_to_the_pool(relay_factory):
    relay = relay_factory(env={"STALE_TTL_MS": STALE})
    relay.register("w1", tags=["workers"])
    relay.register("w2", tags=["workers"])
    beat = Heartbeat(relay, "w2")
    beat.start()
    try:
        # w1 claims a claimable message, a task, and a task it then blocks; a finished task stays finished.
        msg = relay.send("human", "tag:workers", "rotate the keys", claimable=True)
        assert relay.post("/api/messages/%d/claim" % msg["id"], {"agentId": "w1"}).status == 200
        tasks = []
        for title in ("fix the build", "blocked work", "already done"):
            r = relay.post("/api/tasks", {"title": title, "target": "tag:workers", "from": "human"})
            assert r.status == 201, r
            tasks.append(r.json["task"])
            assert relay.post("/api/tasks/%d/claim" % r.json["task"]["id"], {"agentId": "w1"}).status == 200
        assert relay.patch("/api/tasks/%d/status" % tasks[1]["id"], {"agentId": "w1", "status": "blocked"}).status == 200
        assert relay.patch("/api/tasks/%d/status" % tasks[2]["id"], {"agentId": "w1", "status": "done"}).status == 200
        relay.inbox("w2")  # w2 has seen everything once: the released work must come back to it anyway

        # Another agent racing for the claimed work loses while w1 holds it.
        assert relay.post("/api/messages/%d/claim" % msg["id"], {"agentId": "w2"}).code == "already_claimed"

        assert wait_for(lambda: status_of(relay, "w1") == "offline"), relay.get("/api/agents/w1").json
        card = relay.get("/api/agents/w1").json
        assert card["listening"] is False

        # The agent that heartbeats every 0.5 s stayed online throughout.
        assert status_of(relay, "w2") == "online"
        assert set(beat.statuses) == {200}
        offline = stored_events(relay, ["agent.offline"])
        assert [e["agent_id"] for e in offline] == ["w1"]
        assert offline[0]["data"]["agent"]["status"] == "offline"

        # Every claim of w1 was released, with events, and stored as released.
        released = stored_events(relay, ["message.released"])
        released_ids = {e["data"]["message"]["id"] for e in released}
        assert msg["id"] in released_ids
        assert tasks[0]["messageId"] in released_ids and tasks[1]["messageId"] in released_ids
        assert tasks[2]["messageId"] not in released_ids
        rows = relay.sql("SELECT id, claimed_by FROM messages WHERE claimable = 1 ORDER BY id")
        claimed = {r["id"]: r["claimed_by"] for r in rows}
        assert claimed[msg["id"]] is None
        assert claimed[tasks[0]["messageId"]] is None and claimed[tasks[1]["messageId"]] is None
        task_rows = {r["id"]: r for r in relay.sql("SELECT id, status, claimed_by FROM tasks")}
        assert task_rows[tasks[0]["id"]]["status"] == "open" and task_rows[tasks[0]["id"]]["claimed_by"] is None
        assert task_rows[tasks[1]["id"]]["status"] == "open" and task_rows[tasks[1]["id"]]["claimed_by"] is None
        assert task_rows[tasks[2]["id"]]["status"] == "done" and task_rows[tasks[2]["id"]]["claimed_by"] == "w1"
        for t in tasks[:2]:
            evs = relay.get("/api/tasks/%d/events" % t["id"]).json["events"]
            assert evs[-1]["type"] == "released" and evs[-1]["actor"] == "w1"
        # A stream replaying from the start shows the same to a client.
        seen = read_sse(relay, "/api/events?since=0&types=agent.offline,message.released",
                        until=lambda evs: len(evs) >= 1 + len(released))
        assert ("agent.offline", "w1") in [(k, d.get("agent", {}).get("id")) for k, d in seen]

        # The released work reaches the live agent again, and it can claim all of it.
        again = {m["id"] for m in relay.inbox("w2")["messages"]}
        assert {msg["id"], tasks[0]["messageId"], tasks[1]["messageId"]} <= again
        assert relay.post("/api/messages/%d/claim" % msg["id"], {"agentId": "w2"}).status == 200
        assert relay.post("/api/tasks/%d/claim" % tasks[0]["id"], {"agentId": "w2"}).status == 200
        assert relay.post("/api/tasks/%d/claim" % tasks[1]["id"], {"agentId": "w2"}).status == 200
    finally:
        beat.done.set()
        beat.join()

    # Stored, so it holds across a restart; and a heartbeat brings the silent agent back.
    relay.restart()
    assert status_of(relay, "w1") == "offline"
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (msg["id"],))[0]["claimed_by"] == "w2"
    r = relay.post("/api/agents/w1/heartbeat", {})
    assert r.status == 200 and r.json["agent"]["status"] == "online"
    assert status_of(relay, "w1") == "online"


def test_an_open_long_poll_or_stream_keeps_an_agent_online(relay_factory):
    # A short keep-alive: the relay notices a stream whose client hung up when it next writes to it.
    relay = relay_factory(env={"STALE_TTL_MS": STALE, "AGENT_RELAY_SSE_PING_MS": "500"})
    for aid in ("poller", "streamer", "silent"):
        relay.register(aid)
    results = {}

    def long_poll():
        # One poll of 5 s: more than three times the stale TTL.
        results[0] = relay.get("/api/agents/poller/inbox?wait=5", timeout=20).status

    poller = threading.Thread(target=long_poll, daemon=True)
    stream = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=20)
    stream.request("GET", "/api/events?agentId=streamer")
    stream_response = stream.getresponse()  # kept referenced: dropping it would close the socket
    assert stream_response.status == 200
    poller.start()
    try:
        # The silent agent, registered at the same moment, goes offline; the listeners do not.
        assert wait_for(lambda: status_of(relay, "silent") == "offline")
        cards = {a["id"]: a for a in relay.get("/api/agents").json["agents"]}
        assert cards["poller"]["status"] == "online" and cards["poller"]["listening"] is True
        assert cards["streamer"]["status"] == "online" and cards["streamer"]["listening"] is True
        poller.join(20)
        assert results == {0: 200}
        assert status_of(relay, "streamer") == "online"
        offline = {e["agent_id"] for e in stored_events(relay, ["agent.offline"])}
        assert "poller" not in offline and "streamer" not in offline
    finally:
        stream_response.close()
        stream.close()
    # Once it stops listening the same sweeper takes it offline: the poll was what kept it.
    assert wait_for(lambda: status_of(relay, "poller") == "offline")
    assert wait_for(lambda: status_of(relay, "streamer") == "offline")


def test_an_agent_marked_offline_while_its_stream_closes_stays_offline(relay):
    """A session that ends marks its agent offline while its stream is still closing (an MCP bridge told to stop
    does both at once): the stream's end, seen by the relay after the mark, moves lastSeen but brings the agent
    no status back."""
    relay.register("leaving")
    stream = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=20)
    stream.request("GET", "/api/events?agentId=leaving")
    response = stream.getresponse()
    try:
        assert response.status == 200
        assert wait_for(lambda: relay.get("/api/agents/leaving").json["listening"] is True)
        assert relay.delete("/api/agents/leaving").status == 200
        marked = relay.get("/api/agents/leaving").json
        assert marked["status"] == "offline" and marked["listening"] is True, marked
        time.sleep(0.05)  # a stream's end is seen later than the mark
    finally:
        response.close()
        stream.close()
    assert wait_for(lambda: relay.get("/api/agents/leaving").json["listening"] is False)
    card = relay.get("/api/agents/leaving").json
    assert card["status"] == "offline", card
    assert card["lastSeen"] > marked["lastSeen"], (marked, card)  # the stream's end is recorded as activity
    offline = [e for e in stored_events(relay, ["agent.offline", "agent.online"]) if e["agent_id"] == "leaving"]
    assert [e["type"] for e in offline] == ["agent.offline"], offline


def test_long_offline_agents_are_pruned_but_system_agents_stay(relay_factory):
    relay = relay_factory(env={"STALE_TTL_MS": STALE, "OFFLINE_PRUNE_MS": "500"})
    relay.register("ghost", tags=["workers"])
    relay.register("boss")
    relay.send("boss", "ghost", "hello")
    assert wait_for(lambda: relay.get("/api/agents/ghost").status == 404, timeout=20)
    assert relay.get("/api/agents/ghost").code == "unknown_agent"
    assert wait_for(lambda: relay.get("/api/agents/boss").status == 404, timeout=20)
    r = relay.post("/api/agents/ghost/heartbeat", {})
    assert r.status == 404 and r.code == "unknown_agent"
    assert relay.sql("SELECT id FROM agents WHERE id IN ('ghost', 'boss')") == []
    types = [e["type"] for e in stored_events(relay, ["agent.offline", "agent.removed"]) if e["agent_id"] == "ghost"]
    assert types == ["agent.offline", "agent.removed"]
    # Its messages stay (history); the built-in agents were never touched.
    assert len(relay.sql("SELECT id FROM messages WHERE to_target = 'ghost'")) == 1
    for sid in ("human", "system"):
        r = relay.get("/api/agents/" + sid)
        assert r.status == 200 and r.json["system"] is True
    assert {r["id"] for r in relay.sql("SELECT id FROM agents WHERE system = 1")} == {"human", "system"}
    relay.restart()
    assert relay.get("/api/agents/ghost").status == 404
    assert relay.get("/api/agents/human").status == 200 and relay.get("/api/agents/system").status == 200
    # A pruned agent registers again as a new agent.
    assert relay.post("/api/agents", {"id": "ghost"}).status == 201


# -- clock jumps: presence counts silence on the monotonic clock ---------------------------------------------------
# The relay runs through tests/clock_shift.py, which moves only the wall clock it reads (time.time()), as an NTP
# step or a person setting the date does. Stored times stay epoch ms on the wall clock.


def test_a_clock_set_back_does_not_keep_a_silent_agents_claims(relay_factory, tmp_path):
    relay = shifted_relay(relay_factory, tmp_path, env={"STALE_TTL_MS": STALE})
    relay.register("worker")
    beat = Heartbeat(relay, "worker")  # alive until the clock has jumped, so that its silence starts after the jump
    beat.start()
    try:
        job = relay.send("human", "worker", "rotate the keys", claimable=True)
        task = relay.post("/api/tasks", {"title": "fix the build", "target": "worker", "from": "human"}).json["task"]
        assert relay.post("/api/messages/%d/claim" % job["id"], {"agentId": "worker"}).status == 200
        assert relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "worker"}).status == 200
        shift(relay, -3600)
        stamped = relay.send("human", "worker", "what time is it?")["createdAt"]
        assert stamped < (time.time() - 3500) * 1000  # the relay reads the clock set back an hour
    finally:
        beat.done.set()
        beat.join()
    assert set(beat.statuses) <= {200}
    assert wait_for(lambda: status_of(relay, "worker") == "offline", timeout=30), relay.get("/api/agents/worker").json
    assert relay.get("/api/messages/%d" % job["id"]).json["message"]["claimedBy"] is None
    assert relay.get("/api/tasks/%d" % task["id"]).json["task"]["status"] == "open"
    assert relay.sql("SELECT id FROM messages WHERE claimed_by = 'worker'") == []
    row = relay.sql("SELECT status, offline_since FROM agents WHERE id = 'worker'")[0]
    assert row["status"] == "offline" and row["offline_since"] < (time.time() - 3500) * 1000  # stamped on the wall clock
    assert "Traceback" not in relay.log


def test_a_clock_set_forward_takes_no_agent_offline_before_its_time(relay_factory, tmp_path):
    """Monotonic time says no time passed: a silent agent goes offline STALE_TTL_MS after its last activity, not at
    the jump, and one that heartbeats stays online throughout."""
    ttl = 3000
    relay = shifted_relay(relay_factory, tmp_path, env={"STALE_TTL_MS": str(ttl)})
    relay.register("steady")
    beat = Heartbeat(relay, "steady")
    beat.start()
    try:
        silent_since = time.monotonic()  # before their last activity, which the relay records during the requests
        for aid in ("quiet-1", "quiet-2"):
            relay.register(aid)
        shift(relay, 3600)
        assert relay.send("human", "steady", "what time is it?")["createdAt"] > (time.time() + 3500) * 1000
        assert wait_for(lambda: all(status_of(relay, a) == "offline" for a in ("quiet-1", "quiet-2")), timeout=30)
        # on the clocks that do not jump, a full STALE_TTL_MS passed first (a lower bound, whatever the load)
        assert time.monotonic() - silent_since >= ttl / 1000.0
        assert status_of(relay, "steady") == "online"
    finally:
        beat.done.set()
        beat.join()
    assert set(beat.statuses) == {200}
    assert "steady" not in {e["agent_id"] for e in stored_events(relay, ["agent.offline"])}


def test_after_a_restart_with_the_clock_set_back_a_silent_agent_still_goes_offline(relay_factory, tmp_path):
    """The stored lastSeen is all a restart has; a stamp ahead of the clock (set back while the relay was down)
    counts as activity at the start, not as an hour to come."""
    relay = shifted_relay(relay_factory, tmp_path, env={"STALE_TTL_MS": STALE})
    relay.register("worker")
    job = relay.send("human", "worker", "rotate the keys", claimable=True)
    assert relay.post("/api/messages/%d/claim" % job["id"], {"agentId": "worker"}).status == 200
    relay.stop()
    with open(relay.clock_file, "w") as f:
        f.write("-3600")
    relay.start()
    assert relay.send("human", "worker", "what time is it?")["createdAt"] < (time.time() - 3500) * 1000
    assert wait_for(lambda: status_of(relay, "worker") == "offline", timeout=30), relay.get("/api/agents/worker").json
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (job["id"],)) == [{"claimed_by": None}]
