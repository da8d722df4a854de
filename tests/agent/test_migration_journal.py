"""A migration's rootfs delta from its change journal (hosts/agent/ctweb_agent/mjournal.py), on a
real directory with the real fanotify and a real detached journal process (the agent's zipapp):
whatever the container does during the presync and up to the freeze (create, write in place,
write through a mapping it keeps, delete, rename, chmod, hard links, directories swapped),
the target's rootfs after the delta is the source's, entry for entry; the journal process ends
with its migration (cleanup, abort, its directory gone) and by its lifetime bound. Needs root
(a fanotify filesystem mark)."""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hosts import agent as shipping
from tests.support.agent import receive
from tests.support.agent_loader import load_agent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a fanotify filesystem mark needs root")

PARAMS = {"name": "c1", "migration": 1}


def tree_sums(top, links=True) -> dict:
    """Every entry: type and contents (SHA-256, link target), mode, owner, a file's mtime, and
    for a file with several names the other names (its hard-link group)."""
    top = str(top)
    out, inodes = {}, {}
    for root, dirs, files in os.walk(top):
        for n in dirs + files:
            p = os.path.join(root, n)
            s = os.lstat(p)
            rel = os.path.relpath(p, top)
            if os.path.islink(p):
                body, mtime = "->" + os.readlink(p), None
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    body = hashlib.sha256(f.read()).hexdigest()
                mtime = s.st_mtime_ns // 10**9
                inodes.setdefault(s.st_ino, []).append(rel)
            else:
                body, mtime = "dir", None  # a directory's time moves with the deletions made in it
            out[rel] = [body, s.st_mode, s.st_uid, s.st_gid, mtime]
    for names in inodes.values():
        for n in names if links else ():
            out[n].append(sorted(names))
    return out


@pytest.fixture
def pyz(tmp_path_factory):
    d = tmp_path_factory.mktemp("pyz")
    path = d / shipping.agent_file_name()
    path.write_bytes(shipping.agent_source()[0])
    return str(path)


@pytest.fixture
def hosts(tmp_path, pyz, monkeypatch):
    """(source agent, target agent, the source's rootfs): the journal process runs from the zipapp."""
    src = load_agent(root=tmp_path / "a")
    dst = load_agent(root=tmp_path / "b")
    monkeypatch.setattr(src.mjournal, "agent_file", lambda: pyz)
    rootfs = tmp_path / "a" / "lxc" / "c1" / "rootfs"
    rootfs.mkdir(parents=True)
    (rootfs.parent / "config").write_text(f"lxc.rootfs.path = dir:{rootfs}\n")
    os.makedirs(src.S.MIGRATIONS_PATH + "/1")
    frozen = {"state": "STOPPED", "pids": None}
    monkeypatch.setattr(src.mjournal, "_state", lambda name: frozen["state"])
    monkeypatch.setattr(src.mjournal, "container_pids", lambda name: frozen["pids"])
    # What the presync finds held open for writing or mapped shared (migrate._held).
    monkeypatch.setattr(src.migrate, "_state", lambda name: "RUNNING" if frozen.get("running") else "STOPPED")
    monkeypatch.setattr(src.migrate, "container_pids", lambda name: frozen.get("running"))
    yield src, dst, rootfs, frozen
    src.mjournal.end(src.S.MIGRATIONS_PATH + "/1")


def presync(src, dst, monkeypatch, during=None, journal=True):
    """The rootfs sent as `send` does (the journal started first); `during`: what the container
    does while the tree is walked."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path, arcname in src._send_sources("c1", {**PARAMS, "journal": journal}, "rootfs"):
            if during:
                during()
            src._tar_tree(tar, path, arcname)
    receive(dst, monkeypatch, buf.getvalue())


def delta(src, dst, monkeypatch):
    """The delta as `send` makes it once the container is down; (what the target said, the list)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        src._add_delta(tar, "c1", PARAMS)
    out = receive(dst, monkeypatch, buf.getvalue(), what="delta")
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        listed = json.load(tar.extractfile(src.DELTA_MEMBER))
    return out, listed


def target_rootfs(dst):
    return Path(dst.S.LXC_PATH) / "c1" / "rootfs"


def make_tree(r):
    r = str(r)
    for d in ("etc", "var/log", "var/cache/apt", "usr/share/doc/pkg/sub", "data", "old/deep/er"):
        os.makedirs(os.path.join(r, d))
    for i in range(10):
        with open(os.path.join(r, "etc", f"f{i}"), "wb") as f:
            f.write(os.urandom(8 << 10))
    for rel in (
        "usr/share/doc/pkg/a",
        "usr/share/doc/pkg/sub/b",
        "var/cache/apt/c",
        "var/log/app.log",
        "old/deep/er/x",
    ):
        with open(os.path.join(r, rel), "wb") as f:
            f.write(os.urandom(4096))
    for rel in ("data/held", "data/held-fd", "data/mapped"):
        with open(os.path.join(r, rel), "wb") as f:
            f.write(b"\0" * mmap.PAGESIZE * 2)
    os.symlink("etc/f0", os.path.join(r, "link"))
    os.link(os.path.join(r, "etc/f9"), os.path.join(r, "etc/f9.twin"))


def changes(r):
    """Create, write in place, delete, rename, chmod, links, a directory made anew."""
    r = str(r)
    with open(os.path.join(r, "var/log/app.log"), "ab") as f:
        f.write(b"more\n")
    st_ = os.stat(os.path.join(r, "etc/f3"))
    with open(os.path.join(r, "etc/f3"), "r+b") as f:  # in place, same size and time
        f.write(b"changed!")
    os.utime(os.path.join(r, "etc/f3"), ns=(st_.st_atime_ns, st_.st_mtime_ns))
    os.chmod(os.path.join(r, "etc/f1"), 0o600)
    os.chown(os.path.join(r, "etc/f2"), 1234, 1234)
    os.link(os.path.join(r, "etc/f7"), os.path.join(r, "etc/f7.link"))
    with open(os.path.join(r, "etc/f9"), "r+b") as f:  # through one name of two
        f.write(b"twin")
    os.makedirs(os.path.join(r, "new/dir"))
    for n in ("x", "y"):
        with open(os.path.join(r, "new/dir", n), "wb") as f:
            f.write(n.encode() * 100)
    os.rename(os.path.join(r, "usr/share/doc/pkg"), os.path.join(r, "usr/share/doc/pkg2"))
    with open(os.path.join(r, "usr/share/doc/pkg2/sub/b"), "ab") as f:
        f.write(b"+")
    os.rename(os.path.join(r, "etc/f5"), os.path.join(r, "etc/f5.renamed"))
    os.unlink(os.path.join(r, "etc/f4"))
    shutil.rmtree(os.path.join(r, "var/cache/apt"))
    shutil.rmtree(os.path.join(r, "old"))  # a directory made anew under the same name
    os.makedirs(os.path.join(r, "old/other"))
    os.unlink(os.path.join(r, "etc/f8"))  # a file becomes a directory
    os.mkdir(os.path.join(r, "etc/f8"))
    fd = os.open(os.path.join(r, "data/mapped"), os.O_RDWR)  # through a mapping, unmapped, closed
    m = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    m[:6] = b"mapped"
    m.close()
    os.close(fd)


def early(r):
    """While the presync walks the tree (the journal runs already)."""
    with open(os.path.join(r, "var/log/app.log"), "ab") as f:
        f.write(b"early\n")
    os.makedirs(os.path.join(r, "srv/early"))
    with open(os.path.join(r, "srv/early/e"), "wb") as f:
        f.write(b"e" * 100)
    os.rename(os.path.join(r, "etc/f6"), os.path.join(r, "srv/f6"))


# A process of the container: maps two files shared and writes through them before the
# presync, then on "go" writes to the same (already dirty) pages again: no fault, no event,
# no new time. data/held stays mapped, data/held-fd only open for writing.
CHILD = r"""
import mmap, os, sys
root = sys.argv[1]
maps = {}
for rel in ("data/held", "data/held-fd"):
    fd = os.open(os.path.join(root, rel), os.O_RDWR)
    m = mmap.mmap(fd, mmap.PAGESIZE * 2, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    m[:7] = b"first:" + rel[-1].encode()
    maps[rel] = (fd, m)
print("ready", flush=True)
sys.stdin.readline()
for rel, (fd, m) in maps.items():
    m[:8] = b"second:" + rel[-1].encode()
fd, m = maps.pop("data/held-fd")
m.close()
print("done", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def child():
    procs = []

    def start(rootfs):
        p = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(rootfs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        procs.append(p)
        assert p.stdout.readline().strip() == "ready"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            os.kill(p.pid, signal.SIGCONT)
            p.wait()


def test_the_delta_from_the_journal_makes_the_target_the_source(hosts, monkeypatch, child):
    """Frozen tasks (as a post-copy's dump leaves them) that wrote through mappings they still
    hold: those files arrive too (read from the frozen processes, as no event tells of them)."""
    src, dst, rootfs, frozen = hosts
    make_tree(rootfs)
    p = child(rootfs)
    presync(src, dst, monkeypatch, during=lambda: early(rootfs))
    changes(rootfs)  # after the presync, before the freeze
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "done"
    os.kill(p.pid, signal.SIGSTOP)  # the freeze
    frozen.update(state="FROZEN", pids=[p.pid])
    out, listed = delta(src, dst, monkeypatch)
    assert out["delta"]["frozen_pass"] == "journal", out
    assert listed["frozen_pass_paths"] < 80, listed  # the changes, not the tree
    assert tree_sums(target_rootfs(dst)) == tree_sums(rootfs)
    assert (target_rootfs(dst) / "data/held").read_bytes()[:8] == b"second:d"
    assert "old" in listed["replaced"]
    assert not os.path.exists(Path(src.S.MIGRATIONS_PATH) / "1" / "journal.json") or not src.mjournal._ours(
        json.loads((Path(src.S.MIGRATIONS_PATH) / "1" / "journal.json").read_text())
    )


def test_without_the_scan_of_the_frozen_tasks_a_mapped_write_is_missed(hosts, monkeypatch, child):
    """Why the delta reads the frozen processes: with their pids unknown it would not be
    exact, so it walks (and says why), and the walk still sends what they hold."""
    src, dst, rootfs, frozen = hosts
    make_tree(rootfs)
    p = child(rootfs)
    frozen["running"] = [p.pid]
    presync(src, dst, monkeypatch)
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "done"
    os.kill(p.pid, signal.SIGSTOP)
    frozen.update(state="FROZEN", pids=None)
    out, listed = delta(src, dst, monkeypatch)
    assert out["delta"]["frozen_pass"] == "walk" and "could not be listed" in out["delta"]["frozen_pass_reason"]
    assert tree_sums(target_rootfs(dst)) == tree_sums(rootfs)


def test_a_stopped_container_needs_no_scan_its_last_close_was_journalled(hosts, monkeypatch, child):
    """Stop-and-copy: the dump killed the tasks; the last release of a file written through a
    mapping sent FAN_CLOSE_WRITE, so the journal has it."""
    src, dst, rootfs, frozen = hosts
    make_tree(rootfs)
    p = child(rootfs)
    presync(src, dst, monkeypatch)
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "done"
    p.kill()
    p.wait()
    out, listed = delta(src, dst, monkeypatch)
    assert out["delta"]["frozen_pass"] == "journal", out
    assert (target_rootfs(dst) / "data/held").read_bytes()[:8] == b"second:d"
    assert tree_sums(target_rootfs(dst)) == tree_sums(rootfs)


def test_the_walk_when_the_journal_is_turned_off_says_so(hosts, monkeypatch):
    src, dst, rootfs, frozen = hosts
    make_tree(rootfs)
    presync(src, dst, monkeypatch, journal=False)
    changes(rootfs)
    out, listed = delta(src, dst, monkeypatch)
    assert out["delta"]["frozen_pass"] == "walk"
    assert "turned off" in out["delta"]["frozen_pass_reason"]
    assert tree_sums(target_rootfs(dst), links=False) == tree_sums(rootfs, links=False)


def _journal_info(src):
    path = Path(src.S.MIGRATIONS_PATH) / "1" / "journal.json"
    return json.loads(path.read_text())


def _gone(src, info, timeout=10):
    deadline = time.monotonic() + timeout
    while src.mjournal._ours(info) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not src.mjournal._ours(info)


@pytest.mark.parametrize("how", ["cleanup", "cleanup-keep-state", "abort", "resume", "inspect", "dir-removed"])
def test_the_journal_process_ends_with_its_migration(hosts, monkeypatch, how):
    src, dst, rootfs, frozen = hosts
    make_tree(rootfs)
    presync(src, dst, monkeypatch)
    info = _journal_info(src)
    assert src.mjournal._ours(info)
    monkeypatch.setattr(src.lxc, "_state", lambda name: "STOPPED")
    if how == "cleanup":
        src.cmd_migrate_cleanup({**PARAMS, "remove": False})
    elif how == "cleanup-keep-state":
        src.cmd_migrate_cleanup({**PARAMS, "remove": False, "keep_state": True})
    elif how == "abort":
        monkeypatch.setattr(src.lazy, "_exists", lambda name: False)
        src.cmd_migrate_abort(PARAMS)
    elif how == "resume":
        with pytest.raises(src.AgentError):  # nothing to resume in this tree; the journal goes first
            src.cmd_migrate_resume(PARAMS)
    elif how == "inspect":
        monkeypatch.setattr(src.commands, "_exists", lambda name: False)
        assert src.cmd_inspect(PARAMS)["journal_ended"] is True
    else:
        shutil.rmtree(Path(src.S.MIGRATIONS_PATH) / "1")
    assert _gone(src, info), f"the journal process outlived {how}"


def test_the_journal_process_ends_by_its_lifetime_bound(hosts):
    src, dst, rootfs, frozen = hosts
    mdir = str(Path(src.S.MIGRATIONS_PATH) / "1")
    assert src.mjournal.start(mdir, str(rootfs), lifetime_s=1) is None
    info = _journal_info(src)
    assert src.mjournal._ours(info)
    assert _gone(src, info, timeout=10)
    with pytest.raises(src.journal.Untrusted, match="lifetime"):
        src.mjournal.collect(mdir)


# Random container activity: operations on a small tree.
NAMES = st.sampled_from(["a", "b", "c", "d/e", "d/f", "g/h/i"])
OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["write", "append", "chmod", "unlink", "mkdir", "rename", "link", "symlink", "rmtree", "inplace"]
        ),
        NAMES,
        NAMES,
        st.binary(min_size=0, max_size=64),
    ),
    min_size=1,
    max_size=25,
)


def _apply(root, op, x, y, data):
    px, py = os.path.join(root, x), os.path.join(root, y)
    try:
        if op in ("write", "append"):
            os.makedirs(os.path.dirname(px), exist_ok=True)
            with open(px, "ab" if op == "append" else "r+b" if os.path.isfile(px) else "wb") as f:
                f.write(data)
        elif op == "inplace":  # same size, same time
            s = os.stat(px)
            with open(px, "r+b") as f:
                f.write(data[: s.st_size])
            os.utime(px, ns=(s.st_atime_ns, s.st_mtime_ns))
        elif op == "chmod":
            os.chmod(px, 0o600 if len(data) % 2 else 0o644)
        elif op == "unlink":
            os.unlink(px)
        elif op == "mkdir":
            os.makedirs(px)
        elif op == "rename":
            os.makedirs(os.path.dirname(py), exist_ok=True)
            os.rename(px, py)
        elif op == "link":
            os.makedirs(os.path.dirname(py), exist_ok=True)
            os.link(px, py)
        elif op == "symlink":
            os.makedirs(os.path.dirname(py), exist_ok=True)
            os.symlink(x, py)
        elif op == "rmtree":
            shutil.rmtree(os.path.join(root, x.split("/")[0]))
    except OSError:
        pass  # not possible on the tree as it is: the container's call failed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=OPS, during=OPS, after=OPS)
def test_any_changes_during_the_presync_give_the_source_tree(tmp_path_factory, pyz, before, during, after):
    tmp = tmp_path_factory.mktemp("prop")
    with pytest.MonkeyPatch.context() as mp:
        src = load_agent(root=tmp / "a")
        dst = load_agent(root=tmp / "b")
        mp.setattr(src.mjournal, "agent_file", lambda: pyz)
        mp.setattr(src.mjournal, "_state", lambda name: "STOPPED")
        rootfs = tmp / "a" / "lxc" / "c1" / "rootfs"
        rootfs.mkdir(parents=True)
        (rootfs.parent / "config").write_text(f"lxc.rootfs.path = dir:{rootfs}\n")
        os.makedirs(src.S.MIGRATIONS_PATH + "/1")
        for op in before:
            _apply(str(rootfs), *op)
        try:
            presync(src, dst, mp, during=lambda: [_apply(str(rootfs), *op) for op in during])
            for op in after:
                _apply(str(rootfs), *op)
            out, listed = delta(src, dst, mp)
        finally:
            src.mjournal.end(src.S.MIGRATIONS_PATH + "/1")
        if out["delta"]["frozen_pass"] != "journal":
            # Only for a hard link it could not account for; the migration walks instead.
            assert "names" in out["delta"]["frozen_pass_reason"], out
            assert any(op[0] == "link" for op in before + during + after)
            return
        assert tree_sums(target_rootfs(dst)) == tree_sums(rootfs)
