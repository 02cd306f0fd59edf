"""The CLI's side of delivery truth and search, run as subprocesses against a real relay: `send --wait` prints each
state as it is reached and exits 0, 1 or 4; `send` says at once when a message is held for approval; `show` prints
receipts and replies; `search` prints results with snippets."""
import json
import subprocess
import sys

from conftest import RELAY_PY, wait_for
from test_cli import cli_env, run_cli


def start_cli(env, *args):
    return subprocess.Popen([sys.executable, RELAY_PY] + [str(a) for a in args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


def finish(proc, timeout=30):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def parked(relay, n=1):
    """Until the CLI's wait is parked in the relay as a long-poll."""
    assert wait_for(lambda: relay.get("/api/stats").json["longPolls"] >= n, timeout=15)


def last_message_id(relay):
    return relay.sql("SELECT MAX(id) AS n FROM messages")[0]["n"]


def test_send_wait_read_prints_delivered_then_read_and_exits_0(relay, tmp_path):
    env = cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")
    relay.register("writer")
    relay.register("reviewer")
    p = start_cli(env, "send", "--from", "writer", "--to", "reviewer", "--wait", "read", "--timeout", "60", "PR 42 is ready")
    parked(relay)
    mid = last_message_id(relay)
    relay.inbox("reviewer")
    relay.post("/api/messages/%d/read" % mid, {"agentId": "reviewer"})
    code, out, err = finish(p)
    assert code == 0, err
    assert out.splitlines() == ["sent [msg:%d] to reviewer" % mid, "delivered to reviewer", "read by reviewer"]


def test_send_wait_reply_prints_the_reply_as_a_message_line(relay, tmp_path):
    env = cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")
    relay.register("writer")
    relay.register("reviewer")
    p = start_cli(env, "send", "--from", "writer", "--to", "reviewer", "--wait", "reply", "what is the build number?")
    parked(relay)
    mid = last_message_id(relay)
    relay.inbox("reviewer")
    reply = relay.send("reviewer", "writer", "7731, green", replyTo=mid)
    code, out, err = finish(p)
    assert code == 0, err
    assert out.splitlines() == ["sent [msg:%d] to reviewer" % mid, "delivered to reviewer",
                                "[msg:%d] from reviewer (reply to msg:%d): 7731, green" % (reply["id"], mid)]


def test_send_wait_times_out_with_exit_4_and_says_so(relay, tmp_path):
    env = cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")
    relay.register("writer")
    relay.register("reviewer")
    code, out, err = finish(start_cli(env, "send", "--from", "writer", "--to", "reviewer", "--wait", "read", "--timeout", "1",
                                      "anyone?"))
    mid = last_message_id(relay)
    assert code == 4, (out, err)
    assert out.splitlines() == ["sent [msg:%d] to reviewer" % mid]
    assert "was not delivered within 1 s (timed out)" in err
    # delivered but never read: it says how far it got
    relay.inbox("reviewer")
    code, out, err = finish(start_cli(env, "send", "--from", "writer", "--to", "reviewer", "--wait", "delivered",
                                      "--timeout", "0", "again"))
    assert code == 4 and "was not delivered within 0 s" in err
    # exit 4 is in the table of every command's help
    assert "4  send --wait: the time (--timeout) ran out" in run_cli(env, "send", "--help").stdout


def test_a_held_message_is_told_at_once_and_a_rejection_ends_the_wait_with_exit_1(relay, tmp_path):
    env = cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")
    relay.register("writer")
    relay.register("gate", approvalMode="guarded")
    r = run_cli(env, "send", "--from", "writer", "--to", "gate", "deploy to production")
    mid = last_message_id(relay)
    assert r.returncode == 0
    assert r.stdout.splitlines() == [
        "sent [msg:%d] to gate" % mid,
        "held: your message [msg:%d] to gate is held for approval by a person; it reaches gate only once approved" % mid]
    assert json.loads(run_cli(env, "send", "--from", "writer", "--to", "gate", "x", "--json").stdout)["held"] == ["gate"]

    p = start_cli(env, "send", "--from", "writer", "--to", "gate", "--wait", "delivered", "rotate the keys")
    parked(relay)
    mid = last_message_id(relay)
    relay.post("/api/messages/%d/reject" % mid, {"agentId": "gate"})
    code, out, err = finish(p)
    assert code == 1, (out, err)
    assert out.splitlines() == [
        "sent [msg:%d] to gate" % mid,
        "held: your message [msg:%d] to gate is held for approval by a person; it reaches gate only once approved" % mid,
        "rejected for gate by a person: it will not reach gate"]
    assert "cannot be delivered any more: a person rejected it for gate" in err

    # approved: the wait goes on to delivery
    p = start_cli(env, "send", "--from", "writer", "--to", "gate", "--wait", "delivered", "rotate them now")
    parked(relay)
    mid = last_message_id(relay)
    relay.post("/api/messages/%d/approve" % mid, {})
    relay.inbox("gate")
    code, out, err = finish(p)
    assert code == 0, err
    assert out.splitlines()[2:] == ["approved for gate by a person", "delivered to gate"]
    p = start_cli(env, "send", "--from", "writer", "--to", "gate", "--wait", "delivered", "--json", "rotate them now")
    parked(relay)
    mid = last_message_id(relay)
    relay.post("/api/messages/%d/approve" % mid, {})
    relay.inbox("gate")
    code, out, err = finish(p)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["held"] == ["gate"] and lines[-1]["reached"] is True
    assert [r["state"] for r in lines[-1]["receipts"]] == ["delivered"]


def test_send_wait_all_waits_for_every_recipient(relay, tmp_path):
    env = cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")
    relay.register("lead")
    relay.register("b", tags=["rev"])
    relay.register("c", tags=["rev"])
    p = start_cli(env, "send", "--from", "lead", "--to", "tag:rev", "--wait", "delivered", "--all", "please look")
    parked(relay)
    relay.inbox("b")
    wait_for(lambda: relay.get("/api/stats").json["longPolls"] >= 1)
    assert p.poll() is None  # c has not fetched it yet
    relay.inbox("c")
    code, out, err = finish(p)
    assert code == 0, err
    assert sorted(out.splitlines()[1:]) == ["delivered to b", "delivered to c"]
    # a fan-out nobody matches can never be delivered: exit 1 at once
    code, out, err = finish(start_cli(env, "send", "--from", "lead", "--to", "tag:nobody", "--wait", "delivered", "hello?"))
    assert code == 1 and "no agent it was sent to is left to get it" in err


def test_show_prints_receipts_with_times_and_replies(relay, tmp_path):
    env = cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")
    relay.register("writer")
    relay.register("reviewer", tags=["rev"])
    relay.register("gate", tags=["rev"], approvalMode="guarded")
    m = relay.send("writer", "tag:rev", "please review")
    relay.inbox("reviewer")
    relay.post("/api/messages/%d/read" % m["id"], {"agentId": "reviewer"})
    reply = relay.send("reviewer", "writer", "done", replyTo=m["id"])
    r = run_cli(env, "show", str(m["id"]))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "[msg:%d] from writer (to tag:rev): please review" % m["id"]
    assert lines[2] == "    -- gate: held for approval by a person"
    assert lines[3].startswith("    -- reviewer: read (delivered 20") and ", read 20" in lines[3]
    assert lines[4] == "    -- replied by reviewer: [msg:%d] (agent-relay show %d)" % (reply["id"], reply["id"])
    out = json.loads(run_cli(env, "show", str(m["id"]), "--json").stdout)
    assert [x["id"] for x in out["replies"]] == [reply["id"]] and len(out["receipts"]) == 2
    r = run_cli(env, "show", "999")
    assert r.returncode == 1 and "(not_found)" in r.stderr


def test_search_prints_results_with_snippets(relay, tmp_path):
    env = cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")
    relay.register("writer")
    relay.register("reviewer")
    relay.register("gate", approvalMode="guarded")
    m = relay.send("writer", "reviewer", "The schema migration looks clean,\ntests pass.", subject="PR 42")
    held = relay.send("writer", "gate", "migration of the vault")
    t = relay.post("/api/tasks", {"title": "Migration of db-2", "target": "reviewer"}).json["task"]
    r = run_cli(env, "search", "migration")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "[msg:%d] from writer (to reviewer): The schema **migration** looks clean, tests pass." % m["id"] in lines
    assert "[task:%d] open Migration of db-2 -> reviewer: **Migration** of db-2" % t["id"] in lines
    r = run_cli(env, "search", "migration", "--agent", "gate")
    assert r.stdout == "no matches\n"
    r = run_cli(env, "search", "vault", "--from", "writer", "--to", "gate", "--json")
    out = json.loads(r.stdout)
    assert [x["message"]["id"] for x in out["results"]] == [held["id"]] and out["engine"] == "fts5"
    r = run_cli(env, "search", "migration", "--limit", "1")
    assert r.stdout.splitlines()[-1] == "(more matches: narrow the search, or raise --limit)"
    r = run_cli(env, "search", "*")
    assert r.returncode == 1 and "q: has no word to search for" in r.stderr
