"""Faults outside the per-strategy matrix (tests/migration/test_e2e_lab_fault_matrix.py), on the
real lab: the target's disk filling up mid-transfer and a cancel in each phase of a
migration. After each, the same checks as the matrix (tests.support.faults.settled): the
container on exactly one host, running with its memory, nothing left half-made on either
host, an honest sentence; each adds a row to test-artifacts/fault-matrix.md.

(The worker, agent, link and database faults of every strategy are the matrix's cases;
Redis restarted mid-operation is in tests/operations/test_e2e_worker_lost.py.)
"""

from __future__ import annotations

import pytest

from tests.support.faults import (  # noqa: F401  (also imported from here by other lab tests)  # noqa: F401
    BIG_MIB,
    MEMORY,
    fresh_worker,
    hosts_with,
    leftovers,
    link,
    make,
    phase,
    settled,
    shell,
    start,
    wait_until,
)
from tests.support.lab import counter, on_host
from tests.support.stack import run_op

pytestmark = [pytest.mark.e2e, pytest.mark.lab]


@pytest.fixture
def cleanup(bob):
    names = []
    yield names
    for name in names:
        if bob.get(f"/api/v1/containers/{name}/").status_code == 200:
            run_op(bob, "DELETE", f"/api/v1/containers/{name}/")


def test_the_targets_disk_fills_mid_transfer(bob, lab, cleanup):
    name = make(bob, lab, "disk-full")
    cleanup.append(name)
    assert on_host(lab, "lab-b", "lxc-ls", "-1").stdout.split() == [], "lab-b must be empty for this test"
    small = on_host(lab, "lab-b", "mount", "-t", "tmpfs", "-o", "size=700m", "ctweb-small", "/var/lib/lxc")
    assert small.returncode == 0, small.stderr
    try:
        before = counter(lab, "lab-a", name)
        op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "stop-and-copy"})
        wait_until(bob, op_id, phase("transfer", "root filesystem", 1), "the rootfs transfer")
        shell(lab, "lab-b", "dd if=/dev/zero of=/var/lib/lxc/filler bs=1M 2>/dev/null; true")  # until it is full
        op = bob.wait_operation(op_id, timeout=180)
        assert op["status"] == "failure", op
        assert "disk is full" in op["error"], op["error"]
        assert sorted(op["result"]["bundle"]) == ["lab-a.tar.gz", "lab-b.tar.gz"]  # debug bundles from both
        assert on_host(lab, "lab-b", "ls", "/var/lib/lxc").stdout.split() == ["filler"]
    finally:
        on_host(lab, "lab-b", "rm", "-f", "/var/lib/lxc/filler")
        on_host(lab, "lab-b", "umount", "/var/lib/lxc")
    settled(
        bob,
        lab,
        name,
        op,
        strategy="stop-and-copy",
        fault="target disk full",
        when="transfer",
        before=before,
        test="test_the_targets_disk_fills_mid_transfer",
        expect_host="lab-a",
    )


# --- cancel in each phase ---------------------------------------------------------------


CANCEL_AT = [
    ("preflight", phase("preflight")),
    ("rootfs transfer", phase("transfer", "root filesystem", 20 << 20)),
    ("dump", phase("dump")),
    ("images transfer", phase("transfer", "memory images", 20 << 20)),
    ("restore", phase("restore")),
]


def test_a_migration_cancelled_in_each_phase(bob, lab, cleanup):
    name = make(bob, lab, "canceller", memory=True)
    cleanup.append(name)
    host = "lab-a"
    for when, seen in CANCEL_AT:
        target = "lab-b" if host == "lab-a" else "lab-a"
        before = counter(lab, host, name)
        op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": target, "strategy": "stop-and-copy"})
        wait_until(bob, op_id, seen, f"the {when}")
        r = bob.post(f"/api/v1/operations/{op_id}/cancel")
        assert r.status_code in (200, 202), r.text
        op = bob.wait_operation(op_id, timeout=300)
        if when == "restore":
            # It may already run on the target: then the cancel is too late and says so.
            expect = target if op["status"] == "success" else host
            if op["status"] == "success":
                assert "too late" in op["result"]["cancel"], op["result"]
        else:
            assert op["status"] == "cancelled", (when, op["status"], op["error"])
            assert op["error"].startswith("Cancelled at the operator's request."), op["error"]
            expect = host
        host = settled(
            bob,
            lab,
            name,
            op,
            strategy="stop-and-copy",
            fault="cancel",
            when=when,
            before=before,
            test="test_a_migration_cancelled_in_each_phase",
            expect_host=expect,
        )
