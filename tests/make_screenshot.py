#!/usr/bin/env python3
"""Make docs/dashboard.png, the screenshot at the top of the README (not a test).

Starts the real relay on a free port with a throwaway database, fills it with a
few realistic agents, a conversation, a claimable work item, a task with
repeated occurrences that an agent has claimed, and a message held for a
guarded agent, then opens the dashboard in headless Chromium (Debian's
/usr/bin/chromium driven by Playwright, as the browser tests do) and saves a
1280x800 screenshot.

    python3 tests/make_screenshot.py [output.png]     # default: docs/dashboard.png

Run it again after changing the page's look (and `python3 tests/refresh_dashboard.py`).
"""
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from conftest import ROOT, Relay  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


def populate(relay):
    relay.register("backend-agent", label="API backend", machine="devbox", project="billing",
                   tags=["api", "python"], capabilities=["python", "sql"])
    relay.register("reviewer", label="code review", tags=["review"], capabilities=["review"])
    relay.register("ops-bot", label="deploys", tags=["ops"], capabilities=["deploy"], approvalMode="guarded",
                   channels=["all", "deploys"])
    relay.register("docs-writer", tags=["docs"], capabilities=["markdown"])
    relay.patch("/api/agents/backend-agent", {"status": "busy"})
    relay.patch("/api/agents/docs-writer", {"status": "idle"})

    pr = relay.send("backend-agent", "reviewer", "Migration 0042 adds the invoices.currency column with a default; "
                    "tests pass locally and on CI. Can you take a look?", subject="PR #42: invoice currency")
    relay.send("reviewer", "backend-agent", "Looks clean. One nit: index the new column. Approving once that's in.",
               replyTo=pr["id"])
    relay.send("human", "broadcast", "Deploy freeze from 17:00 UTC today; finish open work before then.",
               subject="Deploy freeze")
    relay.send("human", "tag:api", "test_billing::test_refund_rounding fails about 1 run in 20. Who can take it?",
               subject="Flaky test", claimable=True)

    alert = {"title": "Disk 91% full on db-1", "body": "/var/lib/postgresql is at 91% and rising.",
             "target": "tag:api", "severity": "critical", "dedupeKey": "disk-db-1"}
    task = relay.post("/api/tasks", alert).json["task"]
    relay.post("/api/tasks", alert)
    relay.post("/api/tasks", alert)
    relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "backend-agent"})
    relay.patch("/api/tasks/%d/status" % task["id"], {"agentId": "backend-agent", "progress": 60})
    relay.post("/api/tasks", {"title": "Update the API changelog for v2.3", "target": "tag:docs", "severity": "info"})

    relay.send("backend-agent", "ops-bot", "Migration is merged. Deploy v2.3.1 to production?", subject="Deploy request",
               channel="deploys")
    relay.send("docs-writer", "reviewer", "Changelog draft is in docs/changelog.md.")


def main():
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "dashboard.png"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    from playwright.sync_api import expect, sync_playwright

    tmp = tempfile.mkdtemp(prefix="agent-relay-shot-")
    relay = Relay(tmp).start()
    listener = None
    try:
        populate(relay)
        # An agent with an open stream shows as listening.
        import http.client

        listener = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
        listener.request("GET", "/api/events?agentId=backend-agent")
        listener_response = listener.getresponse()
        assert listener_response.status == 200
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
            ctx = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
            page = ctx.new_page()
            page.goto(relay.url + "/")
            expect(page.locator("#conn-status")).to_have_attribute("data-state", "live")
            expect(page.locator('[data-testid="approval"]')).to_have_count(1)
            expect(page.locator('[data-testid="task-occurrences"]')).to_have_text("×3")
            expect(page.locator('[data-testid="agent-listening"][data-listening="true"]')).to_have_count(1)
            page.wait_for_timeout(300)  # let the last debounced refresh paint
            page.screenshot(path=out)
            browser.close()
        print("wrote %s" % out)
    finally:
        if listener is not None:
            listener.close()
        relay.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
