"""The frozen pass from the change journal, for real on the lab (hosts/agent/ctweb_agent/journal.py):
a stateful snapshot of a running debian container whose rootfs was given many files uses the
journal (its stats say so, with the few paths it copied), and a restore from it gives back the
memory pattern and a file the container wrote just before the snapshot. Needs root.

Run:  python -m pytest tests/lab/test_snapshot_journal.py -p no:warnings -x -s
"""

from __future__ import annotations

import os

import pytest

from tests.support.criu import memcheck, memcheck_container, memcheck_tick, ok, read_file, ssh, wait_for

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

NAME = "jr-deb"
ROOTFS = f"/var/lib/lxc/{NAME}/rootfs"
SNAPS = f"/var/lib/ctweb/snapshots/{NAME}"
# 32 MiB of a pattern checked every second; it also appends its tick to /var/log/ticks with
# write() and rewrites /srv/state through a shared mapping it keeps (never closed).
MEMCHECK = memcheck(
    32,
    setup='fd = os.open("/srv/state", os.O_RDWR | os.O_CREAT, 0o644)\n'
    "os.ftruncate(fd, 4096)\n"
    "m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)\n",
    each='    m[:16] = f"{n:016d}".encode()\n',
)
MANY = 20000


@pytest.fixture(scope="module")
def deb(lab, hosts):
    with memcheck_container(lab, hosts[0], NAME, 96, MEMCHECK):
        yield hosts[0]


def test_a_stateful_snapshot_of_a_big_rootfs_uses_the_journal_and_restores_exactly(lab, deb):
    a = deb
    ssh(
        lab,
        a,
        "python3",
        "-c",
        f"import os\nfor i in range({MANY}):\n"
        f"    d = '{ROOTFS}/srv/many/%03d' % (i // 200)\n"
        "    os.makedirs(d, exist_ok=True)\n"
        "    open('%s/f%d' % (d, i), 'wb').write(b'x' * 512)\n",
    )
    first = ok(lab, a, "snapshot", {"name": NAME, "snapshot": "j0", "stateful": True})
    # What the container writes just before the next snapshot.
    ssh(lab, a, "lxc-attach", "-n", NAME, "--", "/bin/sh", "-c", "echo before-j1 > /srv/written")
    snap = ok(lab, a, "snapshot", {"name": NAME, "snapshot": "j1", "stateful": True})
    stats = snap["stats"]
    print(f"\nfrozen pass: j0 {first['stats'].get('frozen_pass')} j1 {stats}")
    assert stats["frozen_pass"] == "journal", stats
    assert 0 < stats["frozen_pass_paths"] < 500, stats
    assert snap["shared_with"] == "j0"
    assert read_file(lab, a, f"{SNAPS}/j1/rootfs/srv/written") == "before-j1"
    # The file it writes through a mapping it never lets go of holds the tick of the freeze
    # (it writes /tmp/memcheck first, then the mapping: the same tick, or one behind).
    held = int(read_file(lab, a, f"{SNAPS}/j1/rootfs/srv/state")[:16])
    at = int(read_file(lab, a, f"{SNAPS}/j1/rootfs/tmp/memcheck").split()[1])
    assert at - 1 <= held <= at, (held, at)

    ssh(lab, a, "lxc-attach", "-n", NAME, "--", "/bin/sh", "-c", "echo after-j1 > /srv/written")
    restored = ok(lab, a, "restore", {"name": NAME, "snapshot": "j1"})
    assert restored["state"] == "RUNNING"
    assert read_file(lab, a, f"{ROOTFS}/srv/written") == "before-j1"
    assert at <= memcheck_tick(lab, a, NAME) <= at + 3
    assert wait_for(lambda: memcheck_tick(lab, a, NAME) > at + 2, timeout=20)  # the pattern checks OK again
    assert read_file(lab, a, f"{ROOTFS}/tmp/memcheck").startswith("OK ")
