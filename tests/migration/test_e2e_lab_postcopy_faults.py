"""Post-copy faults during the page pull, on the real lab: the pages go through both
hosts' resumable page relays, so a broken link pauses the pull and it goes on when the
link is back; a dead lazy-pages daemon on the target puts the container back on the
source from its frozen state. After each: one host, running, memory pattern intact,
counter not restarted, nothing left over, the operation ended with an honest sentence.

The pull is slowed by a test-only throttle file the test writes into the migration's
root-only directory on the source (see _relay_throttle in the agent)."""

from __future__ import annotations

import json
import time

import pytest

from tests.migration.test_e2e_lab_faults import _link, bob, hosts_with, phase, shell, start, wait_until  # noqa: F401
from tests.support.lab import PATTERN, counter, create, pattern
from tests.support.stack import ROOT, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

THROTTLE = 32 * 1024  # bytes per relay send, 10 sends a second: about 320 KiB/s


@pytest.fixture
def patterned(bob, lab):  # noqa: F811
    names = []

    def make(name):
        ok(create(bob, name=name, host="lab-a", command=["sh", "-c", PATTERN]))
        wait_for(lambda: counter(lab, "lab-a", name) > 2, 30, "counting")
        names.append(name)
        return name

    yield make
    for name in names:
        if bob.get(f"/api/v1/containers/{name}/").status_code == 200:
            run_op(bob, "DELETE", f"/api/v1/containers/{name}/")


def _worker_log(bob) -> str:  # noqa: F811
    """The worker's log, kept in test-artifacts/ for a failed run."""
    procs = getattr(bob.stack, "procs", {})
    text = "\n".join(p.tail(400) for k, p in procs.items() if "worker" in k)
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / "postcopy-faults-worker.log").write_text(text)
    return "see test-artifacts/postcopy-faults-worker.log"


def _throttle(lab, op_id: int) -> None:
    d = f"/var/lib/ctweb/migrations/{op_id}"
    wait_for(lambda: shell(lab, "lab-a", f"test -d {d}").returncode == 0, 30, "the migration directory", interval=0.05)
    shell(lab, "lab-a", f"echo {THROTTLE} > {d}/TEST-ONLY-throttle")


def _clean(lab, name: str) -> None:
    """No migration directory, CRIU process or page relay left (lxc-checkpoint -r leaves the
    container's own monitor under that name, "[lxc monitor]": not a leftover)."""
    for host in ("lab-a", "lab-b"):
        left = shell(lab, host, "ls /var/lib/ctweb/migrations/ 2>/dev/null; true").stdout.split()
        assert left == [], (host, left)
        procs = shell(
            lab,
            host,
            "ps -eo comm,args | grep -E '^(criu|lxc-checkpoint) |pages-relay' | grep -v -e grep -e 'lxc monitor'; true",
        )
        assert procs.stdout.strip() == "", (host, procs.stdout)


def _intact(lab, host: str, name: str, before: int) -> None:
    wait_for(lambda: counter(lab, host, name) > before, 30, "it to keep counting")
    now = counter(lab, host, name)
    assert before <= now <= before + 200, (before, now)  # it went on, it did not start over
    start_sum, now_sum = pattern(lab, host, name)
    assert start_sum == now_sum  # the memory pattern is the one it drew before the move


@pytest.mark.parametrize(
    "host,seconds",
    [
        ("lab-b", 45),  # the headline case: the target's link, 45 s
        ("lab-a", 15),  # the source's link, just past the dead-link time (CTWEB_SSH_DEAD_AFTER=10 in the stack)
    ],
)
def test_post_copy_survives_a_link_down_during_the_pull(bob, lab, patterned, host, seconds):  # noqa: F811
    from lab import core

    name = patterned(f"pc-cut-{host[-1]}")
    before = counter(lab, "lab-a", name)
    op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
    _throttle(lab, op_id)
    wait_until(bob, op_id, phase("pages"), "the page pull", timeout=180)
    time.sleep(1)
    _link(core, host, up=False)
    try:
        time.sleep(seconds)
    finally:
        _link(core, host, up=True)
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "success", (op["error"], op.get("details"), _worker_log(bob))
    assert op["result"]["page_relay"]["rounds"] >= 2, op["result"]  # it re-attached after the cut
    row = bob.get(f"/api/v1/containers/{name}/").json()
    assert (row["host"], row["state"]) == ("lab-b", "RUNNING")
    assert hosts_with(lab, name) == ["lab-b"]
    _intact(lab, "lab-b", name, before)
    _clean(lab, name)


def test_post_copy_whose_lazy_pages_dies_resumes_on_the_source(bob, lab, patterned):  # noqa: F811
    name = patterned("pc-lp")
    before = counter(lab, "lab-a", name)
    op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
    _throttle(lab, op_id)
    wait_until(bob, op_id, phase("pages"), "the page pull", timeout=180)
    time.sleep(1)
    info = json.loads(shell(lab, "lab-b", f"cat /var/lib/ctweb/migrations/{op_id}/lazy-pages.json").stdout)
    assert shell(lab, "lab-b", f"kill -9 {int(info['pid'])}").returncode == 0
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "failure", (op, _worker_log(bob))
    assert "was resumed on lab-a" in op["error"], op["error"]
    row = bob.get(f"/api/v1/containers/{name}/").json()
    assert (row["host"], row["state"]) == ("lab-a", "RUNNING"), row
    assert hosts_with(lab, name) == ["lab-a"]
    _intact(lab, "lab-a", name, before)
    _clean(lab, name)


# What a local unprivileged user tries on each host during the pull: connect to any TCP
# port listening there (the old page server and tunnel entrance were loopback ports), to
# the relay's socket, and read the migration's files.
NOBODY = r"""
import glob, os, socket
found = []
for path in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(path).readlines()[1:]:
        f = line.split()
        if f[3] == "0A":
            port = int(f[1].rsplit(":", 1)[1], 16)
            if port == 22:
                continue  # sshd itself
            s = socket.socket(socket.AF_INET6 if path.endswith("6") else socket.AF_INET)
            try:
                s.connect(("::1" if path.endswith("6") else "127.0.0.1", port))
                found.append(f"connected to port {port}")
            except OSError:
                pass
for sock in ["/var/lib/ctweb/migrations/%(op)s/page-relay.sock"]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sock)
        found.append("connected to " + sock)
    except OSError:
        pass
for root, dirs, files in os.walk("/var/lib/ctweb/migrations"):
    for name in files:
        try:
            open(os.path.join(root, name), "rb").read(1)
            found.append("read " + os.path.join(root, name))
        except OSError:
            pass
print("FOUND", found)
"""


def test_a_local_user_cannot_reach_the_page_path_during_a_post_copy(bob, lab, patterned):  # noqa: F811
    name = patterned("pc-sec")
    op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
    _throttle(lab, op_id)
    wait_until(bob, op_id, phase("pages"), "the page pull", timeout=180)
    for host in ("lab-a", "lab-b"):
        script = NOBODY % {"op": op_id}
        out = shell(
            lab,
            host,
            f"cat > /tmp/nobody.py <<'EOF'\n{script}\nEOF\n"
            "chmod 644 /tmp/nobody.py; setpriv --reuid=65534 --regid=65534 --clear-groups python3 /tmp/nobody.py",
        )
        assert "FOUND []" in out.stdout, (host, out.stdout, out.stderr)
        assert shell(lab, host, f"test -S /var/lib/ctweb/migrations/{op_id}/page-relay.sock").returncode == 0, host
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "success", (op["error"], _worker_log(bob))


def test_post_copy_goes_on_after_the_worker_is_killed_during_the_pull(bob, lab, lab_stack, patterned):  # noqa: F811
    name = patterned("pc-wk")
    before = counter(lab, "lab-a", name)
    op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
    _throttle(lab, op_id)
    wait_until(bob, op_id, phase("pages"), "the page pull", timeout=180)
    time.sleep(1)
    lab_stack.procs["worker"].kill()  # the pump and its SSH channels die with it
    time.sleep(5)
    lab_stack.start_worker()
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "failure" and op["error"].startswith("Worker lost"), (op["error"], _worker_log(bob))
    assert "every page arrived" in op["error"], (op["error"], _worker_log(bob))
    row = bob.get(f"/api/v1/containers/{name}/").json()
    assert (row["host"], row["state"]) == ("lab-b", "RUNNING"), row
    assert hosts_with(lab, name) == ["lab-b"]
    _intact(lab, "lab-b", name, before)
    _clean(lab, name)
