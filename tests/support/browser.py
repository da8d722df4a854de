"""Shared pieces of the browser tests: Debian's Chromium driven by Playwright, logins, and
checks every page must pass (controls with names, no horizontal overflow, no template source)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NARROW = {"width": 390, "height": 844}  # a phone held upright

# Roles a user operates; each needs an accessible name (WAI-ARIA "name required").
CONTROL_ROLES = (
    "button",
    "checkbox",
    "combobox",
    "link",
    "listbox",
    "radio",
    "searchbox",
    "slider",
    "spinbutton",
    "switch",
    "textbox",
)
# In Playwright's ARIA snapshot a named control reads `- button "Log out"`; an unnamed one
# has nothing after its role but children (`:`) or states (`[checked]`).
_UNNAMED = re.compile(r"^\s*- (" + "|".join(CONTROL_ROLES) + r")(?=$|:| \[)", re.M)

# Whatever the Content-Security-Policy blocked on a page (an inline style or script would).
_CSP_WATCH = """document.addEventListener("securitypolicyviolation", (e) => {
  (window.ctwebCspViolations = window.ctwebCspViolations || []).push(e.violatedDirective + " " + e.blockedURI);
});"""

# Everything a keyboard user can reach with Tab (visible and enabled).
_CONTROLS_JS = """() => {
  const sel = 'a[href], button, input:not([type=hidden]), select, textarea, [tabindex]:not([tabindex="-1"])';
  const all = Array.from(document.querySelectorAll(sel)).filter(
    (el) => !el.disabled && el.getClientRects().length && getComputedStyle(el).visibility !== "hidden");
  all.forEach((el, i) => { el.dataset.kb = String(i); });
  return all.map((el) => el.outerHTML.slice(0, 120));
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page_as(browser, stack):
    """`page_as("bob")`: a new browser context logged in as bob through the login form."""
    contexts = []

    def login(username: str, **context_options) -> Page:
        context = browser.new_context(**context_options)
        context.add_init_script(_CSP_WATCH)
        contexts.append(context)
        page = context.new_page()
        page.goto(stack.url + "/accounts/login/")
        page.get_by_label("User name").fill(username)
        page.get_by_label("Password").fill(f"{username}-password-1")
        page.get_by_role("button", name="Log in").click()
        expect(page).to_have_url(stack.url + "/")
        return page

    yield login
    for c in contexts:
        c.close()


def block_websockets(page: Page) -> None:
    """As behind a proxy that drops websockets: the page must fall back to polling."""
    page.route(re.compile(r"^wss?://"), lambda route: route.abort())
    page.context.route_web_socket(re.compile(".*"), lambda ws: ws.close())


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def nav(page: Page, name: str) -> None:
    page.get_by_role("navigation", name="Main").get_by_role("link", name=name, exact=True).click()


def unnamed_controls(page: Page) -> list[str]:
    return [line.strip() for line in page.locator("body").aria_snapshot().splitlines() if _UNNAMED.match(line)]


def overflow_px(page: Page) -> int:
    return page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")


def check_page(page: Page, what: str) -> None:
    """What every page promises: rendered, every control named, nothing wider than the window."""
    body = page.locator("body").inner_text()
    assert "{{" not in body and "{%" not in body and "Traceback" not in body, what
    assert unnamed_controls(page) == [], f"{what}: controls without an accessible name"
    assert overflow_px(page) <= 0, f"{what} is wider than the window ({page.viewport_size})"
    assert page.evaluate("window.ctwebCspViolations || []") == [], f"{what}: the CSP blocked something"


def unreachable_by_tab(page: Page) -> list[str]:
    """Press Tab through the page; the visible, enabled controls focus never reached."""
    controls = page.evaluate(_CONTROLS_JS)
    page.locator("body").focus()
    page.evaluate("document.activeElement && document.activeElement.blur()")
    reached = set()
    for _ in range(len(controls) + 10):
        page.keyboard.press("Tab")
        kb = page.evaluate("document.activeElement && document.activeElement.dataset.kb")
        if kb is not None:
            reached.add(int(kb))
    return [c for i, c in enumerate(controls) if i not in reached]


def csrf_post(page: Page, path: str, fields: dict | None = None) -> int:
    """POST from inside the page like a form would, with the page's own CSRF token; the status."""
    return page.evaluate(
        """async ([path, fields]) => {
            const body = new FormData();
            body.append("csrfmiddlewaretoken", document.querySelector("[name=csrfmiddlewaretoken]").value);
            Object.entries(fields).forEach(([k, v]) => body.append(k, v));
            const r = await fetch(path, {method: "POST", body, credentials: "same-origin", redirect: "manual"});
            return r.status;
        }""",
        [path, fields or {}],
    )
