"""The benchmarks keep working: `benchmarks/run.py --quick` runs every item end to end, and
`benchmarks/connections.py --quick` measures the connection cap.

No timing is asserted here (speed claims live in the benchmark's own output,
beside a baseline measured in the same run); this only shows that each item
runs against the real relay, prints its figures and writes complete JSON.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")

ITEMS = ["sqlite", "throughput", "latency", "scale", "inbox", "idle", "ingress", "stream_memory", "lease_hook", "search",
         "history"]
# one line per target in the issues: throughput ratio, 3 latency, 2 scale, inbox, idle; never-reading streams' RSS;
# at the main scale level RSS, threads, send ratio and delivery p99, one line for the largest level, RSS once the crowd
# has left, history filtered by agent; what a lease check adds to a hook call; search p99 with FTS5 at the larger size
TARGETS = 18


def test_quick_benchmark_runs_every_item(tmp_path):
    out = tmp_path / "latest.json"
    proc = subprocess.run([sys.executable, RUN, "--quick", "--out", str(out)], cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
    text = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:]

    # every item and every target is printed
    for heading in ("1. send throughput", "2. delivery latency", "3. scale", "4. inbox latency", "5. idle",
                    "6. task ingress", "7. never-reading streams", "8. lease check in a hook call", "9. search latency", "10. history", "targets:"):
        assert heading in text, "missing %r in:\n%s" % (heading, text[-3000:])
    target_lines = [line for line in text.splitlines() if line.strip().startswith(("[met", "[not met"))]
    assert len(target_lines) == TARGETS, text[-3000:]

    res = json.loads(out.read_text())
    assert res["mode"] == "quick"
    for key in ITEMS + ["machine", "targets", "config", "item_seconds"]:
        assert key in res, key
    for key in ("nproc", "cpu", "python", "sqlite"):
        assert res["machine"][key], key

    # item 1: all three concurrencies, both servers, a ratio, and SQLite's own rate
    assert set(res["throughput"]) == {"1", "8", "32"}
    for cell in res["throughput"].values():
        assert cell["baseline_rps"] > 0 and cell["relay_rps"] > 0 and cell["ratio"] > 0
    assert res["sqlite"]["commits_per_s"] > 0 and res["sqlite"]["send_shaped_commits_per_s"] > 0

    # item 2: long-poll and stream, with 1 and with 100 agents waiting, each message seen by its agent
    assert set(res["latency"]) == {"long_poll_1", "long_poll_100", "stream_1", "stream_100"}
    for name, cell in res["latency"].items():
        assert cell["samples"] == res["config"]["latency_samples"], name
        assert 0 < cell["p50_ms"] <= cell["p95_ms"] <= cell["p99_ms"], name
    assert res["latency"]["long_poll_100"]["waiting"] == 100

    # item 3: at each level the relay really held what was asked, sends still went through, a message reached one
    # more waiter, and the crowd was seen to leave
    sc = res["scale"]
    assert [lv["waiting"] for lv in sc["levels"]] == res["config"]["scale_levels"]
    for lv in sc["levels"]:
        assert lv["long_polls"] + lv["streams"] >= lv["waiting"] and lv["streams"] >= lv["waiting"] // 6, lv
        assert lv["rss_mb"] > 0 and lv["threads"] > 0 and lv["relay_rps"] > 0 and lv["relay_rps_none_waiting"] > 0
        assert lv["delivery_to_one_more"]["samples"] == res["config"]["scale_latency_samples"]
        assert lv["after_they_left"]["rss_mb"] > 0 and lv["sqlite_while_held"]["us_per_send_shaped_commit"] > 0
    assert sc["relay_rps"] > 0 and sc["vs_item1"] > 0

    # item 4: both history sizes were stored and read through the relay
    ib = res["inbox"]
    assert ib["small"]["messages"] >= res["config"]["inbox_sizes"][0]
    assert ib["large"]["messages"] >= res["config"]["inbox_sizes"][1]
    for key in ("new_message", "nothing_new", "history_first_page"):
        assert ib["small"][key]["p50_ms"] > 0 and ib["large"][key]["p50_ms"] > 0 and ib["ratio_" + key] > 0

    # item 8: every size was stored and read through the relay, for both agents
    hs = res["history"]
    assert [c["messages"] >= n for c, n in zip(hs["sizes"], res["config"]["history_sizes"])] == [True] * 3
    for c in hs["sizes"]:
        assert c["reader"]["p50_ms"] > 0 and c["channel_only"]["p50_ms"] > 0 and c["reader"]["page"] > 0
    assert hs["ratio_reader"] > 0 and hs["ratio_channel_only"] > 0

    # item 5 and 6
    assert res["idle"]["waiters"] == res["config"]["idle_waiters"] and res["idle"]["cpu_percent_of_core"] >= 0
    assert res["ingress"]["new_keys"]["events_per_s"] > 0 and res["ingress"]["dedupe_storm"]["events_per_s"] > 0
    # the storm was counted on one task, not turned into new ones
    assert res["ingress"]["dedupe_storm"]["occurrence_count"] >= res["config"]["count"]

    # item 7: every stream was opened and stalled, and the RSS was read before and at the peak
    sm = res["stream_memory"]
    assert sm["streams_opened"] == sm["streams_stalled"] == res["config"]["memory_streams"] and not sm["aborted"]
    assert sm["history_mb"] >= res["config"]["memory_history_mb"] * 0.99
    assert 0 < sm["rss_before_mb"] <= sm["rss_peak_mb"] and sm["per_stream_mb"] >= 0

    # item 8: each case ran as processes and in one process, and the check met the leases (it refused the edit)
    lh = res["lease_hook"]
    for kind, runs in (("process", "hook_runs"), ("inprocess", "hook_inprocess_runs")):
        for case in ("off", "empty", "leases"):
            assert lh[kind][case]["samples"] == res["config"][runs] and lh[kind][case]["p50_ms"] > 0, (kind, case)
        assert lh[kind]["leases"]["ratio"] > 0 and "added_ms" in lh[kind]["empty"]
    assert lh["leases_in_scope"] == res["config"]["hook_leases"]
    # item 9: both sizes stored, searched with FTS5 and with the scan, the index built by the migration
    for size in res["config"]["search_sizes"]:
        cell = res["search"][str(size)]
        assert cell["messages"] == size and cell["index_build_s"] >= 0
        for engine in ("fts5", "like"):
            assert cell[engine]["samples"] > 0 and 0 < cell[engine]["p50_ms"] <= cell[engine]["p99_ms"], (size, engine)
            assert all(q["results"] >= 0 for q in cell[engine]["queries"].values())

    assert len(res["targets"]) == TARGETS
    for t in res["targets"]:
        assert isinstance(t["met"], bool) and t["value"] is not None and t["limit"], t


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and lowers a Linux process's descriptor limit")
def test_the_connection_cap_benchmark_runs(tmp_path):
    """benchmarks/connections.py --quick: a relay held at a cap of 100, and one whose descriptors run out first."""
    out = tmp_path / "connections.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "connections.py"), "--quick", "--out", str(out)],
                          cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
    text = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:]
    res = json.loads(out.read_text())
    cap = res["cap"]
    assert cap["connections_held"] >= 100 and cap["at_cap"]["rss_mb"] > 0, cap
    assert (cap["next"]["status"], cap["next"]["code"]) == (503, "unavailable"), cap
    assert cap["serves_again_after_s"] is not None, cap
    fd = res["out_of_descriptors"]
    assert (fd["next"]["status"], fd["next"]["code"]) == (503, "unavailable") and fd["log_lines"] == 1, fd
    assert fd["serves_again_after_s"] is not None, fd
