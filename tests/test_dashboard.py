"""The dashboard in a real browser: headless Chromium driven by Playwright.

Each test starts its own relay, opens the page the relay serves at "/" in a
fresh browser context, and does what a person does there: reads, types,
clicks. What the page did is then checked through the API and in the database.
One browser is shared by the module; Debian's /usr/bin/chromium is used
through `executable_path` (tests/run.sh installs it; never `playwright install`).
"""
import json
import os

import pytest

from conftest import need

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
TOKEN = "dash-token-12345"
ADMIN = "dash-admin-67890"
PAYLOAD = "<img src=x onerror=alert(1)>"

# Counts how often the token modal is shown, from the first paint on.
COUNT_MODAL = """
window.__authShown = [];
document.addEventListener('DOMContentLoaded', () => {
  const m = document.getElementById('auth-modal');
  if (!m) return;
  new MutationObserver(() => { if (!m.hidden) window.__authShown.push(m.dataset.kind); })
    .observe(m, { attributes: true, attributeFilter: ['hidden'] });
});
"""


@pytest.fixture(scope="module")
def browser():
    need(os.path.exists(CHROMIUM), "Debian's chromium (%s) drives the dashboard tests; tests/run.sh installs it" % CHROMIUM)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    need(sync_playwright is not None, "the playwright Python package drives the dashboard tests (pip install -r tests/requirements.txt)")
    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
    yield b
    b.close()
    pw.stop()


class Session:
    """One browser context on the relay's page, recording console errors, dialogs and requests."""

    def __init__(self, browser, relay, width=1280, height=800, init_script=None):
        from playwright.sync_api import expect

        self.expect = expect
        self.relay = relay
        self.ctx = browser.new_context(viewport={"width": width, "height": height})
        self.ctx.set_default_timeout(5000)
        if init_script:
            self.ctx.add_init_script(init_script)
        self.page = self.ctx.new_page()
        self.errors, self.dialogs, self.requests = [], [], []
        self.page.on("console", lambda m: self.errors.append("console: " + m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append("pageerror: %s" % e))
        self.page.on("dialog", self._dialog)
        self.page.on("request", lambda r: self.requests.append((r.url, dict(r.headers))))

    def _dialog(self, d):
        self.dialogs.append(d.message)
        d.dismiss()

    def open(self):
        self.page.goto(self.relay.url + "/")
        return self

    def live(self):
        self.expect(self.page.locator("#conn-status")).to_have_attribute("data-state", "live")
        return self

    def tid(self, testid, **data):
        sel = '[data-testid="%s"]' % testid + "".join('[data-%s="%s"]' % (k.replace("_", "-"), v) for k, v in data.items())
        return self.page.locator(sel)

    def agent_card(self, agent_id):
        return self.tid("agent-card", agent_id=agent_id)

    def assert_clean(self):
        assert self.errors == [], self.errors
        assert self.dialogs == [], self.dialogs

    def close(self):
        self.ctx.close()


@pytest.fixture
def session(browser):
    opened = []

    def make(relay, **kw):
        s = Session(browser, relay, **kw)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


# ---------------------------------------------------------------------------


def test_an_agent_registered_through_the_api_appears_without_a_reload(relay, session):
    relay.register("early-bird", tags=["build"])
    s = session(relay).open().live()
    s.expect(s.agent_card("early-bird")).to_be_visible()
    s.expect(s.page.locator("#stat-agents-total")).to_have_text("1")
    s.page.evaluate("window.__sameDocument = true")

    relay.register("newcomer", label="night shift", tags=["ops"], capabilities=["deploy"])
    card = s.agent_card("newcomer")
    card.wait_for(state="visible", timeout=1000)  # pushed by the stream: within a second, no reload
    assert s.page.evaluate("window.__sameDocument") is True
    s.expect(card.locator('[data-testid="agent-label"]')).to_have_text("night shift")
    s.expect(card.locator('[data-testid="agent-status"]')).to_have_text("online")
    s.expect(card.locator('[data-testid="agent-tags"]')).to_have_text("ops")
    s.expect(card.locator('[data-testid="agent-caps"]')).to_have_text("deploy")
    s.expect(s.page.locator("#stat-agents-total")).to_have_text("2")

    # Later changes arrive the same way: a status change and a session end.
    relay.patch("/api/agents/newcomer", {"status": "busy"})
    s.expect(card.locator('[data-testid="agent-status"]')).to_have_text("busy")
    relay.delete("/api/agents/early-bird")
    s.expect(s.agent_card("early-bird").locator('[data-testid="agent-status"]')).to_have_text("offline")
    assert s.page.evaluate("window.__sameDocument") is True
    s.assert_clean()


def test_a_message_composed_in_the_page_reaches_the_agents_inbox(relay, session):
    relay.register("backend-agent")
    s = session(relay).open().live()
    s.page.fill("#compose-to", "backend-agent")
    s.page.fill("#compose-subject", "Migration")
    s.page.fill("#compose-body", "Please run the migration on staging.\nThen report back.")
    s.page.click("#compose-send")
    s.expect(s.page.locator("#compose-status")).to_contain_text("Sent #")
    s.expect(s.page.locator("#compose-error")).to_be_hidden()
    s.expect(s.page.locator("#compose-body")).to_have_value("")

    inbox = relay.inbox("backend-agent")["messages"]
    assert [(m["from"], m["subject"], m["body"]) for m in inbox] == [
        ("human", "Migration", "Please run the migration on staging.\nThen report back.")]
    rows = relay.sql("SELECT from_agent, to_target, body FROM messages")
    assert rows == [{"from_agent": "human", "to_target": "backend-agent", "body": "Please run the migration on staging.\nThen report back."}]
    # The feed shows it, as text.
    msg = s.tid("message", message_id=inbox[0]["id"])
    s.expect(msg.locator('[data-testid="msg-from"]')).to_have_text("human")
    s.expect(msg.locator('[data-testid="msg-to"]')).to_have_text("backend-agent")
    s.expect(msg.locator('[data-testid="msg-body"]')).to_have_text("Please run the migration on staging.\nThen report back.")

    # A target that names nobody is refused, and the page says why.
    s.page.fill("#compose-to", "nobody-here")
    s.page.fill("#compose-body", "hello?")
    s.page.click("#compose-send")
    s.expect(s.page.locator("#compose-error")).to_contain_text("unknown_agent")
    assert len(relay.sql("SELECT id FROM messages")) == 1
    s.errors = [e for e in s.errors if "404" not in e]  # Chromium logs every 4xx as "Failed to load resource"
    s.assert_clean()


def test_a_label_edited_in_place_is_stored(relay, session):
    relay.register("reviewer")
    s = session(relay).open().live()
    card = s.agent_card("reviewer")
    label = card.locator('[data-testid="agent-label"]')
    s.expect(label).to_have_text("add label")
    label.click()
    field = card.locator('[data-testid="agent-label-input"]')
    field.fill("code review")
    field.press("Enter")
    s.expect(label).to_have_text("code review")
    assert relay.get("/api/agents/reviewer").json["label"] == "code review"
    assert relay.sql("SELECT label FROM agents WHERE id = 'reviewer'") == [{"label": "code review"}]

    # Escape cancels: nothing is sent, nothing changes.
    label.click()
    field.fill("something else")
    field.press("Escape")
    s.expect(label).to_have_text("code review")
    assert relay.get("/api/agents/reviewer").json["label"] == "code review"
    relay.restart()
    assert relay.get("/api/agents/reviewer").json["label"] == "code review"
    s.assert_clean()


def test_a_held_message_approved_in_the_page_reaches_the_guarded_agent(relay, session):
    relay.register("backend-agent")
    relay.register("ops-bot", approvalMode="guarded")
    s = session(relay).open().live()
    held = relay.send("backend-agent", "ops-bot", "Deploy v2.3 to production?")
    doomed = relay.send("backend-agent", "ops-bot", "Drop the staging database?")
    assert relay.inbox("ops-bot", since=0)["messages"] == []

    row = s.tid("approval", message_id=held["id"], agent_id="ops-bot")
    s.expect(row).to_be_visible()
    s.expect(row.locator('[data-testid="approval-body"]')).to_have_text("Deploy v2.3 to production?")
    s.expect(s.page.locator("#stat-held")).to_have_text("2")
    row.locator('[data-testid="approve-btn"]').click()
    s.expect(row).to_have_count(0)
    other = s.tid("approval", message_id=doomed["id"], agent_id="ops-bot")
    other.locator('[data-testid="reject-btn"]').click()
    s.expect(other).to_have_count(0)
    s.expect(s.page.locator("#approvals-empty")).to_be_visible()

    inbox = relay.inbox("ops-bot", since=0)["messages"]
    assert [m["id"] for m in inbox] == [held["id"]]
    receipts = {r["agentId"]: r["state"] for r in relay.get("/api/messages/%d" % held["id"]).json["receipts"]}
    assert receipts["ops-bot"] in ("approved", "delivered")
    states = relay.get("/api/messages/%d" % doomed["id"]).json["receipts"]
    assert [r["state"] for r in states if r["agentId"] == "ops-bot"] == ["rejected"]
    s.assert_clean()


def test_with_a_token_the_page_asks_once_keeps_it_and_never_puts_it_in_a_url(relay_factory, session):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": TOKEN})
    relay.register("backend-agent")
    s = session(relay, init_script=COUNT_MODAL).open()
    modal = s.page.locator("#auth-modal")
    s.expect(modal).to_be_visible()
    s.expect(modal).to_have_attribute("data-kind", "token")
    s.expect(s.page.locator("#conn-status")).to_have_attribute("data-state", "auth")
    s.page.fill("#auth-token", TOKEN)
    s.page.click("#auth-save")
    s.expect(modal).to_be_hidden()
    s.live()
    s.expect(s.agent_card("backend-agent")).to_be_visible()
    assert s.page.evaluate("localStorage.getItem('agentRelayToken')") == TOKEN

    # It works: the stream pushes, a message is sent.
    relay.register("reviewer")
    s.expect(s.agent_card("reviewer")).to_be_visible()
    s.page.fill("#compose-to", "reviewer")
    s.page.fill("#compose-body", "token works")
    s.page.click("#compose-send")
    s.expect(s.page.locator("#compose-status")).to_contain_text("Sent #")
    assert [m["body"] for m in relay.inbox("reviewer")["messages"]] == ["token works"]
    assert s.page.evaluate("window.__authShown") == ["token"]

    # A reload uses the stored token: no second prompt.
    s.page.reload()
    s.live()
    s.expect(s.agent_card("reviewer")).to_be_visible()
    assert s.page.evaluate("window.__authShown") == []

    api = [(u, h) for u, h in s.requests if "/api/" in u]
    assert any(u.endswith("/api/events") for u, _ in api)
    for url, headers in s.requests:
        assert TOKEN not in url, url
    # The token travels in a header; only the very first probe (before the prompt) went without it.
    without = [u for u, h in api if h.get("authorization") != "Bearer " + TOKEN]
    assert len(without) == 1 and without[0].endswith("/api/stats"), without


def test_agent_and_message_text_is_shown_as_text_and_runs_nothing(relay, session):
    relay.register("mallory", label=PAYLOAD, tags=["x"])
    relay.register("ops-bot", approvalMode="guarded")
    msg = relay.send("mallory", "human", PAYLOAD, subject=PAYLOAD)
    held = relay.send("mallory", "ops-bot", PAYLOAD)
    relay.post("/api/tasks", {"title": PAYLOAD, "body": PAYLOAD, "target": "tag:x"})
    s = session(relay).open().live()

    label = s.agent_card("mallory").locator('[data-testid="agent-label"]')
    s.expect(label).to_have_text(PAYLOAD)
    body = s.tid("message", message_id=msg["id"]).locator('[data-testid="msg-body"]')
    s.expect(body).to_have_text(PAYLOAD)
    s.expect(s.tid("message", message_id=msg["id"]).locator('[data-testid="msg-subject"]')).to_have_text(PAYLOAD)
    s.expect(s.tid("approval", message_id=held["id"]).locator('[data-testid="approval-body"]')).to_have_text(PAYLOAD)
    s.expect(s.tid("task").locator('[data-testid="task-title"]')).to_have_text(PAYLOAD)
    # Also when it arrives live.
    relay.send("mallory", "human", PAYLOAD + " live")
    s.expect(s.page.locator('[data-testid="msg-body"]', has_text=PAYLOAD + " live")).to_have_count(1)

    assert label.locator("img").count() == 0 and body.locator("img").count() == 0
    assert s.page.evaluate("document.querySelectorAll('img').length") == 0
    s.assert_clean()


def test_a_normal_session_logs_no_console_errors(relay, session):
    relay.register("backend-agent", tags=["api"], capabilities=["python"])
    relay.register("reviewer", tags=["review"])
    first = relay.send("backend-agent", "reviewer", "Migration looks clean, tests pass.", subject="PR 42")
    relay.send("reviewer", "backend-agent", "Approved, merging.", replyTo=first["id"])
    relay.send("human", "tag:api", "Pick this up", claimable=True)
    task = relay.post("/api/tasks", {"title": "Disk 91% on db-1", "target": "tag:api", "dedupeKey": "disk"}).json["task"]
    relay.post("/api/tasks", {"title": "Disk 91% on db-1", "target": "tag:api", "dedupeKey": "disk"})
    relay.post("/api/tasks/%d/claim" % task["id"], {"agentId": "backend-agent"})
    relay.patch("/api/tasks/%d/status" % task["id"], {"agentId": "backend-agent", "progress": 40})
    s = session(relay).open().live()

    t = s.tid("task", task_id=task["id"])
    s.expect(t.locator('[data-testid="task-occurrences"]')).to_have_text("×2")
    s.expect(t.locator('[data-testid="task-claimed-by"]')).to_have_text("backend-agent")
    s.expect(t.locator('[data-testid="task-progress"]')).to_contain_text("40%")
    s.expect(s.tid("work-item")).to_have_count(1)
    thread = s.tid("message", message_id=first["id"])
    thread.locator('[data-testid="thread-toggle"]').click()
    s.expect(thread.locator('[data-testid="message-reply"]')).to_have_count(1)
    # Reply from the page joins the thread.
    thread.locator('[data-testid="msg-reply"]').first.click()
    s.expect(s.page.locator("#compose-to")).to_have_value("backend-agent")
    s.page.fill("#compose-body", "Thanks both.")
    s.page.click("#compose-send")
    s.expect(s.page.locator("#compose-status")).to_contain_text("Sent #")
    stored = relay.sql("SELECT reply_to, thread_id FROM messages WHERE body = 'Thanks both.'")
    assert stored == [{"reply_to": first["id"], "thread_id": first["id"]}]
    # Filters.
    s.page.fill("#filter-q", "Migration")
    s.expect(s.tid("message")).to_have_count(1)
    s.page.fill("#filter-q", "")
    s.page.fill("#filter-agent", "reviewer")
    s.expect(s.tid("message", message_id=first["id"])).to_be_visible()
    # Live task changes.
    relay.patch("/api/tasks/%d/status" % task["id"], {"agentId": "backend-agent", "status": "done"})
    s.expect(t).to_have_attribute("data-status", "done")
    s.assert_clean()


def test_at_phone_width_nothing_scrolls_sideways(relay, session):
    long_id = "agent-with-a-rather-long-identifier-" + "x" * 60
    relay.register(long_id, label="L" * 64, tags=["t" * 60], capabilities=["c" * 60], channels=["all", "ch" * 30])
    relay.register("ops-bot", approvalMode="guarded")
    relay.send(long_id, "human", "unbroken-" + "y" * 400, subject="s" * 200)
    relay.send(long_id, "ops-bot", "z" * 300)
    relay.post("/api/tasks", {"title": "T" * 200, "target": long_id, "externalUrl": "https://example.invalid/" + "p" * 200})
    s = session(relay, width=390, height=844).open().live()
    s.expect(s.agent_card(long_id)).to_be_visible()
    s.expect(s.tid("approval")).to_have_count(1)
    s.expect(s.tid("task")).to_have_count(1)
    sizes = s.page.evaluate("""() => {
        const vw = window.innerWidth, out = [];
        for (const n of document.querySelectorAll('[data-testid], section, header, main')) {
            const r = n.getBoundingClientRect();
            if (r.width && r.right > vw + 0.5) out.push((n.dataset.testid || n.tagName) + ' ' + Math.round(r.right));
        }
        return {vw, html: document.documentElement.scrollWidth, body: document.body.scrollWidth, wide: out};
    }""")
    assert sizes["vw"] == 390
    assert sizes["html"] <= 390 and sizes["body"] <= 390, sizes
    assert sizes["wide"] == [], sizes
    s.assert_clean()


def test_with_agent_keys_sending_as_human_asks_for_the_admin_token(relay_factory, session):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": TOKEN, "AGENT_RELAY_AGENT_KEYS": "1", "AGENT_RELAY_ADMIN_TOKEN": ADMIN})
    key = relay.register("backend-agent")["agentKey"]
    s = session(relay, init_script="localStorage.setItem('agentRelayToken', %s);" % json.dumps(TOKEN) + COUNT_MODAL).open().live()
    s.expect(s.agent_card("backend-agent")).to_be_visible()
    s.page.fill("#compose-to", "backend-agent")
    s.page.fill("#compose-body", "Ship it.")
    s.page.click("#compose-send")
    modal = s.page.locator("#auth-modal")
    s.expect(modal).to_be_visible()
    s.expect(modal).to_have_attribute("data-kind", "admin")
    s.page.fill("#auth-token", ADMIN)
    s.page.click("#auth-save")
    s.expect(s.page.locator("#compose-status")).to_contain_text("Sent #")
    assert s.page.evaluate("localStorage.getItem('agentRelayAdminToken')") == ADMIN
    r = relay.get("/api/agents/backend-agent/inbox", headers={"X-Agent-Relay-Agent-Key": key})
    assert [(m["from"], m["body"]) for m in r.json["messages"]] == [("human", "Ship it.")]
    # The next person's act goes straight through.
    s.page.fill("#compose-to", "backend-agent")
    s.page.fill("#compose-body", "And tag the release.")
    s.page.click("#compose-send")
    s.expect(s.page.locator("#compose-status")).to_contain_text("Sent #")
    assert s.page.evaluate("window.__authShown") == ["admin"]
    assert relay.sql("SELECT COUNT(*) AS n FROM messages WHERE from_agent = 'human'") == [{"n": 2}]
    for url, _ in s.requests:
        assert TOKEN not in url and ADMIN not in url, url
