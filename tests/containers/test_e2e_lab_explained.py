"""Failures explained, for real: CRIU failures forced on the lab through the dashboard end with
one sentence and a fix at the top of the failed operation (result.explanation in the API, the
first thing on its page), naming the host whose CRIU log said so (hosts/criu_errors.py)."""

import time
from html import escape

import pytest
from playwright.sync_api import expect

from hosts.criu_errors import CATALOGUE
from tests.support.lab import COUNTER, create, on_host

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

ENTRY = {c.key: c for c in CATALOGUE}


def _run(api, method, path, body):
    r = api(method, path, json=body)
    assert r.status_code == 202, r.text
    return api.wait_operation(r.json()["id"], timeout=180)


def _container(bob, name, command):
    op = create(bob, name=name, host="lab-a", template="busybox", command=["sh", "-c", command])
    assert op["status"] == "success", op["error"]


def _delete(bob, name):
    assert _run(bob, "DELETE", f"/api/v1/containers/{name}/", None)["status"] == "success"


def _explained(op, cls, host="lab-a"):
    assert op["status"] == "failure", op
    x = op["result"].get("explanation")
    assert x is not None, op["error"]
    assert (x["class"], x["host"]) == (cls, host), x
    assert (x["sentence"], x["fix"]) == (ENTRY[cls].sentence, ENTRY[cls].fix)
    assert x["line"] in op["error"]  # read from the CRIU lines the error carries
    return x


def test_a_stateful_stop_without_the_network_lock_says_why_live_on_its_page(lab_stack, lab, bob, page_as):
    _container(bob, "why-net", COUNTER)
    # iptables-restore answers "no" on lab-a only (a bind mount in its mount namespace).
    path = on_host(lab, "lab-a", "readlink", "-f", "/usr/sbin/iptables-restore").stdout.strip()
    assert on_host(lab, "lab-a", "mount", "--bind", "/bin/false", path).returncode == 0
    try:
        page = page_as("bob")
        r = bob.post("/api/v1/containers/why-net/state", json={"action": "stop", "stateful": True})
        assert r.status_code == 202, r.text
        page.goto(lab_stack.url + f"/operations/{r.json()['id']}/")
        op = bob.wait_operation(r.json()["id"], timeout=120)
    finally:
        on_host(lab, "lab-a", "umount", path)
    x = _explained(op, "network-lock")
    assert "Locking network failed" in x["line"]
    assert bob.get("/api/v1/containers/why-net/").json()["state"] == "RUNNING"
    # The page that watched it run shows the sentence and the fix above the error, without a reload.
    expect(page.locator("#explained-sentence")).to_have_text(ENTRY["network-lock"].sentence, timeout=15000)
    expect(page.locator("#explained-fix")).to_contain_text(ENTRY["network-lock"].fix)
    expect(page.locator("#explained-heading")).to_have_text("Why it failed: network lock on lab-a")
    html = page.content()
    assert html.index('id="op-explained"') < html.index('id="op-error"')
    assert escape(x["line"], quote=False) in html
    # Once iptables works again, the same stop goes through.
    ok = _run(bob, "POST", "/api/v1/containers/why-net/state", {"action": "stop", "stateful": True})
    assert ok["status"] == "success" and "explanation" not in ok["result"]
    _delete(bob, "why-net")


def test_a_snapshot_of_a_nested_namespace_is_explained(lab_stack, lab, bob):
    _container(bob, "why-nest", "unshare -u sleep 1000 & " + COUNTER)
    time.sleep(1)
    op = _run(bob, "POST", "/api/v1/containers/why-nest/snapshots/", {"stateful": True})
    x = _explained(op, "namespaces")
    assert "Can't dump nested uts namespace" in x["line"]
    _delete(bob, "why-nest")


def test_a_full_disk_under_the_saved_state_is_explained(lab_stack, lab, bob):
    _container(bob, "why-disk", "x=$(head -c 6000000 /dev/zero | tr '\\0' a); " + COUNTER)
    time.sleep(2)
    on_host(lab, "lab-a", "mkdir", "-p", "/var/lib/ctweb/state")
    assert (
        on_host(lab, "lab-a", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/var/lib/ctweb/state").returncode == 0
    )
    try:
        op = _run(bob, "POST", "/api/v1/containers/why-disk/state", {"action": "stop", "stateful": True})
    finally:
        on_host(lab, "lab-a", "umount", "/var/lib/ctweb/state")
    x = _explained(op, "disk")
    assert "No space left on device" in x["line"]
    _delete(bob, "why-disk")


def test_a_migration_of_a_file_held_from_the_host_is_explained_with_the_source_host(lab_stack, lab, bob):
    _container(bob, "why-fd", COUNTER)
    # A daemon left by lxc-attach (setsid: its own session) holding the host's /etc/hostname.
    on_host(
        lab,
        "lab-a",
        "sh",
        "-c",
        '\'nohup lxc-attach -n why-fd -- /bin/setsid /bin/sh -c "/bin/sleep 1000 </dev/null >/dev/null 2>&1 &" '
        "3</etc/hostname </dev/null >/dev/null 2>&1 &'",
    )
    time.sleep(2)
    caps = {h["name"]: (h.get("capabilities") or {}).get("network") for h in bob.get("/api/v1/hosts/").json()}
    assert caps["lab-a"] and caps["lab-a"] == caps["lab-b"], caps
    op = _run(bob, "POST", "/api/v1/containers/why-fd/migrate", {"target_host": "lab-b", "strategy": "stop-and-copy"})
    x = _explained(op, "files")
    assert "Can't lookup mount=" in x["line"] and "path=/etc/hostname" in x["line"]
    row = bob.get("/api/v1/containers/why-fd/").json()
    assert (row["host"], row["state"]) == ("lab-a", "RUNNING")
    _delete(bob, "why-fd")


def test_a_migration_whose_restore_fails_on_the_target_names_the_target(lab_stack, lab, bob):
    """Both hosts: the dump on lab-a goes through (LXC hands its bind mount from the host to CRIU
    as external), the restore on lab-b cannot make the mount again (ctweb's config allowlist
    drops a bind mount from the host, and lab-b has no such directory anyway)."""
    _container(bob, "why-dst", COUNTER)
    assert _run(bob, "POST", "/api/v1/containers/why-dst/state", {"action": "stop"})["status"] == "success"
    on_host(lab, "lab-a", "mkdir", "-p", "/srv/why-share")
    on_host(
        lab,
        "lab-a",
        "sh",
        "-c",
        "'echo lxc.mount.entry = /srv/why-share srv none bind,create=dir 0 0 >> /var/lib/lxc/why-dst/config'",
    )
    assert _run(bob, "POST", "/api/v1/containers/why-dst/state", {"action": "start"})["status"] == "success"
    op = _run(bob, "POST", "/api/v1/containers/why-dst/migrate", {"target_host": "lab-b", "strategy": "stop-and-copy"})
    print(f"\n{op['error'][:2500]}\n{op['result'].get('explanation')}")
    _explained(op, "mounts", host="lab-b")
    assert op["error"].startswith("lab-b: ")
    row = bob.get("/api/v1/containers/why-dst/").json()
    assert (row["host"], row["state"]) == ("lab-a", "RUNNING")  # rolled back to its source
    _delete(bob, "why-dst")


def test_a_check_shows_checkpointable_or_blocked_with_its_fix(lab_stack, lab, bob, page_as):
    """Issue 17 item 1 through the dashboard: the check operation's answer on the container."""
    _container(bob, "chk-web", COUNTER)
    op = _run(bob, "POST", "/api/v1/containers/chk-web/check", {"trial": True})
    assert op["status"] == "success", op["error"]
    k = bob.get("/api/v1/containers/chk-web/").json()["checkpointable"]
    assert (k["status"], k["reasons"], k["operation"]) == ("yes", [], op["id"]) and k["verified_at"]
    assert 0 < k["trial_frozen_ms"] < 10_000
    # A daemon left in the attaching session blocks it; the scan and the trial both say so.
    on_host(
        lab,
        "lab-a",
        "sh",
        "-c",
        '\'nohup lxc-attach -n chk-web -- /bin/sh -c "/bin/sleep 1000 </dev/null >/dev/null 2>&1 &" '
        "</dev/null >/dev/null 2>&1 &'",
    )
    time.sleep(2)
    op = _run(bob, "POST", "/api/v1/containers/chk-web/check", {"trial": True})
    assert op["status"] == "success", op["error"]
    k = bob.get("/api/v1/containers/chk-web/").json()["checkpointable"]
    assert k["status"] == "no" and [r["class"] for r in k["reasons"]] == ["processes", "processes"]
    assert k["reasons"][1]["sentence"].startswith("The trial dump failed: ")
    row = next(r for r in bob.get("/api/v1/containers/?host=lab-a").json() if r["name"] == "chk-web")
    assert row["checkpointable"]["status"] == "no" and row["state"] == "RUNNING"
    page = page_as("carol")
    page.goto(lab_stack.url + "/containers/chk-web/")
    expect(page.locator("#checkpointable-reasons li").first).to_contain_text("blocked: Process")
    expect(page.locator("#checkpointable-reasons li").first).to_contain_text("fix: Start it inside the container")
    page.goto(lab_stack.url + "/containers/")
    expect(page.locator('[data-field="checkpointable"]', has_text="blocked: processes")).to_be_visible()
    _delete(bob, "chk-web")
