"""The shared token and the start-up checks that guard the network boundary.

With AGENT_RELAY_TOKEN set, every /api route the spec lists refuses a request
without the token or with a wrong one (401), except GET /api/health; both
header forms work; a token in the URL is refused. A relay that would listen
beyond loopback without a token, or that is given a variable it cannot parse,
refuses to start and says which variable is wrong.
"""
import os
import socket
import subprocess
import sys

import pytest

from conftest import RELAY_PY

TOKEN = "correct-horse-battery-staple"
WRONG = "correct-horse-battery-stable"
INTEGRATION_TOKEN = "integration-token-xyz"


def spec_routes(relay):
    r = relay.get("/api/spec")
    assert r.status == 200, r
    out = []
    for path, ops in sorted(r.json["paths"].items()):
        for method, op in sorted(ops.items()):
            out.append((method.upper(), path, op))
    assert len(out) >= 25, out
    return out


def concrete(path):
    """The spec's path with its {placeholders} filled: an existing agent, message 1, task 1."""
    if path.startswith("/api/agents/"):
        return path.replace("{id}", "dev")
    return path.replace("{id}", "1")


def is_stream(op):
    return "text/event-stream" in str(op.get("responses", {}))


def status_of(relay, method, path, headers, stream=False):
    """Status of a request made with exactly these headers (no token added by the client)."""
    if stream:
        s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
        try:
            head = "".join("%s: %s\r\n" % kv for kv in headers.items())
            s.sendall(("%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (method, path, head)).encode())
            line = s.recv(200).split(b"\r\n")[0]
            return int(line.split()[1]), None
        finally:
            s.close()
    body = {} if method in ("POST", "PATCH") else None
    r = relay.request(method, path, body=body, headers=headers, token=False)
    return r.status, r


def snapshot(relay):
    out = {}
    for t in ("agents", "messages", "receipts", "tasks", "callbacks"):
        rows = relay.sql("SELECT * FROM %s" % t)
        for row in rows:
            row.pop("last_seen", None)
        out[t] = sorted(rows, key=lambda row: sorted((k, str(v)) for k, v in row.items()))
    return out


@pytest.fixture
def guarded(relay_factory):
    integrations = '[{"name": "mon", "token": "%s", "scopes": ["tasks:create"], "targets": ["dev"]}]' % INTEGRATION_TOKEN
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": TOKEN, "AGENT_RELAY_INTEGRATIONS": integrations})
    relay.register("dev", tags=["t"])
    relay.register("boss")
    relay.send("boss", "dev", "hello", claimable=True)
    r = relay.post("/api/tasks", {"title": "t1", "target": "dev", "from": "boss"})
    assert r.status == 201, r
    return relay


def test_every_api_route_needs_the_token_except_health(guarded):
    relay = guarded
    routes = spec_routes(relay)
    before = snapshot(relay)
    problems = []
    for method, path, op in routes:
        url = concrete(path)
        for label, headers in (("no token", {}), ("wrong bearer", {"Authorization": "Bearer " + WRONG}),
                               ("wrong header", {"X-Agent-Relay-Token": WRONG}),
                               ("empty bearer", {"Authorization": "Bearer "}),
                               ("basic auth", {"Authorization": "Basic " + TOKEN})):
            status, r = status_of(relay, method, url, headers, stream=is_stream(op))
            if (method, path) == ("GET", "/api/health"):
                if status != 200:
                    problems.append("%s %s with %s: %s, expected 200" % (method, url, label, status))
                continue
            if status != 401:
                problems.append("%s %s with %s: %s, expected 401" % (method, url, label, status))
            elif r is not None and (r.code != "unauthorized" or "www-authenticate" not in r.headers):
                problems.append("%s %s with %s: %r" % (method, url, label, r))
    assert not problems, "\n".join(problems)
    assert snapshot(relay) == before, "a refused request changed stored data"
    assert TOKEN not in relay.log and WRONG not in relay.log


def test_the_right_token_opens_every_route(guarded):
    """The control for the test above: the same routes with the token are not refused."""
    relay = guarded
    for method, path, op in spec_routes(relay):
        if path == "/api/integrations/events":
            continue  # opened by an integration's token, below
        for headers in ({"Authorization": "Bearer " + TOKEN}, {"X-Agent-Relay-Token": TOKEN}):
            status, r = status_of(relay, method, concrete(path), headers, stream=is_stream(op))
            assert status not in (401, 403, 500), (method, path, headers, r)


def test_both_header_forms_work_for_reads_and_writes(guarded):
    relay = guarded
    for headers in ({"Authorization": "Bearer " + TOKEN}, {"authorization": "bearer " + TOKEN},
                    {"X-Agent-Relay-Token": TOKEN}):
        r = relay.request("GET", "/api/agents", headers=headers, token=False)
        assert r.status == 200 and {"dev", "boss"} <= {a["id"] for a in r.json["agents"]}, (headers, r)
        r = relay.request("POST", "/api/messages", body={"from": "boss", "to": "dev", "body": "via %r" % list(headers)},
                          headers=headers, token=False)
        assert r.status == 201, (headers, r)
    bodies = [row["body"] for row in relay.sql("SELECT body FROM messages WHERE from_agent = 'boss' ORDER BY id")]
    assert bodies == ["hello", "t1", "via ['Authorization']", "via ['authorization']", "via ['X-Agent-Relay-Token']"]


def test_a_token_in_the_url_is_refused(guarded):
    relay = guarded
    for name in ("token", "access_token"):
        r = relay.request("GET", "/api/agents?%s=%s" % (name, TOKEN), token=False)
        assert (r.status, r.code) == (401, "unauthorized"), r
        # even alongside a good header: the URL (and so the logs) must not carry it
        r = relay.request("GET", "/api/agents?%s=%s" % (name, TOKEN))
        assert r.status == 400 and r.code == "invalid_field", r
        assert TOKEN not in r.body.decode()
    r = relay.request("POST", "/api/messages?token=" + TOKEN, body={"from": "boss", "to": "dev", "body": "x"}, token=False)
    assert r.status == 401, r
    assert relay.sql("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 2
    assert TOKEN not in relay.log


def test_the_integration_token_opens_only_the_ingress(guarded):
    relay = guarded
    bearer = {"Authorization": "Bearer " + INTEGRATION_TOKEN}
    r = relay.request("POST", "/api/integrations/events", body={"dedupeKey": "k1", "title": "disk full"},
                      headers=bearer, token=False)
    assert r.status == 201 and r.json["created"] is True, r
    r = relay.request("GET", "/api/agents", headers=bearer, token=False)
    assert r.status == 403, r
    r = relay.request("POST", "/api/integrations/events", body={"dedupeKey": "k2", "title": "x"})  # the shared token
    assert r.status == 401, r
    assert [row["dedupe_key"] for row in relay.sql("SELECT dedupe_key FROM tasks WHERE source LIKE 'integration:%'")] == ["k1"]


# -- refusing to start -----------------------------------------------------------


def run_relay(tmp_path, args, env_extra, timeout=20):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AGENT_RELAY_") and k not in ("HOST", "PORT", "STALE_TTL_MS", "OFFLINE_PRUNE_MS",
                                                             "RETENTION_DAYS")}
    env.update(env_extra)
    env["XDG_DATA_HOME"] = str(tmp_path / "data")  # never the user's own database
    cmd = [sys.executable, RELAY_PY, "serve"] + args
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                       cwd=str(tmp_path), timeout=timeout)
    return p.returncode, p.stdout.decode() + p.stderr.decode()


def test_non_loopback_without_a_token_refuses_to_start(tmp_path):
    rc, out = run_relay(tmp_path, ["--host", "0.0.0.0", "--port", "0"], {})
    assert rc != 0, out
    assert "AGENT_RELAY_TOKEN" in out, out
    assert "secrets" in out or "token_urlsafe" in out or "openssl" in out, "no hint on making a token: " + out
    assert "Traceback" not in out and "listening on" not in out, out
    rc, out = run_relay(tmp_path, ["--port", "0"], {"HOST": "0.0.0.0"})
    assert rc != 0 and "AGENT_RELAY_TOKEN" in out and "Traceback" not in out, out


def test_non_loopback_with_a_token_starts_and_demands_it(relay_factory):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": TOKEN}, args=["--host", "0.0.0.0"])
    assert relay.request("GET", "/api/agents", token=False).status == 401
    assert relay.request("GET", "/api/agents").status == 200
    # beyond loopback the Host guard gives way to the token
    assert relay.request("GET", "/api/agents", headers={"Host": "relay.example.com"}).status == 200


@pytest.mark.parametrize("env,args,named", [
    ({"PORT": "abc"}, [], "PORT"),
    ({"STALE_TTL_MS": "-5"}, ["--port", "0"], "STALE_TTL_MS"),
    ({"AGENT_RELAY_INTEGRATIONS": "{bad"}, ["--port", "0"], "AGENT_RELAY_INTEGRATIONS"),
    ({"AGENT_RELAY_INTEGRATIONS": '{"name": "x"}'}, ["--port", "0"], "AGENT_RELAY_INTEGRATIONS"),
    ({"AGENT_RELAY_MAX_BODY_BYTES": "lots"}, ["--port", "0"], "AGENT_RELAY_MAX_BODY_BYTES"),
    ({"RETENTION_DAYS": "1.5"}, ["--port", "0"], "RETENTION_DAYS"),
    ({"AGENT_RELAY_AGENT_KEYS": "maybe"}, ["--port", "0"], "AGENT_RELAY_AGENT_KEYS"),
    ({}, ["--port", "abc"], "--port"),
])
def test_a_bad_setting_stops_the_start_and_names_itself(tmp_path, env, args, named):
    rc, out = run_relay(tmp_path, args + ["--db", str(tmp_path / "r.db")], env)
    assert rc != 0, out
    assert named in out, out
    assert "Traceback" not in out and "listening on" not in out, out
    assert not (tmp_path / "r.db").exists(), "the relay created its database before refusing to start"
