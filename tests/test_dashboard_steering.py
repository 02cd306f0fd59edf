"""Steering from the dashboard, in a real browser (headless Chromium through Playwright, as in test_dashboard.py).

Honest presence, an agent's detail view, the controls people use all day (approval mode, remove an agent, release
a stuck claim, cancel and reassign a task), with agent keys on as well, task filters, receipt states and the held
badge, the disconnected banner, the phone layout, safe Markdown and the sparkline. Each test starts its own relay,
does what a person does in the page, then checks what the relay stored through the API or the database.
"""
import json
import re
import time

from test_dashboard import ADMIN, COUNT_MODAL, TOKEN, browser, session  # noqa: F401 (fixtures used by name)


def quiet(s, *statuses):
    """Chromium logs every 4xx it gets as a console error; drop those a test provokes on purpose."""
    s.errors = [e for e in s.errors if not any("status of %d" % code in e for code in statuses)]


def confirm(s, expect_text=None):
    modal = s.tid("confirm-modal")
    s.expect(modal).to_be_visible()
    if expect_text:
        s.expect(s.tid("confirm-text")).to_contain_text(expect_text)
    s.tid("confirm-ok").click()
    s.expect(modal).to_be_hidden()


def open_detail(s, agent_id):
    s.tid("agent-open", agent_id=agent_id).click()
    panel = s.tid("agent-detail")
    s.expect(panel).to_be_visible()
    s.expect(s.tid("detail-title")).to_contain_text(agent_id)
    return panel


def task(relay, task_id):
    return relay.get("/api/tasks/%d" % task_id).json["task"]


def message(relay, message_id):
    return relay.get("/api/messages/%d" % message_id).json["message"]


# ---------------------------------------------------------------------------


def test_presence_counts_busy_and_idle_agents_as_online(relay, session):
    for i in range(6):
        relay.register("agent-%d" % i)
    relay.patch("/api/agents/agent-0", {"status": "busy"})
    relay.patch("/api/agents/agent-1", {"status": "busy"})
    relay.patch("/api/agents/agent-2", {"status": "idle"})
    relay.delete("/api/agents/agent-5")  # session end: offline
    s = session(relay).open().live()
    s.expect(s.page.locator("#stat-agents-online")).to_have_text("5")
    s.expect(s.page.locator("#stat-agents-total")).to_have_text("6")
    s.expect(s.tid("stat-agents-breakdown")).to_have_text("(2 busy, 1 idle)")
    s.expect(s.page.locator("#stat-agents")).to_have_attribute("title", re.compile(r"^5 alive: 2 online, 2 busy, 1 idle"))

    # Live: going idle keeps an agent online; a session end does not.
    relay.patch("/api/agents/agent-3", {"status": "idle"})
    s.expect(s.tid("stat-agents-breakdown")).to_have_text("(2 busy, 2 idle)")
    s.expect(s.page.locator("#stat-agents-online")).to_have_text("5")
    relay.delete("/api/agents/agent-0")
    s.expect(s.page.locator("#stat-agents-online")).to_have_text("4")
    s.expect(s.tid("stat-agents-breakdown")).to_have_text("(1 busy, 2 idle)")
    s.assert_clean()


def test_the_agent_detail_view_shows_its_card_inbox_read_state_claims_and_current_task(relay, session):
    relay.register("worker", label="night shift", machine="devbox", project="billing", tags=["api"],
                   capabilities=["python"], meta={"model": "m-7"})
    relay.register("boss")
    first = relay.send("boss", "worker", "First job")
    second = relay.send("boss", "worker", "Second job")
    relay.inbox("worker")  # both delivered
    relay.post("/api/messages/%d/read" % first["id"], {"agentId": "worker"})
    third = relay.send("boss", "worker", "Third job")  # not fetched yet
    work = relay.send("human", "tag:api", "Fix the flaky test", claimable=True)
    assert relay.post("/api/messages/%d/claim" % work["id"], {"agentId": "worker"}).status == 200
    t = relay.post("/api/tasks", {"title": "Disk 91% on db-1", "target": "tag:api"}).json["task"]
    relay.post("/api/tasks/%d/claim" % t["id"], {"agentId": "worker"})
    relay.patch("/api/tasks/%d/status" % t["id"], {"agentId": "worker", "progress": 30})
    report = relay.send("worker", "boss", "Status: on it")
    s = session(relay).open().live()

    # A click anywhere on the card (here its id) opens the view.
    s.agent_card("worker").locator('[data-testid="agent-id"]').click()
    panel = s.tid("agent-detail")
    s.expect(panel).to_be_visible()
    s.expect(s.tid("detail-title")).to_have_text("night shift · worker")
    field = lambda name: panel.locator('[data-testid="detail-field"][data-field="%s"]' % name)  # noqa: E731
    s.expect(field("machine")).to_have_text("devbox")
    s.expect(field("project")).to_have_text("billing")
    s.expect(field("status")).to_have_text("online")
    s.expect(field("approvalMode")).to_have_text("open")
    s.expect(field("tags")).to_have_text("api")
    s.expect(field("capabilities")).to_have_text("python")
    s.expect(field("meta")).to_have_text(json.dumps({"model": "m-7"}, separators=(",", ":")))

    # Inbox with its read state, fetched from each message's receipts once it is on screen.
    state = lambda m: panel.locator('[data-testid="detail-inbox-item"][data-message-id="%d"] [data-testid="detail-read-state"]' % m["id"])  # noqa: E731
    s.expect(state(first)).to_have_attribute("data-state", "unknown")  # below the fold: not fetched
    panel.locator('[data-testid="detail-inbox"]').scroll_into_view_if_needed()
    s.expect(state(first)).to_have_attribute("data-state", "read")
    s.expect(state(second)).to_have_attribute("data-state", "delivered")
    s.expect(state(third)).to_have_attribute("data-state", "not-delivered")
    # Claims, current task, tasks, and what it sent.
    s.expect(panel.locator('[data-testid="detail-claim"][data-message-id="%d"]' % work["id"])).to_contain_text("Fix the flaky test")
    current = panel.locator('[data-testid="detail-current-task"]')
    s.expect(current).to_have_attribute("data-task-id", str(t["id"]))
    s.expect(current).to_contain_text("Disk 91% on db-1")
    s.expect(current.locator('[data-testid="task-progress"]')).to_contain_text("30%")
    s.expect(panel.locator('[data-testid="detail-task"]')).to_have_count(1)
    s.expect(panel.locator('[data-testid="detail-sent-item"][data-message-id="%d"]' % report["id"])).to_contain_text("Status: on it")

    # It stays live: the agent reads the second message, finishes its task.
    relay.post("/api/messages/%d/read" % second["id"], {"agentId": "worker"})
    s.expect(state(second)).to_have_attribute("data-state", "read")
    relay.patch("/api/tasks/%d/status" % t["id"], {"agentId": "worker", "status": "done"})
    s.expect(panel.locator('[data-testid="detail-current"]')).to_have_text("No task in progress.")
    s.expect(panel.locator('[data-testid="detail-task"]')).to_have_attribute("data-status", "done")

    # Keyboard: Escape closes and gives the focus back; Enter on "Details" opens it again; Close closes.
    s.page.keyboard.press("Escape")
    s.expect(panel).to_be_hidden()
    opener = s.tid("agent-open", agent_id="worker")
    s.expect(opener).to_be_focused()
    s.page.keyboard.press("Enter")
    s.expect(panel).to_be_visible()
    s.expect(s.tid("detail-close")).to_be_focused()
    s.page.keyboard.press("Enter")
    s.expect(panel).to_be_hidden()
    s.assert_clean()


def test_an_approval_mode_changed_in_the_detail_view_is_stored(relay, session):
    relay.register("ops-bot")
    s = session(relay).open().live()
    open_detail(s, "ops-bot")
    select = s.tid("detail-approval")
    s.expect(select).to_have_value("open")
    select.select_option("guarded")
    s.expect(s.tid("detail-note")).to_have_text("Approval mode is now guarded.")
    assert relay.get("/api/agents/ops-bot").json["approvalMode"] == "guarded"
    s.expect(s.agent_card("ops-bot").locator('[data-testid="agent-approval"]')).to_have_text("guarded")
    # Now it holds what agents send it.
    relay.register("backend-agent")
    relay.send("backend-agent", "ops-bot", "Deploy?")
    s.expect(s.tid("approval", agent_id="ops-bot")).to_have_count(1)

    select.select_option("read-only")
    s.expect(s.tid("detail-note")).to_have_text("Approval mode is now read-only.")
    assert relay.get("/api/agents/ops-bot").json["approvalMode"] == "read-only"
    assert relay.sql("SELECT approval_mode FROM agents WHERE id = 'ops-bot'") == [{"approval_mode": "read-only"}]
    s.assert_clean()


def test_removing_an_agent_asks_first_and_then_it_is_gone(relay, session):
    relay.register("old-bot", tags=["api"])
    work = relay.send("human", "tag:api", "Half-done job", claimable=True)
    relay.post("/api/messages/%d/claim" % work["id"], {"agentId": "old-bot"})
    s = session(relay).open().live()
    open_detail(s, "old-bot")

    # Going back removes nothing.
    s.tid("detail-remove").click()
    s.expect(s.tid("confirm-modal")).to_be_visible()
    s.expect(s.tid("confirm-text")).to_contain_text("claims go back to the pool")
    s.tid("confirm-cancel").click()
    s.expect(s.tid("confirm-modal")).to_be_hidden()
    assert relay.get("/api/agents/old-bot").status == 200

    s.tid("detail-remove").click()
    confirm(s)
    s.expect(s.tid("agent-detail")).to_be_hidden()
    s.expect(s.agent_card("old-bot")).to_have_count(0)
    assert relay.get("/api/agents/old-bot").status == 404
    assert relay.sql("SELECT id FROM agents WHERE id = 'old-bot'") == []
    assert message(relay, work["id"])["claimedBy"] is None  # its claim went back to the pool
    s.assert_clean()


def test_a_stuck_claim_released_in_the_page_goes_back_to_the_pool(relay, session):
    relay.register("stuck-agent", tags=["api"])
    work = relay.send("human", "tag:api", "Rotate the keys", claimable=True)
    relay.post("/api/messages/%d/claim" % work["id"], {"agentId": "stuck-agent"})
    s = session(relay).open().live()
    item = s.tid("work-item", message_id=work["id"])
    s.expect(item.locator('[data-testid="msg-claimed-by"]')).to_have_text("claimed by stuck-agent")
    item.locator('[data-testid="claim-release"]').click()
    confirm(s, "stuck-agent")
    s.expect(item.locator('[data-testid="msg-claimable"]')).to_have_text("claimable")
    s.expect(item.locator('[data-testid="claim-release"]')).to_have_count(0)
    assert message(relay, work["id"])["claimedBy"] is None
    assert relay.sql("SELECT claimed_by FROM messages WHERE id = ?", (work["id"],)) == [{"claimed_by": None}]
    s.assert_clean()


def test_a_task_canceled_in_the_page_is_stored(relay, session):
    relay.register("backend-agent", tags=["api"])
    t = relay.post("/api/tasks", {"title": "Rebuild the search index", "target": "tag:api"}).json["task"]
    relay.post("/api/tasks/%d/claim" % t["id"], {"agentId": "backend-agent"})
    s = session(relay).open().live()
    row = s.tid("task", task_id=t["id"])
    row.locator('[data-testid="task-cancel"]').click()
    s.expect(s.tid("confirm-text")).to_contain_text("Rebuild the search index")
    s.tid("confirm-cancel").click()
    assert task(relay, t["id"])["status"] == "claimed"

    row.locator('[data-testid="task-cancel"]').click()
    confirm(s)
    s.expect(row).to_have_attribute("data-status", "canceled")
    s.expect(row.locator('[data-testid="task-cancel"]')).to_have_count(0)
    assert task(relay, t["id"])["status"] == "canceled"
    events = relay.get("/api/tasks/%d/events" % t["id"]).json["events"]
    assert (events[-1]["type"], events[-1]["actor"], events[-1]["data"]["to"]) == ("status", "human", "canceled")
    s.assert_clean()


def test_a_task_reassigned_in_the_page_is_stored_and_a_refusal_is_shown(relay, session):
    for agent_id in ("first", "second", "gone", "watcher"):
        relay.register(agent_id, tags=["api"])
    relay.patch("/api/agents/watcher", {"approvalMode": "read-only"})
    relay.delete("/api/agents/gone")  # offline
    t = relay.post("/api/tasks", {"title": "Upgrade the database", "target": "tag:api"}).json["task"]
    relay.post("/api/tasks/%d/claim" % t["id"], {"agentId": "first"})
    s = session(relay).open().live()
    row = s.tid("task", task_id=t["id"])
    error = row.locator('[data-testid="act-error"]')

    row.locator('[data-testid="task-reassign"]').click()
    row.locator('[data-testid="task-assignee"]').select_option("second")
    row.locator('[data-testid="task-assign-go"]').click()
    confirm(s, "taken from first and given to second")
    s.expect(row.locator('[data-testid="task-claimed-by"]')).to_have_text("second")
    stored = task(relay, t["id"])
    assert (stored["status"], stored["claimedBy"]) == ("claimed", "second")
    assert message(relay, t["messageId"])["claimedBy"] == "second"

    # An offline agent cannot take it: the relay's answer is shown; the task is open again.
    row.locator('[data-testid="task-reassign"]').click()
    row.locator('[data-testid="task-assignee"]').select_option("gone")
    row.locator('[data-testid="task-assign-go"]').click()
    confirm(s)
    s.expect(error).to_contain_text("gone cannot take it")
    s.expect(error).to_contain_text("agent_offline")
    s.expect(row).to_have_attribute("data-status", "open")
    stored = task(relay, t["id"])
    assert (stored["status"], stored["claimedBy"]) == ("open", None)

    # A read-only agent may not claim: 403 read_only, shown, nothing stored (no confirmation: nobody held it).
    row.locator('[data-testid="task-assignee"]').select_option("watcher")
    row.locator('[data-testid="task-assign-go"]').click()
    s.expect(error).to_contain_text("read_only")
    stored = task(relay, t["id"])
    assert (stored["status"], stored["claimedBy"]) == ("open", None)

    # And an open task is simply assigned.
    row.locator('[data-testid="task-assignee"]').select_option("first")
    row.locator('[data-testid="task-assign-go"]').click()
    s.expect(row.locator('[data-testid="task-claimed-by"]')).to_have_text("first")
    s.expect(error).to_be_hidden()
    assert task(relay, t["id"])["claimedBy"] == "first"
    quiet(s, 403, 409)
    s.assert_clean()


def test_tasks_filter_by_status_and_severity(relay, session):
    relay.register("backend-agent", tags=["api"])
    post = lambda title, severity: relay.post("/api/tasks", {"title": title, "target": "tag:api", "severity": severity}).json["task"]  # noqa: E731
    disk = post("Disk full", "critical")
    docs = post("Update docs", "info")
    cert = post("Certificate expires", "critical")
    lint = post("Lint warnings", "warning")
    relay.post("/api/tasks/%d/claim" % cert["id"], {"agentId": "backend-agent"})
    relay.patch("/api/tasks/%d/status" % lint["id"], {"status": "canceled"})
    s = session(relay).open().live()
    shown = lambda: sorted(int(x) for x in s.tid("task").evaluate_all("ns => ns.map(n => n.dataset.taskId)"))  # noqa: E731
    s.expect(s.tid("task")).to_have_count(4)

    s.tid("task-filter-status").select_option("open")
    s.expect(s.tid("task")).to_have_count(2)
    assert shown() == sorted([disk["id"], docs["id"]])
    s.tid("task-filter-severity").select_option("critical")
    s.expect(s.tid("task")).to_have_count(1)
    assert shown() == [disk["id"]]
    s.tid("task-filter-status").select_option("active")
    s.expect(s.tid("task")).to_have_count(2)
    assert shown() == sorted([disk["id"], cert["id"]])
    s.tid("task-filter-status").select_option("canceled")
    s.expect(s.page.locator("#tasks-empty")).to_have_text("No tasks match the filters.")
    s.tid("task-filter-severity").select_option("")
    s.expect(s.tid("task")).to_have_count(1)
    assert shown() == [lint["id"]]

    # Filters hold for what arrives live.
    s.tid("task-filter-status").select_option("open")
    s.tid("task-filter-severity").select_option("critical")
    s.expect(s.tid("task")).to_have_count(1)
    fresh = post("Queue backing up", "critical")
    post("Typo in README", "info")
    s.expect(s.tid("task", task_id=fresh["id"])).to_be_visible()
    s.expect(s.tid("task")).to_have_count(2)
    assert shown() == sorted([disk["id"], fresh["id"]])
    s.assert_clean()


def test_receipt_states_appear_and_update_when_the_recipient_reads(relay, session):
    relay.register("writer")
    relay.register("reviewer")
    relay.register("ops", tags=["ops"])
    relay.register("qa", tags=["ops"])
    direct = relay.send("writer", "reviewer", "Please review PR 7")
    relay.inbox("reviewer")  # delivered
    fanout = relay.send("writer", "tag:ops", "Deploy window at noon")
    relay.inbox("ops")
    relay.post("/api/messages/%d/read" % fanout["id"], {"agentId": "ops"})
    unseen = relay.send("writer", "reviewer", "And PR 8")
    s = session(relay).open().live()

    receipt = lambda m, agent: s.tid("message", message_id=m["id"]).locator('[data-testid="receipt"][data-agent-id="%s"]' % agent)  # noqa: E731
    # States are read only for messages on screen; scroll to the oldest (the rest are above it).
    s.tid("message", message_id=direct["id"]).scroll_into_view_if_needed()
    s.expect(s.tid("message", message_id=direct["id"]).locator('[data-testid="msg-receipts"]')).to_have_attribute("data-loaded", "true")
    s.expect(receipt(direct, "reviewer")).to_have_attribute("data-state", "delivered")
    s.expect(receipt(fanout, "ops")).to_have_attribute("data-state", "read")
    s.expect(receipt(fanout, "qa")).to_have_count(0)  # has not fetched it
    s.expect(receipt(unseen, "reviewer")).to_have_attribute("data-state", "sent")

    # The recipient reads, then replies: the page follows without a reload.
    relay.post("/api/messages/%d/read" % direct["id"], {"agentId": "reviewer"})
    s.expect(receipt(direct, "reviewer")).to_have_attribute("data-state", "read")
    s.expect(receipt(direct, "reviewer")).to_have_text("reviewer · read")
    relay.inbox("qa")
    relay.post("/api/agents/qa/read", {"upTo": fanout["id"]})
    s.expect(receipt(fanout, "qa")).to_have_attribute("data-state", "read")
    relay.send("reviewer", "writer", "Looks good", replyTo=direct["id"])
    s.expect(receipt(direct, "reviewer")).to_have_attribute("data-state", "replied")
    s.assert_clean()


def test_a_held_message_carries_a_held_badge_until_a_person_decides(relay, session):
    relay.register("backend-agent")
    relay.register("ops-bot", approvalMode="guarded")
    held = relay.send("backend-agent", "ops-bot", "Deploy v2.3?")
    plain = relay.send("backend-agent", "human", "FYI: deploy planned")
    s = session(relay).open().live()
    msg = s.tid("message", message_id=held["id"])
    s.expect(msg.locator('[data-testid="msg-held"]')).to_have_text("held")
    s.expect(msg.locator('[data-testid="msg-held"]')).to_have_attribute("title", re.compile("held for ops-bot"))
    s.expect(msg.locator('[data-testid="receipt"][data-agent-id="ops-bot"]')).to_have_attribute("data-state", "held")
    s.expect(s.tid("message", message_id=plain["id"]).locator('[data-testid="msg-body"]')).to_have_text("FYI: deploy planned")
    s.expect(s.tid("message", message_id=plain["id"]).locator('[data-testid="msg-held"]')).to_have_count(0)

    # Held again after a live send; gone once approved.
    relay.post("/api/messages/%d/approve" % held["id"], {"agentId": "ops-bot"})
    s.expect(msg.locator('[data-testid="msg-held"]')).to_have_count(0)
    s.expect(msg.locator('[data-testid="receipt"][data-agent-id="ops-bot"]')).to_have_attribute("data-state", "approved")
    later = relay.send("backend-agent", "ops-bot", "Also restart the workers?")
    s.expect(s.tid("message", message_id=later["id"]).locator('[data-testid="msg-held"]')).to_have_text("held")
    s.assert_clean()


def test_at_phone_width_work_and_approvals_come_before_the_history(relay, session):
    relay.register("backend-agent", tags=["api"], label="L" * 64)
    relay.register("ops-bot", approvalMode="guarded")
    relay.send("backend-agent", "ops-bot", "Deploy?")
    relay.send("backend-agent", "human", "```\n" + "wide-code-line-" * 30 + "\n```\n- item " + "x" * 200)
    relay.post("/api/tasks", {"title": "Disk full", "target": "tag:api", "severity": "critical"})
    s = session(relay, width=390, height=844).open().live()
    s.expect(s.tid("approval")).to_have_count(1)
    s.expect(s.tid("task")).to_have_count(1)
    s.expect(s.tid("message")).to_have_count(3)  # the task announces itself with a message
    top = lambda testid: s.tid(testid).bounding_box()["y"]  # noqa: E731
    assert top("approvals-section") < top("messages-section")
    assert top("work-section") < top("messages-section")
    assert top("work-section") < top("compose-section")

    overflow = """() => {
        const vw = window.innerWidth, out = [];
        for (const n of document.querySelectorAll('[data-testid], section, header, main, aside')) {
            const r = n.getBoundingClientRect();
            if (r.width && r.right > vw + 0.5) out.push((n.dataset.testid || n.tagName) + ' ' + Math.round(r.right));
        }
        return {html: document.documentElement.scrollWidth, body: document.body.scrollWidth, wide: out};
    }"""
    sizes = s.page.evaluate(overflow)
    assert sizes["html"] <= 390 and sizes["body"] <= 390 and sizes["wide"] == [], sizes
    # The detail view takes the whole width and nothing in it scrolls sideways either.
    s.tid("task", task_id=1).locator('[data-testid="task-reassign"]').click()
    s.expect(s.tid("task-assignee")).to_be_visible()
    open_detail(s, "backend-agent")
    assert s.tid("agent-detail").bounding_box()["width"] <= 390
    sizes = s.page.evaluate(overflow)
    assert sizes["html"] <= 390 and sizes["body"] <= 390 and sizes["wide"] == [], sizes
    s.assert_clean()


def test_a_stopped_relay_shows_since_when_and_dims_the_page_until_it_is_back(relay, session):
    relay.register("backend-agent")
    s = session(relay).open().live()
    s.expect(s.agent_card("backend-agent")).to_be_visible()
    banner = s.tid("disconnected-banner")
    s.expect(banner).to_be_hidden()
    before = s.page.evaluate("Date.now()")

    relay.stop()
    s.expect(banner).to_be_visible()
    s.expect(banner).to_have_text(re.compile(r"^Disconnected since \d\d:\d\d:\d\d"))
    after = s.page.evaluate("Date.now()")
    since = s.page.evaluate("conn.downSince")
    assert before <= since <= after
    assert time.strftime("%H:%M:%S", time.localtime(since / 1000.0)) in banner.inner_text()
    assert s.page.evaluate("document.body.dataset.disconnected") == "true"
    assert float(s.page.evaluate("getComputedStyle(document.querySelector('main')).opacity")) < 1
    s.expect(s.agent_card("backend-agent")).to_be_visible()  # still shown, dimmed

    relay.restart(same_port=True)
    # The page retries with a backoff of up to 15 s; this waits for it, it does not time it.
    s.expect(banner).to_be_hidden(timeout=30000)
    s.live()
    assert s.page.evaluate("document.body.dataset.disconnected") is None
    assert float(s.page.evaluate("getComputedStyle(document.querySelector('main')).opacity")) == 1
    relay.register("after-restart")
    s.expect(s.agent_card("after-restart")).to_be_visible()
    s.errors = [e for e in s.errors if "ERR_CONNECTION_REFUSED" not in e and "ERR_EMPTY_RESPONSE" not in e
                and "ERR_CONNECTION_RESET" not in e]
    s.assert_clean()


MARKDOWN = """Deploy **now**, then *verify* with `make check`.
Second line of the same paragraph.

- first step
- second step with a [runbook](https://example.com/runbook)

```
<b>not bold</b> && rm -rf /
```

<img src=x onerror="window.__pwned = 1"> <script>window.__pwned = 2</script>
[click me](javascript:alert(1)) and [also](data:text/html,hi)"""


def test_message_bodies_are_safe_markdown_and_injected_html_stays_text(relay, session):
    relay.register("mallory", tags=["ops"])
    relay.register("ops-bot", approvalMode="guarded")
    msg = relay.send("mallory", "human", MARKDOWN)
    held = relay.send("mallory", "ops-bot", "**hold** <img src=x onerror=\"window.__pwned = 3\">")
    s = session(relay).open().live()
    body = s.tid("message", message_id=msg["id"]).locator('[data-testid="msg-body"]')
    s.expect(body.locator("strong")).to_have_text("now")
    s.expect(body.locator("em")).to_have_text("verify")
    s.expect(body.locator("p code")).to_have_text("make check")
    first_paragraph = body.locator("p").first.evaluate("n => n.textContent")
    assert first_paragraph == "Deploy now, then verify with make check.\nSecond line of the same paragraph."  # the line break is kept
    s.expect(body.locator("ul > li")).to_have_count(2)
    link = body.locator("a")
    s.expect(link).to_have_count(1)
    s.expect(link).to_have_text("runbook")
    s.expect(link).to_have_attribute("href", "https://example.com/runbook")
    s.expect(link).to_have_attribute("rel", "noopener noreferrer")
    s.expect(body.locator("pre code")).to_have_text("<b>not bold</b> && rm -rf /")
    s.expect(body).to_contain_text('<img src=x onerror="window.__pwned = 1"> <script>window.__pwned = 2</script>')
    s.expect(body).to_contain_text("[click me](javascript:alert(1)) and [also](data:text/html,hi)")
    s.expect(s.tid("approval", message_id=held["id"]).locator('[data-testid="approval-body"] strong')).to_have_text("hold")
    s.expect(s.tid("approval", message_id=held["id"]).locator('[data-testid="approval-body"]')).to_contain_text("<img src=x")

    # Nothing was created from the text, nothing ran.
    counts = s.page.evaluate("""() => ({
        img: document.querySelectorAll('img').length,
        script: document.querySelectorAll('main script, aside script').length,
        js: document.querySelectorAll('a[href^="javascript"], a[href^="data"]').length,
        pwned: window.__pwned === undefined ? null : window.__pwned,
    })""")
    assert counts["img"] == 0 and counts["script"] == 0 and counts["js"] == 0 and counts["pwned"] is None, counts
    assert body.locator("b").count() == 0
    s.assert_clean()  # no dialog opened, no error


def test_the_sparkline_draws_messages_per_minute(relay, session):
    relay.register("chatty")
    for i in range(3):
        relay.send("chatty", "human", "message %d" % i)
    s = session(relay).open().live()
    spark = s.tid("sparkline")
    s.expect(spark).to_have_attribute("data-total", "3")
    s.expect(s.tid("stat-last-hour")).to_have_text("3")
    bars = s.tid("spark-bar")
    assert bars.count() >= 1
    assert sum(int(c) for c in bars.evaluate_all("ns => ns.map(n => n.getAttribute('data-count'))")) == 3
    assert all(float(h) > 0 for h in bars.evaluate_all("ns => ns.map(n => n.getAttribute('height'))"))
    box = spark.bounding_box()
    assert box["width"] > 0 and box["height"] > 0
    relay.send("chatty", "human", "one more")
    s.expect(spark).to_have_attribute("data-total", "4")
    s.expect(spark).to_have_attribute("aria-label", re.compile("^4 messages in the last 60 minutes"))
    s.assert_clean()


def test_with_agent_keys_every_control_asks_for_the_admin_token(relay_factory, session):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": TOKEN, "AGENT_RELAY_AGENT_KEYS": "1", "AGENT_RELAY_ADMIN_TOKEN": ADMIN})
    admin = {"X-Agent-Relay-Admin-Token": ADMIN}
    keys = {a: relay.register(a, tags=["api"])["agentKey"] for a in ("holder", "taker", "victim")}
    as_holder = {"X-Agent-Relay-Agent-Key": keys["holder"]}
    work = relay.post("/api/messages", {"from": "human", "to": "tag:api", "body": "Stuck job", "claimable": True}, headers=admin).json["message"]
    assert relay.post("/api/messages/%d/claim" % work["id"], {"agentId": "holder"}, headers=as_holder).status == 200
    moving = relay.post("/api/tasks", {"title": "Move me", "target": "tag:api"}, headers=admin).json["task"]
    doomed = relay.post("/api/tasks", {"title": "Cancel me", "target": "tag:api"}, headers=admin).json["task"]
    for t in (moving, doomed):
        assert relay.post("/api/tasks/%d/claim" % t["id"], {"agentId": "holder"}, headers=as_holder).status == 200
    s = session(relay, init_script="localStorage.setItem('agentRelayToken', %s);" % json.dumps(TOKEN) + COUNT_MODAL).open().live()
    s.expect(s.agent_card("victim")).to_be_visible()

    def give_admin_token():
        modal = s.page.locator("#auth-modal")
        s.expect(modal).to_be_visible()
        s.expect(modal).to_have_attribute("data-kind", "admin")
        s.page.fill("#auth-token", ADMIN)
        s.page.click("#auth-save")
        s.expect(modal).to_be_hidden()

    def forget_admin_token():  # so that the next control has to ask again
        s.page.evaluate("localStorage.removeItem('agentRelayAdminToken')")

    # Approval mode.
    open_detail(s, "victim")
    s.tid("detail-approval").select_option("guarded")
    give_admin_token()
    s.expect(s.tid("detail-note")).to_have_text("Approval mode is now guarded.")
    assert relay.get("/api/agents/victim").json["approvalMode"] == "guarded"
    s.tid("detail-close").click()
    forget_admin_token()

    # Release a stuck claim.
    s.tid("work-item", message_id=work["id"]).locator('[data-testid="claim-release"]').click()
    confirm(s)
    give_admin_token()
    s.expect(s.tid("work-item", message_id=work["id"]).locator('[data-testid="msg-claimable"]')).to_be_visible()
    assert message(relay, work["id"])["claimedBy"] is None
    forget_admin_token()

    # Cancel a task.
    s.tid("task", task_id=doomed["id"]).locator('[data-testid="task-cancel"]').click()
    confirm(s)
    give_admin_token()
    s.expect(s.tid("task", task_id=doomed["id"])).to_have_attribute("data-status", "canceled")
    assert task(relay, doomed["id"])["status"] == "canceled"
    forget_admin_token()

    # Reassign a task.
    row = s.tid("task", task_id=moving["id"])
    row.locator('[data-testid="task-reassign"]').click()
    row.locator('[data-testid="task-assignee"]').select_option("taker")
    row.locator('[data-testid="task-assign-go"]').click()
    confirm(s)
    give_admin_token()
    s.expect(row.locator('[data-testid="task-claimed-by"]')).to_have_text("taker")
    assert task(relay, moving["id"])["claimedBy"] == "taker"
    forget_admin_token()

    # Remove an agent.
    open_detail(s, "victim")
    s.tid("detail-remove").click()
    confirm(s)
    give_admin_token()
    s.expect(s.agent_card("victim")).to_have_count(0)
    assert relay.get("/api/agents/victim").status == 404

    assert s.page.evaluate("window.__authShown") == ["admin"] * 5
    for url, _ in s.requests:
        assert TOKEN not in url and ADMIN not in url, url
    quiet(s, 403)
    s.assert_clean()
