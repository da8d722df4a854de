"""Post-copy with direct transfer allowed, on the real lab: the pages go from lab-a's page
relay to lab-b's over TLS 1.3 (per-migration certificates), not through the dashboard; the
memory pattern arrives intact; a 45 s cut of the link between the hosts in the middle of the
pull only pauses it (the target's relay connects again and the relays resume from their
offsets); a target that cannot reach the source's relay falls back to the dashboard's pump
and the result says so."""

import time
from contextlib import contextmanager

import pytest

from lab import core
from tests.support.faults import (
    fresh_worker,
    leftovers,
    phase,
    shell,
    start,
    throttle,
    unthrottle,
    wait_until,
    worker_log,
)
from tests.support.lab import PATTERN, counter, create, on_host, pattern
from tests.support.stack import Api, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

LAB_NET = str(core.subnet())
A, B = core.host_address(0), core.host_address(1)


@pytest.fixture
def alice(lab_stack):
    return Api(lab_stack, lab_stack.tokens["alice"])


@pytest.fixture
def direct(alice, bob):
    names: list[str] = []
    r = alice("PUT", "/api/v1/settings/", json={"direct_transfer_networks": [LAB_NET]})
    assert r.status_code == 200, r.text
    yield names
    alice("PUT", "/api/v1/settings/", json={"direct_transfer_networks": []})
    for name in names:
        for op in bob.get(f"/api/v1/operations/?container={name}&status=running").json():
            bob.wait_operation(op["id"], timeout=300)
        if bob.get(f"/api/v1/containers/{name}/").status_code == 200:
            run_op(bob, "DELETE", f"/api/v1/containers/{name}/")


def patterned(bob, lab, direct, name: str) -> tuple[str, int]:
    direct.append(name)
    ok(create(bob, name=name, host="lab-a", command=["sh", "-c", PATTERN]))
    wait_for(lambda: counter(lab, "lab-a", name) > 2, 30, "counting")
    start_sum, now_sum = wait_for(lambda: _pattern(lab, "lab-a", name), 10, "the pattern")
    assert start_sum == now_sum
    return start_sum, counter(lab, "lab-a", name)


def _pattern(lab, host, name):
    try:
        return pattern(lab, host, name)
    except (ValueError, IndexError, AssertionError):  # a file caught half-written
        return None


def _arrived(lab, name: str, drawn: str, before: int) -> None:
    assert wait_for(lambda: _pattern(lab, "lab-b", name), 10, "the pattern") == (drawn, drawn)
    assert counter(lab, "lab-b", name) >= before  # it went on, it did not start over
    assert name not in on_host(lab, "lab-a", "lxc-ls", "-1").stdout.split()  # never on two hosts
    for host in ("lab-a", "lab-b"):
        assert leftovers(lab, host, name) == [], host


@contextmanager
def hosts_cut_from_each_other(lab, new_connections_only: bool = False):
    """Drop what lab-b and lab-a send each other (on lab-b: the dashboard's links to both
    stay up). With new_connections_only, only new TCP connections from lab-b to lab-a are
    refused (a firewall that lets the direct stream, lab-a -> lab-b, through)."""
    if new_connections_only:
        rules = [f"OUTPUT -d {A} -p tcp --syn -j REJECT"]
    else:
        rules = [f"INPUT -s {A} -j DROP", f"OUTPUT -d {A} -j DROP"]
    for rule in rules:
        r = shell(lab, "lab-b", f"iptables -w -I {rule}")
        assert r.returncode == 0, r.stderr
    try:
        yield
    finally:
        for rule in rules:
            shell(lab, "lab-b", f"iptables -w -D {rule}")


def test_post_copy_pages_go_host_to_host_over_tls(bob, lab, direct):
    drawn, before = patterned(bob, lab, direct, "pcd")
    op = ok(run_op(bob, "POST", "/api/v1/containers/pcd/migrate", {"target_host": "lab-b", "strategy": "post-copy"}))
    result = op["result"]
    transfer = result["transfer"]
    assert (transfer["images"], transfer["pages"], transfer["pages_encrypted"]) == ("direct-tls", "direct-tls", True)
    assert transfer["pages_why"] is None, transfer
    assert result["page_relay"]["path"] == "direct-tls" and result["page_relay"]["encrypted"] is True
    assert result["page_relay"]["rounds"] == 1, result["page_relay"]  # one TLS connection, no break
    assert "over TLS 1.3" in result["transport"] and "relayed by the dashboard" not in result["transport"]
    # The pattern's 8 MB came as pages, host to host: the dashboard carried none of them.
    assert result["page_bytes"] > 4 << 20, result
    assert result["dashboard_bytes"] < result["page_bytes"] / 20, result
    _arrived(lab, "pcd", drawn, before)


def test_a_45_s_cut_between_the_hosts_mid_pull_only_pauses_it(bob, lab, direct):
    drawn, before = patterned(bob, lab, direct, "pcd-cut")
    op_id = start(bob, "/api/v1/containers/pcd-cut/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
    throttle(lab, "lab-a", op_id)  # about 320 KiB/s: the cut lands in the middle of the pull
    wait_until(bob, op_id, phase("pages"), "the page pull", timeout=180)
    with hosts_cut_from_each_other(lab):
        time.sleep(45)
    unthrottle(lab, "lab-a", op_id)
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "success", (op["error"], worker_log(bob.stack, "postcopy-direct-worker.log"))
    relay = op["result"]["page_relay"]
    assert relay["path"] == "direct-tls" and relay["rounds"] >= 2, relay  # connected again after the cut
    assert op["result"]["dashboard_bytes"] < op["result"]["page_bytes"] / 20, op["result"]
    _arrived(lab, "pcd-cut", drawn, before)


def test_a_worker_lost_mid_pull_leaves_the_direct_link_to_finish_it(bob, lab, lab_stack, direct):
    """The worker SIGKILLed during a direct pull: the relays carry on between themselves;
    the recovery reads their counters (no pump) until every page arrived."""
    drawn, before = patterned(bob, lab, direct, "pcd-lost")
    op_id = start(bob, "/api/v1/containers/pcd-lost/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
    throttle(lab, "lab-a", op_id)
    wait_until(bob, op_id, phase("pages"), "the page pull", timeout=180)
    fresh_worker(lab_stack)
    time.sleep(3)
    unthrottle(lab, "lab-a", op_id)
    op = bob.wait_operation(op_id, timeout=400)
    assert op["status"] == "failure" and op["error"].startswith("Worker lost"), op["error"]
    assert "every page arrived" in op["error"], (op["error"], worker_log(bob.stack, "postcopy-direct-worker.log"))
    assert op["result"]["transfer"]["pages"] == "direct-tls"
    row = bob.get("/api/v1/containers/pcd-lost/").json()
    assert (row["host"], row["state"]) == ("lab-b", "RUNNING"), row
    _arrived(lab, "pcd-lost", drawn, before)


def test_a_target_that_cannot_reach_the_source_falls_back_to_the_dashboard(bob, lab, direct):
    drawn, before = patterned(bob, lab, direct, "pcd-fw")
    with hosts_cut_from_each_other(lab, new_connections_only=True):
        op = ok(
            run_op(bob, "POST", "/api/v1/containers/pcd-fw/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
        )
    result = op["result"]
    transfer = result["transfer"]
    assert transfer["images"] == "direct-tls"  # lab-a -> lab-b connections pass
    assert (transfer["pages"], transfer["pages_encrypted"]) == ("ssh-relay", True), transfer
    assert "no direct link" in transfer["pages_why"], transfer
    assert result["page_relay"]["path"] == "ssh-relay"
    assert "the direct page link could not be made" in result["transport"], result["transport"]
    assert result["dashboard_bytes"] >= result["page_bytes"] > 4 << 20, result  # the pages crossed it
    _arrived(lab, "pcd-fw", drawn, before)
