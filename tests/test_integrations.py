"""Integration ingress: tokens, scopes, the per-integration rate limit, and a
broken AGENT_RELAY_INTEGRATIONS that stops the start with a clear message."""
import json
import os
import subprocess
import sys

import pytest

from conftest import RELAY_PY

TOKEN = "ingress-token-aaaa"
NOSCOPE_TOKEN = "ingress-token-bbbb"
INTEGRATIONS = [
    {"name": "monitoring", "token": TOKEN, "scopes": ["tasks:create"], "targets": ["tag:oncall", "cap:db"],
     "channels": ["alerts", "db"]},
    {"name": "readonly", "token": NOSCOPE_TOKEN, "scopes": ["tasks:read"], "targets": ["tag:oncall"], "channels": []},
]
EVENTS = "/api/integrations/events"


def bearer(token):
    return {"Authorization": "Bearer " + token}


def start(relay_factory, **env):
    env = dict(env)
    env.setdefault("AGENT_RELAY_INTEGRATIONS", json.dumps(INTEGRATIONS))
    return relay_factory(env=env)


def task_count(relay):
    return relay.sql("SELECT COUNT(*) AS n FROM tasks")[0]["n"]


def test_tokens_and_scopes(relay_factory):
    relay = start(relay_factory)
    relay.register("oncall-1", tags=["oncall"], capabilities=["db"], channels=["alerts", "db"])
    alert = {"dedupeKey": "cpu:web1", "title": "CPU high on web1"}

    r = relay.post(EVENTS, alert)
    assert r.status == 401 and r.code == "unauthorized", r
    r = relay.post(EVENTS, alert, headers=bearer("not-a-real-token"))
    assert r.status == 401 and r.code == "unauthorized", r
    r = relay.post(EVENTS, alert, headers=bearer(NOSCOPE_TOKEN))
    assert r.status == 403 and r.code == "scope" and "tasks:create" in r.json["error"]["message"], r
    r = relay.post(EVENTS, dict(alert, target="tag:frontend"), headers=bearer(TOKEN))
    assert r.status == 403 and r.code == "scope" and "tag:frontend" in r.json["error"]["message"], r
    r = relay.post(EVENTS, dict(alert, target="oncall-1"), headers=bearer(TOKEN))
    assert r.status == 403 and r.code == "scope", r
    r = relay.post(EVENTS, dict(alert, channel="random"), headers=bearer(TOKEN))
    assert r.status == 403 and r.code == "scope" and "random" in r.json["error"]["message"], r
    # malformed events are refused by field
    r = relay.post(EVENTS, {"title": "no key"}, headers=bearer(TOKEN))
    assert r.status == 400 and r.code == "invalid_field" and "dedupeKey" in r.json["error"]["message"], r
    r = relay.post(EVENTS, {"dedupeKey": "k"}, headers=bearer(TOKEN))
    assert r.status == 400 and r.code == "invalid_field" and "title" in r.json["error"]["message"], r
    r = relay.post(EVENTS, dict(alert, status="exploded"), headers=bearer(TOKEN))
    assert r.status == 400 and r.code == "invalid_field" and "status" in r.json["error"]["message"], r
    assert task_count(relay) == 0
    assert relay.sql("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0

    # within its lists: target and channel default to the integration's first ones
    r = relay.post(EVENTS, alert, headers=bearer(TOKEN))
    assert r.status == 201 and r.json["task"]["target"] == "tag:oncall" and r.json["task"]["channel"] == "alerts", r
    r = relay.post(EVENTS, dict(alert, dedupeKey="db:replica", target="cap:db", channel="db"), headers=bearer(TOKEN))
    assert r.status == 201 and r.json["task"]["target"] == "cap:db" and r.json["task"]["channel"] == "db", r
    assert task_count(relay) == 2
    assert len([m for m in relay.inbox("oncall-1")["messages"] if m["kind"] == "task"]) == 2


@pytest.mark.parametrize("shared_token", [None, "relay-shared-token-1"])
def test_integration_token_opens_only_its_route(relay_factory, shared_token):
    env = {"AGENT_RELAY_TOKEN": shared_token} if shared_token else {}
    relay = start(relay_factory, **env)
    relay.register("a1", tags=["oncall"])
    tries = [
        ("GET", "/api/agents", None),
        ("GET", "/api/tasks", None),
        ("GET", "/api/callbacks", None),
        ("POST", "/api/messages", {"from": "a1", "to": "a1", "body": "hi"}),
        ("POST", "/api/tasks", {"title": "t", "target": "tag:oncall"}),
        ("POST", "/api/agents", {"id": "intruder"}),
        ("GET", "/api/nope", None),
    ]
    for method, path, body in tries:
        r = relay.request(method, path, body=body, headers=bearer(TOKEN))
        assert r.status == 403 and r.code == "forbidden", (method, path, r)
        assert "integrations/events" in r.json["error"]["message"]
    assert relay.sql("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0
    assert [a["id"] for a in relay.sql("SELECT id FROM agents WHERE system = 0")] == ["a1"]
    # the shared token does not open the integration route either
    r = relay.post(EVENTS, {"dedupeKey": "k", "title": "t"}, headers=bearer(shared_token or "x" * 16))
    assert r.status == 401, r
    assert relay.post(EVENTS, {"dedupeKey": "k", "title": "t"}, headers=bearer(TOKEN)).status == 201


def test_rate_limit_per_integration(relay_factory):
    relay = start(relay_factory, AGENT_RELAY_INTEGRATION_RATE_LIMIT_PER_MINUTE="5")
    alert = {"dedupeKey": "flapping", "title": "Flapping check"}
    answers = [relay.post(EVENTS, alert, headers=bearer(TOKEN)) for _ in range(8)]
    assert [a.status for a in answers] == [201, 200, 200, 200, 200, 429, 429, 429]
    limited = answers[5]
    assert limited.code == "rate_limited" and "monitoring" in limited.json["error"]["message"]
    retry = int(limited.headers["retry-after"])
    assert 1 <= retry <= 60
    # refused events are not counted
    assert relay.sql("SELECT occurrence_count FROM tasks") == [{"occurrence_count": 5}]
    # another integration has its own budget (and gets its own 403, not a 429)
    r = relay.post(EVENTS, alert, headers=bearer(NOSCOPE_TOKEN))
    assert r.status == 403 and r.code == "scope"


@pytest.mark.parametrize("value, words", [
    ('[{"name": "x", "token": "tok-1234567", "targets": ["tag:a"]', "not valid JSON"),
    ('{"name": "x"}', "list"),
    ('[{"name": "x", "targets": ["tag:a"]}]', "token"),
    ('[{"token": "tok-1234567", "targets": ["tag:a"]}]', "name"),
    ('[{"name": "x", "token": "tok-1234567"}]', "targets"),
    ('[{"name": "x", "token": "tok-1234567", "targets": ["tag:a"], "callbackUrl": "ftp://h/x"}]', "callbackUrl"),
    ('[{"name": "x", "token": "t1-1234567", "targets": ["tag:a"]}, {"name": "x", "token": "t2-1234567", "targets": ["tag:a"]}]',
     "twice"),
])
def test_broken_integrations_stop_the_start(tmp_path, value, words):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    env["AGENT_RELAY_INTEGRATIONS"] = value
    p = subprocess.run([sys.executable, RELAY_PY, "serve", "--port", "0", "--db", str(tmp_path / "r.db")], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=30)
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode == 2, out
    assert "AGENT_RELAY_INTEGRATIONS" in out and words in out, out
    assert "Traceback" not in out and "listening" not in out, out
    assert not (tmp_path / "r.db").exists()


def test_broken_integrations_flag_is_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    p = subprocess.run([sys.executable, RELAY_PY, "serve", "--port", "0", "--db", str(tmp_path / "r.db"),
                        "--integrations", "[oops"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=30)
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode == 2 and "--integrations" in out and "Traceback" not in out, out
