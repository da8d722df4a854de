"""Snapshots on a btrfs host, for real on the lab (hosts/agent/ctweb_agent/cow.py): lab-b's
/var/lib/lxc and /var/lib/ctweb are one btrfs filesystem (a loop image, lab/core.py) when the lab
comes up with CTWEB_LAB_BTRFS=lab-b. A debian container's rootfs is a subvolume; ten stateful
snapshots are read-only btrfs snapshots taken while frozen, and take (measured by the
filesystem itself, statvfs after a sync) at most 2 x the disk of one snapshot's rootfs plus
images; no write (the container rewriting files in place, a restore and the writes after it, a
snapshot's deletion) changes a snapshot (sha256 of every snapshot tree); a restore gives the
memory pattern back; deleting the snapshots and the container leaves no subvolume. Needs root.

Run:  CTWEB_LAB_BTRFS=lab-b python -m pytest tests/lab/test_snapshot_btrfs.py -p no:warnings -x -s
"""

from __future__ import annotations

import os
import subprocess

import pytest

from lab import core
from tests.support.criu import (
    REWRITE,
    attach,
    memcheck_container,
    memcheck_tick,
    ok,
    read_file,
    ssh,
    tree_sums,
    wait_for,
)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

NAME = "cow-deb"
SNAPS = f"/var/lib/ctweb/snapshots/{NAME}"
ROOTFS = f"/var/lib/lxc/{NAME}/rootfs"
MiB = 1 << 20


def sums(lab, host, snaps) -> dict:
    return tree_sums(lab, host, SNAPS, snaps)


def machine_fs() -> str:
    """lab-b's btrfs as the machine sees it (mounted there by lab/core.py)."""
    return str(core.hosts_dir() / "lab-b" / "btrfs")


def used_bytes() -> int:
    """What the filesystem itself says it uses, after committing what is pending."""
    subprocess.run(["sync", "-f", machine_fs()], check=True)
    st = os.statvfs(machine_fs())
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def subvolumes() -> list[str]:
    out = subprocess.run(["btrfs", "subvolume", "list", machine_fs()], capture_output=True, text=True, check=True)
    return [line.split(" path ", 1)[1] for line in out.stdout.splitlines() if " path " in line]


def inode(lab, host, path) -> int:
    return int(ssh(lab, host, "stat", "-c", "%i", path).stdout.decode())


@pytest.fixture(scope="module")
def b(lab, hosts):
    b = hosts[1]
    fs = ssh(lab, b, "stat", "-f", "-c", "%T", "/var/lib/lxc").stdout.decode().strip()
    if fs != "btrfs":
        pytest.skip(f"lab-b's /var/lib/lxc is on {fs}: bring the lab up with CTWEB_LAB_BTRFS=lab-b")
    return b


def test_ten_btrfs_snapshots_take_little_disk_and_no_write_reaches_any(lab, b):
    caps = ok(lab, b, "probe", {})["snapshot_storage"]
    assert caps["filesystem"] == "btrfs" and caps["native_cow_used"] is True, caps
    assert subvolumes() == []
    with memcheck_container(lab, b, NAME, 95):
        assert inode(lab, b, ROOTFS) == 256  # the rootfs is a subvolume
        base = used_bytes()
        taken, used = [], []
        for i in range(10):
            taken.append(ok(lab, b, "snapshot", {"name": NAME, "snapshot": f"s{i}", "stateful": True}))
            used.append(used_bytes() - base)
        for s in taken:
            assert s["rootfs_storage"] == "btrfs snapshot" and s["shared_with"] is None, s
            assert s["images_compression"] == "zstd"
        assert inode(lab, b, f"{SNAPS}/s0/rootfs") == 256
        one = taken[0]["size_bytes"]  # rootfs + images of one snapshot, whole
        rootfs_bytes = int(ssh(lab, b, "du", "-s", "-B1", ROOTFS).stdout.decode().split()[0])
        print(
            f"\nbtrfs, idle debian ({rootfs_bytes / MiB:.0f} MiB rootfs, 32 MiB pattern): one snapshot whole "
            f"{one / MiB:.1f} MiB (images {taken[0]['images_bytes'] / MiB:.1f} MiB zstd); filesystem used after "
            f"the 1st {used[0] / MiB:.1f} MiB, after the 10th {used[9] / MiB:.1f} MiB "
            f"(10th alone {(used[9] - used[8]) / MiB:.1f} MiB; {used[9] / one:.2f} x one); agent's added_bytes "
            f"1st {taken[0]['added_bytes'] / MiB:.2f} MiB, 10th {taken[9]['added_bytes'] / MiB:.2f} MiB; "
            f"frozen {[s['stats']['frozen_ms'] for s in taken]} ms; load {os.getloadavg()}"
        )
        assert one >= rootfs_bytes * 0.9  # each snapshot is whole on its own
        assert used[9] <= 2 * one
        assert taken[9]["added_bytes"] < taken[9]["images_bytes"] + 8 * MiB  # no rootfs copy counted

        names = [f"s{i}" for i in range(10)]
        before = sums(lab, b, names)
        # A read-only snapshot refuses a write, even from root on the host.
        assert ssh(lab, b, "touch", f"{SNAPS}/s0/rootfs/etc/x", check=False).returncode != 0
        attach(lab, b, NAME, REWRITE)  # the container rewrites shared files in place
        ok(lab, b, "snapshot", {"name": NAME, "snapshot": "s10", "stateful": True})
        assert sums(lab, b, names) == before
        names.append("s10")
        before = sums(lab, b, names)

        at = int(read_file(lab, b, f"{SNAPS}/s3/rootfs/tmp/memcheck").split()[1])
        restored = ok(lab, b, "restore", {"name": NAME, "snapshot": "s3"})
        assert restored["state"] == "RUNNING"
        assert at <= memcheck_tick(lab, b, NAME) <= at + 3  # the memory pattern is back, checked OK
        assert wait_for(lambda: memcheck_tick(lab, b, NAME) > at + 2, timeout=20)
        assert read_file(lab, b, f"{ROOTFS}/etc/debian_version")[:4] != "XXXX"  # rolled back
        attach(lab, b, NAME, REWRITE)  # writes after the restore, to files the rootfs got from s3
        assert sums(lab, b, names) == before

        ok(lab, b, "delete-snapshot", {"name": NAME, "snapshot": "s5"})
        names.remove("s5")
        assert sums(lab, b, names) == {s: before[s] for s in names}
        assert len(subvolumes()) == 1 + len(names)  # the rootfs and each snapshot's
    assert ssh(lab, b, "test", "-e", f"/var/lib/lxc/{NAME}", check=False).returncode == 1
    assert ssh(lab, b, "test", "-e", SNAPS, check=False).returncode == 1
    assert subvolumes() == []  # nothing left behind
