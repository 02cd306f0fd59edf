"""GET /api/search against the real relay: ranked results with snippets, the query language (and what it does with
input that is not), filters and visibility (nothing held for an agent is found for it), tasks, the FTS5 index and
the scan giving the same answers on the same data, the index built for the rows of a database written by the
relay before it had one, filled after the sends (a search first adds what the indexer has not reached), kept in
step by retention, and the setting that picks the engine.
"""
import os
import sqlite3
import time

import pytest

from conftest import ROOT, wait_for

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "main-schema3.sql")
DAY_MS = 86400000


def search(relay, q, **query):
    r = relay.get("/api/search", query=dict(q=q, **query))
    assert r.status == 200, r
    return r.json


def ids(out, kind="message"):
    return [r[kind]["id"] for r in out["results"] if r["type"] == kind]


def fts_rowids(relay, table, match):
    """What the FTS5 index itself holds for a query (read straight from the database file)."""
    return sorted(r["rowid"] for r in relay.sql("SELECT rowid FROM %s WHERE %s MATCH ?" % (table, table), (match,)))


def corpus(relay):
    """Agents and messages that the engines' tests share; returns the ids by name."""
    relay.register("backend-agent", tags=["backend"])
    relay.register("reviewer", tags=["review"])
    relay.register("ops", tags=["ops"], channels=["deploys"])
    relay.register("gate", tags=["review"], approvalMode="guarded")
    m = {}
    m["pr"] = relay.send("backend-agent", "reviewer", "The schema migration looks clean, tests pass on the branch.",
                         subject="Migration for PR 42")["id"]
    m["reply"] = relay.send("reviewer", "backend-agent", "Approved; merge the migration when CI is green.", replyTo=m["pr"])["id"]
    m["deploy"] = relay.send("backend-agent", "tag:ops", "Deploy of build 7731 to staging is done; smoke tests are green.",
                             channel="deploys")["id"]
    m["long"] = relay.send("backend-agent", "reviewer", "A long note that mentions migration once among many other words: "
                           + " ".join("filler%d" % i for i in range(60)))["id"]
    m["secret"] = relay.send("backend-agent", "gate", "Rotate the staging credentials (migration of the vault) before Friday.")["id"]
    m["cafe"] = relay.send("reviewer", "backend-agent", "Le Café Müller: déploiement terminé, naïve tests OK.")["id"]
    m["phrase"] = relay.send("reviewer", "backend-agent", "full disk on db-2, the disk is full again")["id"]
    m["punct"] = relay.send("reviewer", "backend-agent", "foo-bar baz_qux x/y NOT AND OR NEAR(a b) col:val -minus ^caret")["id"]
    task = relay.post("/api/tasks", {"title": "Disk full on db-2", "body": "94% used on /var; migration logs grow",
                                     "target": "tag:backend", "from": "reviewer"}).json["task"]
    m["task"] = task["id"]
    m["task_msg"] = task["messageId"]
    return m


QUERIES = ["migration", "migrat*", "Migration tests", '"tests pass"', '"pass tests"', "cafe", "CAFÉ", "müller", "naive",
           "deploiement", '"disk full"', "disk full", "full*", "db 2", "foo-bar", "baz_qux", "NOT", "near", "col:val", "-minus",
           "^caret", '"unbalanced quote', 'a"b', "x/y", "7731", "build*", "migration -filler1", "filler1*", "disk AND full",
           "(migration)", "migration OR deploy", "green", "credentials", "94"]


# -- ranked, with snippets ---------------------------------------------------------------------


def test_results_come_best_first_with_snippets_and_say_the_engine(relay):
    m = corpus(relay)
    assert relay.get("/api/health").json["search"] == "fts5"
    out = search(relay, "migration")
    assert out["engine"] == "fts5" and out["more"] is False
    found = ids(out)
    # in the subject and the body beats the body alone, which beats once in a long body
    assert found[0] == m["pr"] and found.index(m["reply"]) < found.index(m["long"])
    assert set(found) == {m["pr"], m["reply"], m["long"], m["secret"]}
    ranks = [r["rank"] for r in out["results"]]
    assert ranks == sorted(ranks, reverse=True)
    first = out["results"][0]
    assert first["type"] == "message" and first["message"]["subject"] == "Migration for PR 42"
    assert "**migration**" in first["snippet"].lower()
    long = [r for r in out["results"] if r["type"] == "message" and r["message"]["id"] == m["long"]][0]
    assert long["snippet"].startswith("A long note") and long["snippet"].endswith("\u2026") and len(long["snippet"]) < 200

    # a task is found by its title and body, once, as the task (its announcing message is not a second result)
    out = search(relay, "disk full")
    assert ids(out, "task") == [m["task"]] and m["task_msg"] not in ids(out)
    task = [r for r in out["results"] if r["type"] == "task"][0]
    assert task["task"]["title"] == "Disk full on db-2" and "**" in task["snippet"]
    assert m["phrase"] in ids(out)


def test_the_query_language_words_phrases_and_prefixes(relay):
    m = corpus(relay)
    assert ids(search(relay, "migration tests")) == [m["pr"]]  # every word must match
    assert ids(search(relay, '"tests pass"')) == [m["pr"]]
    assert ids(search(relay, '"pass tests"')) == []  # a phrase keeps its order
    assert set(ids(search(relay, "migrat*"))) == {m["pr"], m["reply"], m["long"], m["secret"]}
    assert ids(search(relay, "migrat")) == []  # a word is a whole word
    assert ids(search(relay, '"smoke test"*')) == [m["deploy"]]  # a phrase whose last word is a prefix
    assert ids(search(relay, "cafe MULLER")) == [m["cafe"]]  # case and accents are folded
    assert ids(search(relay, "foo-bar")) == [m["punct"]]  # punctuation separates words, as in the text


@pytest.mark.parametrize("q", ['"', '""', "*", "**", '"*"', "-", "()", "NEAR(", 'AND "', "^", ":", "col:", '" OR "',
                               "NOT", "a:b:c", "{x y}", "x" * 500, "\u00e9*", "\U0001F600", "'", "%", "_", "\\"])
def test_operators_and_broken_syntax_are_plain_text_or_a_400_naming_q_never_a_500(relay, q):
    relay.register("a")
    relay.send("a", "a", "NOT a NEAR miss: col:val and x y")
    r = relay.get("/api/search", query={"q": q})
    assert r.status in (200, 400), r
    if r.status == 400:
        assert r.code == "invalid_field" and r.json["error"]["field"] == "q", r
    else:
        assert isinstance(r.json["results"], list)
    assert "Traceback" not in relay.log


def test_bad_parameters_are_refused_naming_the_field(relay):
    relay.register("a")
    for query, field in ((dict(), "q"), (dict(q=""), "q"), (dict(q="x", limit=0), "limit"), (dict(q="x", limit=101), "limit"),
                         (dict(q="x", since="yesterday"), "since"), (dict(q="x", until="-"), "until"),
                         (dict(q="x" * 501), "q"), (dict(q="!!! ???"), "q"), (dict(q=" ".join("w%d" % i for i in range(17))), "q")):
        r = relay.get("/api/search", query=query)
        assert r.status == 400 and r.code == "invalid_field" and r.json["error"]["field"] == field, (query, r)
    r = relay.get("/api/search", query={"q": "x", "agent": "nobody"})
    assert r.status == 404 and r.code == "unknown_agent"
    assert relay.post("/api/search", {"q": "x"}).status == 405


# -- filters and visibility ------------------------------------------------------------------------


def test_filters_and_limit(relay):
    m = corpus(relay)
    assert set(ids(search(relay, "migration", **{"from": "reviewer"}))) == {m["reply"]}
    assert set(ids(search(relay, "green", to="tag:ops"))) == {m["deploy"]}
    assert set(ids(search(relay, "green", channel="deploys"))) == {m["deploy"]}
    assert ids(search(relay, "green", to="ops")) == []  # `to` is the exact target string
    assert ids(search(relay, "full", **{"from": "reviewer"}), "task") == [m["task"]]
    assert ids(search(relay, "full", to="tag:backend"), "task") == [m["task"]]
    assert ids(search(relay, "full", **{"from": "backend-agent"}), "task") == []
    out = search(relay, "migration", limit=2)
    assert len(out["results"]) == 2 and out["more"] is True
    created = {r["id"]: r["created_at"] for r in relay.sql("SELECT id, created_at FROM messages")}
    found = {m["pr"], m["reply"], m["long"], m["secret"]}  # "migration" in messages (the task's is a task)
    for pivot in sorted({created[i] for i in found}):  # since and until are inclusive, in epoch ms
        assert set(ids(search(relay, "migration", since=pivot))) == {i for i in found if created[i] >= pivot}
        assert set(ids(search(relay, "migration", until=pivot))) == {i for i in found if created[i] <= pivot}
        assert set(ids(search(relay, "migration", since=pivot, until=pivot))) == {i for i in found if created[i] == pivot}
    assert ids(search(relay, "migration", since=max(created.values()) + 1)) == []


def test_an_agent_finds_only_what_it_may_see_and_never_what_is_held_for_it(relay):
    m = corpus(relay)
    assert m["secret"] not in ids(search(relay, "credentials", agent="gate"))  # held for gate
    assert ids(search(relay, "credentials", agent="backend-agent")) == [m["secret"]]  # its sender
    assert ids(search(relay, "credentials")) == [m["secret"]]  # a person sees everything
    assert ids(search(relay, "credentials", agent="reviewer")) == []  # not addressed to it
    assert ids(search(relay, "green", agent="ops")) == [m["deploy"]]  # fan-out on its channel
    # history agrees: GET /api/messages?agent=gate does not list what is held for it either
    assert m["secret"] not in [x["id"] for x in relay.get("/api/messages?agent=gate").json["messages"]]
    relay.post("/api/messages/%d/approve" % m["secret"], {})
    assert ids(search(relay, "credentials", agent="gate")) == [m["secret"]]
    assert m["secret"] in [x["id"] for x in relay.get("/api/messages?agent=gate").json["messages"]]
    rejected = relay.send("backend-agent", "gate", "quarterly credentials audit")["id"]
    relay.post("/api/messages/%d/reject" % rejected, {})
    assert rejected not in ids(search(relay, "audit", agent="gate"))
    assert rejected not in [x["id"] for x in relay.get("/api/messages?agent=gate").json["messages"]]


# -- the two engines ----------------------------------------------------------------------------------


def answers(relay):
    out = {}
    for q in QUERIES:
        r = relay.get("/api/search", query={"q": q, "limit": 100})
        assert r.status in (200, 400), (q, r)
        out[q] = r.status if r.status == 400 else sorted((x["type"], x[x["type"]]["id"]) for x in r.json["results"])
    return out


def test_fts5_and_the_scan_give_the_same_answers_on_the_same_data(relay_factory):
    relay = relay_factory()
    corpus(relay)
    fts = answers(relay)
    assert relay.get("/api/search?q=migration").json["engine"] == "fts5"
    assert sum(1 for v in fts.values() if v and v != 400) >= 20, fts  # most queries find something
    relay.stop()
    relay.extra_env["AGENT_RELAY_SEARCH"] = "like"
    relay.start()
    assert relay.get("/api/health").json["search"] == "like"
    assert relay.get("/api/search?q=migration").json["engine"] == "like"
    # the scan keeps no index: no triggers cost the writes
    assert relay.sql("SELECT name FROM sqlite_master WHERE type = 'trigger'") == []
    like = answers(relay)
    assert like == fts
    out = relay.get("/api/search", query={"q": "migration"}).json
    assert "**migration**" in out["results"][0]["snippet"].lower()

    # rows written while scanning are in the index once FTS5 is back (it is rebuilt at start)
    later = relay.send("reviewer", "backend-agent", "zeppelin arrives")["id"]
    relay.stop()
    relay.extra_env["AGENT_RELAY_SEARCH"] = "fts5"
    relay.start()
    assert ids(search(relay, "zeppelin")) == [later]
    assert fts_rowids(relay, "messages_fts", "zeppelin") == [later]
    assert answers(relay) == fts


def test_an_unknown_engine_setting_stops_the_start_naming_it(relay_factory):
    relay = relay_factory(env={"AGENT_RELAY_SEARCH": "elastic"}, start=False)
    with pytest.raises(RuntimeError) as e:
        relay.start()
    assert "AGENT_RELAY_SEARCH" in str(e.value)


# -- the index: built, kept in step, trimmed -------------------------------------------------------------


def test_a_database_from_before_the_index_gets_one_for_its_rows(relay_factory, tmp_path):
    """The fixture is a database the relay wrote before it had the search index (schema 3): the start migrates it,
    the index holds its rows, and what is written next is indexed: tasks by their trigger, messages by the indexer."""
    relay = relay_factory(env={"RETENTION_DAYS": "0"}, start=False)
    con = sqlite3.connect(relay.db_path)
    with open(FIXTURE, encoding="utf-8") as f:
        con.executescript(f.read())
    assert con.execute("PRAGMA user_version").fetchone()[0] == 3
    before = con.execute("SELECT id, body FROM messages ORDER BY id").fetchall()
    con.close()
    relay.start()
    assert relay.sql("PRAGMA user_version")[0]["user_version"] == 7  # on through the search index (6) and its progress (7)
    assert [(r["id"], r["body"]) for r in relay.sql("SELECT id, body FROM messages ORDER BY id")] == before
    triggers = sorted(r["name"] for r in relay.sql("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
    assert triggers == ["messages_fts_delete", "messages_fts_update", "tasks_fts_delete", "tasks_fts_insert", "tasks_fts_update"]
    assert fts_rowids(relay, "messages_fts", "migration") == [1, 2]
    assert relay.sql("SELECT upto FROM search_progress WHERE name = 'messages_fts'")[0]["upto"] == len(before)
    assert set(ids(search(relay, "migration"))) == {1, 2}
    assert ids(search(relay, "smoke tests")) == [3]
    assert ids(search(relay, "disk", agent="backend-agent"), "task") == [1]
    assert ids(search(relay, "credentials", agent="gate")) == []  # held for gate in the old database too
    assert ids(search(relay, "credentials")) == [4]
    # a new message is indexed moments after its send, with no search to ask for it, and stays indexed through a kill
    new = relay.send("reviewer", "backend-agent", "the migration of the cache is next")["id"]
    assert wait_for(lambda: fts_rowids(relay, "messages_fts", "migration") == [1, 2, new], timeout=5)
    relay.restart(kill=True)
    assert fts_rowids(relay, "messages_fts", "migration") == [1, 2, new]
    assert set(ids(search(relay, "migration"))) == {1, 2, new}


def test_a_search_finds_what_was_sent_just_before_it_and_the_index_agrees_word_for_word(relay):
    """Messages are indexed after their sends: a search first adds what the indexer has not reached yet."""
    relay.register("a")
    relay.register("b")
    sent = [relay.send("a", "b", "walrus report %d" % i)["id"] for i in range(40)]
    assert sorted(ids(search(relay, "walrus", limit=100))) == sent  # each send answered before the search began
    assert fts_rowids(relay, "messages_fts", "walrus") == sent
    upto = relay.sql("SELECT upto FROM search_progress WHERE name = 'messages_fts'")[0]["upto"]
    assert upto >= sent[-1]
    relay.stop()
    con = sqlite3.connect(relay.db_path)
    try:
        con.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 1)")
    finally:
        con.close()


def test_messages_stored_while_no_relay_indexed_them_are_indexed_at_the_start(relay_factory):
    """Rows the index does not hold yet (the relay was killed before its indexer reached them): the start adds them,
    and deleting rows the index never held leaves it whole (its delete trigger acts only on rows it holds)."""
    relay = relay_factory(env={"RETENTION_DAYS": "0"})
    relay.register("a")
    relay.register("b")
    first = relay.send("a", "b", "narwhal one")["id"]
    assert ids(search(relay, "narwhal")) == [first]
    relay.stop()
    con = sqlite3.connect(relay.db_path)
    with con:  # as a send writes them, before the indexer has run
        upto = con.execute("SELECT upto FROM search_progress WHERE name = 'messages_fts'").fetchone()[0]
        assert upto >= first
        for i in range(3):
            con.execute("INSERT INTO messages(from_agent, to_target, body, kind, payload, meta, created_at) "
                        "VALUES ('a', 'b', ?, 'chat', '{}', '{}', 0)", ("narwhal stored %d" % i,))
        gone = con.execute("SELECT MAX(id) FROM messages").fetchone()[0]
        con.execute("DELETE FROM messages WHERE id = ?", (gone,))  # never indexed: nothing to take out of the index
    con.close()
    relay.start()
    stored = [r["id"] for r in relay.sql("SELECT id FROM messages WHERE body LIKE 'narwhal stored%' ORDER BY id")]
    assert len(stored) == 2
    assert wait_for(lambda: fts_rowids(relay, "messages_fts", "narwhal") == [first] + stored, timeout=5)  # the indexer, at start
    assert sorted(ids(search(relay, "narwhal"))) == [first] + stored
    relay.stop()
    con = sqlite3.connect(relay.db_path)
    try:  # the index and its rows agree, word for word
        con.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 1)")
    finally:
        con.close()


def test_a_database_whose_index_triggers_kept_is_moved_to_the_indexer_without_a_rebuild(relay_factory):
    """A database of a relay whose triggers indexed each message inside its send (schema 6): the start keeps the
    index it has (it holds every row), swaps the triggers and records how far the index reaches."""
    relay = relay_factory()
    relay.register("a")
    relay.register("b")
    old = [relay.send("a", "b", "okapi %d" % i)["id"] for i in range(5)]
    assert sorted(ids(search(relay, "okapi"))) == old
    relay.stop()
    con = sqlite3.connect(relay.db_path)
    with con:  # as schema 6 left it: three triggers on messages, no progress table
        con.execute("DROP TRIGGER messages_fts_delete")
        con.execute("DROP TRIGGER messages_fts_update")
        con.execute("DROP TABLE search_progress")
        for stmt in (
            "CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN INSERT INTO messages_fts(rowid, subject, body) "
            "VALUES (new.id, new.subject, new.body); END",
            "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN INSERT INTO messages_fts(messages_fts, rowid, "
            "subject, body) VALUES ('delete', old.id, old.subject, old.body); END",
            "CREATE TRIGGER messages_fts_update AFTER UPDATE OF subject, body ON messages BEGIN INSERT INTO messages_fts("
            "messages_fts, rowid, subject, body) VALUES ('delete', old.id, old.subject, old.body); INSERT INTO messages_fts("
            "rowid, subject, body) VALUES (new.id, new.subject, new.body); END",
        ):
            con.execute(stmt)
        # a row only the old trigger indexed: were the index rebuilt, it would be there all the same, so mark the index
        con.execute("INSERT INTO messages_fts(rowid, subject, body) VALUES (999999, NULL, 'okapi marker')")
        con.execute("PRAGMA user_version = 6")
    con.close()
    relay.start()
    assert relay.sql("PRAGMA user_version")[0]["user_version"] == 7
    triggers = sorted(r["name"] for r in relay.sql("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'messages%'"))
    assert triggers == ["messages_fts_delete", "messages_fts_update"]
    assert relay.sql("SELECT upto FROM search_progress WHERE name = 'messages_fts'")[0]["upto"] == old[-1]
    assert 999999 in fts_rowids(relay, "messages_fts", "marker")  # kept, not rebuilt
    new = relay.send("a", "b", "okapi new")["id"]
    assert sorted(ids(search(relay, "okapi"))) == old + [new]


def test_retention_removes_rows_from_the_index(relay_factory):
    relay = relay_factory(env={"STALE_TTL_MS": "4000", "RETENTION_DAYS": "14"})
    relay.register("a")
    relay.register("b")
    old = [relay.send("a", "b", "ancient mammoth %d" % i)["id"] for i in range(3)]
    task = relay.post("/api/tasks", {"title": "mammoth tusk inventory", "target": "b", "from": "a"}).json["task"]
    assert relay.patch("/api/tasks/%d/status" % task["id"], {"status": "canceled"}).status == 200
    upto = relay.sql("SELECT MAX(id) AS n FROM messages")[0]["n"]
    fresh = relay.send("a", "b", "fresh mammoth")["id"]
    assert set(ids(search(relay, "mammoth"))) == set(old + [fresh])
    assert ids(search(relay, "mammoth"), "task") == [task["id"]]
    relay.stop()
    when = int(time.time() * 1000) - 30 * DAY_MS
    con = sqlite3.connect(relay.db_path)
    with con:
        con.execute("UPDATE messages SET created_at = ? WHERE id <= ?", (when, upto))
        con.execute("UPDATE tasks SET created_at = ?, updated_at = ? WHERE id = ?", (when, when, task["id"]))
    con.close()
    relay.start()
    relay.register("marker")
    assert wait_for(lambda: relay.get("/api/agents/marker").json["status"] == "offline")  # a sweep with retention ran
    assert relay.sql("SELECT COUNT(*) AS n FROM messages WHERE id <= ?", (upto,))[0]["n"] == 0
    assert ids(search(relay, "mammoth")) == [fresh]
    assert ids(search(relay, "mammoth"), "task") == []
    assert fts_rowids(relay, "messages_fts", "mammoth") == [fresh]
    assert fts_rowids(relay, "tasks_fts", "mammoth") == []
    relay.stop()
    con = sqlite3.connect(relay.db_path)
    try:
        for table in ("messages_fts", "tasks_fts"):  # the index and its rows agree, word for word
            con.execute("INSERT INTO %s(%s, rank) VALUES ('integrity-check', 1)" % (table, table))
    finally:
        con.close()
