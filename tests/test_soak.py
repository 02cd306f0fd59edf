"""The soak benchmark, shortened to 60 s: mixed load with agents coming and going, long-polls,
streams, tasks and callbacks; nothing acknowledged is lost and the relay's memory, threads and
file descriptors stay flat. Part of the full suite; deselect it with `-m "not soak"`.
The long run is `python3 benchmarks/soak.py` (600 s by default)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SOAK = os.path.join(ROOT, "benchmarks", "soak.py")


@pytest.mark.soak
@pytest.mark.timeout(240)
def test_sixty_seconds_of_mixed_load(tmp_path):
    report = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, SOAK, "--seconds", "60", "--report", str(report)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=200, cwd=str(tmp_path))
    out = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, out
    data = json.loads(report.read_text())
    assert data["ok"] and data["findings"] == [], out
    # the run really exercised what it claims to
    ops = data["byOperation"]
    for op in ("send", "inbox", "register", "leave", "heartbeat", "claim", "finish", "integration", "stream"):
        assert ops.get(op, 0) > 0, (op, ops)
    assert data["acknowledgedMessages"] > 1000 and data["callbacksDelivered"] > 10 and data["streamEvents"] > 1000, out
    assert len(data["samples"]) >= 20
    for key in ("rssKiB", "threads", "fds"):
        assert data["flat"][key]["ok"], (key, data["flat"][key])
