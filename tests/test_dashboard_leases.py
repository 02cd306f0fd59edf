"""Leases on the dashboard, in a real browser (headless Chromium through Playwright, as in test_dashboard.py): the
list of active leases (holder, scope, paths, reason, exclusive or shared, time left) follows lease events without a
reload, the agent detail view lists the agent's leases, and a person releases one from the page (asked first).
What the page did is checked through the API and in the database."""
import re

from test_dashboard import PAYLOAD, browser, session  # noqa: F401 (fixtures used by name)
from test_dashboard_steering import confirm, open_detail


def take(relay, agent_id, paths, **fields):
    fields.update({"agentId": agent_id, "paths": paths})
    r = relay.post("/api/leases", fields)
    assert r.status == 201, r
    return r.json["lease"]


def test_the_lease_list_follows_lease_events_without_a_reload(relay, session):
    relay.register("backend-agent", project="shop")
    relay.register("docs-agent", project="shop")
    first = take(relay, "backend-agent", ["src/api/", "setup.cfg"], reason="migrating the API")
    s = session(relay).open().live()
    s.page.evaluate("window.__sameDocument = true")
    item = s.tid("lease", lease_id=first["id"])
    s.expect(item).to_be_visible()
    s.expect(item.locator('[data-testid="lease-holder"]')).to_have_text("backend-agent")
    s.expect(item.locator('[data-testid="lease-paths"]')).to_have_text(re.compile(r"src/api/\s*setup\.cfg"))
    s.expect(item.locator('[data-testid="lease-reason"]')).to_have_text("migrating the API")
    s.expect(item.locator('[data-testid="lease-mode"]')).to_have_text("exclusive")
    s.expect(item.locator('[data-testid="lease-scope"]')).to_have_text("in shop")
    s.expect(item.locator('[data-testid="lease-expires"]')).to_have_text(re.compile(r"^in (29|30)m$"))
    s.expect(s.tid("leases-count")).to_have_text("1")
    s.expect(s.tid("stat-leases")).to_have_text("1")

    # a new lease appears, an ended one goes: live, from the stream
    second = take(relay, "docs-agent", ["docs/"], exclusive=False, ttlMs=7200000, reason=PAYLOAD)
    s.expect(s.tid("lease", lease_id=second["id"])).to_be_visible()
    s.expect(s.tid("lease", lease_id=second["id"]).locator('[data-testid="lease-mode"]')).to_have_text("shared")
    s.expect(s.tid("lease", lease_id=second["id"]).locator('[data-testid="lease-reason"]')).to_have_text(PAYLOAD)  # text
    s.expect(s.tid("leases-count")).to_have_text("2")
    assert relay.delete("/api/leases/%d?agentId=backend-agent" % first["id"]).status == 200
    s.expect(s.tid("lease", lease_id=first["id"])).to_have_count(0)
    assert relay.delete("/api/agents/docs-agent").status == 200  # offline: its lease ends with it
    s.expect(s.tid("lease")).to_have_count(0)
    s.expect(s.tid("leases-empty")).to_be_visible()
    s.expect(s.tid("stat-leases")).to_have_text("0")
    assert s.page.evaluate("window.__sameDocument") is True
    s.assert_clean()


def test_the_agent_detail_view_lists_its_leases_and_the_holder_opens_it(relay, session):
    relay.register("backend-agent", project="shop")
    relay.register("other", project="shop")
    mine = take(relay, "backend-agent", ["src/api/"], reason="migrating the API")
    take(relay, "other", ["docs/"])
    s = session(relay).open().live()
    s.tid("lease", lease_id=mine["id"]).locator('[data-testid="lease-holder"]').click()
    panel = s.tid("agent-detail")
    s.expect(panel).to_be_visible()
    s.expect(s.tid("detail-title")).to_contain_text("backend-agent")
    leases = s.tid("detail-leases")
    s.expect(leases.locator('[data-testid="detail-lease"]')).to_have_count(1)
    s.expect(leases.locator('[data-testid="detail-lease"]')).to_have_attribute("data-lease-id", str(mine["id"]))
    s.expect(panel.get_by_role("heading", name="Leases (1)")).to_be_visible()
    later = take(relay, "backend-agent", ["tests/"], exclusive=False)  # appears in the open panel, from the stream
    s.expect(leases.locator('[data-testid="detail-lease"][data-lease-id="%d"]' % later["id"])).to_be_visible()
    s.expect(panel.get_by_role("heading", name="Leases (2)")).to_be_visible()
    s.tid("detail-close").click()
    open_detail(s, "other")
    s.expect(s.tid("detail-leases").locator('[data-testid="detail-lease"]')).to_have_count(1)
    s.assert_clean()


def test_a_lease_released_in_the_page_is_stored_as_released(relay, session):
    relay.register("backend-agent", project="shop")
    one = take(relay, "backend-agent", ["src/api/"], reason="migrating the API")
    two = take(relay, "backend-agent", ["docs/"])
    s = session(relay).open().live()
    # from the list, asked first: going back keeps it
    s.tid("lease", lease_id=one["id"]).locator('[data-testid="lease-release"]').click()
    s.expect(s.tid("confirm-text")).to_contain_text("backend-agent will no longer hold src/api/")
    s.tid("confirm-cancel").click()
    assert relay.sql("SELECT released_at FROM leases WHERE id = ?", (one["id"],)) == [{"released_at": None}]
    s.tid("lease", lease_id=one["id"]).locator('[data-testid="lease-release"]').click()
    confirm(s, "src/api/")
    s.expect(s.tid("lease", lease_id=one["id"])).to_have_count(0)
    row = relay.sql("SELECT released_at, cause FROM leases WHERE id = ?", (one["id"],))[0]
    assert row["released_at"] and row["cause"] == "released"
    # from the agent's detail view
    open_detail(s, "backend-agent")
    s.tid("detail-lease", lease_id=two["id"]).locator('[data-testid="detail-lease-release"]').click()
    confirm(s, "docs/")
    s.expect(s.tid("detail-lease")).to_have_count(0)
    assert relay.get("/api/leases").json["leases"] == []
    s.assert_clean()
