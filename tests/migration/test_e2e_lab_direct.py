"""Direct host-to-host transfer on the real lab: an admin allows the lab's network, a
stop-and-copy migration's tars then go from lab-a to lab-b over TLS without crossing the dashboard
(the bridge's own interface, where the dashboard's SSH connections end, sees almost none
of those bytes), the result says so, the memory pattern and the counter come along; with
the setting removed it relays again. A direct stream that breaks ends like a relayed one:
the container keeps running on the source and nothing is left on the target."""

import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from lab import core
from tests.support.faults import fresh_worker, leftovers, make, phase, settled, start, wait_until
from tests.support.lab import PATTERN, counter, create, on_host, pattern
from tests.support.stack import Api, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

LAB_NET = str(core.subnet())
A, B = core.host_address(0), core.host_address(1)
BIG_MIB = 64  # a file in the rootfs: the bytes that show which way the copy went
BRIDGE_RX = Path(f"/sys/class/net/{core.ROOT_BRIDGE}/statistics/rx_bytes")  # what reaches the dashboard's side


@pytest.fixture
def alice(lab_stack):
    return Api(lab_stack, lab_stack.tokens["alice"])


def allow(alice, networks: list[str]) -> None:
    r = alice("PUT", "/api/v1/settings/", json={"direct_transfer_networks": networks})
    assert r.status_code == 200 and r.json()["direct_transfer_networks"] == networks, r.text


@pytest.fixture
def direct(alice, bob):
    names: list[str] = []
    allow(alice, [LAB_NET])
    yield names
    allow(alice, [])
    for name in names:
        for op in bob.get(f"/api/v1/operations/?container={name}&status=running").json():
            bob.wait_operation(op["id"], timeout=300)
        if bob.get(f"/api/v1/containers/{name}/").status_code == 200:
            run_op(bob, "DELETE", f"/api/v1/containers/{name}/")


def steady_pattern(lab, host: str, name: str) -> tuple[str, str]:
    """pattern(), read again if it caught the shell rewriting /tmp/pattern.now."""

    def read():
        try:
            return pattern(lab, host, name)
        except (ValueError, IndexError, AssertionError):  # a file caught half-written
            return None

    return wait_for(read, 10, f"{name}'s memory pattern")


def migrate(bob, name: str, target: str, strategy: str = "stop-and-copy") -> tuple[dict, int]:
    """Migrate to `target`; (the operation, bytes the dashboard's side of the bridge received)."""
    rx = int(BRIDGE_RX.read_text())
    op = ok(run_op(bob, "POST", f"/api/v1/containers/{name}/migrate", {"target_host": target, "strategy": strategy}))
    return op, int(BRIDGE_RX.read_text()) - rx


def test_stop_and_copy_goes_direct_where_an_admin_allows_it_and_relays_again_when_not(bob, alice, lab, direct):
    direct.append("straight")
    ok(create(bob, name="straight", host="lab-a", command=["sh", "-c", PATTERN]))
    r = on_host(
        lab, "lab-a", "dd", "if=/dev/urandom", "of=/var/lib/lxc/straight/rootfs/big", "bs=1M", f"count={BIG_MIB}"
    )
    assert r.returncode == 0, r.stderr
    wait_for(lambda: counter(lab, "lab-a", "straight") > 2, 30, "counting")
    drawn = steady_pattern(lab, "lab-a", "straight")[0]
    ok(run_op(bob, "POST", "/api/v1/containers/straight/snapshots/", {"name": "keep", "stateful": True}))
    ip = bob.get("/api/v1/containers/straight/").json()["ipv4"]

    before = counter(lab, "lab-a", "straight")
    op, through_dashboard = migrate(bob, "straight", "lab-b")
    result = op["result"]
    assert result["transfer"].pop("memory_in_images_bytes") > 4 << 20  # the pattern, in the images
    assert result["transfer"] == {
        "images": "direct-tls",
        "images_encrypted": True,
        "network": LAB_NET,
        "source_address": A,
        "target_address": B,
        "pages": "in-images",
        "pages_encrypted": True,
        "pages_why": None,
        "why": f"lab-a ({A}) and lab-b ({B}) are both in {LAB_NET}, allowed by an admin",
    }
    assert (
        f"sent directly from lab-a ({A}) to lab-b ({B}) over TLS 1.3 on {LAB_NET}" in result["transport"]
        and "encrypted, both hosts authenticated" in result["transport"]
    )
    assert result["bytes_transferred"] > BIG_MIB << 20
    # The bytes did not pass through the dashboard: its side of the bridge saw a fraction of them.
    assert through_dashboard < result["bytes_transferred"] / 4, (through_dashboard, result["bytes_transferred"])
    rootfs = [e["bytes"] for e in op["events"] if e["phase"] == "transfer" and e.get("what") == "root filesystem"]
    assert len(rootfs) >= 2 and rootfs == sorted(rootfs), rootfs  # live progress, as it arrived
    assert any("directly host to host over TLS 1.3" in e["message"] for e in op["events"])

    row = bob.get("/api/v1/containers/straight/").json()
    assert (row["host"], row["state"], row["ipv4"], row["snapshots"]) == ("lab-b", "RUNNING", ip, 1)
    after = counter(lab, "lab-b", "straight")
    assert before <= after <= before + 30, (before, after)  # it went on, it did not start over
    assert steady_pattern(lab, "lab-b", "straight") == (drawn, drawn)  # the memory came along intact
    assert "straight" not in on_host(lab, "lab-a", "lxc-ls", "-1").stdout.split()  # never on two hosts
    assert on_host(lab, "lab-b", "test", "-d", "/var/lib/ctweb/snapshots/straight/keep").returncode == 0
    assert on_host(lab, "lab-b", "cmp", "-s", "/var/lib/lxc/straight/rootfs/big", "/dev/null").returncode == 1
    assert "lxc.hook" not in on_host(lab, "lab-b", "cat", "/var/lib/lxc/straight/config").stdout

    # Post-copy on the same network: the (page-less) images go direct, the pages too, over TLS
    # between the hosts' page relays (tests/migration/test_e2e_lab_postcopy_direct.py).
    before = counter(lab, "lab-b", "straight")
    op, _ = migrate(bob, "straight", "lab-a", "post-copy")
    transfer = op["result"]["transfer"]
    assert (transfer["images"], transfer["images_encrypted"]) == ("direct-tls", True)
    assert (transfer["pages"], transfer["pages_encrypted"]) == ("direct-tls", True)
    assert "host to host over TLS 1.3" in op["result"]["transport"]
    # The pattern's 8 MB came through the page relays, apart from what CRIU kept in the images
    # (which went direct with them, and the result says how much).
    held = transfer["memory_in_images_bytes"]
    assert op["result"]["page_bytes"] > 0 and op["result"]["page_bytes"] + held > 4 << 20, (op["result"], held)
    assert (f"{held / 1024:.0f} KiB of pages" in op["result"]["transport"]) == (held > 0)
    assert counter(lab, "lab-a", "straight") >= before
    assert steady_pattern(lab, "lab-a", "straight") == (drawn, drawn)
    assert "straight" not in on_host(lab, "lab-b", "lxc-ls", "-1").stdout.split()

    # The admin takes it back: the next migration relays over SSH again.
    allow(alice, [])
    before = counter(lab, "lab-a", "straight")
    op, through_dashboard = migrate(bob, "straight", "lab-b")
    result = op["result"]
    assert (result["transfer"]["images"], result["transfer"]["images_encrypted"]) == ("ssh-relay", True)
    assert result["transfer"]["pages_encrypted"] is True and result["transfer"]["network"] is None
    assert result["transport"] == "relayed through the dashboard over both hosts' SSH connections (encrypted)"
    assert through_dashboard > BIG_MIB << 20  # every byte came up to the dashboard and went down again
    assert counter(lab, "lab-b", "straight") >= before
    assert steady_pattern(lab, "lab-b", "straight") == (drawn, drawn)
    assert "straight" not in on_host(lab, "lab-a", "lxc-ls", "-1").stdout.split()


@contextmanager
def slow_link_to(host: str, rate: str = "200mbit"):
    """Shape what the bridge sends to `host` (a token bucket on both of its root-side veths:
    the host answers ARP for its address on its container bridge too), so a copy takes
    seconds and a fault lands in the middle of it."""
    from lab import core

    links = core._root_links(host)
    for eth in links:
        subprocess.run(
            ["tc", "qdisc", "replace", "dev", eth, "root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms"],
            check=True,
        )
    try:
        yield
    finally:
        for eth in links:
            subprocess.run(["tc", "qdisc", "del", "dev", eth, "root"], check=False)


@pytest.mark.parametrize("fault", ["receiving agent killed", "worker killed", "cancel"])
def test_a_direct_stream_that_breaks_leaves_it_running_on_the_source(bob, lab, lab_stack, direct, fault):
    name = make(
        bob, lab, {"receiving agent killed": "cut-direct", "worker killed": "lost-direct"}.get(fault, "stop-direct")
    )
    direct.append(name)
    before = counter(lab, "lab-a", name)
    with slow_link_to("lab-b"):
        op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "stop-and-copy"})
        wait_until(bob, op_id, phase("transfer", "root filesystem", 20 << 20), "the direct rootfs transfer")
        if fault == "worker killed":
            fresh_worker(lab_stack)
        elif fault == "cancel":
            assert bob.post(f"/api/v1/operations/{op_id}/cancel").status_code in (200, 202)
        else:
            # The agent that listens and unpacks on lab-b holds the container's lock there.
            out = on_host(lab, "lab-b", "cat", f"/var/lib/ctweb/locks/{name}.lock").stdout.split()
            assert out[1:] == ["receive"], out
            assert on_host(lab, "lab-b", "kill", "-9", out[0]).returncode == 0
        op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == ("cancelled" if fault == "cancel" else "failure"), op
    assert op["result"]["transfer"]["images"] == "direct-tls"
    if fault == "cancel":
        assert op["error"].startswith("Cancelled at the operator's request."), op["error"]
    elif fault == "worker killed":
        assert op["error"].startswith("Worker lost") and "Rolled back" in op["error"], op["error"]
    else:
        assert f"Transfer of the root filesystem (sent directly on {LAB_NET}) failed" in op["error"], op["error"]
    settled(
        bob,
        lab,
        name,
        op,
        strategy="stop-and-copy",
        fault=f"{fault} (direct transfer)",
        when="transfer",
        before=before,
        test=f"direct transfer: {fault}",
        expect_host="lab-a",
    )
    assert leftovers(lab, "lab-b", name) == []
