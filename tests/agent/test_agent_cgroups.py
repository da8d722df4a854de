"""The container's cgroup (hosts/agent cgroups.py): the one cgroup whose subtree holds all of a
container's processes and that LXC freezes, found from its init's /proc/<pid>/cgroup. The init
need not sit in it: with systemd on cgroup v2 the init is in `<payload>/init.scope` and the
services beside it, so the frozen pass's process list, the migration's held files and the
freeze instant all start from the container's cgroup, not the init's.

The pure tests read /proc/<pid>/cgroup texts as LXC 6 leaves them (v1 as on the lab, v2 and
hybrid as a systemd container has them); the root tests make real cgroups on this machine
(the v1 freezer hierarchy, and the cgroup2 one in a private mount namespace where the v1
freezer is unmounted, so the agent sees a v2-only host) with a process in a nested cgroup."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.agent_loader import PACKAGE_DIR, load_agent

FREEZER = Path("/sys/fs/cgroup/freezer")
UNIFIED = Path("/sys/fs/cgroup/unified")
ROOT = Path(__file__).resolve().parents[2]

# /proc/self/mountinfo of a lab host (cgroup v1) and of a v2-only host, abridged.
MOUNTS_V1 = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n"
    "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n"
)
MOUNTS_V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
MOUNTS_HYBRID = MOUNTS_V1 + "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"

# /proc/<init>/cgroup of container c1 as its host reads it.
LAB_V1 = (  # a busybox container on a lab host (seen on lab-b)
    "9:name=systemd:/lxc.payload.c1\n8:pids:/lxc.payload.c1\n6:freezer:/lxc.payload.c1\n"
    "4:memory:/lxc.payload.c1\n1:cpu:/lxc.payload.c1\n0::/\n"
)
SYSTEMD_V2 = "0::/lxc.payload.c1/init.scope\n"
SYSTEMD_HYBRID = (
    "12:freezer:/lxc.payload.c1\n4:memory:/lxc.payload.c1\n"
    "1:name=systemd:/lxc.payload.c1/init.scope\n0::/lxc.payload.c1/init.scope\n"
)


def _locate(agent, proc, mounts, name="c1"):
    return agent.cgroups.locate(proc, mounts, name, isdir=lambda p: True)


def test_the_containers_cgroup_is_its_payload_cgroup_on_v1_v2_and_hybrid_hosts():
    agent = load_agent()
    assert _locate(agent, LAB_V1, MOUNTS_V1) == (
        "/sys/fs/cgroup/freezer/lxc.payload.c1",
        "/sys/fs/cgroup/freezer/lxc.payload.c1/freezer.state",
    )
    # systemd's init.scope is climbed out of: the services' cgroups are its siblings
    assert _locate(agent, SYSTEMD_V2, MOUNTS_V2) == (
        "/sys/fs/cgroup/lxc.payload.c1",
        "/sys/fs/cgroup/lxc.payload.c1/cgroup.freeze",
    )
    # hybrid: LXC freezes through the v1 freezer where it is mounted
    assert _locate(agent, SYSTEMD_HYBRID, MOUNTS_HYBRID).dir == "/sys/fs/cgroup/freezer/lxc.payload.c1"
    # ... and the unified hierarchy where the freezer is not
    assert _locate(agent, SYSTEMD_HYBRID, MOUNTS_V2).dir == "/sys/fs/cgroup/lxc.payload.c1"


def test_only_this_containers_payload_is_taken():
    agent = load_agent()
    payload = agent.cgroups.payload
    assert payload("/lxc.payload.c1-1/init.scope", "c1") == "/lxc.payload.c1-1"  # LXC's name when c1's was taken
    assert payload("/lxc.payload.c1x/init.scope", "c1") is None
    assert payload("/lxc.payload.c1-x", "c1") is None
    assert payload("/lxc.monitor.c1", "c1") is None
    assert payload("/user.slice/lxc.payload.c1/system.slice/cron.service", "c1") == "/user.slice/lxc.payload.c1"
    assert payload("/lxc.payload.c1/lxc.payload.c1", "c1") == "/lxc.payload.c1/lxc.payload.c1"  # deepest
    assert payload("/lxc.payload.a.b", "a.b") == "/lxc.payload.a.b" and payload("/lxc.payload.aXb", "a.b") is None
    # a path that names no payload of it is no answer: never the init's own cgroup alone
    assert _locate(agent, "6:freezer:/ctweb-test/init.scope\n", MOUNTS_V1) is None
    assert _locate(agent, "", MOUNTS_V1) is None


def test_a_mount_rooted_below_the_hierarchys_root_is_mapped_and_others_are_not():
    agent = load_agent()
    mounts = "37 31 0:34 /lab /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n"
    assert _locate(agent, "6:freezer:/lab/lxc.payload.c1\n", mounts).dir == "/sys/fs/cgroup/freezer/lxc.payload.c1"
    assert _locate(agent, "6:freezer:/lab2/lxc.payload.c1\n", mounts) is None
    assert _locate(agent, "6:freezer:/lxc.payload.c1\n", MOUNTS_V2.replace("cgroup2 cgroup2", "tmpfs tmpfs")) is None


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _remove(top: Path):
    for _ in range(100):
        try:
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                d.rmdir()
            top.rmdir()
            return
        except OSError:
            time.sleep(0.05)


@pytest.fixture
def container(tmp_path):
    """A stand-in container c1 in real cgroups: `make(hierarchy)` puts its init in
    <payload>/init.scope and a service process, holding a file of its rootfs open for writing,
    in <payload>/system.slice/svc.service, as systemd does on cgroup v2."""
    made = []

    def make(hierarchy: Path):
        top = hierarchy / f"ctweb-test-{uuid.uuid4().hex[:8]}"
        payload = top / "lxc.payload.c1"
        (payload / "init.scope").mkdir(parents=True)
        (payload / "system.slice" / "svc.service").mkdir(parents=True)
        rootfs = tmp_path / "rootfs"
        (rootfs / "var").mkdir(parents=True, exist_ok=True)
        init = _sleeper()
        service = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time; f = open(sys.argv[1], 'w'); time.sleep(120)",
                str(rootfs / "var/db"),
            ]
        )
        made.append((top, init, service))
        (payload / "init.scope" / "cgroup.procs").write_text(str(init.pid))
        (payload / "system.slice" / "svc.service" / "cgroup.procs").write_text(str(service.pid))
        for _ in range(100):
            if (rootfs / "var/db").exists():
                break
            time.sleep(0.05)
        return payload, init, service, rootfs

    yield make
    for top, *procs in made:
        for p in procs:
            p.kill()
            p.wait()
        _remove(top)


@pytest.mark.skipif(os.geteuid() != 0 or not FREEZER.is_dir(), reason="needs root and a v1 freezer hierarchy")
def test_on_v1_a_process_in_a_nested_cgroup_is_the_containers_and_its_held_file_is_found(container, monkeypatch):
    payload, init, service, rootfs = container(FREEZER)
    agent = load_agent()
    monkeypatch.setattr(agent.cgroups, "_init_pid", lambda name: init.pid)
    monkeypatch.setattr(agent.migrate, "_state", lambda name: "RUNNING")
    assert agent.cgroups.container_cgroup("c1") == (str(payload), str(payload / "freezer.state"))
    assert agent.cgroups.container_pids("c1") == sorted([init.pid, service.pid])
    # what a migration's delta sends whole: the service's file, though the init holds nothing
    assert agent.migrate._held("c1", str(rootfs)) == {"var/db"}
    watch = agent.downtime.FreezeWatch("c1")
    assert watch.path == str(payload / "freezer.state")
    watch.stop()


V2_PROBE = """
import json, subprocess, sys, time
subprocess.run(["umount", "/sys/fs/cgroup/freezer"], check=True)  # this mount namespace only
sys.path.insert(0, sys.argv[1])
from tests.support.agent_loader import load_agent
agent = load_agent(sys.argv[2])
init = int(sys.argv[3])
agent.cgroups._init_pid = lambda name: init
cg = agent.cgroups.container_cgroup("c1")
watch = agent.downtime.FreezeWatch("c1")
time.sleep(0.1)
with open(sys.argv[4], "w") as f:  # what lxc-freeze does: the payload cgroup, not init.scope
    f.write("1")
time.sleep(0.2)
report = watch.report()
print(json.dumps({"cgroup": cg, "pids": agent.cgroups.container_pids("c1"), "watch": watch.path, "how": report["how"]}))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not (UNIFIED / "cgroup.procs").is_file() or not FREEZER.is_dir(),
    reason="needs root and a cgroup2 hierarchy at /sys/fs/cgroup/unified beside the v1 freezer",
)
def test_on_v2_the_freeze_of_the_payload_cgroup_is_seen_and_its_nested_processes_found(container):
    payload, init, service, _rootfs = container(UNIFIED)
    try:
        out = subprocess.run(
            ["unshare", "-m", "--propagation", "private", sys.executable, "-c", V2_PROBE]
            + [str(ROOT), str(PACKAGE_DIR), str(init.pid), str(payload / "cgroup.freeze")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        (payload / "cgroup.freeze").write_text("0")
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["cgroup"] == [str(payload), str(payload / "cgroup.freeze")]
    assert seen["pids"] == sorted([init.pid, service.pid])
    # the init's own init.scope/cgroup.freeze stays 0 while its parent is frozen: watch the payload's
    assert seen["watch"] == str(payload / "cgroup.freeze") and seen["how"] == "freezer"
