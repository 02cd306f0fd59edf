#!/usr/bin/env python3
"""Refresh the copy of dashboard.html that agent_relay.py carries (run after editing dashboard.html).

The copy is gzip-compressed (mtime 0, so it is reproducible) and base64-encoded
between the BEGIN/END EMBEDDED DASHBOARD markers. `--check` exits 1 when the
copy is stale, without writing.
"""
import base64
import gzip
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELAY = os.path.join(ROOT, "agent_relay.py")
PAGE = os.path.join(ROOT, "dashboard.html")
BLOCK = re.compile(r"# BEGIN EMBEDDED DASHBOARD\n.*?# END EMBEDDED DASHBOARD\n", re.S)


def embedded_block(html_bytes):
    gz = gzip.compress(html_bytes, compresslevel=9, mtime=0)
    text = base64.b64encode(gz).decode("ascii")
    lines = ['    "%s",' % text[i : i + 100] for i in range(0, len(text), 100)]
    return "# BEGIN EMBEDDED DASHBOARD\nDASHBOARD_GZIP_B64 = [\n%s\n]\n# END EMBEDDED DASHBOARD\n" % "\n".join(lines)


def main():
    with open(PAGE, "rb") as f:
        block = embedded_block(f.read())
    with open(RELAY, encoding="utf-8") as f:
        source = f.read()
    if not BLOCK.search(source):
        sys.exit("agent_relay.py has no EMBEDDED DASHBOARD markers")
    updated = BLOCK.sub(lambda m: block, source, count=1)
    if "--check" in sys.argv[1:]:
        sys.exit(0 if updated == source else 1)
    if updated != source:
        with open(RELAY, "w", encoding="utf-8") as f:
            f.write(updated)
        print("agent_relay.py: embedded dashboard refreshed from dashboard.html")
    else:
        print("agent_relay.py: embedded dashboard already up to date")


if __name__ == "__main__":
    main()
