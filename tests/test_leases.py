"""Leases (API.md "Leases"): advisory claims on paths, against the real relay.

Taking one (defaults, scope, validation, who may), conflicts (409 lease_conflict naming the holders, nothing
stored), the overlap rules as a table of cases, agents racing for overlapping paths (exactly one winner, the
losers learn who), renewing, releasing, and the four ways a lease ends with their cause on the stream: released,
expired (the sweeper), offline and removed (in the transaction that takes the agent away). Also who sees lease
events on a narrowed stream, /api/stats, agent keys, a restart, retention, and a database written before leases.
"""
import json
import os
import re
import sqlite3
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, wait_for
from test_stream import Stream

sys.path.insert(0, ROOT)
import agent_relay  # noqa: E402

DAY_MS = 86400000


def lease(relay, agent_id, paths, **fields):
    fields.update({"agentId": agent_id, "paths": paths})
    return relay.post("/api/leases", fields)


def take(relay, agent_id, paths, **fields):
    r = lease(relay, agent_id, paths, **fields)
    assert r.status == 201, r
    return r.json["lease"]


def active(relay, **query):
    r = relay.get("/api/leases", query=query)
    assert r.status == 200, r
    return r.json["leases"]


def stored(relay):
    return relay.sql("SELECT * FROM leases ORDER BY id")


def lease_events(relay):
    out = []
    for row in relay.sql("SELECT id, type, agent_id, audience, data FROM events WHERE type LIKE 'lease.%' ORDER BY id"):
        row["data"] = json.loads(row["data"])
        out.append(row)
    return out


def fingerprint(relay):
    return (relay.sql("SELECT COUNT(*) AS n, COALESCE(MAX(id), 0) AS top, COALESCE(SUM(released_at IS NULL), 0) AS live, "
                      "TOTAL(expires_at) AS ex FROM leases")[0],
            relay.sql("SELECT COUNT(*) AS n FROM events")[0]["n"])


# -- taking a lease -----------------------------------------------------------------------------------------------


def test_a_lease_is_taken_with_its_defaults_and_stored(relay):
    relay.register("backend-agent", project="shop")
    before = agent_relay.now_ms()
    r = lease(relay, "backend-agent", ["src/api/", "./README.md", "src/api/"], reason="migrating the API")
    assert r.status == 201, r
    got = r.json["lease"]
    assert set(got) == {"id", "agentId", "scope", "paths", "reason", "exclusive", "createdAt", "expiresAt", "releasedAt"}
    assert (got["agentId"], got["scope"], got["paths"], got["reason"], got["exclusive"], got["releasedAt"]) == (
        "backend-agent", "shop", ["src/api/", "README.md"], "migrating the API", True, None)
    assert before <= got["createdAt"] and got["expiresAt"] - got["createdAt"] == 1800000
    row = stored(relay)[0]
    assert (row["id"], row["agent_id"], row["scope"], json.loads(row["paths"]), row["exclusive"], row["ttl_ms"],
            row["expires_at"], row["released_at"]) == (got["id"], "backend-agent", "shop", got["paths"], 1, 1800000,
                                                        got["expiresAt"], None)
    assert active(relay) == [got]
    assert relay.get("/api/stats").json["leases"] == {"active": 1}
    # a shared lease, with a ttl and a scope of its own
    other = take(relay, "backend-agent", "docs/**", exclusive=False, ttlMs=1000, scope="shop-docs")
    assert (other["paths"], other["exclusive"], other["scope"], other["expiresAt"] - other["createdAt"]) == (
        ["docs/**"], False, "shop-docs", 1000)
    events = lease_events(relay)
    assert [e["type"] for e in events] == ["lease.acquired", "lease.acquired"]
    assert events[0]["data"] == {"lease": got} and events[0]["agent_id"] == "backend-agent"


def test_the_scope_is_the_agents_project_else_default_and_scopes_never_conflict(relay):
    relay.register("a", project="shop")
    relay.register("b", project="billing")
    relay.register("c")  # no project
    assert take(relay, "a", ["src/"])["scope"] == "shop"
    assert take(relay, "b", ["src/"])["scope"] == "billing"  # same paths, another working copy
    assert take(relay, "c", ["src/"])["scope"] == "default"
    r = lease(relay, "c", ["src/app.py"], scope="shop")
    assert (r.status, r.code) == (409, "lease_conflict"), r
    assert [x["agentId"] for x in active(relay, scope="shop")] == ["a"]
    assert [x["agentId"] for x in active(relay, path="src/x.py")] == ["a", "b", "c"]
    assert [x["agentId"] for x in active(relay, path="src/x.py", scope="default")] == ["c"]
    assert [x["scope"] for x in active(relay, agentId="b")] == ["billing"]


BAD = [
    ({}, "agentId"),
    ({"agentId": "a"}, "paths"),
    ({"agentId": "a", "paths": []}, "paths"),
    ({"agentId": "a", "paths": {"src": 1}}, "paths"),
    ({"agentId": "a", "paths": [7]}, "paths"),
    ({"agentId": "a", "paths": ["/etc/passwd"]}, "paths"),
    ({"agentId": "a", "paths": ["../outside"]}, "paths"),
    ({"agentId": "a", "paths": ["src/../../x"]}, "paths"),
    ({"agentId": "a", "paths": ["src/a\x00b"]}, "paths"),
    ({"agentId": "a", "paths": ["src\\api\\x.py"]}, "paths"),
    ({"agentId": "a", "paths": ["src/\nx"]}, "paths"),
    ({"agentId": "a", "paths": [""]}, "paths"),
    ({"agentId": "a", "paths": ["./"]}, "paths"),
    ({"agentId": "a", "paths": ["src/a**b.py"]}, "paths"),
    ({"agentId": "a", "paths": ["x" * 1025]}, "paths"),
    ({"agentId": "a", "paths": ["d/" + "x" * 256]}, "paths"),
    ({"agentId": "a", "paths": ["/".join(["d"] * 129)]}, "paths"),
    ({"agentId": "a", "paths": ["f%d" % i for i in range(65)]}, "paths"),
    ({"agentId": "a", "paths": ["ok.py"], "ttlMs": 999}, "ttlMs"),
    ({"agentId": "a", "paths": ["ok.py"], "ttlMs": 86400001}, "ttlMs"),
    ({"agentId": "a", "paths": ["ok.py"], "ttlMs": "60000"}, "ttlMs"),
    ({"agentId": "a", "paths": ["ok.py"], "ttlMs": True}, "ttlMs"),
    ({"agentId": "a", "paths": ["ok.py"], "exclusive": "yes"}, "exclusive"),
    ({"agentId": "a", "paths": ["ok.py"], "scope": ""}, "scope"),
    ({"agentId": "a", "paths": ["ok.py"], "scope": 5}, "scope"),
    ({"agentId": "a", "paths": ["ok.py"], "scope": "s\x01"}, "scope"),
    ({"agentId": "a", "paths": ["ok.py"], "scope": "s" * 129}, "scope"),
    ({"agentId": "a", "paths": ["ok.py"], "reason": ["x"]}, "reason"),
    ({"agentId": "a", "paths": ["ok.py"], "reason": "r" * 1001}, "reason"),
    ({"agentId": 12, "paths": ["ok.py"]}, "agentId"),
]


@pytest.mark.parametrize("body,field", BAD, ids=["%d-%s" % (i, f) for i, (_b, f) in enumerate(BAD)])
def test_bad_input_is_400_naming_the_field_and_stores_nothing(relay, body, field):
    relay.register("a", project="shop")
    take(relay, "a", ["held.py"])
    before = fingerprint(relay)
    r = relay.post("/api/leases", body)
    assert (r.status, r.code) == (400, "invalid_field"), r
    assert r.json["error"]["field"] == field and r.json["error"]["message"].startswith(field + ":"), r
    assert fingerprint(relay) == before
    assert "Traceback" not in relay.log


def test_bad_lease_requests_elsewhere_are_400_or_404_and_change_nothing(relay):
    relay.register("a")
    one = take(relay, "a", ["x.py"])
    before = fingerprint(relay)
    for method, path, body, want in [
        ("GET", "/api/leases?path=/abs/x.py", None, (400, "invalid_field")),
        ("GET", "/api/leases?path=../x", None, (400, "invalid_field")),
        ("GET", "/api/leases?scope=a%01b", None, (400, "invalid_field")),
        ("POST", "/api/leases/%d/renew" % one["id"], {"agentId": "a", "ttlMs": 5}, (400, "invalid_field")),
        ("POST", "/api/leases/%d/renew" % one["id"], {}, (400, "invalid_field")),
        ("POST", "/api/leases/abc/renew", {"agentId": "a"}, (404, "not_found")),
        ("POST", "/api/leases/999/renew", {"agentId": "a"}, (404, "not_found")),
        ("DELETE", "/api/leases/999?agentId=a", None, (404, "not_found")),
        ("DELETE", "/api/leases/%d?agentId=nobody" % one["id"], None, (404, "unknown_agent")),
        ("POST", "/api/leases", {"agentId": "nobody", "paths": ["x"]}, (404, "unknown_agent")),
        ("PUT", "/api/leases", {}, (405, "method_not_allowed")),
    ]:
        r = relay.request(method, path, body=body)
        assert (r.status, r.code) == want, (method, path, r)
        assert fingerprint(relay) == before, (method, path)
    assert "Traceback" not in relay.log


def test_who_may_take_a_lease(relay):
    relay.register("reader", approvalMode="read-only")
    relay.register("gone")
    relay.delete("/api/agents/gone")
    before = fingerprint(relay)
    r = lease(relay, "reader", ["src/"])
    assert (r.status, r.code) == (403, "read_only") and "read-only" in r.json["error"]["message"], r
    r = lease(relay, "gone", ["src/"])
    assert (r.status, r.code) == (409, "agent_offline") and "heartbeat" in r.json["error"]["message"], r
    r = lease(relay, "never-registered", ["src/"])
    assert (r.status, r.code) == (404, "unknown_agent"), r
    assert fingerprint(relay) == before
    # back online (a heartbeat), it may; a lease is activity, like a claim
    assert relay.post("/api/agents/gone/heartbeat", {}).status == 200
    assert take(relay, "gone", ["src/"])["agentId"] == "gone"
    # a person (human) may say what they are editing too; with no project, in scope default
    assert take(relay, "human", ["docs/"])["scope"] == "default"


# -- conflicts and the overlap rules ----------------------------------------------------------------------------


def test_a_conflict_names_every_holder_and_stores_nothing(relay):
    relay.register("backend-agent", project="shop")
    relay.register("docs-agent", project="shop")
    relay.register("newcomer", project="shop")
    api = take(relay, "backend-agent", ["src/api/", "setup.cfg"], reason="migrating the API")
    readme = take(relay, "docs-agent", ["README.md"], exclusive=False, reason="proofreading")
    before = fingerprint(relay)
    r = lease(relay, "newcomer", ["src/api/routes.py", "README.md", "docs/"], reason="refactor")
    assert (r.status, r.code) == (409, "lease_conflict"), r
    err = r.json["error"]
    assert err["conflicts"] == [
        {"leaseId": api["id"], "agentId": "backend-agent", "path": "src/api/", "requested": "src/api/routes.py",
         "expiresAt": api["expiresAt"]},
        {"leaseId": readme["id"], "agentId": "docs-agent", "path": "README.md", "requested": "README.md",
         "expiresAt": readme["expiresAt"]},
    ]
    text = err["message"]
    assert "src/api/routes.py overlaps src/api/, leased by backend-agent" in text and "migrating the API" in text, text
    assert "README.md overlaps README.md, leased by docs-agent" in text and "shared" in text, text
    assert fingerprint(relay) == before

    # shared with shared is fine; shared against an exclusive lease is not, either way round
    mine = take(relay, "newcomer", ["README.md"], exclusive=False)
    r = lease(relay, "newcomer", ["setup.cfg"], exclusive=False)
    assert (r.status, r.code) == (409, "lease_conflict") and r.json["error"]["conflicts"][0]["leaseId"] == api["id"], r
    r = lease(relay, "docs-agent", ["README.md"])  # exclusive: its own shared lease is no obstacle, newcomer's is
    assert (r.status, r.code) == (409, "lease_conflict"), r
    assert [(c["leaseId"], c["agentId"]) for c in r.json["error"]["conflicts"]] == [(mine["id"], "newcomer")]
    # an agent's own leases never get in its way
    assert take(relay, "backend-agent", ["src/api/routes.py"])["agentId"] == "backend-agent"


# (held pattern, requested pattern, overlap?): the contract's cases, then glob against glob
OVERLAP = [
    ("README.md", "README.md", True),
    ("README.md", "readme.md", False),
    ("src/api/", "src/api/routes.py", True),
    ("src/api/**", "src/api/v2/routes.py", True),
    ("src/api/", "src/api/**", True),
    ("src/api/", "src/api", True),  # a directory covers its own path
    ("src/api", "src/api/routes.py", False),  # an exact path is only that path
    ("src/api/", "src/api2/routes.py", False),
    ("src/api/", "src/", True),
    ("docs/", "src/", False),
    ("tests/test_*.py", "tests/test_api.py", True),
    ("tests/test_*.py", "tests/unit/test_api.py", False),  # * stays within a segment
    ("tests/**/test_*.py", "tests/unit/deep/test_api.py", True),
    ("tests/**/test_*.py", "tests/test_api.py", True),  # ** may match no segment
    ("src/a?c.py", "src/abc.py", True),
    ("src/a?c.py", "src/ac.py", False),
    ("*.md", "docs/guide.md", False),
    ("**/*.md", "docs/guide.md", True),
    ("**", "any/path/at/all.txt", True),
    # glob against glob: some file could match both
    ("src/*.py", "src/a*", True),
    ("src/*.py", "src/*.js", False),
    ("src/*/models.py", "src/*/views.py", False),
    ("src/*/models.py", "src/billing/", True),
    ("src/*_test.py", "src/api_*", True),
    ("src/x*y", "src/*z", False),
    ("a/**/c.py", "a/b/**", True),
    ("a/*/c/", "a/b/*/d.py", True),
]


@pytest.mark.parametrize("held,wanted,overlap", OVERLAP, ids=["%s~%s" % (h, w) for h, w, _o in OVERLAP])
def test_overlap_rules(held, wanted, overlap):
    a, b = agent_relay.lease_pattern(held), agent_relay.lease_pattern(wanted)
    assert agent_relay.leases_overlap(a, b) is overlap
    assert agent_relay.leases_overlap(b, a) is overlap  # symmetric


def test_overlap_rules_through_the_relay(relay):
    """The same table through POST /api/leases (409 or 201) and GET /api/leases?path=, one scope per case."""
    relay.register("holder")
    relay.register("asker")
    for i, (held, wanted, overlap) in enumerate(OVERLAP):
        scope = "case-%d" % i
        h = take(relay, "holder", [held], scope=scope)
        assert [x["id"] for x in active(relay, scope=scope, path=wanted)] == ([h["id"]] if overlap else []), (held, wanted)
        r = lease(relay, "asker", [wanted], scope=scope)
        assert r.status == (409 if overlap else 201), (held, wanted, r)
        if overlap:
            c = r.json["error"]["conflicts"]
            assert c == [{"leaseId": h["id"], "agentId": "holder", "path": agent_relay.lease_pattern(held),
                          "requested": agent_relay.lease_pattern(wanted), "expiresAt": h["expiresAt"]}], c


def test_overlap_of_hostile_patterns_stays_cheap():
    """Wildcard-heavy patterns at the size limits: the overlap test is a product of two small automata (no
    backtracking), so even the worst pairs answer at once."""
    seg = "*a" * 127 + "*"
    many = "/".join(["**"] * 60 + [seg] * 60)
    other = "/".join([seg.replace("a", "b")] * 120)
    assert agent_relay.leases_overlap(agent_relay.lease_pattern(many[:1024]), agent_relay.lease_pattern(other[:1000])) in (True, False)


# -- racing -----------------------------------------------------------------------------------------------------


def test_agents_racing_for_overlapping_leases_get_exactly_one_winner(relay):
    """Many rounds of six agents asking at the same moment for overlapping paths: in each, exactly one lease is
    stored, and every loser's 409 names the winner and its lease."""
    agents = ["racer-%d" % i for i in range(6)]
    for a in agents:
        relay.register(a, project="race")
    # every two of these overlap (src/app.py matches them all); the docs/ paths are each agent's own
    overlapping = ["src/", "src/**", "src/app.py", "src/*.py", "src/a*", "**/app.py"]
    wanted = {a: [overlapping[i], "docs/%d.md" % i] for i, a in enumerate(agents)}
    for rnd in range(25):
        scope = "race-%d" % rnd
        gate = threading.Barrier(len(agents))
        results = {}

        def go(a):
            gate.wait()
            results[a] = lease(relay, a, wanted[a], scope=scope)

        threads = [threading.Thread(target=go, args=(a,)) for a in agents]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        won = [a for a, r in results.items() if r.status == 201]
        assert len(won) == 1, {a: r.status for a, r in results.items()}
        winner = results[won[0]].json["lease"]
        for a, r in results.items():
            if a != won[0]:
                assert (r.status, r.code) == (409, "lease_conflict"), r
                assert {c["agentId"] for c in r.json["error"]["conflicts"]} == {won[0]}
                assert {c["leaseId"] for c in r.json["error"]["conflicts"]} == {winner["id"]}
        rows = relay.sql("SELECT agent_id FROM leases WHERE scope = ?", (scope,))
        assert rows == [{"agent_id": won[0]}]
    assert "Traceback" not in relay.log


# -- renew and release ------------------------------------------------------------------------------------------


def test_renew_extends_a_lease_for_its_holder_only(relay):
    relay.register("owner")
    relay.register("other")
    one = take(relay, "owner", ["src/"], ttlMs=60000)
    r = relay.post("/api/leases/%d/renew" % one["id"], {"agentId": "other"})
    assert (r.status, r.code) == (409, "not_owner") and r.json["error"]["heldBy"] == "owner", r
    r = relay.post("/api/leases/%d/renew" % one["id"], {"agentId": "owner"})
    assert r.status == 200, r
    renewed = r.json["lease"]
    assert renewed["expiresAt"] >= one["expiresAt"] and renewed["expiresAt"] - agent_relay.now_ms() <= 60000  # its own ttl again
    assert {k: v for k, v in renewed.items() if k != "expiresAt"} == {k: v for k, v in one.items() if k != "expiresAt"}
    r = relay.post("/api/leases/%d/renew" % one["id"], {"agentId": "owner", "ttlMs": 7200000})
    assert r.status == 200 and r.json["lease"]["expiresAt"] - agent_relay.now_ms() > 3600000, r
    assert stored(relay)[0]["expires_at"] == r.json["lease"]["expiresAt"] and stored(relay)[0]["ttl_ms"] == 7200000
    assert active(relay)[0]["expiresAt"] == r.json["lease"]["expiresAt"]
    # released: 404 (and a read-only holder may not hold on to one)
    assert relay.delete("/api/leases/%d?agentId=owner" % one["id"]).status == 200
    r = relay.post("/api/leases/%d/renew" % one["id"], {"agentId": "owner"})
    assert (r.status, r.code) == (404, "not_found") and "ended (released" in r.json["error"]["message"], r
    two = take(relay, "owner", ["b/"])
    assert relay.patch("/api/agents/owner", {"approvalMode": "read-only"}).status == 200
    r = relay.post("/api/leases/%d/renew" % two["id"], {"agentId": "owner"})
    assert (r.status, r.code) == (403, "read_only"), r


def test_release_by_the_holder_or_a_person(relay):
    relay.register("owner", project="shop")
    relay.register("other", project="shop")
    one = take(relay, "owner", ["src/"])
    before = fingerprint(relay)
    r = relay.delete("/api/leases/%d?agentId=other" % one["id"])
    assert (r.status, r.code) == (409, "not_owner") and r.json["error"]["heldBy"] == "owner", r
    assert fingerprint(relay) == before
    r = relay.delete("/api/leases/%d?agentId=owner" % one["id"])
    assert r.status == 200, r
    ended = r.json["lease"]
    assert ended["releasedAt"] and {k: v for k, v in ended.items() if k != "releasedAt"} == {
        k: v for k, v in one.items() if k != "releasedAt"}
    row = stored(relay)[0]
    assert (row["released_at"], row["cause"]) == (ended["releasedAt"], "released")
    r = relay.delete("/api/leases/%d?agentId=owner" % one["id"])
    assert (r.status, r.code) == (404, "not_found"), r
    assert active(relay) == [] and relay.get("/api/stats").json["leases"] == {"active": 0}
    # the paths are free again
    two = take(relay, "other", ["src/app.py"])
    # a person (the dashboard: no agentId) may release anyone's; agentId in a JSON body works too
    r = relay.delete("/api/leases/%d" % two["id"])
    assert r.status == 200 and r.json["lease"]["agentId"] == "other", r
    three = take(relay, "other", ["src/app.py"])
    r = relay.request("DELETE", "/api/leases/%d" % three["id"], body={"agentId": "other"})
    assert r.status == 200, r
    events = lease_events(relay)
    assert [(e["type"], e["data"].get("cause")) for e in events] == [
        ("lease.acquired", None), ("lease.released", "released"), ("lease.acquired", None), ("lease.released", "released"),
        ("lease.acquired", None), ("lease.released", "released")]
    assert events[1]["data"]["lease"] == ended


# -- how leases end: expiry, offline, removal -------------------------------------------------------------------


def test_a_lease_expires_on_its_time_with_cause_expired(relay_factory):
    relay = relay_factory(env={"STALE_TTL_MS": "2000"})  # the sweeper passes every half second
    relay.register("holder", project="shop")
    relay.register("peer", project="shop")
    s = Stream(relay, "/api/events?agentId=holder")  # keeps the holder listening, so online
    try:
        short = take(relay, "holder", ["src/"], ttlMs=1000)
        keep = take(relay, "holder", ["docs/"])
        got = s.until_event("lease.released", timeout=20)
    finally:
        s.close()
    assert [e["event"] for e in got] == ["lease.acquired", "lease.acquired", "lease.released"]
    ended = got[-1]["data"]
    assert ended["cause"] == "expired" and ended["lease"]["id"] == short["id"] and ended["lease"]["releasedAt"]
    row = stored(relay)[0]
    assert (row["cause"], row["released_at"]) == ("expired", ended["lease"]["releasedAt"])
    assert [x["id"] for x in active(relay)] == [keep["id"]]
    assert relay.get("/api/stats").json["leases"] == {"active": 1}
    r = relay.post("/api/leases/%d/renew" % short["id"], {"agentId": "holder"})
    assert (r.status, r.code) == (404, "not_found") and "expired" in r.json["error"]["message"], r
    r = relay.delete("/api/leases/%d?agentId=holder" % short["id"])
    assert (r.status, r.code) == (404, "not_found"), r
    assert take(relay, "peer", ["src/x.py"])["agentId"] == "peer"


def test_an_agent_going_offline_or_removed_ends_its_leases_in_the_same_transaction(relay):
    relay.register("quitter", project="shop")
    relay.register("purged", project="shop")
    a = take(relay, "quitter", ["src/"])
    b = take(relay, "quitter", ["docs/"], exclusive=False)
    c = take(relay, "purged", ["tests/"])
    s = Stream(relay, "/api/events")
    try:
        assert relay.delete("/api/agents/quitter").status == 200
        assert relay.delete("/api/agents/purged?purge=true").status == 200
        got = s.until_event("agent.removed", timeout=10)
    finally:
        s.close()
    assert [(e["event"], e["data"].get("cause"), (e["data"].get("lease") or e["data"].get("agent"))["id"]) for e in got] == [
        ("lease.released", "offline", a["id"]), ("lease.released", "offline", b["id"]), ("agent.offline", None, "quitter"),
        ("lease.released", "removed", c["id"]), ("agent.removed", None, "purged")]
    assert [(r["id"], r["cause"]) for r in stored(relay)] == [(a["id"], "offline"), (b["id"], "offline"), (c["id"], "removed")]
    assert active(relay) == []


def test_an_agent_gone_silent_loses_its_leases_with_cause_offline(relay_factory):
    relay = relay_factory(env={"STALE_TTL_MS": "1500"})
    relay.register("quiet", project="shop")
    one = take(relay, "quiet", ["src/"])
    s = Stream(relay, "/api/events")
    try:
        got = s.until_event("agent.offline", timeout=20)
    finally:
        s.close()
    assert [(e["event"], e["data"].get("cause")) for e in got] == [("lease.released", "offline"), ("agent.offline", None)]
    assert got[0]["data"]["lease"]["id"] == one["id"] and stored(relay)[0]["cause"] == "offline"
    # back online, the lease is not back: it ended
    assert relay.post("/api/agents/quiet/heartbeat", {}).status == 200
    assert active(relay) == []


# -- who sees lease events ----------------------------------------------------------------------------------------


def test_narrowed_streams_carry_lease_events_to_the_holder_and_the_agents_of_its_scope(relay):
    relay.register("holder", project="shop")
    relay.register("teammate", project="shop")
    relay.register("visitor", project="elsewhere")
    relay.register("guest", project="elsewhere")
    streams = {a: Stream(relay, "/api/events?agentId=%s&types=lease.acquired,lease.released" % a)
               for a in ("holder", "teammate", "visitor", "guest")}
    try:
        guest = take(relay, "guest", ["notes/"], scope="shop")  # holds a lease in shop: it hears about shop
        one = take(relay, "holder", ["src/"])
        assert relay.delete("/api/leases/%d?agentId=holder" % one["id"]).status == 200
        other = take(relay, "visitor", ["x/"])  # scope elsewhere: not for shop's agents
        seen = {a: [(e["event"], e["data"]["lease"]["id"]) for e in s.until_event("lease.released", timeout=10)]
                for a, s in streams.items() if a != "visitor"}
        visitor = [(e["event"], e["data"]["lease"]["id"]) for e in streams["visitor"].events_until(
            lambda evs: any(e["data"]["lease"]["id"] == other["id"] for e in evs), timeout=10)]
    finally:
        for s in streams.values():
            s.close()
    shop = [("lease.acquired", guest["id"]), ("lease.acquired", one["id"]), ("lease.released", one["id"])]
    assert seen == {"holder": shop, "teammate": shop, "guest": shop}
    assert visitor == [("lease.acquired", other["id"])]


# -- keys, restart, retention, an older database ----------------------------------------------------------------


def test_with_agent_keys_a_lease_needs_the_agents_key_and_a_person_needs_the_admin_token(relay_factory):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": "shared-token-123", "AGENT_RELAY_ADMIN_TOKEN": "admin-token-456",
                               "AGENT_RELAY_AGENT_KEYS": "1"})
    key = relay.register("keyed")["agentKey"]
    mine = {"X-Agent-Relay-Agent-Key": key}
    before = fingerprint(relay)
    r = relay.post("/api/leases", {"agentId": "keyed", "paths": ["src/"]})
    assert (r.status, r.code) == (403, "forbidden"), r
    assert fingerprint(relay) == before
    r = relay.post("/api/leases", {"agentId": "keyed", "paths": ["src/"]}, headers=mine)
    assert r.status == 201, r
    lid = r.json["lease"]["id"]
    assert relay.post("/api/leases/%d/renew" % lid, {"agentId": "keyed"}).status == 403
    assert relay.post("/api/leases/%d/renew" % lid, {"agentId": "keyed"}, headers=mine).status == 200
    r = relay.delete("/api/leases/%d" % lid)  # no agentId: a person's act
    assert (r.status, r.code) == (403, "forbidden") and "admin" in r.json["error"]["message"], r
    r = relay.delete("/api/leases/%d" % lid, headers={"X-Agent-Relay-Admin-Token": "admin-token-456"})
    assert r.status == 200, r


def test_leases_survive_a_restart_and_expire_after_one(relay_factory):
    relay = relay_factory()
    relay.register("a", project="shop")
    relay.register("b", project="shop")
    long = take(relay, "a", ["src/"], reason="big refactor")
    short = take(relay, "a", ["docs/"], ttlMs=1500)
    relay.restart(kill=True)
    listed = active(relay)
    assert long in listed
    r = lease(relay, "b", ["src/x.py"])
    assert (r.status, r.code) == (409, "lease_conflict") and r.json["error"]["conflicts"][0]["leaseId"] == long["id"], r
    # the short one's time runs out, over the restart: it is no longer active, and the sweeper ends it as expired
    assert wait_for(lambda: [x["id"] for x in active(relay)] == [long["id"]], timeout=20)
    assert wait_for(lambda: stored(relay)[1]["cause"] == "expired", timeout=20), stored(relay)
    assert stored(relay)[1]["id"] == short["id"]
    relay.restart()
    assert active(relay) == [long]
    assert relay.post("/api/leases/%d/renew" % long["id"], {"agentId": "a"}).status == 200


def test_retention_removes_released_leases_once_old_and_keeps_active_ones(relay_factory):
    relay = relay_factory(env={"RETENTION_DAYS": "14"})  # the first sweep, seconds after the start, applies retention
    relay.register("a")
    old = take(relay, "a", ["old/"])
    recent = take(relay, "a", ["recent/"])
    live = take(relay, "a", ["live/"])
    for x in (old, recent):
        assert relay.delete("/api/leases/%d?agentId=a" % x["id"]).status == 200
    relay.stop()
    con = sqlite3.connect(relay.db_path)
    with con:
        con.execute("UPDATE leases SET released_at = released_at - ?, created_at = created_at - ? WHERE id = ?",
                    (30 * DAY_MS, 30 * DAY_MS, old["id"]))
        con.execute("UPDATE leases SET created_at = created_at - ? WHERE id = ?", (30 * DAY_MS, live["id"]))
    con.close()
    relay.start()
    assert wait_for(lambda: [r["id"] for r in stored(relay)] == [recent["id"], live["id"]], timeout=20), stored(relay)
    assert [x["id"] for x in active(relay)] == [live["id"]]


def test_a_database_written_before_leases_is_migrated_and_keeps_everything(relay_factory, tmp_path):
    """tests/fixtures/schema3_main.sql is a database that the relay wrote before leases existed (schema 3). Started
    on it, the relay adds the leases table (schema 4) and everything else stays as it was."""
    db = str(tmp_path / "old.db")
    con = sqlite3.connect(db)
    with open(os.path.join(ROOT, "tests", "fixtures", "schema3_main.sql"), encoding="utf-8") as f:
        con.executescript(f.read())
    assert con.execute("PRAGMA user_version").fetchone()[0] == 3
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    before = {t: con.execute("SELECT * FROM %s ORDER BY 1, 2" % t).fetchall() for t in tables}
    con.close()
    assert "leases" not in tables
    relay = relay_factory(db_path=db, env={"STALE_TTL_MS": str(10 ** 14)})  # its agents' lastSeen is old: keep them online
    assert relay.sql("PRAGMA user_version")[0]["user_version"] == 7  # on through leases (4) and what came after
    for t, rows in before.items():
        if t != "events":  # later steps may add columns (messages.recipients): the old ones hold what they held
            width = len(rows[0]) if rows else 0
            assert [tuple(r.values())[:width] for r in relay.sql("SELECT * FROM %s ORDER BY 1, 2" % t)] == rows, t
    events = relay.sql("SELECT * FROM events ORDER BY id")
    assert [tuple(r.values()) for r in events[:len(before["events"])]] == before["events"]
    # what it held still works, and its agents take leases in their project
    assert [m["body"] for m in relay.get("/api/agents/reviewer/inbox?since=0").json["messages"]] == ["PR 42 is ready"]
    got = take(relay, "backend-agent", ["src/api/"])
    assert got["scope"] == "shop" and got["id"] == 1
    r = lease(relay, "reviewer", ["src/api/x.py"])
    assert (r.status, r.code) == (409, "lease_conflict"), r
    relay.restart()
    assert active(relay) == [got]
    assert "Traceback" not in relay.log


LEASE_TEXT = st.lists(st.sampled_from(list("ab./*?~\\ \t\x00\x1f\x7f\x85\xa0-_") + ["..", "**", "/", "//", "./", "x" * 255,
                                                                                  "y" * 256]), max_size=20).map("".join)


def pattern_and_rule_agree(text):
    try:
        agent_relay.lease_pattern(text)
        taken = True
    except agent_relay.ApiError:
        taken = False
    schema = agent_relay.LEASE_PATH
    declared = len(text) <= schema["maxLength"] and re.search(schema["pattern"], text) is not None
    assert declared == taken, (text, "the spec's pattern says %s, lease_pattern %s" % (declared, taken))


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(LEASE_TEXT)
def test_the_spec_states_exactly_the_paths_a_lease_takes(text):
    """POST /api/leases declares its paths with a pattern (LEASE_PATH) that the request checker applies; lease_pattern
    then normalises them. The two must take the same texts."""
    pattern_and_rule_agree(text)


@pytest.mark.parametrize("text", ["src/api/", "./src//api", "**", "src/**/test_*.py", "a/" * 128, "a/" * 129, "a" * 1024,
                                  "a" * 1025, " " * 1020 + "abc", " " * 1030 + "a", "~", "~/a", "~a", "/a", "a/..", ".",
                                  "a/.", ". /a", ".\x85", "a**", "x" * 255 + "/b", "x" * 256 + "/b", " src/ "])
def test_the_spec_states_exactly_the_paths_a_lease_takes_at_the_edges(text):
    pattern_and_rule_agree(text)
