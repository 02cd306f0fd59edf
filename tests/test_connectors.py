"""The examples under examples/integrations, run as a person would run them,
against a running relay: each one creates or resolves the right task."""
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, need

EXAMPLES = os.path.join(ROOT, "examples", "integrations")
SAMPLES = os.path.join(EXAMPLES, "samples")
INTEGRATIONS = [
    {"name": "ops", "token": "ops-token-12345", "scopes": ["tasks:create"], "targets": ["tag:oncall"], "channels": []},
    {"name": "helpdesk", "token": "helpdesk-token-1", "scopes": ["tasks:create"], "targets": ["tag:support"], "channels": []},
    {"name": "alertmanager", "token": "am-token-123456", "scopes": ["tasks:create"], "targets": ["tag:oncall"],
     "channels": []},
    {"name": "github", "token": "gh-token-1234567", "scopes": ["tasks:create"], "targets": ["tag:triage", "tag:oncall"],
     "channels": []},
]
TOKENS = {i["name"]: i["token"] for i in INTEGRATIONS}


@pytest.fixture
def relay(relay_factory):
    r = relay_factory(env={"AGENT_RELAY_INTEGRATIONS": json.dumps(INTEGRATIONS)})
    r.register("oncall-1", tags=["oncall"])
    r.register("support-1", tags=["support"])
    r.register("triage-1", tags=["triage"])
    return r


def run(relay, integration, cmd, stdin=None, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    env["AGENT_RELAY_URL"] = relay.url
    if integration:
        env["AGENT_RELAY_INTEGRATION_TOKEN"] = TOKENS.get(integration, integration)
    env.update(extra_env or {})
    data = stdin
    if isinstance(stdin, str):
        with open(stdin, "rb") as f:
            data = f.read()
    p = subprocess.run(cmd, input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=EXAMPLES, timeout=60)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def tasks(relay, key):
    return relay.sql("SELECT * FROM tasks WHERE dedupe_key = ? ORDER BY id", (key,))


def sample(name):
    return os.path.join(SAMPLES, name)


def sample_json(name):
    with open(sample(name), encoding="utf-8") as f:
        return json.load(f)


def sample_bytes(name):
    with open(sample(name), "rb") as f:
        return f.read()


def need_curl():
    need(shutil.which("curl"), "curl is not installed (apt-get install curl)")


# -- the shell scripts ---------------------------------------------------------------
def test_ops_alert_sh(relay):
    need_curl()
    script = ["sh", os.path.join(EXAMPLES, "ops-alert.sh")]
    title = 'Disk "db-1" 94% full \\ act\tnow'
    code, out, err = run(relay, "ops", script + ["-s", "critical", "-u", "https://grafana.example/d/disk?var=a&b=c",
                                                 "-b", "line one\nline two", "disk:db-1", title])
    assert code == 0, err
    answer = json.loads(out)
    assert answer["created"] is True and answer["task"]["title"] == title
    [row] = tasks(relay, "disk:db-1")
    assert (row["title"], row["severity"], row["body"], row["source"], row["status"]) == (
        title, "critical", "line one\nline two", "integration:ops", "open")
    assert row["external_url"] == "https://grafana.example/d/disk?var=a&b=c"
    msgs = [m for m in relay.inbox("oncall-1")["messages"] if m["kind"] == "task"]
    assert [m["payload"]["taskId"] for m in msgs] == [row["id"]]

    code, out, err = run(relay, "ops", script + ["disk:db-1", title])
    assert code == 0 and json.loads(out)["task"]["occurrenceCount"] == 2, err
    code, out, err = run(relay, "ops", script + ["-r", "disk:db-1"])
    assert code == 0 and json.loads(out)["task"]["status"] == "done", err
    assert [r["status"] for r in tasks(relay, "disk:db-1")] == ["done"]

    # refusals: wrong token, a target outside the integration, bad usage; nothing stored by them
    code, out, err = run(relay, "wrong-token-999", script + ["disk:db-2", "Other disk"])
    assert code == 1 and "401" in err, (code, err)
    code, out, err = run(relay, "ops", script + ["-T", "tag:support", "disk:db-2", "Other disk"])
    assert code == 1 and "403" in err and "scope" in err, (code, err)
    code, out, err = run(relay, "ops", script + ["disk:db-2"])
    assert code == 2 and "TITLE" in err
    code, out, err = run(relay, None, script + ["disk:db-2", "Other disk"])
    assert code == 2 and "AGENT_RELAY_INTEGRATION_TOKEN" in err
    assert tasks(relay, "disk:db-2") == []


def test_support_ticket_sh(relay):
    need_curl()
    script = ["sh", os.path.join(EXAMPLES, "support-ticket.sh")]
    code, out, err = run(relay, "helpdesk", script + ["-p", "urgent", "-u", "https://help.example/tickets/4821",
                                                      "4821", "new", "Refund not received", "Order #99812, paid May 2."])
    assert code == 0, err
    [row] = tasks(relay, "ticket:4821")
    assert (row["title"], row["body"], row["severity"], row["target"], row["status"]) == (
        "Ticket 4821: Refund not received", "Order #99812, paid May 2.", "urgent", "tag:support", "open")
    assert json.loads(row["metadata"]) == {"ticket": "4821", "helpdeskStatus": "new"}
    assert row["external_url"] == "https://help.example/tickets/4821"
    assert [m["payload"]["taskId"] for m in relay.inbox("support-1")["messages"]] == [row["id"]]
    assert relay.inbox("oncall-1")["messages"] == []

    code, out, err = run(relay, "helpdesk", script + ["4821", "pending", "Refund not received"])
    assert code == 0 and json.loads(out)["task"]["occurrenceCount"] == 2, err
    code, out, err = run(relay, "helpdesk", script + ["4821", "solved"])
    assert code == 0 and json.loads(out)["task"]["status"] == "done", err
    code, out, err = run(relay, "helpdesk", script + ["4821", "reopened", "Refund not received"])
    assert code == 0 and json.loads(out)["created"] is True, err
    assert [r["status"] for r in tasks(relay, "ticket:4821")] == ["done", "open"]
    code, out, err = run(relay, "helpdesk", script + ["4821", "exploded", "x"])
    assert code == 2 and "unknown ticket status" in err


def test_shell_examples_pass_shellcheck():
    need(shutil.which("shellcheck"), "shellcheck is not installed (apt-get install shellcheck)")
    for name in ("ops-alert.sh", "support-ticket.sh"):
        p = subprocess.run(["shellcheck", "--shell=sh", os.path.join(EXAMPLES, name)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60)
        assert p.returncode == 0, p.stdout.decode()


# -- the Python connectors -----------------------------------------------------------
def test_alertmanager_connector(relay):
    cmd = [sys.executable, os.path.join(EXAMPLES, "alertmanager.py")]
    firing = sample_json("alertmanager-firing.json")
    code, out, err = run(relay, "alertmanager", cmd, stdin=sample("alertmanager-firing.json"))
    assert code == 0, err
    assert "alertmanager:7c3f2b9a41d0e8f5: task" in out and "created" in out
    disk = tasks(relay, "alertmanager:7c3f2b9a41d0e8f5")
    latency = tasks(relay, "alertmanager:e15a09c6b2f4d738")
    assert len(disk) == len(latency) == 1
    disk, latency = disk[0], latency[0]
    assert (disk["title"], disk["severity"], disk["status"], disk["source"]) == (
        "Disk on db-1 is 94% full", "critical", "open", "integration:alertmanager")
    assert disk["external_url"] == firing["alerts"][0]["generatorURL"]
    assert disk["body"].startswith("Filesystem /var/lib/postgresql") and "Runbook: https://runbooks" in disk["body"]
    assert json.loads(disk["metadata"])["labels"]["mountpoint"] == "/var/lib/postgresql"
    # no summary annotation: the title comes from alertname and instance
    assert (latency["title"], latency["severity"]) == ("HighRequestLatency on api-3.internal.example:8080", "warning")
    assert len([m for m in relay.inbox("oncall-1")["messages"] if m["kind"] == "task"]) == 2

    # Alertmanager repeats a notification: occurrences, no new tasks
    code, out, err = run(relay, "alertmanager", cmd, stdin=sample("alertmanager-firing.json"))
    assert code == 0 and "occurrence 2" in out, (out, err)
    assert relay.sql("SELECT COUNT(*) AS n FROM tasks")[0]["n"] == 2
    code, out, err = run(relay, "alertmanager", cmd, stdin=sample("alertmanager-resolved.json"))
    assert code == 0 and out.count("done") == 2, (out, err)
    assert relay.sql("SELECT status, occurrence_count FROM tasks ORDER BY id") == [
        {"status": "done", "occurrence_count": 2}] * 2

    # without a fingerprint, the labels make the key: stable across notifications
    for a in firing["alerts"]:
        del a["fingerprint"]
    raw = json.dumps(firing).encode()
    assert run(relay, "alertmanager", cmd, stdin=raw)[0] == 0
    assert run(relay, "alertmanager", cmd, stdin=raw)[0] == 0
    rows = relay.sql("SELECT dedupe_key, occurrence_count FROM tasks WHERE status = 'open'")
    assert len(rows) == 2 and all(r["dedupe_key"].startswith("alertmanager:labels:") and r["occurrence_count"] == 2 for r in rows)

    # not an Alertmanager payload; a refused token
    assert run(relay, "alertmanager", cmd, stdin=b'{"hello": 1}')[0] == 2
    code, out, err = run(relay, "wrong-token-999", cmd, stdin=sample("alertmanager-firing.json"))
    assert code == 1 and "401" in err


def test_github_issues_connector(relay):
    cmd = [sys.executable, os.path.join(EXAMPLES, "github_issues.py")]
    opened = sample_json("github-issue-opened.json")
    key = "github:acme-shop/storefront#1347"
    code, out, err = run(relay, "github", cmd, stdin=sample("github-issue-opened.json"))
    assert code == 0 and "created" in out, err
    [row] = tasks(relay, key)
    assert (row["title"], row["body"], row["external_url"], row["status"], row["target"], row["severity"]) == (
        opened["issue"]["title"], opened["issue"]["body"], "https://github.com/acme-shop/storefront/issues/1347",
        "open", "tag:triage", "high")
    assert [m["payload"]["taskId"] for m in relay.inbox("triage-1")["messages"]] == [row["id"]]

    # an action it does not handle changes nothing; neither does another GitHub event
    labeled = dict(opened, action="labeled")
    code, out, err = run(relay, "github", cmd, stdin=json.dumps(labeled).encode())
    assert code == 0 and "ignored" in out
    code, out, err = run(relay, "github", cmd, stdin=sample("github-issue-closed.json"), extra_env={"GITHUB_EVENT": "push"})
    assert code == 0 and "ignored" in out
    assert [(r["status"], r["occurrence_count"]) for r in tasks(relay, key)] == [("open", 1)]

    code, out, err = run(relay, "github", cmd + ["--target", "tag:oncall"], stdin=sample("github-issue-closed.json"))
    assert code == 0 and "done" in out, err
    assert [r["status"] for r in tasks(relay, key)] == ["done"]
    reopened = dict(opened, action="reopened")
    code, out, err = run(relay, "github", cmd, stdin=json.dumps(reopened).encode())
    assert code == 0 and "created" in out
    assert [r["status"] for r in tasks(relay, key)] == ["done", "open"]
    assert run(relay, "github", cmd, stdin=b"[1, 2]")[0] == 2


def test_webhook_stdin_feeds_the_connectors(relay):
    secret = "gh-webhook-secret"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    env.update({"AGENT_RELAY_URL": relay.url, "AGENT_RELAY_INTEGRATION_TOKEN": TOKENS["github"], "GH_SECRET": secret})
    proc = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "webhook-stdin.py"), "--port", "0",
                             "--github-secret-env", "GH_SECRET", "--", sys.executable, "github_issues.py"],
                            cwd=EXAMPLES, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline().decode()
        m = re.search(r"listening on (http://\S+)", line)
        assert m, line
        url = m.group(1)

        def post(raw, event="issues", signature=None):
            sig = signature or "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
            req = urllib.request.Request(url + "/github", data=raw, method="POST", headers={
                "Content-Type": "application/json", "X-GitHub-Event": event, "X-Hub-Signature-256": sig})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        opened = sample_bytes("github-issue-opened.json")
        assert post(opened, signature="sha256=" + "0" * 64)[0] == 401
        assert post(b'{"zen": "Keep it logically awesome."}', event="ping") == (200, "pong\n")
        assert relay.sql("SELECT COUNT(*) AS n FROM tasks")[0]["n"] == 0
        status, text = post(opened)
        assert status == 200 and "created" in text, text
        assert [r["status"] for r in tasks(relay, "github:acme-shop/storefront#1347")] == ["open"]
        status, text = post(sample_bytes("github-issue-closed.json"))
        assert status == 200 and "done" in text, text
        assert [r["status"] for r in tasks(relay, "github:acme-shop/storefront#1347")] == ["done"]
        status, text = post(b"not json")
        assert status == 502 and "not JSON" in text
    finally:
        proc.terminate()
        proc.wait(10)
