"""The dashboard's side of delivery truth and search, in a real browser (headless Chromium through Playwright, as in
test_dashboard.py): receipt states follow message.delivered, message.read and message.replied as they happen, and
the search box asks GET /api/search and shows ranked results with their snippets."""
import re

from test_dashboard import browser, session  # noqa: F401 (fixtures used by name)
from test_dashboard_steering import quiet


def receipt_of(s, message_id, agent):
    return s.tid("message", message_id=message_id).locator('[data-testid="receipt"][data-agent-id="%s"]' % agent)


def receipt_fetches(s, message_id):
    return [u for u, _h in s.requests if re.search(r"/api/messages/%d$" % message_id, u)]


def test_delivered_read_and_replied_show_as_they_happen(relay, session):
    relay.register("writer")
    relay.register("reviewer")
    relay.register("ops", tags=["ops"])
    relay.register("qa", tags=["ops"])
    direct = relay.send("writer", "reviewer", "Please review PR 7")
    fanout = relay.send("writer", "tag:ops", "Deploy window at noon")
    s = session(relay).open().live()
    s.expect(s.tid("message", message_id=direct["id"]).locator('[data-testid="msg-receipts"]')).to_have_attribute("data-loaded", "true")
    s.expect(s.tid("message", message_id=fanout["id"]).locator('[data-testid="msg-receipts"]')).to_have_attribute("data-loaded", "true")
    s.expect(receipt_of(s, direct["id"], "reviewer")).to_have_attribute("data-state", "sent")
    s.expect(receipt_of(s, fanout["id"], "qa")).to_have_count(0)
    fetched = len(receipt_fetches(s, direct["id"])), len(receipt_fetches(s, fanout["id"]))

    # An inbox read is delivery: it shows at once (no 30 s timer), painted from the event itself.
    relay.inbox("reviewer")
    s.expect(receipt_of(s, direct["id"], "reviewer")).to_have_attribute("data-state", "delivered")
    relay.inbox("qa")
    s.expect(receipt_of(s, fanout["id"], "qa")).to_have_attribute("data-state", "delivered")
    relay.post("/api/agents/qa/read", {"upTo": fanout["id"]})
    s.expect(receipt_of(s, fanout["id"], "qa")).to_have_attribute("data-state", "read")
    relay.post("/api/messages/%d/read" % direct["id"], {"agentId": "reviewer"})
    s.expect(receipt_of(s, direct["id"], "reviewer")).to_have_attribute("data-state", "read")
    assert (len(receipt_fetches(s, direct["id"])), len(receipt_fetches(s, fanout["id"]))) == fetched

    # A reply marks its author's receipt replied.
    relay.send("reviewer", "writer", "Looks good", replyTo=direct["id"])
    s.expect(receipt_of(s, direct["id"], "reviewer")).to_have_attribute("data-state", "replied")
    s.expect(receipt_of(s, direct["id"], "reviewer")).to_have_text("reviewer · replied")

    # The held badge stays until a person decides; delivery after approval shows live too.
    relay.register("gate", approvalMode="guarded")
    held = relay.send("writer", "gate", "Deploy v2.3?")
    msg = s.tid("message", message_id=held["id"])
    s.expect(msg.locator('[data-testid="msg-held"]')).to_have_text("held")
    s.expect(receipt_of(s, held["id"], "gate")).to_have_attribute("data-state", "held")
    relay.post("/api/messages/%d/approve" % held["id"], {})
    s.expect(msg.locator('[data-testid="msg-held"]')).to_have_count(0)
    s.expect(receipt_of(s, held["id"], "gate")).to_have_attribute("data-state", "approved")
    relay.inbox("gate")
    s.expect(receipt_of(s, held["id"], "gate")).to_have_attribute("data-state", "delivered")
    s.assert_clean()


def test_the_search_box_finds_messages_and_tasks_best_first_with_snippets(relay, session):
    relay.register("backend-agent")
    relay.register("reviewer")
    relay.register("gate", approvalMode="guarded")
    best = relay.send("backend-agent", "reviewer", "The schema migration looks clean; migration tests pass.",
                      subject="Migration for PR 42")
    once = relay.send("reviewer", "backend-agent", "I will look at the migration <img src=x onerror=alert(1)> after lunch")
    held = relay.send("backend-agent", "gate", "Run the migration on production")
    task = relay.post("/api/tasks", {"title": "Disk full during migration", "target": "reviewer"}).json["task"]
    relay.send("reviewer", "backend-agent", "unrelated chatter")
    s = session(relay).open().live()
    s.expect(s.tid("message")).to_have_count(5)  # the task announces itself with a message

    s.page.fill("#filter-q", "migration")
    s.expect(s.tid("search-task", task_id=task["id"])).to_be_visible()
    s.expect(s.tid("message")).to_have_count(3)  # the task's own message is found as the task
    order = s.page.eval_on_selector_all('[data-testid="messages-list"] > article',
                                        "ns => ns.map(n => n.dataset.messageId || 'task:' + n.dataset.taskId)")
    assert order[0] == str(best["id"]) and set(order) == {str(best["id"]), str(once["id"]), str(held["id"]), "task:%d" % task["id"]}
    first = s.tid("message", message_id=best["id"]).locator('[data-testid="search-snippet"]')
    s.expect(first.locator("mark").first).to_have_text(re.compile("^migration$", re.I))
    s.expect(s.tid("search-note")).to_contain_text("4 matches, best first · fts5")
    # snippets are text: the markup in a message stays text
    s.expect(s.tid("message", message_id=once["id"]).locator('[data-testid="search-snippet"]')).to_contain_text("<img src=x")
    assert s.page.locator('[data-testid="messages-list"] img').count() == 0

    # with the agent filter, what is held for that agent is not found
    s.page.fill("#filter-agent", "gate")
    s.expect(s.tid("search-note")).to_contain_text("0 matches")
    s.expect(s.tid("message")).to_have_count(0)
    s.page.fill("#filter-agent", "")
    s.expect(s.tid("message", message_id=held["id"])).to_be_visible()

    # what arrives while the box holds words is searched again
    late = relay.send("reviewer", "backend-agent", "one more migration note")
    s.expect(s.tid("message", message_id=late["id"])).to_be_visible()

    # nothing to search for: the relay's reason, no crash
    s.page.fill("#filter-q", "*")
    s.expect(s.page.locator("#messages-error")).to_contain_text("q: has no word to search for")
    quiet(s, 400)
    s.page.fill("#filter-q", "")
    s.expect(s.tid("message")).to_have_count(6)
    s.expect(s.tid("search-note")).to_be_hidden()
    s.assert_clean()
