"""What every fault test on the lab shares: waiting for an operation's phase, breaking
things (the worker, a host's link, an agent, the lazy-pages daemon, the database) and the
checks that must hold afterwards (`settled`), which also write the fault matrix's rows.

Any lab test may record rows (`settled` does it): at the end of the session they are
written to test-artifacts/fault-matrix.md and .json (tests/conftest.py calls `write_report`),
grouped per strategy: tried / survived / lost. A row is a dict with at least
`strategy`, `fault`, `phase`, `test`, `lost`, `survived`; other files (a host crash during
the pull, say) add theirs with `record(...)`.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tests.support.lab import PATTERN, counter, create, on_host, pattern
from tests.support.stack import ROOT, Api, ok, run_op, wait_for

FINAL = ("success", "failure", "cancelled")
HOSTS = ("lab-a", "lab-b")
THROTTLE = 32 * 1024  # bytes per page-relay send, 10 sends a second: about 320 KiB/s
ROWS: list[dict] = []
# One test run: set by the first process (an xdist controller's workers inherit it), so a
# run's sessions find each other's rows.
RUN = os.environ.setdefault(
    "CTWEB_TEST_RUN", datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
)
# Sessions side by side (scripts/test.sh runs two at the end) are told apart by their lab instance.
SESSION = RUN + "-" + (os.environ.get("PYTEST_XDIST_WORKER") or "main" + os.environ.get("CTWEB_LAB_ID", ""))


# --- the operation and its phases ---------------------------------------------------------


def start(api, path: str, body: dict | None = None) -> int:
    r = api.post(path, json=body or {})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_until(api, op_id: int, seen, what: str, timeout: float = 120) -> dict:
    """Poll the operation until `seen(op)`; fail if it ends first (the fault came too late)."""

    def check():
        op = api.get(f"/api/v1/operations/{op_id}/").json()
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


def message(name: str, words: str):
    """A predicate: an event of this phase whose message contains `words`."""
    return lambda op: any(e["phase"] == name and words in (e.get("message") or "") for e in op["events"])


# --- the lab's hosts ----------------------------------------------------------------------


def shell(lab, host: str, script: str):
    """A shell line on a lab host (ssh joins its arguments into one line for the remote shell)."""
    return on_host(lab, host, "sh -c " + shlex.quote(script))


def hosts_with(lab, name: str) -> list[str]:
    return [h for h in HOSTS if name in on_host(lab, h, "lxc-ls", "-1").stdout.split()]


LEFT_PROCS = "ps -eo comm,args | grep -E '^(criu|lxc-checkpoint) |pages-relay|migrate-journal' | grep -v -e grep -e 'lxc monitor'; true"


def leftovers(lab, host: str, name: str) -> list[str]:
    """What a job may leave behind on a host: migration working directories, half-made
    snapshots, a restore's copy of a snapshot's images, a copy of the container that is not a container, CRIU / lxc-checkpoint /
    page-relay and change-journal processes (lxc-checkpoint -r leaves the container's own monitor under that
    name, "[lxc monitor]": not a leftover)."""
    script = (
        f"ls -d /var/lib/ctweb/migrations/* /var/lib/ctweb/snapshots/{name}/.tmp-* "
        f"/var/lib/ctweb/restore/{name} /var/lib/ctweb/restore/{name}.contents-* 2>/dev/null; true"
    )
    found = shell(lab, host, script).stdout.split()
    if name not in on_host(lab, host, "lxc-ls", "-1").stdout.split():
        found += shell(lab, host, f"ls -d /var/lib/lxc/{name} 2>/dev/null; true").stdout.split()
    found += [line.strip() for line in shell(lab, host, LEFT_PROCS).stdout.splitlines() if line.strip()]
    return found


def link(host: str, up: bool) -> None:
    """The dashboard's link to a lab host (its veth in the root namespace) up or down."""
    from lab import core

    eth = core._root_links(host)[0]
    subprocess.run(["ip", "link", "set", eth, "up" if up else "down"], check=True)


def cut(host: str, seconds: float) -> None:
    link(host, up=False)
    try:
        time.sleep(seconds)
    finally:
        link(host, up=True)


def throttle(lab, host: str, op_id: int) -> None:
    """Slow a post-copy's page pull (the test-only throttle file the source's relay reads)."""
    d = f"/var/lib/ctweb/migrations/{op_id}"
    wait_for(lambda: shell(lab, host, f"test -d {d}").returncode == 0, 30, "the migration directory", interval=0.05)
    shell(lab, host, f"echo {THROTTLE} > {d}/TEST-ONLY-throttle")


def unthrottle(lab, host: str, op_id: int) -> None:
    """The rest of the pull at full speed (the relay reads the file again every 0.5 s)."""
    shell(lab, host, f"rm -f /var/lib/ctweb/migrations/{op_id}/TEST-ONLY-throttle")


def arm_lock_killer(lab, host: str, name: str, subcommand: str, timeout: float = 45) -> subprocess.Popen:
    """Start watching, on the host itself, for the agent running `subcommand` for the
    container (the process that holds the container's lock; a detached page relay holds
    none), and SIGKILL it the moment it appears: the lock file is read every 10 ms (a lazy
    dump's or a `lxc-stop -k`'s agent lives for a second or less). Wait with `fired`."""
    lock = f"/var/lib/ctweb/locks/{name}.lock"
    script = (
        f"end=$(( $(date +%s) + {int(timeout)} )); while [ $(date +%s) -lt $end ]; do "
        f"set -- $(cat {lock} 2>/dev/null); "
        f'if [ "$2" = {shlex.quote(subcommand)} ] && kill -9 "$1" 2>/dev/null; then echo "$1 $2"; exit 0; fi; '
        "sleep 0.01; done; exit 1"
    )
    h = next(x for x in lab["hosts"] if x["name"] == host)
    argv = ["ssh", "-i", str(lab["key"]), "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={lab['known_hosts']}"]
    argv += ["-o", "StrictHostKeyChecking=yes", f"root@{h['address']}", "sh -c " + shlex.quote(script)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.what = f"an agent running {subcommand} for {name} on {host}"
    p.limit = timeout + 15
    return p


def fired(p: subprocess.Popen) -> str:
    try:
        out, err = p.communicate(timeout=p.limit)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError(f"no {p.what} appeared") from None
    assert p.returncode == 0, f"no {p.what} appeared ({err.strip()})"
    return out.strip()


def kill_lock_holder(lab, host: str, name: str, subcommand: str, timeout: float = 45) -> str:
    """SIGKILL the agent running `subcommand` for the container on a host now (or as soon
    as it starts). Returns 'pid subcommand'."""
    return fired(arm_lock_killer(lab, host, name, subcommand, timeout))


def kill_lazy_pages(lab, host: str, op_id: int) -> None:
    info = json.loads(shell(lab, host, f"cat /var/lib/ctweb/migrations/{op_id}/lazy-pages.json").stdout)
    assert shell(lab, host, f"kill -9 {int(info['pid'])}").returncode == 0


def lock_database(stack, seconds: float) -> str:
    """The database unavailable for writes: a separate process holds `BEGIN EXCLUSIVE` on
    the stack's SQLite file for `seconds` (every other writer waits on it, and gives up
    with "database is locked" after its busy timeout). Blocks until it is released."""
    if stack.env.get("DATABASE_URL", "").startswith("postgres"):
        raise NotImplementedError("the database fault is written for SQLite")
    path = stack.var / "ctweb.sqlite3"
    code = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
        "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2])); c.execute('ROLLBACK')\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        p.wait(seconds + 30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return str(path)


def fresh_worker(stack, pause: float = 0) -> None:
    stack.procs["worker"].kill()
    time.sleep(pause)
    stack.start_worker()


def worker_log(stack, name: str = "faults-worker.log") -> str:
    """The worker's log, kept in test-artifacts/ for a failed run."""
    text = "\n".join(p.tail(400) for k, p in getattr(stack, "procs", {}).items() if "worker" in k)
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / name).write_text(text)
    return f"see test-artifacts/{name}"


def hosts_online(stack) -> None:
    """Both lab hosts online (a cut may have marked one offline; the re-probe would bring it
    back by itself within its backoff, this asks at once so the next case need not wait)."""
    alice = Api(stack, stack.tokens["alice"])
    for h in HOSTS:
        if alice.get(f"/api/v1/hosts/{h}/").json().get("status") != "online":
            wait_for(
                lambda h=h: run_op(alice, "POST", f"/api/v1/hosts/{h}/probe")["status"] == "success",
                120,
                f"{h} to answer a probe",
                interval=2,
            )


# --- after the fault ----------------------------------------------------------------------


def intact(lab, host: str, name: str, before: int) -> None:
    """Its memory survived: the counter went on from where it was (not started over) and the
    memory pattern is the one it drew at its start."""
    now = counter(lab, host, name)
    assert now >= before, f"the counter started over ({before} before the fault, {now} now): its memory was lost"
    assert now <= before + 2000, (before, now)
    wait_for(lambda: counter(lab, host, name) > now, 30, f"{name} to go on counting on {host}")
    start_sum, now_sum = pattern(lab, host, name)
    assert start_sum == now_sum, "the memory pattern changed: its memory was lost"
    # And its network is plugged in: a dump that stops a container takes its veth out of the
    # bridge first (criu._unplug); tasks that run on here must have it back.
    veths = shell(lab, host, f"lxc-info -n {name} -H | sed -n 's/^Link:[[:space:]]*//p'").stdout.split()
    assert veths, f"{name} has no veth on {host}"
    for veth in veths:
        assert (
            shell(lab, host, f"if test -e /sys/class/net/{veth}/master; then echo in; else echo out; fi").stdout.strip()
            == "in"
        ), f"{name}'s {veth} on {host} is in no bridge: it runs with no network"


def honest(op: dict) -> None:
    """A terminal operation with a sentence a person can act on (no traceback, no repr)."""
    assert op["status"] in FINAL, op["status"]
    if op["status"] != "success":
        err = op["error"] or ""
        assert err.strip(), op
        for bad in ("Traceback", "Error(", "Exception(", "internal error"):
            assert bad not in err, err


def tidied(api, lab, name: str, timeout: float = 180) -> None:
    """Nothing orphaned on either host. What a cut left on a host it could not reach is
    removed by the next refresh once the host is back (a probe and a sync here)."""
    alice = Api(api.stack, api.stack.tokens["alice"])

    def clean():
        left = {h: leftovers(lab, h, name) for h in HOSTS}
        if not any(left.values()):
            return True
        for h in HOSTS:
            run_op(alice, "POST", f"/api/v1/hosts/{h}/probe")
            run_op(api, "POST", f"/api/v1/hosts/{h}/sync")
        clean.last = left
        return False

    clean.last = None
    try:
        wait_for(clean, timeout, "both hosts to be clean", interval=2)
    except TimeoutError:
        raise AssertionError(f"left on the hosts: {clean.last}") from None


def _stale_source_copy(api, lab, name: str, op: dict, where: list[str]) -> str | None:
    """A migration that moved the container while the link to its source was down at its very
    end leaves the source's copy, stopped, for the tidy (its clean-up got no answer; the
    operation says so). That host's name, only when all of this holds: two hosts list it, the
    operation succeeded and said so, the record names the other host, and the copy is stopped."""
    if len(where) != 2 or op["status"] != "success":
        return None
    if not any("source copy could not be removed" in (e.get("message") or "") for e in op.get("events") or []):
        print("no stale source copy: the operation did not say so")
        return None
    owner = api.get(f"/api/v1/containers/{name}/").json()["host"]
    other = next(h for h in where if h != owner)
    deadline = time.monotonic() + 30  # its link may be coming back just now: ask until it says
    while True:
        state = on_host(lab, other, "lxc-info", "-s", "-H", "-n", name)
        if state.stdout.strip() or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"the copy on {other} (the record names {owner}): {state.stdout.strip()!r} {state.stderr.strip()!r}")
    return other if state.stdout.strip() == "STOPPED" else None


def _tidy_until(api, done, what: str, timeout: float = 420) -> None:
    """Probe and sync both hosts (the tidy runs in a sync) until `done()`."""
    alice = Api(api.stack, api.stack.tokens["alice"])

    def check():
        if done():
            return True
        for h in HOSTS:
            run_op(alice, "POST", f"/api/v1/hosts/{h}/probe")
            run_op(api, "POST", f"/api/v1/hosts/{h}/sync")
        return False

    wait_for(check, timeout, what, interval=3)


def record(**row) -> dict:
    row.setdefault("lost", True)
    row.setdefault("survived", False)
    ROWS.append(row)
    return row


def settled(
    api,
    lab,
    name: str,
    op: dict,
    *,
    strategy: str,
    fault: str,
    when: str,
    before: int | None,
    test: str = "",
    expect_host: str | None = None,
    memory: bool = True,
) -> str:
    """The invariants after any fault; returns the host it runs on. Records the matrix row
    (lost until the container is shown on one host, running, with its memory).
    `before` is the container's counter just before the fault: it must not start over.
    A container left STOPPED with its saved state is resumable: the test starts it (the
    admin's action) and it must then run with its memory."""
    row = record(strategy=strategy, fault=fault, phase=when, test=test, status=op["status"], ended="?")
    row["sentence"] = (op.get("error") or "")[:300]
    assert op["status"] in FINAL, op["status"]
    where = hosts_with(lab, name)
    stale = _stale_source_copy(api, lab, name, op, where)
    if stale:  # removed by the tidy once its host answers: wait for that, then look again
        _tidy_until(api, lambda: len(hosts_with(lab, name)) == 1, f"the tidy to remove {name}'s copy on {stale}")
        where = hosts_with(lab, name)
    assert len(where) == 1, f"{name} is on {where}"  # never lost, never on two hosts
    host = where[0]
    if expect_host:
        assert host == expect_host, (host, op["error"])
    api_row = api.get(f"/api/v1/containers/{name}/").json()
    assert api_row["host"] == host, (api_row, op["error"])
    resumed = ""
    if api_row["state"] == "STOPPED" and api_row.get("has_saved_state"):
        started = run_op(api, "POST", f"/api/v1/containers/{name}/state", {"action": "start"})
        assert started["status"] == "success", started["error"]
        assert started["result"].get("restored"), started["result"]
        api_row = api.get(f"/api/v1/containers/{name}/").json()
        resumed = ", resumed by a start"
    assert api_row["state"] == "RUNNING", (api_row, op["error"])
    if memory and before is not None:
        intact(lab, host, name, before)
        row.update(ended=f"running on {host}{resumed}, memory intact, counter went on", lost=False)
    else:
        row.update(ended=f"running on {host}{resumed} (cold start: this strategy keeps no memory)", lost=False)
    honest(op)
    tidied(api, lab, name)
    row["survived"] = True
    return host


# --- the report ---------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def write_report() -> None:
    """test-artifacts/fault-matrix.md and .json: this run's rows, per strategy. Every
    session's rows are kept in test-artifacts/fault-matrix-runs/ too (the full matrix runs in
    chunks; scripts/fault_report.py --all puts them together). An xdist worker writes only
    its own session's file; the controller (rows of its own: none) merges the run's."""
    out = ROOT / "test-artifacts"
    runs = out / "fault-matrix-runs"
    if ROWS:
        runs.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git("rev-parse", "--short", "HEAD")
            + (" (with local changes)" if _git("status", "--porcelain") else ""),
            "selection": os.environ.get("CTWEB_FAULTS", "ci"),
        }
        (runs / f"{SESSION}.json").write_text(json.dumps({**meta, "rows": ROWS}, indent=1))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    parts = sorted(runs.glob(f"{RUN}-*.json")) if runs.is_dir() else []
    if not parts:
        return
    report = merge(parts)
    (out / "fault-matrix.json").write_text(json.dumps(report, indent=1))
    (out / "fault-matrix.md").write_text(render(report))


def merge(paths: list[Path]) -> dict:
    """Several sessions' reports as one; a later row of the same test replaces an earlier one."""
    rows: dict[str, dict] = {}
    dates, commits, selections = [], [], []
    for path in sorted(paths):
        part = json.loads(path.read_text())
        dates.append(part["date"])
        commits.append(part["commit"])
        selections.append(part["selection"])
        for i, row in enumerate(part["rows"]):
            rows[row.get("test") or f"{path}:{i}"] = row
    dates.sort()
    return {
        "date": dates[0] if len(set(dates)) == 1 else f"{dates[0]} to {dates[-1]}",
        "commit": ", ".join(dict.fromkeys(commits)),
        "selection": ", ".join(dict.fromkeys(selections)) + f" ({len(paths)} session(s))",
        "rows": list(rows.values()),
    }


def render(report: dict) -> str:
    rows = report["rows"]
    lines = [
        f"Ran on {report['date']}, commit {report['commit']}, selection: {report['selection']}.",
        "",
        "| strategy | tried | survived | lost |",
        "| --- | --- | --- | --- |",
    ]
    strategies = sorted({r["strategy"] for r in rows})
    for s in strategies:
        mine = [r for r in rows if r["strategy"] == s]
        lines.append(
            f"| {s} | {len(mine)} | {sum(1 for r in mine if r['survived'])} | {sum(1 for r in mine if r['lost'])} |"
        )
    total = len(rows)
    lines += [
        f"| **all** | {total} | {sum(1 for r in rows if r['survived'])} | {sum(1 for r in rows if r['lost'])} |",
        "",
        "A row that neither survived nor was lost ended with the container safe but a check "
        "failed (something left over, a dishonest sentence): see its test.",
        "",
        "| strategy | fault | phase | operation | container ended | lost | test |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lost = "**LOST**" if r["lost"] else ("no" if r["survived"] else "no (a check failed)")
        if r.get("known_bug"):
            lost += f" (known bug, xfail: {r['known_bug']})"
        lines.append(
            f"| {r['strategy']} | {r['fault']} | {r['phase']} | {r.get('status', '?')} | {r.get('ended', '?')} "
            f"| {lost} | `{r.get('test', '')}` |"
        )
    return "\n".join(lines) + "\n"


BIG_MIB = 300  # a file in the rootfs: its copy takes a few seconds


# About 400 MB of a shell variable: its dump, copy and restore take a few seconds each.
MEMORY = "m=$(yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | head -c 400000000); "  # not $v: PATTERN uses that


def make(bob, lab, name: str, host: str = "lab-a", memory: bool = False, big: bool = True) -> str:
    """A container that counts and holds a memory pattern (tests.containers.test_e2e_lab_containers.PATTERN)."""
    ok(create(bob, name=name, host=host, command=["sh", "-c", (MEMORY if memory else "") + PATTERN]))
    if big:
        r = on_host(
            lab, host, "dd", "if=/dev/urandom", f"of=/var/lib/lxc/{name}/rootfs/big", "bs=1M", f"count={BIG_MIB}"
        )
        assert r.returncode == 0, r.stderr
    wait_for(lambda: counter(lab, host, name) > 4, 60, f"{name} to count")
    return name
