#!/usr/bin/env python3
"""Refresh the copies of dashboard.html and install.sh that agent_relay.py carries (run after editing either).

Each copy is gzip-compressed (mtime 0, so it is reproducible) and base64-encoded
between its BEGIN/END EMBEDDED markers (DASHBOARD, INSTALLER). `--check` exits 1
when a copy is stale, without writing.
"""
import base64
import gzip
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELAY = os.path.join(ROOT, "agent_relay.py")
PAGE = os.path.join(ROOT, "dashboard.html")
# (file, marker, variable): each file's copy sits between "# BEGIN EMBEDDED <marker>" and "# END EMBEDDED <marker>"
ASSETS = [(PAGE, "DASHBOARD", "DASHBOARD_GZIP_B64"), (os.path.join(ROOT, "install.sh"), "INSTALLER", "INSTALLER_GZIP_B64")]
BLOCK = re.compile(r"# BEGIN EMBEDDED DASHBOARD\n.*?# END EMBEDDED DASHBOARD\n", re.S)


def embedded_block(data, marker="DASHBOARD", variable="DASHBOARD_GZIP_B64"):
    gz = gzip.compress(data, compresslevel=9, mtime=0)
    text = base64.b64encode(gz).decode("ascii")
    lines = ['    "%s",' % text[i : i + 100] for i in range(0, len(text), 100)]
    return "# BEGIN EMBEDDED %s\n%s = [\n%s\n]\n# END EMBEDDED %s\n" % (marker, variable, "\n".join(lines), marker)


def main():
    with open(RELAY, encoding="utf-8") as f:
        source = f.read()
    updated = source
    for path, marker, variable in ASSETS:
        block_re = re.compile(r"# BEGIN EMBEDDED %s\n.*?# END EMBEDDED %s\n" % (marker, marker), re.S)
        if not block_re.search(updated):
            sys.exit("agent_relay.py has no EMBEDDED %s markers" % marker)
        with open(path, "rb") as f:
            block = embedded_block(f.read(), marker, variable)
        updated = block_re.sub(lambda m: block, updated, count=1)
    if "--check" in sys.argv[1:]:
        sys.exit(0 if updated == source else 1)
    if updated != source:
        with open(RELAY, "w", encoding="utf-8") as f:
            f.write(updated)
        print("agent_relay.py: embedded copies refreshed from dashboard.html and install.sh")
    else:
        print("agent_relay.py: embedded copies already up to date")


if __name__ == "__main__":
    main()
