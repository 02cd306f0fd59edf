"""Runs the real relay with a wall clock that a test can set back or forward.

    python3 tests/clock_shift.py serve --port 0 --db relay.db     (as Relay(script=SCRIPT) starts it)

agent_relay.py is imported unchanged and its main() runs; the one difference is time.time(), which returns the
real time plus the number of seconds written in the file named by AGENT_RELAY_TEST_CLOCK_FILE (read at start, and
again on SIGUSR1). time.monotonic() is left alone, as a real clock step (NTP, a person setting the date) leaves
it alone. After each read the script writes the shift it applied to the same path + ".applied", so a test knows
when the relay sees the new time. Tests use shifted_relay() and shift() below.
"""
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.abspath(__file__)
VARIABLE = "AGENT_RELAY_TEST_CLOCK_FILE"


def shifted_relay(relay_factory, tmp_path, env=None, **kw):
    """A relay started through this script; its clock file starts at no shift."""
    path = str(tmp_path / "clock-shift")
    with open(path, "w") as f:
        f.write("0")
    relay = relay_factory(env=dict(env or {}, **{VARIABLE: path}), script=SCRIPT, **kw)
    relay.clock_file = path
    return relay


def shift(relay, seconds, timeout=20.0):
    """Moves the relay's wall clock to real time + `seconds` and waits until the relay has applied it."""
    with open(relay.clock_file, "w") as f:
        f.write(repr(float(seconds)))
    applied = relay.clock_file + ".applied"
    if os.path.exists(applied):
        os.unlink(applied)
    relay.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(applied) as f:
                if float(f.read() or "nan") == float(seconds):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError("the relay did not apply a clock shift of %s s:\n%s" % (seconds, relay.log))


def _run():
    sys.path.insert(0, os.path.dirname(HERE))
    import agent_relay

    path = os.environ[VARIABLE]
    offset = [0.0]
    real_time = time.time

    def read_shift(signum=None, frame=None):
        with open(path) as f:
            offset[0] = float(f.read().strip() or "0")
        with open(path + ".applied", "w") as f:
            f.write(repr(offset[0]))

    read_shift()
    time.time = lambda: real_time() + offset[0]
    signal.signal(signal.SIGUSR1, read_shift)
    return agent_relay.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_run())
