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
