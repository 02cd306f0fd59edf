"""A newcomer's first commands: `agent-relay demo` fills a relay so the dashboard is alive on the first run;
`task show` prints the text of a task; a target form that does not exist says which forms do; `watch` at a
terminal greets a person with one line; `backup` counts in words."""
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

from conftest import RELAY_PY, wait_for
from test_cli import cli_env, run_cli


def test_demo_serves_a_relay_with_agents_and_their_work(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_") and k not in ("HOST", "PORT")}
    proc = subprocess.Popen([sys.executable, RELAY_PY, "demo", "--port", "0"], env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("demo:"):
                break
        text = "".join(lines)
        assert "database: :memory:" in text, text  # a demo leaves nothing behind
        url = re.search(r"open (http://127\.0\.0\.1:\d+)/", text).group(1)
        relay_env = cli_env(url=url)
        agents = run_cli(relay_env, "agents", "--json")
        ids = {a["id"] for a in __import__("json").loads(agents.stdout)["agents"]}
        assert {"backend-agent", "reviewer", "ops-bot", "docs-writer"} <= ids, agents.stdout
        import urllib.request
        import json

        stats = json.loads(urllib.request.urlopen(url + "/api/stats", timeout=10).read())
        assert stats["messages"]["held"] == 1 and stats["tasks"]["claimed"] == 1 and stats["tasks"]["open"] == 1, stats
        history = json.loads(urllib.request.urlopen(url + "/api/messages?limit=50", timeout=10).read())["messages"]
        assert any(m["claimable"] and not m["claimedBy"] and m["kind"] == "chat" for m in history), history
        assert any(m["replyTo"] for m in history), "the demo has a conversation"
        assert wait_for(lambda: json.loads(urllib.request.urlopen(url + "/api/stats", timeout=10).read())["agents"]["listening"] == 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0 and "Traceback" not in rest, rest
    assert os.listdir(str(tmp_path)) == [], "the demo wrote files: %r" % os.listdir(str(tmp_path))


def test_task_show_prints_its_text(relay, tmp_path):
    env = cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")
    relay.register("db-agent", tags=["db"])
    task = relay.post("/api/tasks", {"title": "Disk full on db-1", "target": "tag:db",
                                     "body": "/var is at 94%\nand rising"}).json["task"]
    relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "db-agent"})
    relay.patch("/api/tasks/%d/status" % task["id"], {"agentId": "db-agent", "progress": "pruned old WAL files",
                                                        "status": "done", "result": "freed 40 GB"})
    p = run_cli(env, "task", "show", task["id"])
    assert p.returncode == 0, p.stderr
    assert "    body: /var is at 94%\n          and rising" in p.stdout, p.stdout
    assert "    progress: pruned old WAL files" in p.stdout and "    result: freed 40 GB" in p.stdout, p.stdout


def test_an_unknown_target_form_names_the_forms_that_exist(relay, tmp_path):
    env = cli_env(relay, AGENT_RELAY_STATE_DIR=tmp_path / "state")
    relay.register("me")
    p = run_cli(env, "send", "--from", "me", "--to", "team:backend", "hello")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "'team:' is not an address form" in p.stderr and "tag:X, cap:X, label:X or broadcast" in p.stderr, p.stderr
    assert relay.sql("SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0


def test_watch_at_a_terminal_greets_a_person_in_one_line(relay):
    relay.register("me")
    env = cli_env(relay)
    pid, fd = pty.fork()
    if pid == 0:  # the child: watch with a terminal on stdout
        os.execve(sys.executable, [sys.executable, RELAY_PY, "watch", "--agent", "me"], env)
    try:
        out = b""
        deadline = time.time() + 20
        while b"Ctrl-C stops" not in out and time.time() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                out += os.read(fd, 4096)
        relay.send("human", "me", "hello, person")
        while b"hello, person" not in out and time.time() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                out += os.read(fd, 4096)
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode("utf-8", "replace")
    first = text.splitlines()[0]
    assert first.startswith("Watching me on %s" % relay.url) and first.endswith("(Ctrl-C stops)."), text
    assert "requests from peers" not in text, "the note written for models is for hooks, not for a person: %r" % text
    assert "[msg:1] from human: hello, person" in text, text


def test_backup_counts_in_words(relay, tmp_path):
    relay.register("solo")
    relay.send("solo", "solo", "one message")
    p = subprocess.run([sys.executable, RELAY_PY, "backup", str(tmp_path / "b.db"), "--db", relay.db_path],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "1 message (newest id 1), 1 agent, 0 tasks" in p.stdout, p.stdout
