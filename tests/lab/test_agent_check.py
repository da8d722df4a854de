"""The agent's `check` for real (issue 17 item 1): the static scan of a container's processes
finds the blockers CRIU then trips over, and the trial dump leaves the container running,
reports its freeze and leaves no tmpfs behind.  Needs root.  Containers use .70-.79."""

from __future__ import annotations

import os
import time

import pytest

from hosts.criu_errors import explain
from tests.support.criu import COUNTER, agent, create, ok, ssh, state

pytestmark = [pytest.mark.lab, pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]


def _daemon_from_host(lab, host, name, setsid: bool, fd3: bool):
    """What an admin leaves behind with lxc-attach: a background sleep, re-parented to the
    container's init, in the attaching session (no setsid) and holding the host's file (fd3)."""
    cmd = (
        f"nohup lxc-attach -n {name} -- {'/bin/setsid ' if setsid else ''}/bin/sh -c "
        "'/bin/sleep 1000 </dev/null >/dev/null 2>&1 &' "
        f"{'3</etc/hostname ' if fd3 else ''}</dev/null >/dev/null 2>&1 &"
    )
    ssh(lab, host, "sh", "-c", cmd)
    time.sleep(2)


def _no_trial_left(lab, host):
    mounts = ssh(lab, host, "cat", "/proc/self/mountinfo").stdout.decode()
    assert "/var/lib/ctweb/trial" not in mounts
    assert ssh(lab, host, "ls", "-A", "/var/lib/ctweb/trial", check=False).stdout.strip() == b""


@pytest.fixture
def box(lab, hosts):
    made = []

    def make(name, octet, command=COUNTER):
        create(lab, hosts[0], name, octet, command=["sh", "-c", command])
        made.append(name)
        return hosts[0], name

    yield make
    for name in made:
        agent(lab, hosts[0], "delete", {"name": name})


def test_a_plain_container_is_verified_by_a_trial_dump_and_keeps_running(lab, box):
    a, name = box("chk-clean", 70)
    scan = ok(lab, a, "check", {"name": name, "trial": False})
    assert (scan["status"], scan["reasons"], scan["trial"]) == ("unknown", [], None)
    assert scan["processes"] >= 2
    data = ok(lab, a, "check", {"name": name, "trial": True})
    assert data["status"] == "yes" and data["reasons"] == []
    t = data["trial"]
    assert t["ok"] is True and 0 < t["frozen_ms"] < t["freeze_cap_s"] * 1000 and t["total_ms"] > 0
    assert state(lab, a, name)["state"] == "RUNNING" and data["state"] == "RUNNING"
    _no_trial_left(lab, a)
    print(f"\ntrial dump of {name}: frozen {t['frozen_ms']} ms, total {t['total_ms']} ms")


def test_a_daemon_outside_the_session_is_found_by_the_scan_and_by_the_trial(lab, box):
    a, name = box("chk-session", 71)
    _daemon_from_host(lab, a, name, setsid=False, fd3=False)
    data = ok(lab, a, "check", {"name": name, "trial": True})
    assert data["status"] == "no"
    assert [(r["class"], r["comm"]) for r in data["reasons"]] == [("processes", "sleep")]
    assert data["trial"]["ok"] is False
    assert explain(data["trial"]["details"])["class"] == "processes"  # CRIU agrees with the scan
    assert state(lab, a, name)["state"] == "RUNNING"
    _no_trial_left(lab, a)


def test_a_file_held_from_the_host_is_found_with_its_path(lab, box):
    a, name = box("chk-hostfd", 72)
    _daemon_from_host(lab, a, name, setsid=True, fd3=True)
    data = ok(lab, a, "check", {"name": name, "trial": True})
    assert data["status"] == "no"
    files = [r for r in data["reasons"] if r["class"] == "files"]
    assert [(r["path"], r["fd"]) for r in files] == [("/etc/hostname", 3)]
    assert "processes" not in {r["class"] for r in data["reasons"]}  # setsid: its own session
    assert explain(data["trial"]["details"])["class"] == "files"
    assert state(lab, a, name)["state"] == "RUNNING"


def test_a_nested_namespace_is_found(lab, box):
    a, name = box("chk-nested", 73, "unshare -u sleep 1000 & " + COUNTER)
    time.sleep(1)
    data = ok(lab, a, "check", {"name": name, "trial": False})
    assert [(r["class"], r["ns"]) for r in data["reasons"]] == [("namespaces", "uts")]
    assert data["status"] == "no" and data["trial"] is None


def test_it_refuses_a_stopped_container_and_bad_parameters(lab, box):
    a, name = box("chk-stopped", 74)
    ok(lab, a, "stop", {"name": name})
    _, final = agent(lab, a, "check", {"name": name})
    assert final["type"] == "error" and "only a running container can be checked" in final["message"]
    for bad in ({"trial": "yes"}, {"freeze_cap_s": 0}, {"freeze_cap_s": True}):
        _, final = agent(lab, a, "check", {"name": name, **bad})
        assert final["type"] == "error", final


def test_a_bind_mount_from_the_host_is_found_though_the_trial_goes_through(lab, box):
    """LXC hands it to CRIU as an external mount, so it dumps here; another host cannot restore it
    (tests/containers/test_e2e_lab_explained.py: the migration that fails on lab-b)."""
    a, name = box("chk-bind", 75)
    ok(lab, a, "stop", {"name": name})
    ssh(lab, a, "mkdir", "-p", "/srv/chk-share")
    entry = "lxc.mount.entry = /srv/chk-share srv none bind,create=dir 0 0"
    ssh(lab, a, "sh", "-c", f"echo '{entry}' >> /var/lib/lxc/{name}/config")
    ok(lab, a, "start", {"name": name})
    data = ok(lab, a, "check", {"name": name, "trial": True})
    assert [(r["class"], r["source"], r["target"]) for r in data["reasons"]] == [("mounts", "/srv/chk-share", "srv")]
    assert data["trial"]["ok"] is True and data["status"] == "no"
