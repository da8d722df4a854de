"""The migrate picker's predictions in a real Chromium against the lab: Predict fills each
strategy's predicted downtime and total from the dry run, and migrating with a maximum
downtime lands on an operation page that shows the prediction beside what was measured."""

import re

import pytest
from playwright.sync_api import expect

from tests.support.lab import COUNTER, create
from tests.support.stack import Api, ok, run_op

pytestmark = [pytest.mark.e2e, pytest.mark.lab]


def test_the_picker_predicts_and_the_operation_page_compares(page_as, lab_stack, lab):
    bob = Api(lab_stack, lab_stack.tokens["bob"])
    ok(create(bob, name="picked", host="lab-a", command=["sh", "-c", COUNTER]))
    try:
        page = page_as("bob")
        page.goto(f"{lab_stack.url}/containers/picked/")
        page.get_by_label("Target").select_option("lab-b")
        page.get_by_role("button", name="Predict", exact=True).click()
        table = page.locator("#mig-predictions")
        expect(table).to_be_visible(timeout=30_000)
        for strategy in ("stop-and-copy", "post-copy", "restart"):
            row = table.locator(f'tr[data-strategy="{strategy}"]')
            expect(row.locator("td").nth(0)).to_have_text("yes")
            expect(row.locator("td").nth(1)).to_have_text(re.compile(r"^\d+(\.\d)? m?s$"))
        expect(page.locator("#mig-predict-status")).to_have_text("auto would choose post-copy.")
        page.get_by_label("Max downtime (ms, optional)").fill("600000")
        page.once("dialog", lambda d: d.accept())
        page.get_by_role("button", name="Migrate", exact=True).click()
        expect(page).to_have_url(re.compile(r"/operations/\d+/$"))
        expect(page.locator("#op-status")).to_have_text("success", timeout=180_000)
        page.reload()
        rows = page.locator("#prediction-table tbody tr")
        expect(rows.first.locator("th")).to_have_text("downtime")
        expect(rows.first.locator("td").nth(0)).to_have_text(re.compile(r"^\d+ ms$"))
        expect(rows.first.locator("td").nth(1)).to_have_text(re.compile(r"^\d+ ms$"))
    finally:
        run_op(bob, "DELETE", "/api/v1/containers/picked/")
