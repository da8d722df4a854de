"""Property-based tests of the agent's `receive` (issue 12): random archives from a hostile
source host never change anything outside the receiving container's own directories, and a
refused archive leaves nothing half-placed.

The pytest test re-executes this file under `unshare -m --propagation private`: inside that
private mount namespace it mounts a tmpfs for the sandbox (the agent's LXC_PATH, CTWEB_PATH,
SNAPSHOTS_PATH, STATE_PATH and MIGRATIONS_PATH all point into it) and tmpfs over /etc/cron.d
and /root, where it lays out host-like decoys. Generated symlinks point at those decoys
(absolutely and relatively), so even a broken agent writes only to tmpfs copies that vanish
with the namespace. Every example: a random archive (directories, files, relative, absolute,
dangling and top-level symlinks, symlinks planted on the filesystem before the receive, hard
links inside and pointing outside, device nodes, fifos, setuid files, long and unicode names,
truncated streams, deltas with `deleted` lists), then a full lstat+content snapshot of
everything outside the allowed directories is compared with the one taken before. Needs root
(the mount namespace, mknod, chown), like the other root tests. CTWEB_RECEIVE_EXAMPLES sets
the number of examples (2,000 by default); CTWEB_AGENT_UNDER_TEST another agent (a package directory or a built .pyz).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.agent_loader import PACKAGE_DIR, load_agent

EXAMPLES = int(os.environ.get("CTWEB_RECEIVE_EXAMPLES", "2000"))


def test_random_archives_never_reach_outside_the_containers_directories():
    if os.geteuid() != 0:
        pytest.skip("needs root (a private mount namespace, mknod, chown)")
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare(1) and mount(8)")
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, __file__],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-12000:]
    ran = [line for line in proc.stdout.splitlines() if line.startswith("examples: ")]
    assert ran and int(ran[-1].split()[1]) >= EXAMPLES, proc.stdout


# --- inside the namespace ------------------------------------------------------------------

SANDBOX = "/tmp/ctweb-receive-props"
DECOY_DIRS = ["/etc/cron.d", "/root"]
NAME = "c1"
# The interpreter's own tree, kept visible (read-only) under a decoy directory mounted over.
KEEP = sorted(
    {
        "/".join(p.split("/")[:3])
        for p in (sys.base_prefix, sys.prefix, os.path.realpath(sys.executable))
        if any(p.startswith(d + "/") for d in DECOY_DIRS)
    }
)
MIG = 1


def _mount_tmpfs(path):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m,mode=0755", "tmpfs", path], check=True)


def _setup():
    here, parent = os.readlink("/proc/self/ns/mnt"), os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    if here == parent:
        raise SystemExit("refusing to run outside a private mount namespace")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    _mount_tmpfs(SANDBOX)
    hold = os.path.join(SANDBOX, ".hold")
    for d in DECOY_DIRS:
        if not os.path.isdir(d):
            raise SystemExit(f"{d} is missing: no decoy can be mounted over it")
        # Python itself may live there (pyenv in /root): that one directory stays, read-only.
        keep = [p for p in KEEP if p.startswith(d + "/")]
        for i, p in enumerate(keep):
            os.makedirs(f"{hold}/{i}")
            subprocess.run(["mount", "--bind", p, f"{hold}/{i}"], check=True)
        _mount_tmpfs(d)
        for i, p in enumerate(keep):
            os.makedirs(p)
            subprocess.run(["mount", "--bind", f"{hold}/{i}", p], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", p], check=True)
            subprocess.run(["umount", f"{hold}/{i}"], check=True)
            os.rmdir(f"{hold}/{i}")
    if os.path.isdir(hold):
        os.rmdir(hold)
    for d in DECOY_DIRS:
        Path(d, "decoy").write_text("host file\n")
        os.chmod(os.path.join(d, "decoy"), 0o600)
    Path("/root/.ssh").mkdir()
    Path("/root/.ssh/authorized_keys").write_text("ssh-ed25519 AAAA host\n")
    s = Path(SANDBOX)
    for d in ("lxc", "ctweb/snapshots", "ctweb/state", "ctweb/migrations", "host/etc/cron.d"):
        (s / d).mkdir(parents=True)
    other = s / "lxc/other"
    (other / "rootfs/etc").mkdir(parents=True)
    (other / "config").write_text(f"lxc.rootfs.path = dir:{other}/rootfs\n")
    (other / "rootfs/etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (other / "rootfs/etc/shadow").write_text("root:*:1::::::\n")
    (s / "ctweb/snapshots/other/s1/rootfs").mkdir(parents=True)
    (s / "ctweb/snapshots/other/s1/config").write_text("lxc.uts.name = other\n")
    (s / "ctweb/state/other/images").mkdir(parents=True)
    (s / "ctweb/state/other/images/pages-1.img").write_bytes(b"\x01" * 100)
    (s / "ctweb/migrations/7/images").mkdir(parents=True)
    (s / "ctweb/migrations/7/images/core-1.img").write_bytes(b"\x02" * 10)
    (s / "host/etc/cron.d/job").write_text("* * * * * root true\n")


ALLOWED = [
    f"{SANDBOX}/lxc/{NAME}",
    f"{SANDBOX}/ctweb/snapshots/{NAME}",
    f"{SANDBOX}/ctweb/state/{NAME}",
    f"{SANDBOX}/ctweb/migrations/{MIG}",
]


def _allowed(path):
    return any(path == a or path.startswith(a + "/") for a in ALLOWED)


def _entry(path, st):
    if stat.S_ISDIR(st.st_mode):
        names = [  # the allowed directories may come and go; everything else is listed
            n
            for n in os.listdir(path)
            if not (path == ALLOWED[3] and n == "receiving") and (_allowed(path) or not _allowed(os.path.join(path, n)))
        ]
        return ("d", st.st_mode, st.st_uid, st.st_gid, tuple(sorted(names)))
    rec = [st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_mtime_ns, st.st_rdev]
    if stat.S_ISLNK(st.st_mode):
        rec.append(os.readlink(path))
    elif stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            rec.append(hashlib.sha256(f.read()).hexdigest())
    return tuple(rec)


def _snapshot(only_allowed=False):
    """lstat + content of every path in the sandbox and the decoys (outside or inside the allowed dirs)."""
    out = {}
    for top in [SANDBOX, *DECOY_DIRS]:
        for base, dirs, files in os.walk(top):
            dirs[:] = [x for x in dirs if os.path.join(base, x) not in KEEP]
            for n in [base, *[os.path.join(base, x) for x in dirs + files]]:
                if n in out or _allowed(n) != only_allowed:
                    continue
                if only_allowed and n.endswith(f"/migrations/{MIG}/receiving"):
                    continue  # written before the first byte, on purpose
                out[n] = _entry(n, os.lstat(n))
    return out


def _reset(what, plants):
    for a in ALLOWED:
        if os.path.lexists(a):
            if os.path.isdir(a) and not os.path.islink(a):
                shutil.rmtree(a)
            else:
                os.unlink(a)
    os.makedirs(ALLOWED[3])  # made by migrate-check
    cdir = Path(ALLOWED[0])
    if what == "delta":
        (cdir / "rootfs/etc").mkdir(parents=True)
        (cdir / "config").write_text(f"lxc.rootfs.path = dir:{cdir}/rootfs\n")
        (cdir / "rootfs/victim").write_text("old\n")
        (cdir / "rootfs/etc/hosts").write_text("127.0.0.1 localhost\n")
    for where, target in plants:
        p = os.path.join(SANDBOX, where)
        if not os.path.isdir(os.path.dirname(p)):
            continue
        if os.path.lexists(p):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        os.symlink(target, p)


def _make_tar(members, delta):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, extra, mode, uid in members:
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = mode, uid, uid, 1_700_000_000
            data = None
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, extra
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, extra
            elif kind in ("chr", "blk"):
                info.type = tarfile.CHRTYPE if kind == "chr" else tarfile.BLKTYPE
                info.devmajor, info.devminor = 1, 3
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            else:
                data = extra
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        if delta is not None:
            data = json.dumps({"deleted": delta}).encode()
            info = tarfile.TarInfo(".ctweb-delta.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _setup()
    agent = load_agent(os.environ.get("CTWEB_AGENT_UNDER_TEST") or PACKAGE_DIR)
    agent.S.LXC_PATH = f"{SANDBOX}/lxc"
    agent.S.CTWEB_PATH = f"{SANDBOX}/ctweb"
    agent.S.SNAPSHOTS_PATH = f"{SANDBOX}/ctweb/snapshots"
    agent.S.STATE_PATH = f"{SANDBOX}/ctweb/state"
    agent.S.MIGRATIONS_PATH = f"{SANDBOX}/ctweb/migrations"
    agent.common.emit = lambda msg: None

    tops = {"rootfs": NAME, "delta": NAME, "snapshots": NAME, "state": NAME, "images": "images"}
    components = st.one_of(
        st.sampled_from(["rootfs", "etc", "cron.d", "x", "s1", "images", "sub", "ü-ñ-名前", "a" * 255, "bin"]),
        st.sampled_from(["config", "config.tmp", "é" * 128, "..", ".", ""]),  # half as often
    )
    link_targets = st.sampled_from(
        ["/etc/cron.d", "/root", "/root/.ssh/authorized_keys", f"{SANDBOX}/lxc/other", f"{SANDBOX}/host/etc/cron.d"]
        + ["../" * k + t for k in (1, 2, 3, 4, 6, 9) for t in ("etc/cron.d", "root", "lxc/other", "other")]
        + ["nowhere/dangling", ".", "..", "rootfs", "/"]
    )
    sane_components = st.sampled_from(["etc", "x", "bin", "sub", "ü-ñ-名前", "a" * 255])
    kinds = st.sampled_from(
        ["dir", "dir", "file", "file", "file", "symlink", "hardlink", "chr", "blk", "fifo", "setuid"]
    )

    @st.composite
    def archives(draw):
        what = draw(st.sampled_from(list(tops)))
        top = tops[what]
        names = []
        members = []
        hostile = draw(st.integers(0, 2)) > 0  # a third of the archives are what a sane source sends
        if draw(st.integers(0, 3)) > 0:  # most archives start as the source's agent would send them
            skeleton = {
                "rootfs": [(top, "dir"), (f"{top}/config", "file"), (f"{top}/rootfs", "dir")],
                "delta": [(f"{top}/config", "file"), (f"{top}/rootfs", "dir")],
                "snapshots": [(top, "dir"), (f"{top}/s1", "dir"), (f"{top}/s1/rootfs", "dir")],
                "state": [(top, "dir"), (f"{top}/images", "dir")],
                "images": [(top, "dir"), (f"{top}/pages-1.img", "file")],
            }[what]
            for name, kind in skeleton:
                members.append((name, kind, b"lxc.uts.name = c1\n" if kind == "file" else "", 0o755, 0))
                names.append(name)
        for _ in range(draw(st.integers(0, 9))):
            first = draw(st.sampled_from([top] * 12 + ["c2", "other", "..", "/etc", "images"])) if hostile else top
            rest = draw(st.lists(components if hostile else sane_components, min_size=0 if hostile else 1, max_size=4))
            if what in ("rootfs", "delta") and draw(st.integers(0, 3)) > 0:
                rest = ["rootfs", *rest]
            if what == "snapshots" and draw(st.integers(0, 3)) > 0:
                rest = ["s1", "rootfs", *rest]
            name = "/".join([first, *rest])
            kind = draw(kinds if hostile else st.sampled_from(["dir", "file", "hardlink"]))
            mode = draw(st.sampled_from([0o644, 0o755, 0o700, 0o600, 0o4755, 0o2755] if hostile else [0o644, 0o700]))
            if kind == "setuid":
                kind, mode = "file", 0o4755
            extra = b""
            if kind == "file":
                extra = draw(st.sampled_from([b"", b"* * * * * root /tmp/evil\n", b"x" * 3000]))
            elif kind == "symlink":
                extra = draw(link_targets)
            elif kind == "hardlink":
                extra = draw(
                    st.sampled_from(
                        [
                            *names,
                            "other/config",
                            "../other/config",
                            f"{SANDBOX}/lxc/other/config",
                            "/root/.ssh/authorized_keys",
                        ]
                        if names and hostile
                        else names or ["other/config", "/etc/cron.d/decoy"]
                    )
                )
            members.append((name, kind, extra, mode, draw(st.sampled_from([0, 1000, 65534]))))
            names.append(name)
        delta = None
        if what == "delta":
            delta = draw(
                st.lists(
                    st.sampled_from(
                        [
                            "victim",
                            "etc",
                            "sub/decoy",
                            "sub",
                            "../../other/config",
                            "/etc/cron.d/decoy",
                            "etc/hosts",
                            "x/../../other",
                        ]
                    ),
                    max_size=4,
                )
            )
        plants = (
            []
            if not hostile
            else draw(
                st.lists(
                    st.sampled_from(
                        [
                            (f"lxc/{NAME}", "/etc/cron.d"),
                            (f"lxc/{NAME}", f"{SANDBOX}/lxc/other"),
                            (f"lxc/{NAME}/rootfs", "/root"),
                            (f"lxc/{NAME}/rootfs/sub", "/etc/cron.d"),
                            (f"lxc/{NAME}/rootfs/etc", "../../other/rootfs/etc"),
                            (f"lxc/{NAME}/config.tmp", "/etc/cron.d/evil"),
                            (f"lxc/{NAME}/config", "/etc/cron.d/decoy"),
                            (f"ctweb/snapshots/{NAME}", "/root"),
                            (f"ctweb/state/{NAME}", "../snapshots/other"),
                            (f"ctweb/migrations/{MIG}/images", "/root"),
                            (f"ctweb/migrations/{MIG}/images", "../7/images"),
                        ]
                    ),
                    max_size=2,
                    unique=True,
                )
            )
        )
        tar = _make_tar(members, delta)
        if hostile and draw(st.integers(0, 5)) == 0:
            tar = tar[: draw(st.integers(0, len(tar)))]  # cut short
        return what, tar, plants

    seen = {"examples": 0, "ok": 0, "refused": 0}
    reasons: dict = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(archives())
    def check(example):
        what, tar, plants = example
        _reset(what, plants)
        outside, inside = _snapshot(), _snapshot(only_allowed=True)
        path = f"{SANDBOX}/host/stream.tar"
        with open(path, "wb") as f:
            f.write(tar)

        class Stdin:
            buffer = open(path, "rb")  # noqa: SIM115

        sys.stdin = Stdin
        try:
            agent.cmd_receive({"name": NAME, "migration": MIG, "what": what, "stall_s": 5})
            refused = None
        except agent.AgentError as e:
            refused = e
        finally:
            Stdin.buffer.close()
            os.unlink(path)
        seen["examples"] += 1
        seen["refused" if refused else "ok"] += 1
        why = re.sub(r"'[^']*'|\(.*\)|[0-9]+", "_", str(refused.message))[:70] if refused else "placed"
        reasons[why] = reasons.get(why, 0) + 1
        after = _snapshot()
        changed = sorted(p for p in set(outside) | set(after) if outside.get(p) != after.get(p))
        assert not changed, f"{what}: changed outside the container's directories: {changed[:8]} ({refused})"
        if refused is not None:
            now = _snapshot(only_allowed=True)
            half = sorted(p for p in set(inside) | set(now) if inside.get(p) != now.get(p))
            assert not half, f"{what}: refused ({refused}) but half-placed: {half[:8]}"

    check()
    for why, n in sorted(reasons.items(), key=lambda x: -x[1]):
        print(f"{n:6d}  {why}")
    print(f"examples: {seen['examples']} placed: {seen['ok']} refused: {seen['refused']}")


if __name__ == "__main__":
    main()
