"""The fault matrix, on the real lab: things break in the middle of a migration or a
snapshot, and afterwards the container is on exactly one host, running (or stopped with
its state), nothing is left half-made on either host, and the operation has ended with
an honest message.

Faults: the Celery worker killed during the dump, the transfer and the restore (then
started again); the agent killed during a dump; the target's link cut mid-transfer; the
target's disk filling up mid-transfer; a cancel in each phase; the worker killed during
a stateful snapshot. (Redis restarted mid-operation is in test_e2e_api_fuzz's neighbour,
tests/operations/test_e2e_worker_lost.py.) Every test adds a row to test-artifacts/fault-matrix.md.
"""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest

from tests.support.lab import COUNTER, counter, create, on_host
from tests.support.stack import ROOT, Api, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

BIG_MIB = 300  # a file in the rootfs: its copy takes a few seconds
# About 400 MB of a shell variable: its dump, copy and restore take a few seconds each.
MEMORY = "v=$(yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | head -c 400000000); "
FINAL = ("success", "failure", "cancelled")
MATRIX: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    lines = [
        "# Fault matrix (tests/migration/test_e2e_lab_faults.py, this run)",
        "",
        "| fault | when | operation | container ended | lost |",
        "|---|---|---|---|---|",
    ]
    for row in MATRIX:
        lines.append(f"| {row['fault']} | {row['when']} | {row['status']} | {row['ended']} | {row['lost']} |")
    survived = sum(1 for r in MATRIX if not r["lost"])
    lines += ["", f"{len(MATRIX)} faults tried, {survived} survived, {len(MATRIX) - survived} containers lost."]
    (out / "fault-matrix.md").write_text("\n".join(lines) + "\n")
    (out / "fault-matrix.json").write_text(json.dumps(MATRIX, indent=1))


@pytest.fixture
def bob(lab_stack):
    return Api(lab_stack, lab_stack.tokens["bob"])


def make(bob, lab, name: str, host: str = "lab-a", memory: bool = False, big: bool = True) -> str:
    ok(create(bob, name=name, host=host, command=["sh", "-c", (MEMORY if memory else "") + COUNTER]))
    if big:
        r = on_host(
            lab, host, "dd", "if=/dev/urandom", f"of=/var/lib/lxc/{name}/rootfs/big", "bs=1M", f"count={BIG_MIB}"
        )
        assert r.returncode == 0, r.stderr
    wait_for(lambda: counter(lab, host, name) > 4, 60, f"{name} to count")
    return name


@pytest.fixture
def cleanup(bob):
    names = []
    yield names
    for name in names:
        if bob.get(f"/api/v1/containers/{name}/").status_code == 200:
            run_op(bob, "DELETE", f"/api/v1/containers/{name}/")


def start(bob, path: str, body: dict | None = None) -> int:
    r = bob.post(path, json=body or {})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_until(bob, op_id: int, seen, what: str, timeout: float = 120) -> dict:
    """Poll the operation until `seen(op)`; fail if it ends first (the fault came too late)."""

    def check():
        op = bob.get(f"/api/v1/operations/{op_id}/").json()
        if seen(op):
            return op
        assert op["status"] not in FINAL, f"it ended ({op['status']}: {op['error']}) before {what}"
        return None

    return wait_for(check, timeout, what, interval=0.05)


def phase(name: str, what: str | None = None, min_bytes: int = 1):
    """A predicate: the operation has reached this phase (for transfers: of this, with bytes moved)."""

    def seen(op):
        for e in op["events"]:
            if e["phase"] != name:
                continue
            if what is None or (e.get("what") == what and (e.get("bytes") or 0) >= min_bytes):
                return True
        return False

    return seen


def hosts_with(lab, name: str) -> list[str]:
    return [h for h in ("lab-a", "lab-b") if name in on_host(lab, h, "lxc-ls", "-1").stdout.split()]


def leftovers(lab, host: str, name: str) -> list[str]:
    """What a job may leave behind: migration working directories, half-made copies."""
    script = f"ls -d /var/lib/ctweb/migrations/* /var/lib/ctweb/snapshots/{name}/.tmp-* 2>/dev/null; true"
    found = shell(lab, host, script).stdout.split()
    if name not in on_host(lab, host, "lxc-ls", "-1").stdout.split():
        found += shell(lab, host, f"ls -d /var/lib/lxc/{name} 2>/dev/null; true").stdout.split()
    return found


def shell(lab, host: str, script: str):
    """A shell line on a lab host (ssh joins its arguments into one line for the remote shell)."""
    return on_host(lab, host, "sh -c " + shlex.quote(script))


def settled(bob, lab, name: str, op: dict, fault: str, when: str, before: int, expect_host: str | None = None) -> str:
    """The invariants after any fault; returns the host it is on. Records the matrix row.
    `before` is the container's counter just before the fault: it must not start over."""
    row = {"fault": fault, "when": when, "status": op["status"], "ended": "?", "lost": True}
    MATRIX.append(row)
    assert op["status"] in FINAL, op
    where = hosts_with(lab, name)
    assert len(where) == 1, f"{name} is on {where}"  # never lost, never on two hosts
    host = where[0]
    if expect_host:
        assert host == expect_host, (host, op["error"])
    api_row = bob.get(f"/api/v1/containers/{name}/").json()
    assert api_row["host"] == host, (api_row, op["error"])
    assert api_row["state"] == "RUNNING", (api_row, op["error"])
    now = counter(lab, host, name)
    assert now >= before, f"the counter started over ({before} before the fault, {now} now): its memory was lost"
    wait_for(lambda: counter(lab, host, name) > now, 15, f"{name} to go on counting on {host}")
    for h in ("lab-a", "lab-b"):
        assert leftovers(lab, h, name) == [], (h, op["error"])
    row.update(ended=f"running on {host}, counter went on", lost=False)
    return host


def fresh_worker(stack) -> None:
    stack.procs["worker"].kill()
    stack.start_worker()


# --- the worker dies -------------------------------------------------------------------


@pytest.mark.parametrize(
    "when,seen,memory",
    [
        ("transfer", phase("transfer", "root filesystem", 20 << 20), False),
        ("dump", phase("dump"), True),
        ("restore", phase("restore"), True),
    ],
)
def test_the_worker_dies_during_a_migration(bob, lab, lab_stack, cleanup, when, seen, memory):
    name = make(bob, lab, f"wk-{when}", memory=memory, big=not memory)
    cleanup.append(name)
    before = counter(lab, "lab-a", name)
    op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "stop-and-copy"})
    wait_until(bob, op_id, seen, f"the {when}")
    fresh_worker(lab_stack)
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "failure" and op["error"].startswith("Worker lost"), op["error"]
    assert any(e["phase"] == "recovery" for e in op["events"])
    host = settled(bob, lab, name, op, "worker killed", when, before)
    if when in ("transfer", "dump"):
        assert host == "lab-a" and "Rolled back" in op["error"], op["error"]
    else:  # the restore goes on without the worker: it is rolled forward, or back if it had not begun
        assert ("runs there now" in op["error"]) == (host == "lab-b"), op["error"]


def test_the_worker_dies_during_a_stateful_snapshot(bob, lab, lab_stack, cleanup):
    name = make(bob, lab, "wk-snap", memory=True, big=False)
    cleanup.append(name)
    before = counter(lab, "lab-a", name)
    op_id = start(bob, f"/api/v1/containers/{name}/snapshots/", {"name": "cut", "stateful": True})
    wait_until(bob, op_id, phase("dump"), "the dump")
    fresh_worker(lab_stack)
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "failure" and op["error"].startswith("Worker lost"), op["error"]
    settled(bob, lab, name, op, "worker killed", "snapshot dump", before, expect_host="lab-a")
    snaps = [s["name"] for s in bob.get(f"/api/v1/containers/{name}/snapshots/").json()]
    on_disk = on_host(lab, "lab-a", "test", "-f", f"/var/lib/ctweb/snapshots/{name}/cut/meta.json").returncode == 0
    # Whatever the host kept is what the dashboard shows: a finished snapshot is recorded.
    assert (snaps == ["cut"]) == on_disk, (snaps, on_disk, op["error"])
    if on_disk:
        assert "is recorded" in op["error"]


# --- the agent dies, the link breaks, the disk fills ------------------------------------


def test_the_agent_dies_during_a_dump(bob, lab, cleanup):
    name = make(bob, lab, "agent-crash", memory=True, big=False)
    cleanup.append(name)
    before = counter(lab, "lab-a", name)
    op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "stop-and-copy"})
    wait_until(bob, op_id, phase("dump"), "the dump")

    def agent_pid():
        out = on_host(lab, "lab-a", "cat", f"/var/lib/ctweb/locks/{name}.lock").stdout.split()
        return out[0] if len(out) == 2 and out[1] == "migrate-dump" else None

    pid = wait_for(agent_pid, 30, "the dump's agent to hold the lock", interval=0.05)
    assert on_host(lab, "lab-a", "kill", "-9", pid).returncode == 0
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "failure", op
    settled(bob, lab, name, op, "agent killed (SIGKILL)", "dump", before, expect_host="lab-a")
    assert "resumed on lab-a" in op["error"] or "stayed" in op["error"], op["error"]


def _link(lab_core, host: str, up: bool) -> None:
    eth = lab_core._root_links(host)[0]
    subprocess.run(["ip", "link", "set", eth, "up" if up else "down"], check=True)


def test_the_targets_link_is_cut_mid_transfer(bob, lab, cleanup):
    from lab import core

    name = make(bob, lab, "cut-link")
    cleanup.append(name)
    before = counter(lab, "lab-a", name)
    op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "stop-and-copy"})
    wait_until(bob, op_id, phase("transfer", "root filesystem", 20 << 20), "the rootfs transfer")
    _link(core, "lab-b", up=False)
    try:
        op = bob.wait_operation(op_id, timeout=180)
    finally:
        _link(core, "lab-b", up=True)
    assert op["status"] == "failure", op
    assert "could not be confirmed clean" in op["error"], op["error"]
    assert leftovers(lab, "lab-b", name), "the cut should have left a partial copy on lab-b"

    # Back online: the next refresh (a probe and a sync here) removes what the cut left there.
    def tidied():
        run_op(Api(bob.stack, bob.stack.tokens["alice"]), "POST", "/api/v1/hosts/lab-b/probe")
        run_op(bob, "POST", "/api/v1/hosts/lab-b/sync")
        return leftovers(lab, "lab-b", name) == []

    wait_for(tidied, 120, "lab-b to be tidied once it is back", interval=2)
    settled(bob, lab, name, op, "target link down", "rootfs transfer", before, expect_host="lab-a")


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
    settled(bob, lab, name, op, "target disk full", "rootfs transfer", before, expect_host="lab-a")


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
        host = settled(bob, lab, name, op, "cancel", when, before, expect_host=expect)
