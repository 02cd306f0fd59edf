"""Leases in the Claude Code and Codex hooks, fed the JSON those tools send (as tests/fixtures/hooks, pointed at a
real git working copy), against a real relay: PreToolUse refuses an edit of a path another agent leased
exclusively, naming the holder and its reason, lets it through with a warning under AGENT_RELAY_LEASES=warn and
skips the check under `off`; reads never meet it, nor do the session's own leases, shared leases, other scopes or
paths outside the working copy. Shell commands are checked where they say what they write. One GET per gated
call, none for a call that writes nothing; the lease commands of the CLI; SessionEnd ends the session's leases."""
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT
from test_cli import cli_env, expected_id, free_port, run_cli
from test_hooks import CLAUDE_SESSION, CODEX_SESSION, fixture, hook

sys.path.insert(0, ROOT)
import agent_relay  # noqa: E402

CLAUDE_ID = expected_id("claude", "shop", CLAUDE_SESSION)
CODEX_ID = expected_id("codex", "shop", CODEX_SESSION)
REASON = "migrating the API"


@pytest.fixture
def repo(tmp_path):
    """A git working copy named shop, with the files the tests edit."""
    root = tmp_path / "shop"
    for rel in ("src/api/routes.py", "src/api/models.py", "src/pay.py", "README.md", "docs/guide.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("# %s\n" % rel)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


@pytest.fixture
def henv(relay, tmp_path):
    return cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")


def event(tool, name, repo, **changes):
    """A fixture's JSON with its cwd in the working copy and its paths moved there."""
    data = json.loads(fixture(tool, name))
    data["cwd"] = str(repo)
    data.update(changes)
    return json.dumps(data)


def claude_tool(repo, tool_name, tool_input):
    return event("claude", "pre_tool_use_edit", repo, tool_name=tool_name, tool_input=tool_input)


def codex_tool(repo, tool_name, tool_input):
    return event("codex", "pre_tool_use_apply_patch", repo, tool_name=tool_name, tool_input=tool_input)


def pre(env, tool, raw):
    """PreToolUse's whole output (or None)."""
    out, _ = hook(env, tool, "pre-tool-use", raw=raw)
    return out


def decision(out):
    return (out or {}).get("hookSpecificOutput", {}).get("permissionDecision")


def start(env, tool, repo):
    out, _ = hook(env, tool, "session-start", raw=event(tool, "session_start", repo))
    assert out["hookSpecificOutput"]["hookEventName"] == "SessionStart", out
    return out


def holder(relay, **fields):
    relay.register("backend-agent", project="shop")
    r = relay.post("/api/leases", dict({"agentId": "backend-agent", "paths": ["src/api/"], "reason": REASON}, **fields))
    assert r.status == 201, r
    return r.json["lease"]


def until(lease):
    return time.strftime("%H:%M", time.localtime(lease["expiresAt"] / 1000.0))


def test_claude_edit_of_a_leased_path_is_refused_naming_the_holder(relay, henv, repo):
    start(henv, "claude", repo)
    lease = holder(relay)
    for tool_name, tool_input in [
        ("Edit", {"file_path": str(repo / "src/api/routes.py"), "old_string": "a", "new_string": "b"}),
        ("Write", {"file_path": str(repo / "src/api/new_module.py"), "content": "x = 1\n"}),
        ("MultiEdit", {"file_path": str(repo / "src/api/models.py"), "edits": []}),
        ("NotebookEdit", {"notebook_path": str(repo / "src/api/analysis.ipynb"), "new_source": "1"}),
    ]:
        out = pre(henv, "claude", claude_tool(repo, tool_name, tool_input))
        assert decision(out) == "deny", (tool_name, out)
        rel = os.path.relpath(tool_input.get("file_path") or tool_input["notebook_path"], str(repo))
        reason = out["hookSpecificOutput"]["permissionDecisionReason"]
        assert reason.startswith("Agent Relay: %s is leased by backend-agent until %s: %s." % (rel, until(lease), REASON)), reason
        assert "send --from %s --to backend-agent" % CLAUDE_ID in reason, reason
    # other files, reads, and anything outside the working copy are not its business
    assert pre(henv, "claude", claude_tool(repo, "Edit", {"file_path": str(repo / "src/pay.py")})) is None
    assert pre(henv, "claude", claude_tool(repo, "Read", {"file_path": str(repo / "src/api/routes.py")})) is None
    assert pre(henv, "claude", claude_tool(repo, "Write", {"file_path": "/tmp/elsewhere/src/api/x.py"})) is None
    # relative to the session's folder, from a subfolder of the working copy
    raw = json.loads(claude_tool(repo, "Edit", {"file_path": "routes.py"}))
    raw["cwd"] = str(repo / "src" / "api")
    assert decision(pre(henv, "claude", json.dumps(raw))) == "deny"


def test_claude_shell_commands_that_write_a_leased_path_are_refused_and_reads_are_not(relay, henv, repo):
    start(henv, "claude", repo)
    holder(relay)
    refused = ["echo 'x = 1' > src/api/routes.py", "printf x >> src/api/models.py", "rm -rf src/api",
               "rm src/api/routes.py", "mv src/api/routes.py src/routes.py", "cp src/pay.py src/api/",
               "sed -i 's/a/b/' src/api/routes.py", "touch src/api/new.py", "cat src/pay.py | tee src/api/copy.py",
               "cd src && echo x > api/routes.py", "bash -lc 'truncate -s 0 src/api/models.py'",
               "git checkout -- src/api/routes.py", "ls && mv src src2"]
    allowed = ["cat src/api/routes.py", "grep -rn route src/api/", "ls -la src/api", "python3 -m pytest tests",
               "git diff src/api/routes.py", "sed -n 1,20p src/api/routes.py", "echo x > src/pay.py",
               "cp src/api/routes.py /tmp/routes.py.bak", "wc -l src/api/*.py > /tmp/counts.txt", "echo $X > $Y"]
    for command in refused:
        out = pre(henv, "claude", claude_tool(repo, "Bash", {"command": command, "description": "x"}))
        assert decision(out) == "deny", (command, out)
        assert "is leased by backend-agent" in out["hookSpecificOutput"]["permissionDecisionReason"], command
    for command in allowed:
        assert pre(henv, "claude", claude_tool(repo, "Bash", {"command": command, "description": "x"})) is None, command


def test_warn_lets_the_edit_through_with_a_warning_and_off_skips_the_check(relay, henv, repo):
    start(henv, "claude", repo)
    lease = holder(relay)
    edit = claude_tool(repo, "Edit", {"file_path": str(repo / "src/api/routes.py")})
    out = pre(dict(henv, AGENT_RELAY_LEASES="warn"), "claude", edit)
    assert decision(out) is None, out
    line = "src/api/routes.py is leased by backend-agent until %s: %s" % (until(lease), REASON)
    assert line in out["systemMessage"] and "AGENT_RELAY_LEASES=warn" in out["systemMessage"], out
    assert out["hookSpecificOutput"] == {"hookEventName": "PreToolUse", "additionalContext": out["systemMessage"]}
    assert pre(dict(henv, AGENT_RELAY_LEASES="off"), "claude", edit) is None
    _, p = hook(dict(henv, AGENT_RELAY_LEASES="sometimes"), "claude", "pre-tool-use", raw=edit)
    assert json.loads(p.stdout)["hookSpecificOutput"]["permissionDecision"] == "deny"  # an unknown value checks
    assert "AGENT_RELAY_LEASES='sometimes'" in p.stderr


def test_own_shared_and_other_scopes_leases_do_not_block(relay, henv, repo):
    start(henv, "claude", repo)
    relay.register("docs-agent", project="shop")
    relay.register("elsewhere", project="other-repo")
    assert relay.post("/api/leases", {"agentId": CLAUDE_ID, "paths": ["src/api/"]}).status == 201  # the session's own
    assert relay.post("/api/leases", {"agentId": "docs-agent", "paths": ["docs/"], "exclusive": False}).status == 201
    assert relay.post("/api/leases", {"agentId": "elsewhere", "paths": ["README.md"]}).status == 201
    for path in ("src/api/routes.py", "docs/guide.md", "README.md"):
        assert pre(henv, "claude", claude_tool(repo, "Edit", {"file_path": str(repo / path)})) is None, path


def test_a_relay_that_cannot_be_reached_blocks_nothing(henv, repo):
    env = dict(henv, AGENT_RELAY_URL="http://127.0.0.1:%d" % free_port())
    out, p = hook(env, "claude", "pre-tool-use", raw=claude_tool(repo, "Edit", {"file_path": str(repo / "src/api/x.py")}))
    assert out is None and "could not check leases" in p.stderr


def test_the_lease_check_stands_beside_the_approval_gate(relay, henv, repo):
    """Relay work in a guarded session asks first; a leased path is refused before that, and under warn the question
    carries the warning."""
    start(dict(henv, AGENT_RELAY_APPROVAL="guarded"), "claude", repo)
    holder(relay)
    m = relay.send("human", CLAUDE_ID, "please edit the routes")
    hook(henv, "claude", "prompt-submit", raw=event("claude", "user_prompt_submit", repo))
    assert relay.get("/api/messages/%d" % m["id"]).json["receipts"][0]["state"] == "delivered"
    routes = claude_tool(repo, "Edit", {"file_path": str(repo / "src/api/routes.py")})
    assert decision(pre(henv, "claude", routes)) == "deny"
    out = pre(dict(henv, AGENT_RELAY_LEASES="warn"), "claude", routes)
    assert decision(out) == "ask" and "is leased by backend-agent" in out["systemMessage"], out
    assert decision(pre(henv, "claude", claude_tool(repo, "Edit", {"file_path": str(repo / "src/pay.py")}))) == "ask"


def test_codex_apply_patch_and_shell_commands_of_a_leased_path_are_refused(relay, henv, repo):
    start(henv, "codex", repo)
    lease = holder(relay)
    patch = ("*** Begin Patch\n*** Update File: src/pay.py\n@@\n-a\n+b\n*** Add File: src/api/v2.py\n+x = 1\n"
             "*** End Patch")
    out = pre(henv, "codex", codex_tool(repo, "apply_patch", {"command": patch}))
    assert decision(out) == "deny", out
    assert out["hookSpecificOutput"]["permissionDecisionReason"].startswith(
        "Agent Relay: src/api/v2.py is leased by backend-agent until %s: %s." % (until(lease), REASON))
    assert pre(henv, "codex", codex_tool(repo, "apply_patch", {"command": patch.replace("src/api/v2.py", "src/v2.py")})) is None
    for command in ("bash -lc 'echo x > src/api/routes.py'", "rm src/api/models.py", "apply_patch <<'EOF'\n%s\nEOF" % patch):
        assert decision(pre(henv, "codex", codex_tool(repo, "Bash", {"command": command}))) == "deny", command
    assert pre(henv, "codex", codex_tool(repo, "Bash", {"command": "bash -lc 'cat src/api/routes.py'"})) is None
    out = pre(dict(henv, AGENT_RELAY_LEASES="warn"), "codex", codex_tool(repo, "apply_patch", {"command": patch}))
    assert decision(out) is None and "src/api/v2.py is leased by backend-agent" in out["systemMessage"], out


class CountingProxy:
    """Forwards HTTP requests to the relay and records each request line: what a hook asked of the relay."""

    def __init__(self, port):
        seen = self.seen = []

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def forward(self):
                seen.append("%s %s" % (self.command, self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                c.request(self.command, self.path, body=body or None,
                          headers={k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")})
                r = c.getresponse()
                data = r.read()
                self.send_response(r.status)
                self.send_header("Content-Type", r.getheader("Content-Type") or "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                c.close()

            do_GET = do_POST = do_PATCH = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_one_request_per_gated_call_and_none_for_a_call_that_writes_nothing(relay, henv, repo):
    start(henv, "claude", repo)
    holder(relay)
    proxy = CountingProxy(relay.port)
    try:
        env = dict(henv, AGENT_RELAY_URL=proxy.url)
        state = os.path.join(henv["AGENT_RELAY_STATE_DIR"], "sessions", "claude-%s.json" % CLAUDE_SESSION)
        with open(state) as f:
            data = json.load(f)
        data["url"] = proxy.url  # the session's recorded relay: the proxy in front of it
        with open(state, "w") as f:
            json.dump(data, f)
        assert decision(pre(env, "claude", claude_tool(repo, "Edit", {"file_path": str(repo / "src/api/routes.py")}))) == "deny"
        assert proxy.seen == ["GET /api/leases?scope=shop&path=src%2Fapi%2Froutes.py"]
        del proxy.seen[:]
        assert decision(pre(env, "claude", claude_tool(repo, "Bash", {"command": "mv src/pay.py src/api/pay.py"}))) == "deny"
        assert proxy.seen == ["GET /api/leases?scope=shop"]  # two paths: one request for the scope
        del proxy.seen[:]
        for command in ("cat src/api/routes.py", "pytest -q", "git status"):
            assert pre(env, "claude", claude_tool(repo, "Bash", {"command": command})) is None
        assert pre(env, "claude", claude_tool(repo, "Read", {"file_path": str(repo / "src/api/routes.py")})) is None
        assert proxy.seen == []
    finally:
        proxy.close()


def test_session_end_ends_the_sessions_leases(relay, henv, repo):
    start(henv, "claude", repo)
    r = relay.post("/api/leases", {"agentId": CLAUDE_ID, "paths": ["src/"]})
    assert r.status == 201, r
    hook(henv, "claude", "session-end", raw=event("claude", "session_end", repo))
    row = relay.sql("SELECT released_at, cause FROM leases WHERE id = ?", (r.json["lease"]["id"],))[0]
    assert row["released_at"] and row["cause"] == "offline"
    assert relay.get("/api/leases").json["leases"] == []


def test_the_lease_commands(relay, henv, repo):
    """lease (prints the id; on a conflict the holders, exit 1), leases, unlease ID and --all, from inside the repo."""
    relay.register("backend-agent", project="shop")
    relay.register("dev", project="shop")
    env = dict(henv, AGENT_RELAY_AGENT_ID="dev")
    r = run_cli(env, "lease", "--agent", "backend-agent", "api/", "../README.md", "--reason", REASON, "--ttl", "2h",
                cwd=str(repo / "src"))
    assert r.returncode == 0, r.stderr
    lid = int(r.stdout)
    got = relay.get("/api/leases").json["leases"]
    assert [(x["id"], x["paths"], x["scope"], x["reason"]) for x in got] == [(lid, ["src/api/", "README.md"], "shop", REASON)]
    assert 7190000 <= got[0]["expiresAt"] - got[0]["createdAt"] <= 7200000
    # a conflict: the holders and why, exit 1, nothing leased
    r = run_cli(env, "lease", "src/api/routes.py", "docs/", cwd=str(repo))
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout)
    assert "src/api/routes.py is leased by backend-agent until %s: %s (lease:%d holds src/api/)" % (
        until(got[0]), REASON, lid) in r.stderr, r.stderr
    r = run_cli(env, "lease", "src/api/routes.py", "--json", cwd=str(repo))
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["conflicts"][0]["leaseId"] == lid
    # shared, and its own
    r = run_cli(env, "lease", "docs/", "--shared", "--ttl", "90s", cwd=str(repo))
    assert r.returncode == 0, r.stderr
    mine = int(r.stdout)
    r = run_cli(env, "leases", cwd=str(repo))
    assert r.returncode == 0
    assert re.search(r"lease:%d\s+backend-agent\s+shop\s+src/api/, README.md\s+exclusive\s+\S+ \(in .+\)\s+%s" % (lid, REASON), r.stdout), r.stdout
    assert re.search(r"lease:%d\s+dev\s+shop\s+docs/\s+shared" % mine, r.stdout), r.stdout
    r = run_cli(env, "leases", "--path", "api/routes.py", "--json", cwd=str(repo / "src"))
    assert [x["id"] for x in json.loads(r.stdout)["leases"]] == [lid]
    r = run_cli(env, "leases", "--agent", "dev", "--json", cwd=str(repo))
    assert [x["id"] for x in json.loads(r.stdout)["leases"]] == [mine]
    # usage errors: exit 2
    for args in (["lease", "/etc/passwd"], ["lease", "x", "--ttl", "2d"], ["lease", "x", "--ttl", "soon"], ["unlease"],
                 ["unlease", "12", "--all"], ["unlease", "twelve"]):
        r = run_cli(env, *args, cwd=str(repo))
        assert r.returncode == 2, (args, r.returncode, r.stderr)
    # unlease: not its lease (exit 1), its own, then --all
    r = run_cli(env, "unlease", "lease:%d" % lid, cwd=str(repo))
    assert r.returncode == 1 and "not_owner" in r.stderr
    r = run_cli(env, "unlease", str(mine), cwd=str(repo))
    assert r.returncode == 0 and r.stdout == "released [lease:%d] docs/\n" % mine
    r = run_cli(env, "unlease", "--all", "--agent", "backend-agent", cwd=str(repo))
    assert r.returncode == 0 and r.stdout == "released [lease:%d] src/api/, README.md\n" % lid
    assert run_cli(env, "leases", cwd=str(repo)).stdout == "no leases\n"
    assert run_cli(env, "unlease", "--all", cwd=str(repo)).stdout == "no leases held by dev\n"
