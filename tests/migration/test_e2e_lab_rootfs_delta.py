"""A migration's rootfs delta from the source's change journal (hosts/agent/ctweb_agent/mjournal.py),
for real on the lab: the container creates, appends to, writes in place, chmods, renames,
hard-links and deletes files, makes directories anew and writes through shared mappings it
keeps (of files it maps after the presync began too), every 20 ms, during the presync and up
to the freeze; the target's rootfs after the migration is the source's as it was frozen, entry
for entry (type, contents or link target, mode, owner, a file's time, its hard-link group),
for stop-and-copy and post-copy, and the result says the journal listed it.

The source's tree is read once its dump is done, under the container's lock on the source
(so the source's cleanup waits for it). The container stops changing anything once it sees a
gap of more than GAP_S in its own clock (it was frozen, and now runs on the target), so the
target's tree is still the one the migration brought when it is read."""

import json
import subprocess
import threading
import time

import pytest

from tests.support.lab import create, on_host, ssh_argv
from tests.support.stack import ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

NAME = "churn"
ROOTFS = f"/var/lib/lxc/{NAME}/rootfs"
GAP_S = 0.4

CHURN = r"""
import mmap, os, shutil, sys, time
r = "/srv/churn"
os.makedirs(r, exist_ok=True)
fd = os.open("/srv/mapped", os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 4096)
m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
# Files it maps later, one more every 25 rounds, and writes through (opened for writing and
# mapped: no fanotify event tells of that, nor of the writes; made before the presync began).
os.makedirs("/srv/late", exist_ok=True)
for i in range(40):
    if not os.path.exists(f"/srv/late/m{i}"):
        open(f"/srv/late/m{i}", "wb").write(b"\0" * 4096)
late = []
last = [time.time()]
prev = [[]]

# Before each change, with the paths it touches. A gap: it was frozen meanwhile, runs on the
# target now and changes nothing more; the change before this one may have been cut by the
# freeze (begun on the source, ended on the target), so its paths are written down.
def go(*paths):
    now = time.time()
    if now - last[0] > GAP:
        with open("/srv/spanned", "w") as f:
            f.write("\n".join(p.lstrip("/") for p in prev[0]))
        while True:
            time.sleep(3600)
    last[0] = now
    prev[0] = paths

n = 0
while True:
    n += 1
    k = n % 40
    go(f"{r}/f{k}"); open(f"{r}/f{k}", "ab").write(b"%d\n" % n)
    j = f"{r}/f{(k + 7) % 40}"
    if os.path.exists(j):
        go(j)
        with open(j, "r+b") as f:
            f.write(b"X")
    go(f"{r}/f{k}"); os.chmod(f"{r}/f{k}", 0o600 if n % 2 else 0o644)
    j = f"{r}/f{(k + 13) % 40}"
    if os.path.exists(j):
        go(j, f"{r}/r{n}"); os.rename(j, f"{r}/r{n}")
    if n % 7 == 0 and os.path.exists(f"{r}/f{k}"):
        go(f"{r}/f{k}", f"{r}/h{n}"); os.link(f"{r}/f{k}", f"{r}/h{n}")  # a second name, written through the first
    for e in os.listdir(r):
        if e[0] in "rh" and int(e[1:]) < n - 30:
            go(f"{r}/{e}"); os.unlink(f"{r}/{e}")
    if n % 10 == 0:
        d = f"{r}/d{n % 3}"
        go(d); shutil.rmtree(d, ignore_errors=True)
        go(d); os.makedirs(f"{d}/sub/deeper")
        go(d); open(f"{d}/sub/deeper/x", "w").write(str(n))
    go("/srv/mapped"); m[:16] = b"%015d\n" % n
    if n % 25 == 0 and len(late) < 40:
        go(f"/srv/late/m{len(late)}"); late.append(mmap.mmap(os.open(f"/srv/late/m{len(late)}", os.O_RDWR), 4096))
    for i, mm in enumerate(late):
        go(f"/srv/late/m{i}"); mm[:16] = b"%015d\n" % n
    go("/srv/round.tmp", "/srv/round"); open("/srv/round.tmp", "w").write(str(n)); os.replace("/srv/round.tmp", "/srv/round")
    time.sleep(0.02)
""".replace("GAP", str(GAP_S))

# Every entry of a tree: type, contents' SHA-256 or link target, mode, owner, a file's mtime
# and its other names (hard links). A file last written before argv[2] (the test's start: the
# template's files) is told by its size and mtime, not hashed, so that the source's reading, done
# under the container's lock, ends well within the 30 s the migration's cleanup of the source
# waits for that lock, even on a loaded machine (the source copy stays otherwise).
DIGEST = r"""
import hashlib, json, os, stat, sys
top, since = sys.argv[1], float(sys.argv[2])
out, names = {}, {}
for root, dirs, files in os.walk(top):
    for n in dirs + files:
        p = os.path.join(root, n)
        s = os.lstat(p)
        if stat.S_ISLNK(s.st_mode):
            body, t = "->" + os.readlink(p), None
        elif stat.S_ISREG(s.st_mode) and s.st_mtime < since:
            body, t = "size %d" % s.st_size, s.st_mtime_ns // 10**9
            names.setdefault(s.st_ino, []).append(os.path.relpath(p, top))
        elif stat.S_ISREG(s.st_mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            body, t = h.hexdigest(), s.st_mtime_ns // 10**9
            names.setdefault(s.st_ino, []).append(os.path.relpath(p, top))
        elif stat.S_ISDIR(s.st_mode):
            body, t = "dir", None
        else:
            body, t = "dev %d" % s.st_rdev, None
        out[os.path.relpath(p, top)] = [body, s.st_mode, s.st_uid, s.st_gid, t]
for group in names.values():
    for n in group:
        out[n].append(sorted(group))  # its hard-link group
print(json.dumps(out))
"""

# On the source: once a new migration's dump is written, take the container's lock (the dump's
# agent lets go of it when it is done; the source's cleanup then waits for us) and read the tree.
FROZEN = r"""
import fcntl, glob, os, sys, time
base = "/var/lib/ctweb/migrations/"
before = set(glob.glob(base + "*"))
print("ready", flush=True)
deadline = time.time() + 600
while time.time() < deadline:
    if [d for d in glob.glob(base + "*") if d not in before and os.path.exists(d + "/images/inventory.img")]:
        break
    time.sleep(0.02)
os.makedirs("/var/lib/ctweb/locks", exist_ok=True)
fd = os.open("/var/lib/ctweb/locks/NAME.lock", os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
sys.argv = ["digest", "ROOTFS", sys.argv[1]]
exec(DIGEST)
""".replace("NAME", NAME).replace("ROOTFS", ROOTFS)


def digest(lab, host: str, since: float) -> dict:
    r = on_host(lab, host, "python3", "-", ROOTFS, str(since), input=DIGEST, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def spanned(lab, host: str) -> list[str]:
    """The paths of the change the container saw cut by its freeze (rootfs-relative), if any."""
    out = on_host(lab, host, "cat", f"{ROOTFS}/srv/spanned").stdout
    return [line for line in out.splitlines() if line.strip()]


def rounds(lab, host: str) -> int:
    return int(on_host(lab, host, "cat", f"{ROOTFS}/srv/round").stdout.strip() or 0)


@pytest.mark.parametrize("strategy", ["stop-and-copy", "post-copy"])
def test_the_target_gets_the_frozen_tree_from_the_change_journal(bob, lab, strategy):
    since = time.time() - 5
    ok(create(bob, name=NAME, host="lab-a", template="debian", command=["python3", "-c", CHURN]))
    try:
        wait_for(lambda: rounds(lab, "lab-a") > 20, 30, "the container's changes")
        script = "DIGEST = " + repr(DIGEST) + "\n" + FROZEN
        watcher = subprocess.Popen(
            ssh_argv(lab, next(h for h in lab["hosts"] if h["name"] == "lab-a"), "python3", "-", str(since)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        watcher.stdin.write(script)
        watcher.stdin.close()
        got: dict = {}
        try:
            assert watcher.stdout.readline().strip() == "ready"
            reader = threading.Thread(target=lambda: got.update(out=(watcher.stdout.read(), watcher.stderr.read())))
            reader.start()
            started = rounds(lab, "lab-a")
            op = ok(
                run_op(
                    bob,
                    "POST",
                    f"/api/v1/containers/{NAME}/migrate",
                    {"target_host": "lab-b", "strategy": strategy},
                    timeout=300,
                )
            )
            reader.join(120)
        finally:
            if watcher.poll() is None:
                watcher.kill()
        out, err = got["out"]
        source = json.loads(out)
        delta = op["result"]["rootfs_delta"]
        # The source copy went (its cleanup waited for the reading above, under the lock).
        assert not [e["message"] for e in op["events"] if e.get("phase") == "cleanup" and "could not" in e["message"]]
        print(f"\n{strategy}: rootfs_delta {delta}")
        if delta["pass"] != "journal":
            # The freeze caught the container between opening a hard-linked file and closing it (or
            # mid-way through linking one): the journal cannot vouch for such a file, and the walk
            # is the answer then (journal.py, mjournal.py). Any other reason is a failure.
            assert delta["pass"] == "walk" and "names" in (delta.get("reason") or ""), delta
        assert rounds(lab, "lab-b") > started  # it went on changing its files after the presync began
        target = digest(lab, "lab-b", since)
        # A change the freeze cut in two (begun on the source, ended by the restored process on the
        # target) is the container's own doing, not the migration's: the container wrote its paths
        # down (srv/spanned); they, and their other hard-link names, are not compared.
        cut = spanned(lab, "lab-b")
        assert len(cut) <= 2, cut

        def cut_by_freeze(k: str) -> bool:
            names = {n for v in (source.get(k), target.get(k)) if isinstance(v, list) for n in v[-1] or []}
            return k == "srv/spanned" or any(k == c or k.startswith(c + "/") or c in names for c in cut)

        differ = sorted(
            k for k in source.keys() | target.keys() if source.get(k) != target.get(k) and not cut_by_freeze(k)
        )
        assert not differ, [(k, source.get(k), target.get(k)) for k in differ[:20]]
        # The source's journal process ended with the migration.
        assert on_host(lab, "lab-a", "pgrep", "-f", "migrate-journal").returncode == 1
    finally:
        # A source copy left behind (its cleanup failed) goes first: deleted from ctweb's records
        # alone, it would be found on lab-a again by the next listing and taken in as a container.
        on_host(lab, "lab-a", "lxc-destroy", "-f", "-n", NAME)
        run_op(bob, "DELETE", f"/api/v1/containers/{NAME}/")
