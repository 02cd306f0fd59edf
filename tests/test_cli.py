"""The agent commands, run as subprocesses against a real relay: two agents hold a conversation (register,
send, inbox, reply, thread, claim), tasks, status, doctor, and the exit codes scripts rely on."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import RELAY_PY, ROOT, need

sys.path.insert(0, ROOT)
import agent_relay  # noqa: E402


def cli_env(relay=None, url=None, **extra):
    """The environment of a CLI process: no AGENT_RELAY_* or tool variables from outside, the relay's URL."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AGENT_RELAY_", "CLAUDE", "CODEX_")) and k not in ("PORT", "HOST")}
    env["AGENT_RELAY_URL"] = url or relay.url
    if relay is not None and relay.token:
        env["AGENT_RELAY_TOKEN"] = relay.token
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items() if v is not None})
    return env


def run_cli(env, *args, stdin=None, timeout=30, cwd=None, script=RELAY_PY):
    """Runs `agent_relay.py ARGS...`; returns the CompletedProcess with text stdout/stderr."""
    p = subprocess.run([sys.executable, script] + [str(a) for a in args], env=env, cwd=cwd,
                       input=stdin if stdin is not None else None,
                       stdin=None if stdin is not None else subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, universal_newlines=True)
    return p


_HELD = []


def free_port():
    """A port where nothing listens, for the rest of the run: bound (so no relay started meanwhile gets it), not listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return s.getsockname()[1]


def expected_id(rig, project, session):
    host = socket.gethostname().split(".")[0]
    raw = "%s-%s-%s-%s" % (host, rig, project, hashlib.sha1(session.encode()).hexdigest()[:8])
    return "".join(c if (c.isalnum() or c in "._-") else "-" for c in raw.lower())


@pytest.fixture
def env(relay, tmp_path):
    return cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")


def test_a_read_only_agent_answers_with_reply(relay, env):
    """`reply` addresses the sender of the message it answers, which is all a read-only agent may write to:
    a direct question and a fan-out alike; `send` to start a conversation is refused with the relay's code."""
    relay.register("boss")
    relay.register("watcher", tags=["pool"], approvalMode="read-only")
    question = relay.send("boss", "watcher", "status?")
    announcement = relay.send("boss", "tag:pool", "the pool's work is paused")
    for parent in (question, announcement):
        r = run_cli(env, "reply", "--from", "watcher", "msg:%d" % parent["id"], "noted")
        assert r.returncode == 0, r.stderr
        row = relay.sql("SELECT id, to_target, reply_to FROM messages ORDER BY id DESC LIMIT 1")[0]
        assert r.stdout == "sent [msg:%d] to boss (reply to msg:%d)\n" % (row["id"], parent["id"])
        assert (row["to_target"], row["reply_to"]) == ("boss", parent["id"])
    r = run_cli(env, "send", "--from", "watcher", "--to", "tag:pool", "hello all")
    assert r.returncode == 1 and "read_only" in r.stderr, (r.returncode, r.stderr)


def test_two_agents_hold_a_conversation(relay, env, tmp_path):
    # register: an explicit id with flags, and a derived id from the session, the rig and the project
    r = run_cli(env, "register", "--id", "alice", "--tags", "backend,db", "--caps", "chat,sql", "--label", "lead")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "alice\n"
    proj = tmp_path / "shop"
    proj.mkdir()
    r = run_cli(dict(env, AGENT_RELAY_TAGS="workers", AGENT_RELAY_APPROVAL="guarded"), "register", "--session", "sess-bob",
                "--rig", "cli", cwd=str(proj))
    assert r.returncode == 0, r.stderr
    bob = r.stdout.strip()
    assert bob == expected_id("cli", "shop", "sess-bob")
    # carol's card comes back as JSON
    r = run_cli(dict(env, AGENT_RELAY_CAPS="chat,review"), "register", "--id", "carol", "--tags", "workers", "--json")
    card = json.loads(r.stdout)
    assert card["id"] == "carol" and card["capabilities"] == ["chat", "review"] and card["channels"] == ["all"]
    stored = {a["id"]: a for a in relay.sql("SELECT id, tags, capabilities, label, approval_mode, project, rig FROM agents")}
    assert json.loads(stored["alice"]["tags"]) == ["backend", "db"] and stored["alice"]["label"] == "lead"
    assert json.loads(stored[bob]["tags"]) == ["workers"] and stored[bob]["approval_mode"] == "guarded"
    assert stored[bob]["project"] == "shop" and stored[bob]["rig"] == "cli"
    relay.patch("/api/agents/" + bob, {"approvalMode": "open"})  # a person opens bob up for this conversation

    # alice writes to bob; a body with several lines comes from stdin
    r = run_cli(env, "send", "--from", "alice", "--to", bob, "-", stdin="Migration is ready.\nPlease review the schema.\n")
    assert r.returncode == 0, r.stderr
    first = relay.sql("SELECT id, body FROM messages ORDER BY id DESC LIMIT 1")[0]
    assert first["body"] == "Migration is ready.\nPlease review the schema."
    assert r.stdout == "sent [msg:%d] to %s\n" % (first["id"], bob)

    # bob reads it: the header line, further lines indented by four spaces; the next look finds nothing new
    r = run_cli(dict(env, AGENT_RELAY_AGENT_ID=bob), "inbox")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[msg:%d] from alice: Migration is ready.\n    Please review the schema.\n" % first["id"]
    assert run_cli(env, "inbox", "--agent", bob).stdout == "no new messages\n"
    receipt = relay.sql("SELECT state FROM receipts WHERE message_id = ? AND agent_id = ?", (first["id"], bob))
    assert receipt == [{"state": "delivered"}]
    r = run_cli(env, "inbox", "--agent", bob, "--all", "--json")
    out = json.loads(r.stdout)
    assert [m["id"] for m in out["messages"]] == [first["id"]] and out["cursor"] == first["id"]

    # bob replies; it goes to alice, in the thread of the first message
    r = run_cli(env, "reply", "--from", bob, str(first["id"]), "Schema looks clean, tests pass.")
    assert r.returncode == 0, r.stderr
    second = relay.sql("SELECT id, from_agent, to_target, reply_to, thread_id FROM messages ORDER BY id DESC LIMIT 1")[0]
    assert r.stdout == "sent [msg:%d] to alice (reply to msg:%d)\n" % (second["id"], first["id"])
    assert second == {"id": second["id"], "from_agent": bob, "to_target": "alice", "reply_to": first["id"],
                      "thread_id": first["id"]}
    r = run_cli(env, "inbox", "--agent", "alice", "--json")
    msgs = json.loads(r.stdout)["messages"]
    assert [(m["id"], m["from"], m["replyTo"]) for m in msgs] == [(second["id"], bob, first["id"])]

    # the whole conversation, oldest first
    r = run_cli(env, "thread", "msg:%d" % second["id"])
    assert r.stdout.splitlines() == [
        "[msg:%d] from alice: Migration is ready." % first["id"],
        "    Please review the schema.",
        "[msg:%d] from %s (reply to msg:%d): Schema looks clean, tests pass." % (second["id"], bob, first["id"]),
    ]
    thread = json.loads(run_cli(env, "thread", str(first["id"]), "--json").stdout)
    assert [m["id"] for m in thread["messages"]] == [first["id"], second["id"]]

    # claimable work for tag:workers: bob and carol both see it, exactly one wins
    r = run_cli(env, "send", "--from", "alice", "--to", "tag:workers", "--claimable", "Rotate the API keys")
    assert r.returncode == 0, r.stderr
    work = relay.sql("SELECT id FROM messages ORDER BY id DESC LIMIT 1")[0]["id"]
    assert r.stdout == "sent [msg:%d] to tag:workers (matched 2, online 2)\n" % work
    r = run_cli(env, "inbox", "--agent", "carol")
    assert r.stdout == "[msg:%d] from alice (claimable, to tag:workers): Rotate the API keys\n" % work
    r = run_cli(env, "claim", "--agent", bob, str(work))
    assert (r.returncode, r.stdout) == (0, "claimed [msg:%d]\n" % work)
    r = run_cli(env, "claim", "--agent", "carol", str(work))
    assert r.returncode == 1 and r.stdout == ""
    assert "[msg:%d] is already claimed by %s (already_claimed)" % (work, bob) in r.stderr
    r = run_cli(env, "claim", "--agent", "carol", str(work), "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["error"]["code"] == "already_claimed"
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (work,)) == [{"claimed_by": bob}]
    # bob gives it back; carol may take it now
    assert run_cli(env, "release", "--agent", bob, str(work)).stdout == "released [msg:%d]\n" % work
    assert run_cli(env, "claim", "--agent", "carol", str(work)).returncode == 0
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (work,)) == [{"claimed_by": "carol"}]

    # show: the message with who got it
    r = run_cli(env, "show", str(first["id"]))
    assert r.stdout.startswith("[msg:%d] from alice: Migration is ready.\n    Please review the schema.\n" % first["id"])
    assert "    -- %s: delivered" % bob in r.stdout

    # agents: the three, not the built-in ones
    r = run_cli(env, "agents")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "TAGS", "LABEL", "APPROVAL", "LAST", "SEEN"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(["alice", bob, "carol"])
    ids = [a["id"] for a in json.loads(run_cli(env, "agents", "--json", "--all").stdout)["agents"]]
    assert set(ids) == {"alice", bob, "carol", "human", "system"}


def test_status_and_tasks(relay, env):
    assert run_cli(env, "register", "--id", "worker-1", "--tags", "ops").returncode == 0
    r = run_cli(dict(env, AGENT_RELAY_AGENT_ID="worker-1"), "status", "busy")
    assert (r.returncode, r.stdout) == (0, "worker-1 is busy\n")
    assert relay.sql("SELECT status FROM agents WHERE id = 'worker-1'") == [{"status": "busy"}]
    r = run_cli(env, "status", "--agent", "worker-1", "idle", "--label", "night-shift", "--json")
    assert json.loads(r.stdout)["label"] == "night-shift"
    assert relay.sql("SELECT status, label FROM agents WHERE id = 'worker-1'") == [{"status": "idle", "label": "night-shift"}]

    t = relay.post("/api/tasks", {"title": "Disk full on db-2", "target": "tag:ops", "severity": "high"}).json["task"]
    r = run_cli(env, "tasks")
    assert r.stdout == "[task:%d] open     high: Disk full on db-2 -> tag:ops\n" % t["id"]
    r = run_cli(env, "task", "claim", str(t["id"]), "--agent", "worker-1")
    assert (r.returncode, r.stdout) == (0, "claimed [task:%d]\n" % t["id"])
    r = run_cli(env, "task", "status", "task:%d" % t["id"], "done", "--agent", "worker-1", "--result", "cleaned /var/log")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[task:%d] done" % t["id"])
    assert relay.sql("SELECT status, claimed_by, result FROM tasks WHERE id = ?", (t["id"],)) == [
        {"status": "done", "claimed_by": "worker-1", "result": json.dumps("cleaned /var/log")}]
    tasks = json.loads(run_cli(env, "tasks", "--status", "done", "--json").stdout)["tasks"]
    assert [x["id"] for x in tasks] == [t["id"]]
    # a final task cannot move again: the relay says no, exit 1 with its code
    r = run_cli(env, "task", "status", str(t["id"]), "open", "--agent", "worker-1")
    assert r.returncode == 1 and "(invalid_transition)" in r.stderr

    # offline ends the session: claims go back, the card says offline
    r = run_cli(env, "status", "--agent", "worker-1", "offline")
    assert (r.returncode, r.stdout) == (0, "worker-1 is offline\n")
    assert relay.sql("SELECT status FROM agents WHERE id = 'worker-1'") == [{"status": "offline"}]


def test_exit_codes(relay, env):
    assert run_cli(env, "register", "--id", "solo").returncode == 0
    # 1: the relay said no, and its error code is printed
    r = run_cli(env, "send", "--from", "solo", "--to", "nobody-here", "hi")
    assert r.returncode == 1 and "(unknown_agent)" in r.stderr
    r = run_cli(env, "send", "--from", "solo", "--to", "nobody-here", "hi", "--json")
    assert json.loads(r.stdout)["error"] == {"status": 404, "code": "unknown_agent",
                                             "message": json.loads(r.stdout)["error"]["message"]}
    # 2: usage: no agent, no body, a bad message id, a bad flag
    r = run_cli(env, "send", "--to", "solo", "hi")
    assert r.returncode == 2 and "AGENT_RELAY_AGENT_ID" in r.stderr
    r = run_cli(env, "send", "--from", "solo", "--to", "solo")  # stdin is empty, not a terminal
    assert r.returncode == 2 and "empty" in r.stderr
    assert run_cli(env, "claim", "--agent", "solo", "forty-two").returncode == 2
    assert run_cli(env, "inbox", "--agent", "solo", "--bogus").returncode == 2
    # 3: nothing listens at the URL
    down = dict(env, AGENT_RELAY_URL="http://127.0.0.1:%d" % free_port())
    r = run_cli(down, "agents")
    assert r.returncode == 3 and "Cannot reach the relay" in r.stderr and "connection refused" in r.stderr
    r = run_cli(down, "inbox", "--agent", "solo", "--json")
    assert r.returncode == 3 and json.loads(r.stdout)["error"]["code"] == "unreachable"
    # nothing was stored by the refused calls
    assert relay.sql("SELECT COUNT(*) AS n FROM messages") == [{"n": 0}]
    # the exit codes are documented in each command's help
    r = run_cli(env, "send", "--help")
    assert r.returncode == 0 and "exit codes:" in r.stdout and "3  the relay is unreachable" in r.stdout


def test_token_is_sent(relay_factory, tmp_path):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": "cli-token-123456"})
    env = cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")
    assert run_cli(env, "register", "--id", "tok").stdout == "tok\n"
    r = run_cli(dict(env, AGENT_RELAY_TOKEN="wrong-token-123"), "agents")
    assert r.returncode == 1 and "(unauthorized)" in r.stderr


def test_agent_keys_are_kept_for_later_commands(relay_factory, tmp_path):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": "cli-token-123456", "AGENT_RELAY_AGENT_KEYS": "1",
                               "AGENT_RELAY_ADMIN_TOKEN": "admin-token-654321"})
    env = cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")
    r = run_cli(env, "register", "--id", "keyed")
    assert r.stdout == "keyed\n" and "agent keys" in r.stderr
    key_file = tmp_path / "state" / "keys" / "keyed"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    # later commands acting as `keyed` find its key (registering again too); without it the relay refuses
    assert run_cli(env, "status", "--agent", "keyed", "busy").returncode == 0
    assert run_cli(env, "register", "--id", "keyed", "--status", "busy").returncode == 0
    key_file.unlink()
    r = run_cli(env, "status", "--agent", "keyed", "idle")
    assert r.returncode == 1 and "(forbidden)" in r.stderr
    assert relay.sql("SELECT status FROM agents WHERE id = 'keyed'") == [{"status": "busy"}]


def test_module_level_helpers():
    # the id a command derives matches what the relay would derive from the same parts
    assert agent_relay.registration_from_env({}, rig="cli", project="Shop App", session="s1")["id"] == \
        agent_relay.derive_agent_id(socket.gethostname().split(".")[0], "cli", "Shop App", "s1")
    body = agent_relay.registration_from_env({"AGENT_RELAY_CAPS": "chat, review", "AGENT_RELAY_CHANNELS": "ops",
                                              "AGENT_RELAY_APPROVAL": "read-only"}, rig="x", project="p", session="s")
    assert (body["capabilities"], body["channels"], body["approvalMode"]) == (["chat", "review"], ["ops"], "read-only")
    m = {"id": 7, "from": "a", "to": "b", "body": "one\ntwo\n\n", "claimable": False}
    assert agent_relay.message_line(m) == "[msg:7] from a: one\n    two"
    assert agent_relay.message_line(m, one_line=True) == "[msg:7] from a: one / two"


def test_doctor_tells_problems_apart(relay_factory, tmp_path):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": "doctor-token-123"})
    env = cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")
    assert run_cli(env, "register", "--id", "doc-agent").returncode == 0

    # all good
    r = run_cli(dict(env, AGENT_RELAY_AGENT_ID="doc-agent"), "doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok   relay %s answers at %s" % (agent_relay.__version__, relay.url) in r.stdout
    assert "ok   token accepted" in r.stdout
    assert "ok   agent doc-agent is registered (online" in r.stdout
    assert r.stdout.rstrip().endswith("all good: agents can reach the relay at %s" % relay.url)
    report = json.loads(run_cli(env, "doctor", "--agent", "doc-agent", "--json").stdout)
    assert report["ok"] is True and report["relayVersion"] == agent_relay.__version__
    assert [c["code"] for c in report["checks"]] == ["running", "token", "agent"]

    # relay not running: connection refused at the URL, and how to start it
    down = dict(env, AGENT_RELAY_URL="http://127.0.0.1:%d" % free_port())
    r = run_cli(down, "doctor")
    assert r.returncode == 3
    assert "FAIL relay not running: nothing answers at %s (connection refused)" % down["AGENT_RELAY_URL"] in r.stdout
    assert "Start it with `python3 agent_relay.py`" in r.stdout

    # wrong token, and no token at all
    r = run_cli(dict(env, AGENT_RELAY_TOKEN="not-the-token"), "doctor")
    assert r.returncode == 1 and "FAIL wrong token: the relay refused AGENT_RELAY_TOKEN" in r.stdout
    no_token = {k: v for k, v in env.items() if k != "AGENT_RELAY_TOKEN"}
    r = run_cli(no_token, "doctor")
    assert r.returncode == 1 and "AGENT_RELAY_TOKEN is not set" in r.stdout
    assert json.loads(run_cli(no_token, "doctor", "--json").stdout)["checks"][-1]["code"] == "wrong_token"

    # agent not registered
    r = run_cli(dict(env, AGENT_RELAY_AGENT_ID="ghost-agent"), "doctor")
    assert r.returncode == 1
    assert "FAIL agent ghost-agent is not registered on this relay" in r.stdout
    assert "agent-relay register --id ghost-agent" in r.stdout

    # version mismatch: a relay of another version cannot be started here, so the comparison is checked directly
    assert agent_relay.versions_differ("0.2.0", "0.1.0") and agent_relay.versions_differ("1.1.3", "0.1.3")
    assert not agent_relay.versions_differ(agent_relay.__version__)


def test_register_derives_its_id_from_the_tools_session(relay, env, tmp_path):
    proj = tmp_path / "billing"
    proj.mkdir()
    r = run_cli(dict(env, CLAUDE_CODE_SESSION_ID="abc-123"), "register", cwd=str(proj))
    assert r.stdout.strip() == expected_id("claude", "billing", "abc-123")
    r = run_cli(dict(env, AGENT_RELAY_RIG="ci"), "register", "--session", "job-7", cwd=str(proj))
    assert r.stdout.strip() == expected_id("ci", "billing", "job-7")
    # without a session, every run is a new agent
    a = run_cli(env, "register", cwd=str(proj)).stdout.strip()
    b = run_cli(env, "register", cwd=str(proj)).stdout.strip()
    assert a != b and a.startswith(expected_id("cli", "billing", "x")[:-8])
    # inside a git repository the project is the top-level folder's name
    need(shutil.which("git"), "git is not installed")
    sub = tmp_path / "repo" / "src" / "deep"
    sub.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    r = run_cli(env, "register", "--session", "s", cwd=str(sub))
    assert r.stdout.strip() == expected_id("cli", "repo", "s")


def test_claim_brings_back_an_agent_that_went_offline_while_quiet(relay, env):
    """The relay refuses a claim from an offline agent (409 agent_offline); the CLI runs for a live session, so it
    heartbeats the agent back and claims once more, for messages and tasks alike."""
    relay.register("quiet", tags=["w"])
    relay.register("boss")
    work = relay.send("boss", "tag:w", "take me", claimable=True)["id"]
    task = relay.post("/api/tasks", {"title": "and me", "target": "tag:w"}).json["task"]
    assert relay.delete("/api/agents/quiet").status == 200  # offline, as after STALE_TTL_MS of silence
    raw = relay.post("/api/messages/%d/claim" % work, {"agentId": "quiet"})
    assert (raw.status, raw.code) == (409, "agent_offline"), raw
    r = run_cli(env, "claim", "--agent", "quiet", str(work))
    assert (r.returncode, r.stdout) == (0, "claimed [msg:%d]\n" % work), r.stderr
    assert relay.delete("/api/agents/quiet").status == 200
    r = run_cli(env, "task", "claim", str(task["id"]), "--agent", "quiet")
    assert (r.returncode, r.stdout) == (0, "claimed [task:%d]\n" % task["id"]), r.stderr
    assert relay.get("/api/agents/quiet").json["status"] != "offline"
    assert relay.sql("SELECT claimed_by FROM tasks WHERE id = ?", (task["id"],)) == [{"claimed_by": "quiet"}]
