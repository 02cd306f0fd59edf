"""Claims: exactly one winner however many race, and the refusals that keep
work where it belongs (not claimable, not addressed, not the owner, read-only).
Each refusal is checked to leave the stored claim as it was."""
import threading

N = 20


def claimed_by(relay, message_id):
    return relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (message_id,))[0]["claimed_by"]


def test_twenty_agents_race_for_one_message_and_exactly_one_wins(relay):
    relay.register("boss")
    workers = ["w%02d" % i for i in range(N)]
    for w in workers:
        relay.register(w, tags=["pool"])
    work = relay.send("boss", "tag:pool", "one job", claimable=True)
    assert claimed_by(relay, work["id"]) is None

    # each thread warms its own keep-alive connection first, so that the claims leave together
    barrier = threading.Barrier(N)
    results = {}

    def claim(agent_id):
        assert relay.get("/api/health").status == 200
        barrier.wait(10)
        results[agent_id] = relay.post("/api/messages/%d/claim" % work["id"], {"agentId": agent_id})

    threads = [threading.Thread(target=claim, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == N

    winners = [w for w, r in results.items() if r.status == 200]
    assert len(winners) == 1, {w: r.status for w, r in results.items()}
    winner = winners[0]
    assert results[winner].json["message"]["claimedBy"] == winner
    for w, r in results.items():
        if w == winner:
            continue
        assert r.status == 409, (w, r)
        assert r.code == "already_claimed", (w, r)
        assert r.json["error"]["claimedBy"] == winner, (w, r)
        assert winner in r.json["error"]["message"]

    assert claimed_by(relay, work["id"]) == winner
    r = relay.get("/api/messages/%d" % work["id"])
    assert r.json["message"]["claimedBy"] == winner and r.json["message"]["claimedAt"] is not None
    # the winner claiming again is harmless; a loser still cannot
    assert relay.post("/api/messages/%d/claim" % work["id"], {"agentId": winner}).status == 200
    loser = next(w for w in workers if w != winner)
    assert relay.post("/api/messages/%d/claim" % work["id"], {"agentId": loser}).status == 409
    assert claimed_by(relay, work["id"]) == winner
    assert "Traceback" not in relay.log


def test_claim_refusals(relay):
    relay.register("boss")
    relay.register("worker", tags=["pool"])
    relay.register("outsider", tags=["elsewhere"])
    relay.register("watcher", tags=["pool"], approvalMode="read-only")
    chat = relay.send("boss", "tag:pool", "just chat")
    work = relay.send("boss", "tag:pool", "real work", claimable=True)
    direct = relay.send("boss", "worker", "for worker only", claimable=True)

    r = relay.post("/api/messages/%d/claim" % chat["id"], {"agentId": "worker"})
    assert (r.status, r.code) == (400, "not_claimable"), r
    assert claimed_by(relay, chat["id"]) is None

    r = relay.post("/api/messages/%d/claim" % work["id"], {"agentId": "outsider"})
    assert (r.status, r.code) == (403, "not_addressed"), r
    r = relay.post("/api/messages/%d/claim" % direct["id"], {"agentId": "outsider"})
    assert (r.status, r.code) == (403, "not_addressed"), r
    assert claimed_by(relay, work["id"]) is None and claimed_by(relay, direct["id"]) is None

    r = relay.post("/api/messages/%d/claim" % work["id"], {"agentId": "watcher"})
    assert (r.status, r.code) == (403, "read_only"), r
    assert claimed_by(relay, work["id"]) is None

    r = relay.post("/api/messages/%d/claim" % work["id"], {"agentId": "nobody"})
    assert (r.status, r.code) == (404, "unknown_agent"), r
    r = relay.post("/api/messages/999/claim", {"agentId": "worker"})
    assert (r.status, r.code) == (404, "not_found"), r

    r = relay.post("/api/messages/%d/claim" % work["id"], {"agentId": "worker"})
    assert r.status == 200 and r.json["message"]["claimedBy"] == "worker", r

    # release by someone else: refused, the claim stays
    for other in ("boss", "watcher"):
        r = relay.post("/api/messages/%d/release" % work["id"], {"agentId": other})
        assert (r.status, r.code) == (409, "not_owner"), r
        assert r.json["error"]["claimedBy"] == "worker"
        assert claimed_by(relay, work["id"]) == "worker"
    # release of something not claimed at all is not_owner too
    r = relay.post("/api/messages/%d/release" % direct["id"], {"agentId": "worker"})
    assert (r.status, r.code) == (409, "not_owner"), r
    r = relay.post("/api/messages/%d/release" % work["id"], {"agentId": "worker"})
    assert r.status == 200 and r.json["message"]["claimedBy"] is None, r
    assert claimed_by(relay, work["id"]) is None
    assert "Traceback" not in relay.log


def test_read_only_agent_may_reply_but_not_start_conversations(relay):
    relay.register("boss")
    relay.register("stranger")
    relay.register("watcher", approvalMode="read-only")
    before = relay.sql("SELECT COUNT(*) AS n FROM messages")[0]["n"]

    r = relay.post("/api/messages", {"from": "watcher", "to": "boss", "body": "hello?"})
    assert (r.status, r.code) == (403, "read_only"), r
    r = relay.post("/api/messages", {"from": "watcher", "to": "broadcast", "body": "hello all?"})
    assert (r.status, r.code) == (403, "read_only"), r
    assert relay.sql("SELECT COUNT(*) AS n FROM messages")[0]["n"] == before

    question = relay.send("boss", "watcher", "status?")
    private = relay.send("boss", "stranger", "not for the watcher")
    r = relay.post("/api/messages", {"from": "watcher", "to": "boss", "body": "all fine", "replyTo": question["id"]})
    assert r.status == 201, r
    reply = r.json["message"]
    assert reply["replyTo"] == question["id"] and reply["threadId"] == question["id"]
    row = relay.sql("SELECT from_agent, to_target, reply_to, thread_id FROM messages WHERE id = ?", (reply["id"],))[0]
    assert row == {"from_agent": "watcher", "to_target": "boss", "reply_to": question["id"], "thread_id": question["id"]}
    assert [m["id"] for m in relay.inbox("boss", since=0)["messages"]] == [reply["id"]]

    # a "reply" to a message it never received does not open a conversation
    r = relay.post("/api/messages", {"from": "watcher", "to": "boss", "body": "psst", "replyTo": private["id"]})
    assert r.status == 403 and r.code in ("not_addressed", "read_only"), r
    # nor may a read-only agent hand out claimable work, even as a reply
    r = relay.post("/api/messages", {"from": "watcher", "to": "boss", "body": "do this", "replyTo": question["id"],
                                     "claimable": True})
    assert (r.status, r.code) == (403, "read_only"), r
    assert relay.sql("SELECT COUNT(*) AS n FROM messages")[0]["n"] == before + 3


def test_a_read_only_agents_reply_goes_only_to_the_sender_it_answers(relay):
    """replyTo is no way around read-only: a "reply" to a fan-out target or to a third agent would start a
    conversation, so it is refused and nothing is stored; the answer to the sender goes through."""
    relay.register("boss")
    relay.register("stranger", tags=["pool"], capabilities=["review"], label="eyes")
    relay.register("watcher", tags=["pool"], capabilities=["review"], label="eyes", approvalMode="read-only")
    question = relay.send("boss", "watcher", "status?")
    announcement = relay.send("boss", "tag:pool", "to the whole pool")
    count = lambda: relay.sql("SELECT COUNT(*) AS n FROM messages")[0]["n"]  # noqa: E731
    before = count()
    for parent in (question, announcement):
        for to in ("broadcast", "tag:pool", "cap:review", "label:eyes", "stranger"):
            r = relay.post("/api/messages", {"from": "watcher", "to": to, "body": "psst", "replyTo": parent["id"]})
            assert (r.status, r.code) == (403, "read_only"), (parent["id"], to, r)
            assert "boss" in r.json["error"]["message"], r
    assert count() == before
    assert [m["id"] for m in relay.inbox("stranger", since=0)["messages"]] == [announcement["id"]]
    assert relay.sql("SELECT id FROM messages WHERE from_agent = 'watcher'") == []
    # to the sender of the message it answers: allowed, for a direct question and for a fan-out alike
    for parent in (question, announcement):
        r = relay.post("/api/messages", {"from": "watcher", "to": "boss", "body": "all fine", "replyTo": parent["id"]})
        assert r.status == 201 and r.json["message"]["threadId"] == parent["id"], r
    rows = relay.sql("SELECT to_target, reply_to FROM messages WHERE from_agent = 'watcher' ORDER BY id")
    assert rows == [{"to_target": "boss", "reply_to": question["id"]}, {"to_target": "boss", "reply_to": announcement["id"]}]
    assert "Traceback" not in relay.log


# -- the claimer is checked inside the claim's transaction ------------------------------------------------------

ROUNDS = 200


def race_claims_against(relay, prefix, end_session):
    """ROUNDS rounds: a fresh agent owns a claimable message and a task (with its message); three claims (the
    message, the task, the task's message) leave together with `end_session(agent_id)`. Returns
    [(agent_id, message_id, task_id, task_message_id, {action: Resp})]."""
    relay.register("boss")
    rounds = []
    for i in range(ROUNDS):  # set up first: in a round, only the racing requests run
        agent_id = "%s%03d" % (prefix, i)
        relay.register(agent_id)
        msg = relay.send("boss", agent_id, "a job for " + agent_id, claimable=True)
        r = relay.post("/api/tasks", {"title": "a task for " + agent_id, "target": agent_id, "from": "boss"})
        assert r.status == 201, r
        rounds.append((agent_id, msg["id"], r.json["task"]["id"], r.json["task"]["messageId"], {}))

    actions = {
        "end": lambda rd: end_session(rd[0]),
        "message": lambda rd: relay.post("/api/messages/%d/claim" % rd[1], {"agentId": rd[0]}),
        "task": lambda rd: relay.post("/api/tasks/%d/claim" % rd[2], {"agentId": rd[0]}),
        "task message": lambda rd: relay.post("/api/messages/%d/claim" % rd[3], {"agentId": rd[0]}),
    }
    barrier = threading.Barrier(len(actions))

    def worker(name):
        assert relay.get("/api/health").status == 200  # its keep-alive connection is open before the first round
        for rd in rounds:
            barrier.wait(30)
            rd[4][name] = actions[name](rd)

    threads = [threading.Thread(target=worker, args=(name,)) for name in actions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(len(rd[4]) == len(actions) for rd in rounds)
    for rd in rounds:
        assert rd[4]["end"].status == 200, rd
        for name in ("message", "task", "task message"):
            r = rd[4][name]
            # won before the session ended (and then lost it to the end), or refused after it
            assert r.status == 200 or (r.status, r.code) in ((404, "unknown_agent"), (409, "agent_offline")), (name, r)
    return rounds


def assert_nothing_claimed_by(relay, rounds):
    for agent_id, message_id, task_id, task_message_id, _ in rounds:
        for mid in (message_id, task_message_id):
            assert relay.get("/api/messages/%d" % mid).json["message"]["claimedBy"] is None, (agent_id, mid)
        task = relay.get("/api/tasks/%d" % task_id).json["task"]
        assert (task["status"], task["claimedBy"]) == ("open", None), (agent_id, task)


def stored_claims(relay):
    return (relay.sql("SELECT id, claimed_by FROM messages WHERE claimed_by IS NOT NULL")
            + relay.sql("SELECT id, claimed_by, status FROM tasks WHERE claimed_by IS NOT NULL OR status != 'open'"))


def test_a_claim_racing_a_purge_never_leaves_work_with_a_removed_agent(relay):
    rounds = race_claims_against(relay, "p", lambda agent_id: relay.delete("/api/agents/%s?purge=true" % agent_id))
    for agent_id, *_ in rounds:
        assert relay.get("/api/agents/" + agent_id).code == "unknown_agent"
    assert_nothing_claimed_by(relay, rounds)
    assert stored_claims(relay) == []
    relay.restart()
    assert stored_claims(relay) == []
    assert_nothing_claimed_by(relay, rounds)
    # the work is back in the pool: another agent that it reaches can take it
    agent_id, message_id, task_id, _, _ = rounds[0]
    relay.register(agent_id)
    assert relay.post("/api/tasks/%d/claim" % task_id, {"agentId": agent_id}).status == 200
    assert relay.post("/api/messages/%d/claim" % message_id, {"agentId": agent_id}).status == 200
    assert "Traceback" not in relay.log


def test_a_claim_racing_a_session_end_leaves_the_agent_offline_holding_nothing(relay):
    rounds = race_claims_against(relay, "q", lambda agent_id: relay.delete("/api/agents/" + agent_id))
    for agent_id, *_ in rounds:
        assert relay.get("/api/agents/" + agent_id).json["status"] == "offline", agent_id
    assert_nothing_claimed_by(relay, rounds)
    assert stored_claims(relay) == []
    ids = [rd[0] for rd in rounds]
    assert {r["status"] for r in relay.sql("SELECT status FROM agents WHERE id IN (%s)" % ",".join("?" * len(ids)), ids)} == {"offline"}
    relay.restart()
    assert stored_claims(relay) == []
    assert all(relay.get("/api/agents/" + agent_id).json["status"] == "offline" for agent_id in ids)
    # back with a heartbeat, it may claim again
    agent_id, message_id = rounds[0][0], rounds[0][1]
    r = relay.post("/api/messages/%d/claim" % message_id, {"agentId": agent_id})
    assert (r.status, r.code) == (409, "agent_offline"), r
    assert relay.post("/api/agents/%s/heartbeat" % agent_id, {}).status == 200
    assert relay.post("/api/messages/%d/claim" % message_id, {"agentId": agent_id}).status == 200
    assert "Traceback" not in relay.log


def test_claims_left_with_a_removed_agent_return_to_the_pool_at_start(relay):
    """A database written by a relay without the claimer check may hold work claimed by an agent that is gone;
    the relay gives it back when it starts, since nobody could release it."""
    import sqlite3

    relay.register("boss")
    relay.register("gone", tags=["pool"])
    relay.register("worker", tags=["pool"])
    msg = relay.send("boss", "tag:pool", "a job", claimable=True)
    task = relay.post("/api/tasks", {"title": "a task", "target": "tag:pool", "from": "boss"}).json["task"]
    kept = relay.send("boss", "tag:pool", "kept by a live agent", claimable=True)
    assert relay.post("/api/messages/%d/claim" % msg["id"], {"agentId": "gone"}).status == 200
    assert relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "gone"}).status == 200
    assert relay.post("/api/messages/%d/claim" % kept["id"], {"agentId": "worker"}).status == 200
    relay.stop()
    con = sqlite3.connect(relay.db_path)
    with con:
        con.execute("DELETE FROM agents WHERE id = 'gone'")  # what the lost race used to leave behind
    con.close()
    relay.start()
    assert relay.get("/api/messages/%d" % msg["id"]).json["message"]["claimedBy"] is None
    assert relay.get("/api/messages/%d" % task["messageId"]).json["message"]["claimedBy"] is None
    assert relay.get("/api/tasks/%d" % task["id"]).json["task"]["status"] == "open"
    assert claimed_by(relay, kept["id"]) == "worker"
    assert relay.sql("SELECT id FROM messages WHERE claimed_by = 'gone'") == []
    # and it reaches the agents it was for again
    assert {msg["id"], task["messageId"]} <= {m["id"] for m in relay.inbox("worker")["messages"]}
    assert relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "worker"}).status == 200
    assert "Traceback" not in relay.log
