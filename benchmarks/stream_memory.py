#!/usr/bin/env python3
"""Memory held by streams whose clients never read (item 7 of benchmarks/run.py; also runs alone).

    python3 benchmarks/stream_memory.py                          # 100 streams, 50 MB of history
    python3 benchmarks/stream_memory.py --streams 20 --history-mb 10
    python3 benchmarks/stream_memory.py --relay /path/to/another/agent_relay.py

Stores a history of large messages through the API (250 KB each by default), then opens streams
`GET /api/events?since=0` from sockets with a tiny receive window (SO_RCVBUF 4 KB) that never read a byte
after sending the request. They are opened in waves; a wave counts as stalled once every one of its sockets
holds replayed bytes it has not read (FIONREAD), that is, once the relay has begun the replay and can write no
more. The relay's RSS is read before the first stream and, as a peak, while they are all stalled (VmHWM after
resetting it through /proc/PID/clear_refs where that is allowed, and the highest VmRSS sampled). The report:
RSS before and at the peak, the growth in total and per stream, and whether the README's promise holds: 100
never-reading streams replaying 50 MB of history add at most 100 MB of RSS in total.

A relay that holds a replay whole in memory would take the machine with it, so once the growth passes
--abort-mb no more streams are opened, and the report says so (the target is then missed).
"""
import argparse
import fcntl
import json
import os
import socket
import struct
import sys
import tempfile
import termios
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from loadgen import Http, request_bytes  # noqa: E402  (benchmarks/loadgen.py)

TARGET_MB = 100.0  # the promise, for 100 streams and 50 MB of history
RCVBUF = 4096


def rss_kb(pid, field="VmRSS"):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no %s in /proc/%d/status" % (field, pid))


def reset_peak(pid):
    """Resets the process's VmHWM to its current RSS (Linux 4.0+); False where that is not allowed."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
    except OSError:
        return False
    return rss_kb(pid, "VmHWM") <= rss_kb(pid, "VmRSS") + 1024


def unread(sock):
    """Bytes waiting in the socket's receive queue."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def open_stalled_stream(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # before connect: the window is agreed at the handshake
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(request_bytes("GET", "/api/events?since=0", port))
    return s


def hang_up(s):
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    s.close()


def fill_history(port, history_mb, message_kb):
    """Sends enough messages of message_kb KB to make history_mb MB; returns (messages, MB stored)."""
    ctl = Http(port)
    try:
        for agent in ("mem-writer", "mem-reader"):
            status, _ = ctl.call("POST", "/api/agents", {"id": agent})
            if status not in (200, 201):
                raise RuntimeError("registering %s answered %s" % (agent, status))
        size = message_kb * 1000
        n = max(1, int(round(history_mb * 1e6 / size)))
        for i in range(n):
            body = ("%06d " % i) + "x" * (size - 7)
            status, out = ctl.call("POST", "/api/messages", {"from": "mem-writer", "to": "mem-reader", "body": body})
            if status != 201:
                raise RuntimeError("a send answered %s: %r" % (status, out))
        return n, n * size / 1e6
    finally:
        ctl.close()


def streams_open(port):
    ctl = Http(port)
    try:
        status, stats = ctl.call("GET", "/api/stats")
        return stats["streams"]
    finally:
        ctl.close()


def measure(port, pid, streams=100, history_mb=50.0, message_kb=250, wave=10, abort_mb=1000.0, stall_timeout=120.0,
            hold_s=2.0, say=print):
    """Fills the history, opens `streams` never-reading streams and reports the relay's RSS (see the module's doc)."""
    t0 = time.monotonic()
    n_msgs, stored_mb = fill_history(port, history_mb, message_kb)
    fill_s = time.monotonic() - t0
    time.sleep(0.5)
    before = rss_kb(pid)
    peak_reset = reset_peak(pid)
    peak = before
    socks, stalled, aborted = [], 0, False

    def sample():
        nonlocal peak
        peak = max(peak, rss_kb(pid), rss_kb(pid, "VmHWM") if peak_reset else 0)

    t0 = time.monotonic()
    try:
        while len(socks) < streams and not aborted:
            batch = [open_stalled_stream(port) for _ in range(min(wave, streams - len(socks)))]
            socks.extend(batch)
            deadline = time.monotonic() + stall_timeout
            waiting = list(batch)
            while waiting and time.monotonic() < deadline:
                sample()
                if (peak - before) / 1024.0 > abort_mb:
                    aborted = True
                    break
                waiting = [s for s in waiting if unread(s) < 2048]  # more than the head: the replay has begun
                time.sleep(0.05)
            stalled += len(batch) - len(waiting)
        open_s = time.monotonic() - t0
        end = time.monotonic() + hold_s
        while time.monotonic() < end and not aborted:
            sample()
            time.sleep(0.05)
        sample()
        held_streams = streams_open(port)
    finally:
        for s in socks:
            hang_up(s)
    deadline = time.monotonic() + 60
    while streams_open(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    after = rss_kb(pid)
    growth_mb = (peak - before) / 1024.0
    out = {
        "streams_asked": streams, "streams_opened": len(socks), "streams_stalled": stalled, "streams_held_by_relay": held_streams,
        "history_messages": n_msgs, "history_mb": round(stored_mb, 1), "message_kb": message_kb,
        "rss_before_mb": round(before / 1024.0, 1), "rss_peak_mb": round(peak / 1024.0, 1),
        "rss_after_close_mb": round(after / 1024.0, 1),
        "growth_mb": round(growth_mb, 1), "per_stream_mb": round(growth_mb / max(1, len(socks)), 3),
        "target_mb": TARGET_MB, "met": bool(not aborted and stalled == streams and growth_mb <= TARGET_MB),
        "aborted": aborted, "peak_from_vmhwm": peak_reset, "fill_s": round(fill_s, 1), "open_s": round(open_s, 1),
        "note": "growth = peak RSS while every stream was stalled - RSS before the first; streams open /api/events?since=0 "
                "with SO_RCVBUF %d and never read" % RCVBUF,
    }
    say("   %d streams (%d stalled) replaying %.1f MB (%d messages of %d KB): RSS %.1f MB before, peak %.1f MB, "
        "%.1f MB after they closed" % (len(socks), stalled, stored_mb, n_msgs, message_kb, out["rss_before_mb"],
                                       out["rss_peak_mb"], out["rss_after_close_mb"]))
    say("   growth %.1f MB in total, %.3f MB per stream; target <= %.0f MB in total: %s%s"
        % (growth_mb, out["per_stream_mb"], TARGET_MB, "met" if out["met"] else "not met",
           " (stopped opening streams past %.0f MB)" % abort_mb if aborted else ""))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="RSS of a relay holding streams whose clients never read.")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--history-mb", type=float, default=50.0)
    p.add_argument("--message-kb", type=int, default=250)
    p.add_argument("--abort-mb", type=float, default=1000.0, help="stop opening streams once RSS grew this much")
    p.add_argument("--relay", default=os.path.join(os.path.dirname(HERE), "agent_relay.py"), help="the agent_relay.py to measure")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    import run  # benchmarks/run.py: the same way of starting a relay

    run.RELAY[0] = os.path.abspath(args.relay)
    tmp = tempfile.mkdtemp(prefix="agent-relay-streams-")
    relay = run.start_relay(os.path.join(tmp, "streams.db"))
    try:
        print("stream memory: %s" % run.RELAY[0], flush=True)
        out = measure(relay.port, relay.pid, streams=args.streams, history_mb=args.history_mb, message_kb=args.message_kb,
                      abort_mb=args.abort_mb, say=lambda text: print(text, flush=True))
        relay.check()
    finally:
        relay.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
