#!/usr/bin/env python3
"""Refresh the Claude Code plugin's copy of agent_relay.py and its version: `python3 integrations/refresh.py`.

The plugin ships its own byte-identical copy of agent_relay.py because Claude Code copies a plugin into its
cache and a copied plugin cannot reach files outside its folder. tests/test_hooks.py fails when the copy or
plugin.json's version drifts from ../agent_relay.py; run this script to bring them back in step.
"""
import json
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(os.path.dirname(HERE), "agent_relay.py")
PLUGIN = os.path.join(HERE, "claude-code")
COPY = os.path.join(PLUGIN, "agent_relay.py")
MANIFEST = os.path.join(PLUGIN, ".claude-plugin", "plugin.json")


def source_version():
    with open(SOURCE, encoding="utf-8") as f:
        m = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if not m:
        sys.exit("refresh: no __version__ in %s" % SOURCE)
    return m.group(1)


def main():
    shutil.copyfile(SOURCE, COPY)
    os.chmod(COPY, 0o755)
    with open(MANIFEST, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["version"] = source_version()
    with open(MANIFEST, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
    print("refreshed %s and %s (version %s)" % (os.path.relpath(COPY), os.path.relpath(MANIFEST), manifest["version"]))


if __name__ == "__main__":
    main()
