"""The README's quick start, run as a newcomer would: the start command, the curl session, the test command."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from conftest import ROOT, need, wait_for

README = os.path.join(ROOT, "README.md")


def quick_start_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_the_start_command_serves_the_api_and_stops_cleanly(tmp_path):
    start, test_cmd, curl_session = quick_start_blocks()[:3]
    assert start == "python3 agent_relay.py"
    assert test_cmd == "bash tests/run.sh"
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "bash tests/run.sh" in f.read(), ".ci/run must run the README's test command"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_") and k not in ("HOST", "PORT")}
    env.update(PORT="0", AGENT_RELAY_DB=str(tmp_path / "relay.db"), PYTHONUNBUFFERED="1")
    argv = [sys.executable if w == "python3" else w for w in start.split()]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        first = proc.stdout.readline().decode()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", first)
        assert m, first
        port = m.group(1)
        assert proc.stdout.readline().decode().strip() == "database: %s" % (tmp_path / "relay.db")
        need(shutil.which("curl"), "curl runs the README's quick-start session")
        script = curl_session.replace("localhost:4850", "127.0.0.1:" + port).replace("wait=30", "wait=5")
        t0 = time.monotonic()
        out = subprocess.run(["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        assert out.returncode == 0, out.stderr
        assert time.monotonic() - t0 < 4, "the waiting inbox answers at once: the message is already there"
        answers = [json.loads(line) for line in out.stdout.decode().replace("}{", "}\n{").splitlines() if line.strip()]
        assert answers[0]["id"] == "backend" and answers[1]["id"] == "reviewer"
        assert answers[2]["matched"] == ["reviewer"]
        assert [m["body"] for m in answers[3]["messages"]] == ["Review PR #42, please"]
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=15)[0].decode()
    assert proc.returncode == 0 and "stopped" in rest and "Traceback" not in rest
    assert wait_for(lambda: os.path.exists(str(tmp_path / "relay.db")))
