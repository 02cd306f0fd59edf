#!/usr/bin/env python3
"""Make docs/dashboard.png, the screenshot at the top of the README (not a test).

Starts `agent-relay demo` on a free port (a throwaway relay with a few
realistic agents, a conversation, a claimable work item, a task with repeated
occurrences that an agent has claimed, and a message held for a guarded
agent), then opens the dashboard in headless Chromium (Debian's
/usr/bin/chromium driven by Playwright, as the browser tests do) and saves a
1280x800 screenshot.

    python3 tests/make_screenshot.py [output.png]     # default: docs/dashboard.png

Run it again after changing the page's look (and `python3 tests/refresh_dashboard.py`).
"""
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from conftest import ROOT  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


def start_demo():
    """`agent-relay demo` on a free port, as a newcomer starts it; returns (process, url) once it is filled."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "agent_relay.py"), "demo", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.match(r"demo: .* open (http://\S+)/$", line.strip())
        if m:
            return proc, m.group(1)
    raise RuntimeError("agent-relay demo did not start:\n" + "".join(lines))


def main():
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "dashboard.png"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    from playwright.sync_api import expect, sync_playwright

    proc, url = start_demo()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
            ctx = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
            page = ctx.new_page()
            page.goto(url + "/")
            expect(page.locator("#conn-status")).to_have_attribute("data-state", "live")
            expect(page.locator('[data-testid="approval"]')).to_have_count(1)
            expect(page.locator('[data-testid="task-occurrences"]')).to_have_text("×3")
            expect(page.locator('[data-testid="agent-listening"][data-listening="true"]')).to_have_count(1)
            page.wait_for_timeout(300)  # let the last debounced refresh paint
            page.screenshot(path=out)
            browser.close()
        print("wrote %s" % out)
    finally:
        proc.terminate()
        proc.wait(15)


if __name__ == "__main__":
    main()
