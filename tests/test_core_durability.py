"""Durability: what the relay said it stored is still there after a crash.

The relay is killed with SIGKILL (no shutdown, no checkpoint) and started
again on the same database; agents, messages, read markers, claims and the
relay-kept cursors are checked through HTTP and in the database file itself.
"""


def ids(answer):
    return [m["id"] for m in answer["messages"]]


def build_state(relay):
    relay.register("boss", capabilities=["lead"], label="chief")
    relay.register("dev", tags=["backend", "py"], capabilities=["chat", "review"], label="alpha",
                   channels=["all"], meta={"team": "core"})
    relay.register("ops", tags=["ops"], channels=["ops"], approvalMode="guarded")
    m = [relay.send("boss", "dev", "m%d" % i)["id"] for i in range(4)]
    fan = relay.send("boss", "tag:backend", "fan-out", channel="dev", subject="s", payload={"k": [1, 2]})["id"]
    work = relay.send("boss", "tag:backend", "claim me", claimable=True)["id"]
    open_work = relay.send("boss", "tag:backend", "leave me open", claimable=True)["id"]
    held = relay.send("dev", "ops", "held for a person")["id"]

    assert relay.post("/api/messages/%d/read" % m[0], {"agentId": "dev"}).status == 200
    got = relay.inbox("dev", limit=3)  # the relay-kept cursor moves to m[2]
    assert ids(got) == m[:3] and got["cursor"] == m[2]
    r = relay.post("/api/agents/dev/read", {"upTo": m[2]})
    assert r.status == 200 and r.json["count"] == 2, r  # m[1], m[2]; m[0] was read already
    r = relay.post("/api/messages/%d/claim" % work, {"agentId": "dev"})
    assert r.status == 200, r
    return {"m": m, "fan": fan, "work": work, "open": open_work, "held": held}


def check_state(relay, s):
    m = s["m"]
    # -- over HTTP
    cards = {a["id"]: a for a in relay.get("/api/agents").json["agents"]}
    assert {"boss", "dev", "ops", "human", "system"} <= set(cards)
    dev = cards["dev"]
    assert (dev["tags"], dev["capabilities"], dev["label"], dev["channels"], dev["meta"]) == (
        ["backend", "py"], ["chat", "review"], "alpha", ["all"], {"team": "core"})
    assert cards["ops"]["approvalMode"] == "guarded" and cards["ops"]["channels"] == ["ops"]

    history = relay.get("/api/messages?limit=100").json["messages"]
    assert sorted(x["id"] for x in history) == sorted(m + [s["fan"], s["work"], s["open"], s["held"]])
    fan = relay.get("/api/messages/%d" % s["fan"]).json["message"]
    assert (fan["to"], fan["channel"], fan["subject"], fan["payload"]) == ("tag:backend", "dev", "s", {"k": [1, 2]})

    assert relay.get("/api/messages/%d" % s["work"]).json["message"]["claimedBy"] == "dev"
    r = relay.post("/api/messages/%d/claim" % s["work"], {"agentId": "boss"})
    assert r.status in (403, 409), r  # boss is not addressed; in any case the claim stands
    assert relay.get("/api/messages/%d" % s["held"]).json["receipts"] == [
        {"agentId": "ops", "state": "held", "deliveredAt": None, "readAt": None}]

    # read markers, as the sender sees them (an inbox read here would move the cursor under test)
    def dev_state(mid):
        return {x["agentId"]: x["state"] for x in relay.get("/api/messages/%d" % mid).json["receipts"]}.get("dev")

    assert [dev_state(i) for i in m] == ["read", "read", "read", None]
    assert relay.get("/api/agents/dev").json["id"] == "dev"

    # -- in the file
    agents = {r["id"]: r for r in relay.sql("SELECT * FROM agents")}
    assert agents["dev"]["tags"] == '["backend","py"]' and agents["dev"]["label"] == "alpha"
    assert agents["dev"]["cursor"] == m[2]
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (s["work"],))[0]["claimed_by"] == "dev"
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (s["open"],))[0]["claimed_by"] is None
    receipts = {(r["message_id"], r["agent_id"]): r for r in relay.sql("SELECT * FROM receipts")}
    for i in m[:3]:
        assert receipts[(i, "dev")]["state"] == "read" and receipts[(i, "dev")]["read_at"] is not None
    assert receipts[(s["held"], "ops")]["state"] == "held"
    assert relay.sql("PRAGMA integrity_check") == [{"integrity_check": "ok"}]


def test_everything_survives_sigkill(relay):
    s = build_state(relay)
    relay.restart(kill=True)
    assert relay.proc.poll() is None
    check_state(relay, s)
    # the relay-kept cursor resumes where it was: the client following it gets the rest, once
    m = s["m"]
    assert ids(relay.inbox("dev")) == [m[3], s["fan"], s["work"], s["open"]]
    assert ids(relay.inbox("dev")) == []
    read = {x["id"]: x["read"] for x in relay.inbox("dev", since=0)["messages"]}
    assert read == {m[0]: True, m[1]: True, m[2]: True, m[3]: False, s["fan"]: False, s["work"]: False, s["open"]: False}
    # a second crash right after those writes loses nothing either
    relay.restart(kill=True)
    assert relay.sql("SELECT cursor FROM agents WHERE id = 'dev'")[0]["cursor"] == s["open"]
    assert ids(relay.inbox("dev")) == []
    assert relay.get("/api/messages/%d" % s["work"]).json["message"]["claimedBy"] == "dev"
    assert relay.sql("PRAGMA integrity_check") == [{"integrity_check": "ok"}]
    assert "Traceback" not in relay.log


def test_state_after_a_clean_restart_matches_too(relay):
    s = build_state(relay)
    relay.restart()
    check_state(relay, s)
    # approval and release after the restart still reach the cursor follower
    assert relay.post("/api/messages/%d/approve" % s["held"], {}).status == 200
    relay.restart(kill=True)
    assert ids(relay.inbox("ops")) == [s["held"]]
    assert relay.post("/api/messages/%d/release" % s["work"], {"agentId": "dev"}).status == 200
    relay.restart(kill=True)
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (s["work"],))[0]["claimed_by"] is None
    assert relay.post("/api/messages/%d/claim" % s["work"], {"agentId": "dev"}).status == 200
    assert "Traceback" not in relay.log


def test_a_database_from_the_previous_schema_is_migrated_and_keeps_everything(relay):
    """A database written at schema 2 (created_at indexes, a full thread index) is moved to the current schema in
    place on start: every row stays, threads, inboxes, stats and retention's age lookups work as before."""
    import sqlite3

    s = build_state(relay)
    root = relay.send("boss", "dev", "root")["id"]
    reply = relay.post("/api/messages", {"from": "dev", "to": "boss", "body": "re", "replyTo": root}).json["message"]["id"]
    relay.stop()
    con = sqlite3.connect(relay.db_path)
    with con:  # put the schema back as version 2 left it
        for name, kind in con.execute("SELECT name, type FROM sqlite_master WHERE type IN ('trigger', 'table') "
                                      "AND name IN ('messages_fts', 'tasks_fts') OR name LIKE '%_fts_%' AND type = 'trigger'").fetchall():
            con.execute("DROP %s %s" % (kind.upper(), name))  # the search index (version 6)
        con.execute("DROP TABLE search_progress")  # version 7
        con.execute("ALTER TABLE messages DROP COLUMN recipients")  # version 5
        con.execute("DROP INDEX messages_thread")
        con.execute("CREATE INDEX messages_thread ON messages(thread_id, id)")
        con.execute("CREATE INDEX messages_created ON messages(created_at)")
        con.execute("CREATE INDEX events_created ON events(created_at)")
        con.execute("DROP TABLE leases")  # schema 4 made it
        con.execute("PRAGMA user_version = 2")
    columns = {t: [r[1] for r in con.execute("PRAGMA table_info(%s)" % t)] for t in ("messages", "events", "receipts", "agents")}
    rows = {t: con.execute("SELECT * FROM %s ORDER BY 1, 2" % t).fetchall() for t in columns}
    con.close()
    relay.start()
    assert relay.sql("PRAGMA user_version")[0]["user_version"] == 7  # on through leases (4), recipients (5), search (6, 7)
    indexes = {r["name"]: r["sql"] for r in relay.sql("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    assert "messages_created" not in indexes and "events_created" not in indexes
    assert "WHERE thread_id IS NOT NULL" in indexes["messages_thread"]
    for table, kept in rows.items():
        cols = ", ".join(columns[table])
        assert [tuple(r.values()) for r in relay.sql("SELECT %s FROM %s ORDER BY 1, 2" % (cols, table))] == kept, table
    assert ids(relay.inbox("dev")) == [s["m"][3], s["fan"], s["work"], s["open"], root]
    thread = relay.get("/api/messages/%d/thread" % reply).json
    assert [m["id"] for m in thread["messages"]] == [root, reply]
    stats = relay.get("/api/stats").json
    assert stats["messages"]["total"] == len(rows["messages"]) == stats["messages"]["last24h"], stats
