"""The dashboard in a real Chromium against the real lab: a container created, snapshotted,
restored, migrated and deleted by clicking, watched live from other windows, and refused to a viewer."""

import re

import pytest
from playwright.sync_api import expect

from tests.support.browser import NARROW, block_websockets, check_page, csrf_post, nav, shot, unreachable_by_tab
from tests.support.lab import COUNTER
from tests.support.stack import Api, run_op

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

NAME = "clicked1"
OP_URL = re.compile(r"/operations/\d+/$")


def watch_operation(page, action, timeout=120_000) -> str:
    """Click, land on the operation page, and see it end in success on that same page.

    The page the server sent shows the operation still going; the rest arrives live."""
    with page.expect_response(OP_URL) as served:
        action()
    expect(page).to_have_url(OP_URL)
    assert 'id="op-status" class="status status-success"' not in served.value.text()
    page.evaluate("window.ctwebSamePage = true")  # gone if anything reloads the page
    expect(page.locator("#op-status")).to_have_text("success", timeout=timeout)
    expect(page.locator("#op-progress")).to_have_text("100%")
    expect(page.locator("#op-progressbar")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#op-bar")).to_have_attribute("style", re.compile(r"width: 100%"))
    assert page.evaluate("window.ctwebSamePage === true"), "the operation page was reloaded"
    return page.url


def open_container(page, stack, state: str = "RUNNING") -> None:
    page.goto(f"{stack.url}/containers/{NAME}/")
    expect(page.locator("#container-state")).to_have_text(state)


def test_an_operator_runs_a_container_through_the_dashboard(page_as, lab_stack, lab):
    stack = lab_stack
    bob = Api(stack, stack.tokens["bob"])
    # Two windows on the container list: one over the websocket, one polling without it.
    watcher = page_as("carol")
    watcher.goto(stack.url + "/containers/")
    poller = page_as("carol")
    block_websockets(poller)
    poller.goto(stack.url + "/containers/")
    row = f'tr[data-container="{NAME}"]'

    page = page_as("bob")
    try:
        # Create, from the form.
        nav(page, "Containers")
        page.get_by_role("link", name="Create a container").click()
        check_page(page, "the create form")
        page.get_by_label("Name").fill(NAME)
        page.get_by_label("Host").select_option("lab-a")
        page.get_by_label("Template").select_option("busybox")
        page.get_by_label("Command (optional)").fill(f"sh -c '{COUNTER}'")
        watch_operation(page, lambda: page.get_by_role("button", name="Create", exact=True).click())
        shot(page, "operation-create")
        for p in (watcher, poller):
            expect(p.locator(f"{row} [data-field=state]")).to_have_text("RUNNING", timeout=20_000)
            expect(p.locator(f"{row} [data-field=host]")).to_have_text("lab-a")
        shot(watcher, "containers-live")

        # A stateful snapshot; the progress bar fills on the operation page.
        page.locator("h1").get_by_role("link", name=NAME).click()
        check_page(page, "the container page")
        assert unreachable_by_tab(page) == []
        shot(page, "container-detail")
        expect(page.get_by_label("stateful (with memory)")).to_be_checked()
        watch_operation(page, lambda: page.get_by_role("button", name="Take snapshot").click())
        expect(page.locator("#op-phases li[data-phase=dump]")).to_have_count(1)
        check_page(page, "the snapshot's operation page")
        shot(page, "operation-snapshot")

        # Restore: it asks first; saying no changes nothing.
        open_container(page, stack)
        snap = page.locator('tr[data-snapshot="snap0"]')
        expect(snap).to_contain_text("stateful")
        asked = []
        page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
        snap.get_by_role("button", name="Restore snap0").click()
        assert asked and asked[0].startswith(f"Restore {NAME} to snap0?"), asked
        expect(page).to_have_url(f"{stack.url}/containers/{NAME}/")
        assert bob.get(f"/api/v1/operations/?container={NAME}&kind=restore").json() == []
        page.once("dialog", lambda d: d.accept())
        watch_operation(page, lambda: snap.get_by_role("button", name="Restore snap0").click())
        shot(page, "operation-restore")

        # Stop statefully (it asks), then start: it resumes from its saved memory. A viewer's
        # window on the container follows both without a reload.
        viewer = page_as("carol")
        viewer.goto(f"{stack.url}/containers/{NAME}/")
        open_container(page, stack)
        page.once("dialog", lambda d: d.accept())
        watch_operation(page, lambda: page.get_by_role("button", name="Stop statefully").click())
        expect(viewer.locator("#container-state")).to_have_text("STOPPED", timeout=20_000)
        expect(viewer.locator("#saved-state")).to_be_visible()
        open_container(page, stack, "STOPPED")
        watch_operation(page, lambda: page.get_by_role("button", name="Start (resume saved state)").click())
        expect(page.locator("#op-result")).to_contain_text('"restored": true')
        expect(viewer.locator("#container-state")).to_have_text("RUNNING", timeout=20_000)
        expect(viewer.locator("#saved-state")).to_have_count(0)

        # Migrate with the picker: it says which strategies the target refuses and why.
        open_container(page, stack)
        expect(page.locator("#mig-strategy option[value=pre-copy]")).to_be_disabled()
        expect(page.locator("#mig-why")).to_contain_text("pre-copy:")
        page.get_by_label("Target").select_option("lab-b")
        page.get_by_label("Strategy").select_option("stop-and-copy")
        page.once("dialog", lambda d: d.accept())
        watch_operation(page, lambda: page.get_by_role("button", name="Migrate").click())
        expect(page.locator("#op-chart svg")).to_have_attribute("aria-label", re.compile(r"MiB moved in [\d.]+ s"))
        for segment in ("dump", "transfer", "restore"):
            expect(page.locator(f"#downtime-legend li[data-segment={segment}]")).to_contain_text(" ms (")
        expect(page.locator("#downtime-caption")).to_contain_text(f"{NAME} was down for")
        expect(page.locator("#downtime-table")).to_contain_text("downtime")
        expect(page.locator("#client-downtime")).to_contain_text("Its clients saw it gone for")
        expect(page.locator("#downtime-table")).to_contain_text("client-visible downtime")
        check_page(page, "the migration's operation page")
        shot(page, "operation-migrate")
        for p in (watcher, poller):
            expect(p.locator(f"{row} [data-field=host]")).to_have_text("lab-b", timeout=20_000)

        # A viewer: the same container without a single action, and the server refuses them anyway.
        viewer.reload()
        for button in ("Stop", "Stop statefully", "Restart", "Take snapshot", "Migrate", "Delete", "Restore snap0"):
            expect(viewer.get_by_role("button", name=button, exact=True)).to_have_count(0)
        shot(viewer, "container-viewer")
        assert csrf_post(viewer, f"/containers/{NAME}/snapshot", {"stateful": "1"}) == 403
        assert csrf_post(viewer, f"/containers/{NAME}/migrate", {"target_host": "lab-a"}) == 403
        assert csrf_post(viewer, f"/containers/{NAME}/delete", {"confirm": NAME}) == 403
        assert csrf_post(viewer, f"/containers/{NAME}/snapshots/snap0/restore") == 403
        row_now = bob.get(f"/api/v1/containers/{NAME}/").json()
        assert (row_now["host"], row_now["state"], row_now["snapshots"]) == ("lab-b", "RUNNING", 1)

        # History and the snapshot's decoded contents; every page fits a phone.
        phone = page_as("bob", viewport=NARROW)
        for path, name in [
            (f"/containers/{NAME}/", "container-detail-narrow"),
            (f"/containers/{NAME}/history/", "container-history-narrow"),
            (f"/containers/{NAME}/snapshots/snap0/", "snapshot-detail-narrow"),
            ("/containers/", "containers-narrow"),
            ("/operations/", "operations-narrow-lab"),
            (page.url.replace(stack.url, ""), "operation-migrate-narrow"),
        ]:
            phone.goto(stack.url + path)
            shot(phone, name)
            check_page(phone, f"{path} at 390px")
        page.goto(f"{stack.url}/containers/{NAME}/history/")
        expect(page.locator(".timeline")).to_contain_text("lab-a → lab-b")
        expect(page.locator(".timeline")).to_contain_text("snap0")
        shot(page, "container-history")
        page.goto(f"{stack.url}/containers/{NAME}/snapshots/snap0/")
        expect(page.locator("#process-table")).to_contain_text("/tmp/counter")
        shot(page, "snapshot-detail")

        # Delete: only with its name typed in; the lists drop it without a reload.
        open_container(page, stack)
        page.get_by_label(re.compile(f"Type {NAME} to delete it")).fill(NAME)
        watch_operation(page, lambda: page.get_by_role("button", name="Delete", exact=True).click())
        for p in (watcher, poller):
            expect(p.locator(row)).to_have_count(0, timeout=20_000)
    finally:
        if bob.get(f"/api/v1/containers/{NAME}/").status_code == 200:
            run_op(bob, "DELETE", f"/api/v1/containers/{NAME}/")
