"""The fault matrix per strategy (issue 13, item 7), on the real lab: a table of cases,
each one strategy x fault x phase (x how long), run by one function.

Strategies: the migrations post-copy, stop-and-copy and restart; a stateful snapshot; the
restore of a stateful snapshot; a stateful stop; the start that resumes it.
Faults: the Celery worker SIGKILLed (then started again); the dashboard's link to the
source, or to a migration's target, down for 10 s, 45 s or 5 min; the target's lazy-pages
daemon killed (post-copy); the source's agent (the process holding the container's lock)
killed; the database unavailable for 20 s (another process holds `BEGIN EXCLUSIVE` on the
stack's SQLite file, so every write waits on it).
Phases: the operation's own event phases, stretched where needed (a 300 MiB file in the
rootfs for the copies, ~200 MB of memory for dumps and restores, the page relay's
test-only throttle for a post-copy's pull).

After each case: `tests.support.faults.settled` (on exactly one host, running or resumed
by a start, memory pattern intact and counter not restarted, nothing left on either host,
an honest sentence) plus the case's own expectations. Every case writes a row of
test-artifacts/fault-matrix.md.

Selection: plain `pytest` (CI) runs the cases marked `ci`: one per fault kind per strategy,
the link cuts 15 s (just past the stack's CTWEB_SSH_DEAD_AFTER=10). `make faults`
(CTWEB_FAULTS=all) runs the whole table; `-k` picks chunks of it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest

from tests.support import faults as F
from tests.support.lab import PATTERN, counter, create, on_host
from tests.support.stack import Api, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

MIGRATIONS = ("post-copy", "stop-and-copy", "restart")
BIG_MIB = 300  # a file in the rootfs: its copy takes a few seconds
MEMORY_MB = 200  # memory a dump or a restore has to carry: a second or two each
CUTS = (10, 45, 300)  # the full matrix's link cuts; CI cuts for 15 s
CI_CUT = 15

# Each strategy's phases (the event a case waits for) and what stretches each one.
PHASES = {
    "post-copy": {
        "transfer": (F.phase("transfer", "root filesystem", 20 << 20), "big"),
        "dump": (F.phase("dump"), None),
        "restore": (F.phase("restore"), None),
        "pages": (F.phase("pages"), "throttle"),
    },
    "stop-and-copy": {
        "transfer": (F.phase("transfer", "root filesystem", 20 << 20), "big"),
        "dump": (F.phase("dump"), "memory"),
        "restore": (F.phase("restore"), "memory"),
    },
    "restart": {
        "transfer": (F.phase("transfer", "root filesystem", 20 << 20), "big"),
        "stop": (F.phase("stop"), None),
        "restore": (F.phase("restore"), None),
    },
    "snapshot": {
        "copy": (F.phase("copy"), "big"),
        "dump": (F.phase("dump"), "memory"),
    },
    "restore": {
        "copy": (F.message("copy", "rolling the rootfs"), "big"),
        "restore": (F.phase("restore"), "memory"),
    },
    "stop": {"dump": (F.phase("dump"), "memory")},
    "start": {"restore": (F.phase("restore"), "memory")},
}
# Where the source's agent holds the container's lock (the agent-kill cases): its subcommand.
AGENT_PHASES = {
    "post-copy": {"dump": "migrate-dump"},
    "stop-and-copy": {"dump": "migrate-dump"},
    "restart": {"stop": "stop"},
    "snapshot": {"copy": "snapshot", "dump": "snapshot"},
    "restore": {"copy": "restore", "restore": "restore"},
    "stop": {"dump": "stop"},
    "start": {"restore": "start"},
}
# Phases too short to see through the API before the agent is gone: its killer is armed on
# the host before the operation starts (it fires when that subcommand takes the lock).
# A restore's rootfs copy now carries only what changed (snapshots share files) and a start
# watches its init by event: both are over before a killer started after their phase event is
# in place, so theirs is armed early too and fires when the agent takes the lock.
# So is a post-copy's migrate-dump since the lazy dump runs on its own (the agent answers once it
# has started it): `make faults` on f0c6927 saw no such agent left to kill after the dump event.
ARM_EARLY = {("restart", "stop"), ("restore", "copy"), ("start", "restore"), ("post-copy", "dump")}
# One representative per fault kind per strategy, run in CI.
CI = {
    "post-copy": {
        "worker": "pages",
        "link-source": "pages",
        "link-target": "pages",
        "agent": "dump",
        "database": "pages",
    },
    "stop-and-copy": {
        "worker": "transfer",
        "link-source": "transfer",
        "link-target": "transfer",
        "agent": "dump",
        "database": "transfer",
    },
    "restart": {
        "worker": "transfer",
        "link-source": "transfer",
        "link-target": "transfer",
        "agent": "stop",
        "database": "transfer",
    },
    "snapshot": {"worker": "dump", "link-source": "copy", "agent": "dump", "database": "copy"},
    "restore": {"worker": "copy", "link-source": "copy", "agent": "copy", "database": "copy"},
    "stop": {"worker": "dump", "link-source": "dump", "agent": "dump", "database": "dump"},
    "start": {"worker": "restore", "link-source": "restore", "agent": "restore", "database": "restore"},
}
# Known product bugs: case id -> reason (strict: an unexpected pass fails the run).
XFAIL: dict[str, str] = {}


@dataclass(frozen=True)
class Case:
    strategy: str
    fault: str  # worker | link-source | link-target | lazy-pages | agent | database
    phase: str
    seconds: int = 0
    ci: bool = False

    @property
    def id(self) -> str:
        return f"{self.strategy}-{self.fault}{f'-{self.seconds}s' if self.seconds else ''}-{self.phase}"


def cases() -> list[Case]:
    out = []
    for strategy, phases in PHASES.items():
        ci = CI[strategy]
        kinds = ["worker", "link-source", "database"] + (["link-target"] if strategy in MIGRATIONS else [])
        for when in phases:
            for kind in kinds:
                if kind.startswith("link"):
                    for s in CUTS:
                        out.append(Case(strategy, kind, when, s))
                    if ci.get(kind) == when:
                        out.append(Case(strategy, kind, when, CI_CUT, ci=True))
                else:
                    out.append(Case(strategy, kind, when, 20 if kind == "database" else 0, ci=ci.get(kind) == when))
        for when in AGENT_PHASES[strategy]:
            out.append(Case(strategy, "agent", when, ci=ci.get("agent") == when))
    out.append(Case("post-copy", "lazy-pages", "pages", ci=True))
    return out


def _params():
    full = os.environ.get("CTWEB_FAULTS") == "all"
    for c in cases():
        marks = [pytest.mark.faults_ci] if c.ci else [pytest.mark.faults_full]
        if c.id in XFAIL:
            marks.append(pytest.mark.xfail(reason=XFAIL[c.id], strict=True))
        if c.ci or full:
            yield pytest.param(c, id=c.id, marks=marks)


def _name(case: Case) -> str:
    short = {"post-copy": "pc", "stop-and-copy": "sc", "restart": "rs", "snapshot": "sn", "restore": "rt"}
    kind = {
        "worker": "wk",
        "link-source": "ls",
        "link-target": "lt",
        "lazy-pages": "lp",
        "agent": "ag",
        "database": "db",
    }
    return f"fm-{short.get(case.strategy, case.strategy)}-{kind[case.fault]}{case.seconds or ''}-{case.phase}"


def _make(bob, lab, name: str, stretch: str | None) -> None:
    memory = f"m=$(yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | head -c {MEMORY_MB}000000); " if stretch == "memory" else ""
    ok(create(bob, name=name, host="lab-a", command=["sh", "-c", memory + PATTERN]))
    if stretch == "big":
        big = f"/var/lib/lxc/{name}/rootfs/big"
        r = on_host(lab, "lab-a", "dd", "if=/dev/urandom", f"of={big}", "bs=1M", f"count={BIG_MIB}")
        assert r.returncode == 0, r.stderr
    wait_for(lambda: counter(lab, "lab-a", name) > 2, 90, f"{name} to count")


def _begin(bob, lab, case: Case, name: str, stretch: str | None) -> tuple[int, int]:
    """Start the case's operation (after what it needs first); returns (operation, counter
    before: the value its memory must not fall below afterwards)."""
    c = f"/api/v1/containers/{name}"
    if case.strategy in MIGRATIONS:
        before = counter(lab, "lab-a", name)
        op_id = F.start(bob, f"{c}/migrate", {"target_host": "lab-b", "strategy": case.strategy})
        if stretch == "throttle":
            F.throttle(lab, "lab-a", op_id)
        return op_id, before
    if case.strategy == "snapshot":
        before = counter(lab, "lab-a", name)
        return F.start(bob, f"{c}/snapshots/", {"name": "cut", "stateful": True}), before
    if case.strategy == "restore":
        before = counter(lab, "lab-a", name)  # the snapshot's memory is from now on
        ok(run_op(bob, "POST", f"{c}/snapshots/", {"name": "base", "stateful": True}, timeout=300))
        if stretch == "big":  # the restore has to copy it back
            on_host(lab, "lab-a", "rm", "-f", f"/var/lib/lxc/{name}/rootfs/big")
        return F.start(bob, f"{c}/snapshots/base/restore"), before
    if case.strategy == "stop":
        before = counter(lab, "lab-a", name)
        return F.start(bob, f"{c}/state", {"action": "stop", "stateful": True}), before
    if case.strategy == "start":
        before = counter(lab, "lab-a", name)
        ok(run_op(bob, "POST", f"{c}/state", {"action": "stop", "stateful": True}, timeout=300))
        return F.start(bob, f"{c}/state", {"action": "start"}), before
    raise AssertionError(case.strategy)


def _inject(case: Case, bob, lab, stack, name: str, op_id: int, armed=None) -> None:
    if case.fault == "worker":
        F.fresh_worker(stack, pause=3)
    elif case.fault == "link-source":
        F.cut("lab-a", case.seconds)
    elif case.fault == "link-target":
        F.cut("lab-b", case.seconds)
    elif case.fault == "lazy-pages":
        F.kill_lazy_pages(lab, "lab-b", op_id)
    elif case.fault == "agent" and armed is not None:
        F.fired(armed)
    elif case.fault == "agent":
        F.kill_lock_holder(lab, "lab-a", name, AGENT_PHASES[case.strategy][case.phase])
    elif case.fault == "database":
        F.lock_database(stack, case.seconds)
    else:
        raise AssertionError(case.fault)


def _finish(bob, op_id: int, timeout: float) -> dict:
    """Wait for the end; an operation that waits for a person gets the first action it offers
    (taken by an admin through the API, as a person would)."""
    alice = Api(bob.stack, bob.stack.tokens["alice"])
    decided = False
    deadline = time.monotonic() + timeout
    beat = 0.0
    while time.monotonic() < deadline:
        op = bob.get(f"/api/v1/operations/{op_id}/").json()
        if op["status"] in F.FINAL:
            return op
        if op["status"] == "waiting" and time.monotonic() - beat > 10:
            # The stack runs its worker without --beat: send the scheduled retry of waiting
            # operations as beat does in production (every 10 s, ctweb/settings.py).
            bob.stack.python("from operations.tasks import retry_waiting_operations as t; t.delay()")
            beat = time.monotonic()
        decision = (op.get("result") or {}).get("decision")
        if op["status"] == "waiting" and decision and not decided:
            action = decision["actions"][0]["id"]
            r = alice.post(f"/api/v1/operations/{op_id}/decide", json={"action": action})
            assert r.status_code == 202, r.text
            decided = True
        time.sleep(0.5)
    raise TimeoutError(f"operation {op_id} did not end within {timeout}s")


def _expect(case: Case, op: dict, host: str, lab, bob, name: str) -> None:
    """What each kind of case promises beyond the invariants (from the earlier fault tests)."""
    err = op["error"] or ""
    if case.fault == "worker":
        assert op["status"] == "failure" and err.startswith("Worker lost"), err
        assert any(e["phase"] == "recovery" for e in op["events"])
        if case.strategy == "stop-and-copy" and case.phase in ("transfer", "dump"):
            assert host == "lab-a" and "Rolled back" in err, err
        if case.strategy == "stop-and-copy" and case.phase == "restore":
            assert ("runs there now" in err) == (host == "lab-b"), err
        if case.strategy == "post-copy" and case.phase == "pages":
            assert "every page arrived" in err and host == "lab-b", err
    if case.fault == "lazy-pages":
        assert op["status"] == "failure" and "was resumed on lab-a" in err and host == "lab-a", err
    if case.fault == "agent" and case.strategy == "stop-and-copy":
        assert op["status"] == "failure" and host == "lab-a", err
        assert "resumed on lab-a" in err or "stayed" in err, err
    if case.fault.startswith("link") and case.strategy == "post-copy" and case.phase == "pages":
        # A cut during the pull only pauses it: it goes on and ends on the target.
        assert op["status"] == "success" and host == "lab-b", err
        assert op["result"]["page_relay"]["rounds"] >= 2, op["result"]  # it re-attached
    if case.strategy == "snapshot":
        snaps = [s["name"] for s in bob.get(f"/api/v1/containers/{name}/snapshots/").json()]
        meta = f"/var/lib/ctweb/snapshots/{name}/cut/meta.json"
        on_disk = on_host(lab, host, "test", "-f", meta).returncode == 0
        assert (snaps == ["cut"]) == on_disk, (snaps, on_disk, err)  # what the host kept is what it shows


@pytest.fixture(autouse=True)
def _report_as_we_go():
    yield
    F.write_report()  # a session stopped halfway still leaves the rows it got


@pytest.fixture
def made(bob):
    names = []
    yield names
    F.hosts_online(bob.stack)
    for name in names:
        # A case that failed may leave its operation running: wait for it before the delete.
        def deleted(name=name):
            if bob.get(f"/api/v1/containers/{name}/").status_code == 404:
                return True
            r = bob("DELETE", f"/api/v1/containers/{name}/")
            if r.status_code == 202:
                bob.wait_operation(r.json()["id"], timeout=300)
            return False

        wait_for(deleted, 300, f"{name} to be deleted", interval=5)


@pytest.mark.parametrize("case", list(_params()))
def test_fault(case: Case, bob, lab, lab_stack, made, request):
    F.hosts_online(lab_stack)
    seen, stretch = PHASES[case.strategy][case.phase]
    name = _name(case)
    made.append(name)
    _make(bob, lab, name, stretch)
    armed = None
    if case.fault == "agent" and (case.strategy, case.phase) in ARM_EARLY:
        armed = F.arm_lock_killer(lab, "lab-a", name, AGENT_PHASES[case.strategy][case.phase], timeout=300)
    op_id, before = _begin(bob, lab, case, name, stretch)
    if armed is None:  # an armed killer's firing is the phase's evidence (its agent took the lock)
        F.wait_until(bob, op_id, seen, f"the {case.phase} of {case.strategy}", timeout=300)
    if case.phase == "pages":
        time.sleep(1)  # well inside the pull
    _inject(case, bob, lab, lab_stack, name, op_id, armed)
    if stretch == "throttle":
        F.unthrottle(lab, "lab-a", op_id)  # the fault has hit the pull: the rest at full speed
    op = _finish(bob, op_id, timeout=max(600, case.seconds * 3))
    # A restart that stopped its source starts it cold: it keeps its rootfs, not its memory.
    memory = not (case.strategy == "restart" and any(e["phase"] == "stop" for e in op["events"]))
    try:
        host = F.settled(
            bob,
            lab,
            name,
            op,
            strategy=case.strategy,
            fault=case.fault + (f" {case.seconds} s" if case.seconds else ""),
            when=case.phase,
            before=before,
            test=request.node.nodeid.split("::")[-1],
            memory=memory,
        )
        _expect(case, op, host, lab, bob, name)
    except BaseException:
        if F.ROWS and F.ROWS[-1].get("test") == request.node.nodeid.split("::")[-1]:
            F.ROWS[-1]["survived"] = False  # a case's own expectation failed
            if case.id in XFAIL:
                F.ROWS[-1]["known_bug"] = XFAIL[case.id]
        print(F.worker_log(lab_stack, f"fault-{case.id}-worker.log"), op.get("error"), op.get("events", [])[-8:])
        raise
