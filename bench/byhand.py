"""Overhead against doing it by hand (issue 7, item 1).

Two identical busybox containers on the lab (a counter and 64 MiB of memory held by the
shell): one is snapshotted, restored and migrated through ctweb, the other with the same
steps typed as an operator would, over SSH from this machine (lxc-freeze, lxc-checkpoint,
cp, lxc-checkpoint -r; for a migration the rootfs copied while it runs, then
lxc-checkpoint -s, the images and rootfs copied through this machine with tar over the two
SSH connections -- the same path the worker uses -- then lxc-checkpoint -r). The runs
alternate, in the same session, and each figure is reported as a ratio ctweb / by hand.

Downtime: ctweb's own figures (the agent's freeze-to-thaw for a snapshot, stop-to-running
for a restore, the worker's freeze-to-running for a migration); by hand, the same interval
taken with `date +%s%N` on the host around the same commands (for a migration, on this
machine around the three steps). Total: the whole thing as its user waits for it: the API
request to the operation's end, against the SSH commands' wall time.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.stack import Api, Stack

MEMORY = "v=$(yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | head -c 67108864); "
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 1; done"
WORK = "/var/lib/ctweb/byhand"  # the by-hand images, on the same disk as ctweb's
# The LXC monitor a restore leaves behind keeps its caller's stdout and stderr (LAB-NOTES):
# by hand too, they must go elsewhere or the SSH session never ends.
QUIET = "</dev/null >/dev/null 2>&1"
# CRIU restores the freezer state it dumped: a snapshot taken frozen comes back FROZEN and
# lxc-unfreeze does not see it (LAB-NOTES). By hand, an operator writes the cgroup file.
THAW = "lxc-cgroup -n {n} freezer.state THAWED 2>/dev/null || lxc-cgroup -n {n} cgroup.freeze 0"


class Hosts:
    """SSH to the lab hosts with the dashboard's key and their pinned host keys."""

    def __init__(self, stack: Stack):
        rows = stack.python(
            "from hosts.models import Host\n"
            "for h in Host.objects.filter(name__startswith='lab-'):\n"
            "    print(h.name, h.address, h.key_type, h.key_data)"
        )
        self.dir = Path(tempfile.mkdtemp(prefix="ctweb-byhand-"))
        self.addr = {}
        known = []
        for line in (ln for ln in rows.strip().splitlines() if ln.startswith("lab-")):
            name, addr, ktype, kdata = line.split()
            self.addr[name] = addr
            known.append(f"{addr} {ktype} {kdata}")
        (self.dir / "known_hosts").write_text("\n".join(known) + "\n")
        self.key = str(stack.var / "ssh" / "id_ed25519")

    def argv(self, host: str, script: str) -> list[str]:
        return [
            "ssh",
            "-i",
            self.key,
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.dir / 'known_hosts'}",
            "-o",
            "StrictHostKeyChecking=yes",
            f"root@{self.addr[host]}",
            "sh -c " + shlex.quote("set -e; " + script),
        ]

    def run(self, host: str, script: str) -> str:
        p = subprocess.run(self.argv(host, script), capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"on {host}: {script}\n{p.stderr}")
        return p.stdout

    def pipe(self, src: str, send: str, dst: str, receive: str) -> None:
        """tar from one host to the other through this machine, as the worker relays it."""
        a = subprocess.Popen(self.argv(src, send), stdout=subprocess.PIPE)
        b = subprocess.run(self.argv(dst, receive), stdin=a.stdout, capture_output=True, timeout=600)
        a.stdout.close()
        if a.wait() != 0 or b.returncode != 0:
            raise RuntimeError(f"copy {src} -> {dst} failed: {b.stderr.decode()[-500:]}")


def copy_rate(h: Hosts, src: str, dst: str, mib: int) -> float:
    """Bytes per ms of a plain copy from one host to the other through this machine."""
    t0 = time.monotonic()
    h.pipe(src, f"head -c {mib << 20} /dev/zero", dst, "cat > /dev/null")
    return (mib << 20) / ((time.monotonic() - t0) * 1000)


def _ms_between(out: str) -> float:
    """The host's own timestamps (ns) printed by `date +%s%N` around the timed part."""
    t = [int(x) for x in out.split() if x.isdigit()]
    return (t[-1] - t[0]) / 1e6


def by_hand_snapshot(h: Hosts, host: str, name: str, snap: str) -> tuple[float, float]:
    d = f"{WORK}/{name}/{snap}"
    t0 = time.monotonic()
    out = h.run(
        host,
        f"rm -rf {d}; mkdir -p {d}; date +%s%N; lxc-freeze -n {name}; "
        f"lxc-checkpoint -n {name} -D {d}/images; cp -a /var/lib/lxc/{name}/rootfs {d}/rootfs; "
        f"lxc-unfreeze -n {name}; date +%s%N",
    )
    return _ms_between(out), (time.monotonic() - t0) * 1000


def by_hand_restore(h: Hosts, host: str, name: str, snap: str) -> tuple[float, float]:
    d = f"{WORK}/{name}/{snap}"
    root = f"/var/lib/lxc/{name}/rootfs"
    t0 = time.monotonic()
    out = h.run(
        host,
        f"date +%s%N; lxc-stop -n {name} -k; rm -rf {root}; cp -a {d}/rootfs {root}; "
        f"lxc-checkpoint -r -n {name} -D {d}/images {QUIET}; {THAW.format(n=name)}; date +%s%N",
    )
    return _ms_between(out), (time.monotonic() - t0) * 1000


def by_hand_migration(h: Hosts, src: str, dst: str, name: str) -> tuple[float, float]:
    d = f"{WORK}/{name}/move"
    t0 = time.monotonic()
    # While it runs: its directory (config and rootfs) to the target.
    h.pipe(src, f"tar -C /var/lib/lxc -cf - {name}", dst, "tar -C /var/lib/lxc -xpf -")
    down = time.monotonic()
    h.run(src, f"rm -rf {d}; mkdir -p {d}; lxc-checkpoint -s -n {name} -D {d}")
    # The images, and the rootfs again (tar sends it whole: it is small), in one stream.
    h.pipe(
        src, f"tar -cf - -C {WORK}/{name} move -C /var/lib/lxc/{name} rootfs", dst, f"tar -C /var/lib/lxc/{name} -xpf -"
    )
    h.run(dst, f"lxc-checkpoint -r -n {name} -D /var/lib/lxc/{name}/move {QUIET}")
    downtime = (time.monotonic() - down) * 1000
    h.run(src, f"lxc-destroy -n {name}; rm -rf {d}")
    h.run(dst, f"rm -rf /var/lib/lxc/{name}/move")
    return downtime, (time.monotonic() - t0) * 1000


def bench_by_hand(stack: Stack, repeat: int, op_ms) -> dict[str, list[float]]:
    api = Api(stack, stack.tokens["bob"])
    h = Hosts(stack)
    rows: dict[str, list[float]] = {}
    body = {"host": "lab-a", "template": "busybox", "command": ["sh", "-c", MEMORY + COUNTER]}
    for name in ("viactweb", "byhand"):
        op_ms(api, "POST", "/api/v1/containers/", {**body, "name": name})
    time.sleep(5)  # both hold their memory
    where = "lab-a"
    try:
        for i in range(repeat):
            snap = f"s{i}"
            # stateful snapshot
            wall, _, op = op_ms(api, "POST", "/api/v1/containers/viactweb/snapshots/", {"name": snap})
            rows.setdefault("snapshot downtime, ctweb", []).append(op["result"]["stats"]["frozen_ms"])
            rows.setdefault("snapshot total, ctweb", []).append(wall)
            down, total = by_hand_snapshot(h, where, "byhand", snap)
            rows.setdefault("snapshot downtime, by hand", []).append(down)
            rows.setdefault("snapshot total, by hand", []).append(total)
            # restore it
            wall, _, op = op_ms(api, "POST", f"/api/v1/containers/viactweb/snapshots/{snap}/restore")
            rows.setdefault("restore downtime, ctweb", []).append(op["result"]["stats"]["total_ms"])
            rows.setdefault("restore total, ctweb", []).append(wall)
            down, total = by_hand_restore(h, where, "byhand", snap)
            rows.setdefault("restore downtime, by hand", []).append(down)
            rows.setdefault("restore total, by hand", []).append(total)
            # Both drop their snapshot, so both move the same data (ctweb moves snapshots along).
            h.run(where, f"rm -rf {WORK}/byhand/{snap}")
            op_ms(api, "DELETE", f"/api/v1/containers/viactweb/snapshots/{snap}/")
            # stop-and-copy migration
            target = "lab-b" if where == "lab-a" else "lab-a"
            wall, _, op = op_ms(
                api, "POST", "/api/v1/containers/viactweb/migrate", {"target_host": target, "strategy": "stop-and-copy"}
            )
            rows.setdefault("stop-and-copy downtime, ctweb", []).append(op["result"]["downtime_ms"])
            rows.setdefault("stop-and-copy total, ctweb", []).append(wall)
            down, total = by_hand_migration(h, where, target, "byhand")
            rows.setdefault("stop-and-copy downtime, by hand", []).append(down)
            rows.setdefault("stop-and-copy total, by hand", []).append(total)
            where = target
    finally:
        if where != "lab-a":  # the by-hand one goes home so ctweb can delete it
            try:
                by_hand_migration(h, where, "lab-a", "byhand")
            except RuntimeError as e:
                print(f"could not move byhand back: {e}")
        for name in ("viactweb", "byhand"):
            try:
                op_ms(api, "DELETE", f"/api/v1/containers/{name}/")
            except Exception as e:  # report, keep cleaning
                print(f"could not delete {name}: {e}")
        for host in ("lab-a", "lab-b"):
            subprocess.run(h.argv(host, f"rm -rf {WORK}"), capture_output=True)
    return rows
