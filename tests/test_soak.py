"""The soak benchmark, shortened to 60 s after its warm-up (about 45 s here, at most 180 s): mixed load
with agents coming and going, long-polls, streams, tasks and callbacks; nothing acknowledged is lost and
the relay's memory, threads and file descriptors stay flat once its bounded caches have filled. Part of
the full suite; deselect it with `-m "not soak"`. The long run is `python3 benchmarks/soak.py` (600 s
by default).

One quick test here pins what keeps the relay's memory flat under glibc: its threads share two malloc
arenas (without the limit glibc makes one per thread up to 8 per core, and each fills to its own high-water
mark, so resident memory crept up for many minutes of the soak)."""
import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import ROOT

SOAK = os.path.join(ROOT, "benchmarks", "soak.py")


@pytest.mark.soak
@pytest.mark.timeout(400)
def test_sixty_seconds_of_mixed_load(tmp_path):
    report = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, SOAK, "--seconds", "60", "--report", str(report)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=360, cwd=str(tmp_path))
    out = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, out
    data = json.loads(report.read_text())
    assert data["ok"] and data["findings"] == [], out
    # the run really exercised what it claims to
    ops = data["byOperation"]
    for op in ("send", "inbox", "register", "leave", "heartbeat", "claim", "finish", "integration", "stream"):
        assert ops.get(op, 0) > 0, (op, ops)
    assert data["acknowledgedMessages"] > 1000 and data["callbacksDelivered"] > 10 and data["streamEvents"] > 1000, out
    assert len(data["samples"]) >= 20 and data["warmUp"] is not None
    for key in ("rssKiB", "threads", "fds"):
        assert data["flat"][key]["ok"], (key, data["flat"][key])


HEAP = 64 * 1024 * 1024  # glibc's largest heap of a thread's arena, on 64-bit (HEAP_MAX_SIZE)


def malloc_arenas(pid):
    """glibc arenas other than the main one, from /proc/<pid>/maps: each is a 64 MiB aligned reservation whose
    unused tail is an anonymous PROT_NONE mapping ending on the boundary."""
    n = 0
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            parts = line.split()
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if len(parts) == 5 and parts[1] == "---p" and end % HEAP == 0 and 1024 * 1024 <= end - start < HEAP:
                n += 1
    return n


def glibc_64():
    try:
        return sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION")) and sys.maxsize > 2 ** 32
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not glibc_64(), reason="counts glibc's malloc arenas of a 64-bit Linux process")
@pytest.mark.parametrize("arena_max", [None, "8"], ids=["the relay's own limit", "MALLOC_ARENA_MAX as set"])
def test_the_relays_threads_share_two_malloc_arenas(relay_factory, arena_max):
    if arena_max is None and "MALLOC_ARENA_MAX" in os.environ:
        pytest.skip("MALLOC_ARENA_MAX is set for the tests, and the relay keeps it")
    relay = relay_factory(env={"MALLOC_ARENA_MAX": arena_max} if arena_max else None)
    relay.register("a")
    for i in range(16):
        relay.register("s%d" % i)
    answers = []

    def client(i):  # sixteen at once: the worker pool starts a thread for each request it cannot queue behind another
        for k in range(30):
            message = {"from": "s%d" % i, "to": "broadcast", "body": "%d/%d " % (i, k) + "x" * 300}
            answers.append(relay.post("/api/messages", message).status)
            answers.append(relay.get("/api/messages?limit=50").status)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    arenas = malloc_arenas(relay.proc.pid)
    if arena_max is None:
        assert arenas <= 1, "%d arenas besides the main one" % arenas
    else:  # what a person set is left as it is; more than one here also shows that the load ran on several threads
        assert 1 < arenas <= int(arena_max) - 1, arenas
    assert answers.count(201) == answers.count(200) == 16 * 30, answers
    assert len(relay.inbox("a", limit=500)["messages"]) == 16 * 30
