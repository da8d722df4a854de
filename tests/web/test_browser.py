"""The dashboard in a real Chromium: what an operator sees and clicks (no lab needed here;
tests/web/test_browser_lab.py drives containers on the lab)."""

import re
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import requests
from playwright.sync_api import expect

from tests.support.browser import NARROW, block_websockets, check_page, csrf_post, nav, shot, unreachable_by_tab
from tests.support.stack import Api

pytestmark = pytest.mark.e2e


def test_an_admin_adds_trusts_and_probes_a_host_and_sees_progress_live(page_as, stack, sshd):
    # Two more windows on the host list: one live over the websocket, one polling without it.
    watcher = page_as("carol")
    watcher.goto(stack.url + "/hosts/")
    poller = page_as("carol")
    block_websockets(poller)
    poller.goto(stack.url + "/hosts/")

    page = page_as("alice")
    nav(page, "Hosts")
    page.get_by_role("link", name="Add a host").click()
    page.get_by_label("Name").fill("browser-host")
    page.get_by_label("Address").fill("127.0.0.1")
    page.get_by_label("SSH port").fill(str(sshd.port))
    page.get_by_role("button", name="Connect and show the key").click()
    expect(page.locator("#offered-fingerprint")).to_have_text(sshd.fingerprint())
    shot(page, "host-untrusted")

    page.once("dialog", lambda d: d.accept())  # the confirmation before trusting
    page.get_by_role("button", name="Trust this key and probe").click()
    expect(page).to_have_url(re.compile(r"/operations/\d+/$"))
    # No reload: the websocket carries the progress to 100 %.
    expect(page.locator("#op-status")).to_have_text("success", timeout=30000)
    expect(page.locator("#op-progress")).to_have_text("100%")
    expect(page.locator("#op-events li").filter(has_text="probe")).not_to_have_count(0)
    expect(page.locator("#op-phases li[data-phase=probe]")).to_have_count(1)
    shot(page, "operation-probe")

    # The lists opened before the host existed show it, probed, without a reload.
    for p in (watcher, poller):
        expect(p.locator('tr[data-host="browser-host"] [data-field=status]')).to_have_text("online", timeout=15000)
    shot(watcher, "hosts")

    page.goto(stack.url + "/hosts/browser-host/")
    expect(page.locator("#host-status")).to_have_text("online")
    expect(page.locator(".badges")).to_contain_text("CRIU")
    check_page(page, "host page")
    if "failed" in page.locator(".badges").inner_text():  # Debian 12's CRIU on this kernel: say why
        expect(page.locator("#criu-check-errors")).to_contain_text("Error")
    shot(page, "host-detail")

    # Removing it asks for its name, and the lists drop it without a reload.
    page.get_by_role("button", name="Remove host").click()
    expect(page).to_have_url(stack.url + "/hosts/browser-host/")  # the empty confirmation field stops it
    page.get_by_label("Type browser-host to remove this host from ctweb").fill("browser-host")
    page.get_by_role("button", name="Remove host").click()
    expect(page).to_have_url(stack.url + "/hosts/")
    for p in (watcher, poller):
        expect(p.locator('tr[data-host="browser-host"]')).to_have_count(0, timeout=15000)


def test_the_operation_page_falls_back_to_polling_without_a_websocket(page_as, stack, sshd):
    page = page_as("bob")
    block_websockets(page)
    admin = Api(stack, stack.tokens["alice"])
    admin.post("/api/v1/hosts/", json={"name": "polled", "address": "127.0.0.1", "port": sshd.port})
    admin.post("/api/v1/hosts/polled/trust", json={"fingerprint": sshd.fingerprint()})
    op_id = admin.post("/api/v1/hosts/polled/probe").json()["id"]
    page.goto(f"{stack.url}/operations/{op_id}/")
    expect(page.locator("#op-status")).to_have_text("success", timeout=30000)
    expect(page.locator("#op-live")).not_to_have_text("live")
    expect(page.locator("#op-progress")).to_have_text("100%")
    admin("DELETE", "/api/v1/hosts/polled/")


def test_a_viewer_sees_no_action_buttons_and_is_refused_when_forcing_one(page_as, stack):
    page = page_as("carol")
    page.goto(stack.url + "/hosts/")
    expect(page.get_by_role("link", name="Add a host")).to_have_count(0)
    expect(page.get_by_role("link", name="Users")).to_have_count(0)
    shot(page, "hosts-viewer")
    # The form is not there, but the server does not rely on that.
    assert csrf_post(page, "/users/create", {"username": "mallory", "password": "a-long-passphrase-9"}) == 403
    assert csrf_post(page, "/hosts/add/", {"name": "evil", "address": "127.0.0.1", "port": "22"}) == 403
    names = [u for u in Api(stack, stack.tokens["alice"]).get("/api/v1/hosts/").json() if u["name"] == "evil"]
    assert names == []
    page.goto(stack.url + "/users/")
    expect(page.locator("#error-page h1")).to_have_text("Not allowed")


def test_an_admin_creates_a_user_and_gives_them_a_role(page_as, stack, browser):
    admin = page_as("alice")
    nav(admin, "Users")
    form = admin.locator("#create-user-form")
    form.get_by_label("User name").fill("erin")
    form.get_by_label("Password", exact=True).fill("erin-password-1")
    form.get_by_label("Role").select_option("viewer")
    form.get_by_role("button", name="Create user").click()
    expect(admin.locator(".messages")).to_contain_text("erin created with role viewer")
    check_page(admin, "users page")
    shot(admin, "users")

    erin = browser.new_context().new_page()
    try:
        erin.goto(stack.url + "/accounts/login/")
        erin.get_by_label("User name").fill("erin")
        erin.get_by_label("Password").fill("erin-password-1")
        erin.get_by_role("button", name="Log in").click()
        expect(erin.locator("#who")).to_have_text("erin · viewer")
        assert csrf_post(erin, "/hosts/nope/probe") == 403  # a viewer runs nothing

        # Now an operator, from the Users page (the change asks first).
        row = admin.locator('tr[data-user="erin"]')
        row.get_by_label("Role of erin", exact=True).select_option("operator")
        admin.once("dialog", lambda d: d.accept())
        row.get_by_role("button", name="Set the role of erin").click()
        expect(admin.locator(".messages")).to_contain_text("erin is now operator")
        erin.reload()
        expect(erin.locator("#who")).to_have_text("erin · operator")
        assert csrf_post(erin, "/hosts/nope/probe") == 404  # allowed in now; there is no such host

        # Deactivated: the next request is a login page.
        admin.once("dialog", lambda d: d.accept())
        admin.locator('tr[data-user="erin"]').get_by_role("button", name="Deactivate erin").click()
        expect(admin.locator(".messages")).to_contain_text("erin deactivated")
        erin.goto(stack.url + "/containers/")
        expect(erin).to_have_url(re.compile(r"/accounts/login/"))
    finally:
        erin.context.close()


def test_a_dismissed_confirmation_changes_nothing(page_as, stack):
    page = page_as("alice")
    page.goto(stack.url + "/users/")
    page.once("dialog", lambda d: d.dismiss())
    page.locator('tr[data-user="dave"]').get_by_role("button", name="Deactivate dave").click()
    page.reload()
    expect(page.locator('tr[data-user="dave"] td').nth(1)).to_have_text("yes")  # still active


def test_main_pages_name_every_control_and_fit_a_narrow_window(page_as, stack):
    elsewhere = []

    def note(request):
        if not request.url.startswith((stack.url + "/", stack.url.replace("http:", "ws:") + "/")):
            elsewhere.append(request.url)

    for size, suffix in (({"width": 1280, "height": 900}, ""), (NARROW, "-narrow")):
        page = page_as("alice", viewport=size)
        page.on("request", note)
        for path, name in [
            ("/", "overview"),
            ("/hosts/", "hosts"),
            ("/hosts/add/", "host-add"),
            ("/containers/new/", "container-create"),
            ("/containers/import/", "container-import"),
            ("/containers/", "containers"),
            ("/snapshots/", "snapshots"),
            ("/operations/", "operations"),
            ("/users/", "users"),
            ("/audit/", "audit"),
            ("/tokens/", "tokens"),
            ("/nothing-here/", "not-found"),
        ]:
            page.goto(stack.url + path)
            shot(page, name + suffix)
            check_page(page, f"{path} at {size['width']}px")
    assert elsewhere == []  # no CDN, no fonts, nothing fetched from anywhere else


def test_the_keyboard_reaches_every_control(page_as, stack):
    page = page_as("alice")
    for path in ("/users/", "/operations/", "/hosts/add/", "/tokens/"):
        page.goto(stack.url + path)
        assert unreachable_by_tab(page) == [], path


def test_logging_in_and_creating_a_token_by_keyboard_alone(browser, stack):
    page = browser.new_context().new_page()
    try:
        page.goto(stack.url + "/accounts/login/")
        page.keyboard.type("bob")  # the user name field has the focus
        page.keyboard.press("Tab")
        page.keyboard.type("bob-password-1")
        page.keyboard.press("Enter")
        expect(page).to_have_url(stack.url + "/")
        page.goto(stack.url + "/tokens/")
        page.get_by_label("Name").focus()
        page.keyboard.type("by keyboard")
        page.keyboard.press("Tab")
        expect(page.get_by_role("button", name="Create token")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator("#new-key")).to_be_visible()
    finally:
        page.context.close()


def test_times_are_shown_in_the_users_time_zone(page_as, stack):
    page = page_as("bob", timezone_id="Asia/Tokyo", locale="en-US")
    page.goto(stack.url + "/tokens/")
    t = page.locator("time[datetime]").first
    utc = datetime.fromisoformat(t.get_attribute("datetime"))
    expected = utc.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%Y-%m-%d %H:%M:%S") + " GMT+9"
    expect(t).to_have_text(expected)
    expect(t).to_have_attribute("title", utc.strftime("%Y-%m-%d %H:%M:%S UTC"))


def test_static_files_are_served_hashed_and_cached_without_debug(page_as, stack):
    page = page_as("carol")
    css = page.locator("link[rel=stylesheet]").get_attribute("href")
    js = page.locator("script[src]").first.get_attribute("src")
    for url in (css, js):
        assert re.fullmatch(r"/static/(css|js)/ctweb\.[0-9a-f]{12}\.(css|js)", url), url
        r = requests.get(stack.url + url, headers={"Accept-Encoding": "gzip"}, timeout=10)
        assert r.status_code == 200 and r.headers.get("Content-Encoding") == "gzip"
        assert "immutable" in r.headers["Cache-Control"]
    # The page looks styled: the header bar has its background from the stylesheet.
    assert page.locator("header.top").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(246, 248, 250)"


def test_error_pages_are_the_dashboards_own(page_as, stack):
    page = page_as("dave")  # logged in, no role
    expect(page.locator("#error-page")).to_contain_text("Your account has no role yet")
    shot(page, "no-role")
    viewer = page_as("carol")
    viewer.goto(stack.url + "/containers/no-such-container/")
    expect(viewer.locator("#error-page h1")).to_have_text("Not found")
    expect(viewer.get_by_role("navigation", name="Main")).to_be_visible()  # a way on, not a dead end
    assert "Traceback" not in viewer.content()


def test_pages_render_no_template_source(page_as, stack):
    page = page_as("alice")
    for path in ("/", "/hosts/", "/containers/", "/snapshots/", "/operations/", "/users/", "/tokens/"):
        page.goto(stack.url + path)
        body = page.locator("body").inner_text()
        assert "{{" not in body and "{%" not in body, path
