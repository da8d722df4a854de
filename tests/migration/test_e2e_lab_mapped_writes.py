"""A stop-and-copy migration carries what the container wrote through a shared mapping after
the rootfs was first sent, even when the file's modification time did not move (a page already
dirty takes more writes without a fault): the container appends a tick every 50 ms through a
mapping it keeps, and on the target every tick up to the migration is in the file."""

import pytest

from tests.support.lab import create, on_host
from tests.support.stack import ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

# Tick n goes to bytes [16 n, 16 n + 16) of /srv/ticks, through a shared mapping it keeps;
# /tmp/tick (write()) says the last one.
TICKS = r"""
import mmap, os, time
fd = os.open("/srv/ticks", os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 1 << 16)
m = mmap.mmap(fd, 1 << 16, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
n = 0
while True:
    n += 1
    m[16 * n : 16 * n + 16] = b"%015d\n" % n
    with open("/tmp/tick.tmp", "w") as f:
        f.write(str(n))
    os.replace("/tmp/tick.tmp", "/tmp/tick")
    time.sleep(0.05)
"""
ROOTFS = "/var/lib/lxc/mapped/rootfs"


def ticks(lab, host) -> tuple[int, list[int]]:
    """(the last tick it says, the ticks in the file)."""
    last = on_host(lab, host, "cat", f"{ROOTFS}/tmp/tick").stdout.strip()
    data = on_host(lab, host, "cat", f"{ROOTFS}/srv/ticks").stdout
    found = [
        int(data[16 * k : 16 * k + 15]) for k in range(1, len(data) // 16) if data[16 * k : 16 * k + 15].strip("\0")
    ]
    return int(last or 0), found


def test_writes_through_a_mapping_reach_the_target_of_a_stop_and_copy(bob, lab):
    ok(create(bob, name="mapped", host="lab-a", template="debian", command=["python3", "-c", TICKS]))
    try:
        wait_for(lambda: ticks(lab, "lab-a")[0] > 3, 30, "ticks")
        op = ok(
            run_op(
                bob, "POST", "/api/v1/containers/mapped/migrate", {"target_host": "lab-b", "strategy": "stop-and-copy"}
            )
        )
        assert op["result"]["strategy"] == "stop-and-copy"
        last, found = ticks(lab, "lab-b")
        assert found == list(range(1, len(found) + 1)), found  # no tick lost on the way
        assert len(found) >= last - 1, (last, found)
    finally:
        run_op(bob, "DELETE", "/api/v1/containers/mapped/")
