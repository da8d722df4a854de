"""Native copy-on-write on btrfs (hosts/agent/ctweb_agent/cow.py), on a real small btrfs: a loop
image made with mkfs.btrfs in the test's temporary directory. Subvolumes made, snapshotted and
deleted through the kernel's ioctls; a read-only snapshot refuses every write and no write to the
rootfs reaches it; every removal path of the agent deletes read-only snapshots (shutil.rmtree
cannot); disk counted by extents, each once. Needs root and mkfs.btrfs."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from tests.support.agent import make_tar, receive
from tests.support.agent_loader import load_agent

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a loop btrfs needs root"),
    pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="needs mkfs.btrfs (apt-get install btrfs-progs)"),
]

MiB = 1 << 20


@pytest.fixture
def fs(tmp_path):
    """A 300 MiB btrfs mounted at tmp_path/fs, unmounted (and its loop device freed) after."""
    img, mnt = tmp_path / "btrfs.img", tmp_path / "fs"
    with open(img, "wb") as f:
        f.truncate(300 * MiB)
    subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
    mnt.mkdir()
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a loop btrfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def agent(fs):
    return load_agent(root=fs)


def tree_sum(top, times=True) -> str:
    h = hashlib.sha256()
    for root, dirs, files in os.walk(top):
        dirs.sort()
        for n in sorted(dirs + files):
            p = os.path.join(root, n)
            st = os.lstat(p)
            when = st.st_mtime_ns if times else 0
            h.update(f"{os.path.relpath(p, top)} {st.st_mode} {st.st_uid} {st.st_size} {when}\n".encode())
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def make_rootfs(agent, name="c1", big=8 * MiB):
    """A container's rootfs as the agent makes it on btrfs: a subvolume, with some files."""
    cdir = os.path.join(agent.S.LXC_PATH, name)
    os.makedirs(cdir)
    rootfs = os.path.join(cdir, "rootfs")
    agent.cow.create_subvolume(rootfs)
    os.makedirs(os.path.join(rootfs, "etc"))
    with open(os.path.join(rootfs, "big"), "wb") as f:
        f.write(os.urandom(big))
    for i in range(5):
        with open(os.path.join(rootfs, "etc", f"f{i}"), "w") as f:
            f.write(f"file {i}\n")
    os.symlink("etc/f0", os.path.join(rootfs, "link"))
    return rootfs


def snap(agent, rootfs, name, container="c1"):
    sdir = os.path.join(agent.S.SNAPSHOTS_PATH, container, name)
    os.makedirs(os.path.join(sdir, "images"))
    with open(os.path.join(sdir, "meta.json"), "w") as f:
        f.write("{}")
    agent.cow.snapshot(rootfs, os.path.join(sdir, "rootfs"))
    return sdir


def subvolumes(fs) -> list[str]:
    out = subprocess.run(["btrfs", "subvolume", "list", str(fs)], capture_output=True, text=True, check=True).stdout
    return [line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line]


def test_a_read_only_snapshot_refuses_every_write_and_no_write_to_the_rootfs_reaches_it(agent, fs):
    rootfs = make_rootfs(agent)
    assert agent.cow.is_subvolume(rootfs) and not agent.cow.is_subvolume(os.path.dirname(rootfs))
    assert oct(os.stat(rootfs).st_mode & 0o777) == "0o755"
    sdir = snap(agent, rootfs, "s1")
    copy = os.path.join(sdir, "rootfs")
    assert agent.cow.is_subvolume(copy) and agent.cow.is_read_only(copy) and not agent.cow.is_read_only(rootfs)
    before = tree_sum(copy)
    assert before == tree_sum(rootfs)
    attempts = [
        lambda: open(os.path.join(copy, "big"), "r+b").write(b"x"),
        lambda: open(os.path.join(copy, "new"), "w"),
        lambda: os.chmod(os.path.join(copy, "etc/f1"), 0o600),
        lambda: os.unlink(os.path.join(copy, "etc/f2")),
        lambda: os.rename(os.path.join(copy, "etc/f3"), os.path.join(copy, "f3")),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    # The container rewrites shared files in place, changes modes, deletes: the snapshot stays.
    with open(os.path.join(rootfs, "big"), "r+b") as f:
        f.seek(MiB)
        f.write(b"Y" * 4096)
    with open(os.path.join(rootfs, "etc/f1"), "r+") as f:
        f.write("XX")
    os.chmod(os.path.join(rootfs, "etc/f2"), 0o600)
    os.unlink(os.path.join(rootfs, "etc/f3"))
    assert tree_sum(copy) == before
    # A restore (rsync from the snapshot, store.sync) and writes after it: still the same.
    agent.store.sync(copy, rootfs)
    assert tree_sum(rootfs) == before
    with open(os.path.join(rootfs, "etc/f4"), "a") as f:
        f.write("after the restore\n")
    assert tree_sum(copy) == before


def test_every_removal_path_deletes_read_only_snapshots(agent, fs):
    rootfs = make_rootfs(agent)
    for s in ("s1", "s2", "s3", "s4"):
        snap(agent, rootfs, s)
    assert len(subvolumes(fs)) == 5
    # What the agent used before: shutil.rmtree cannot empty a read-only subvolume.
    with pytest.raises(OSError) as e:
        shutil.rmtree(os.path.join(agent.S.SNAPSHOTS_PATH, "c1", "s4"))
    assert e.value.errno == errno.EROFS
    # delete-snapshot (common._remove_tree)
    assert agent.cmd_delete_snapshot({"name": "c1", "snapshot": "s1"})["deleted"]
    assert not os.path.lexists(os.path.join(agent.S.SNAPSHOTS_PATH, "c1", "s1"))
    # a stale staging/tmp directory (images.remove_prefixed, images._remove_at)
    os.rename(os.path.join(agent.S.SNAPSHOTS_PATH, "c1", "s2"), os.path.join(agent.S.SNAPSHOTS_PATH, ".recv-9-c1"))
    assert agent.images.remove_prefixed(".recv-9-", (agent.S.SNAPSHOTS_PATH,))
    assert not os.path.lexists(os.path.join(agent.S.SNAPSHOTS_PATH, ".recv-9-c1"))
    # a nested subvolume inside a writable one (a container that made one), and the container
    # directory with its rootfs subvolume (containers._destroy / lazy's clean-up: cow.rmtree)
    agent.cow.create_subvolume(os.path.join(rootfs, "etc", "nested"))
    with open(os.path.join(rootfs, "etc", "nested", "x"), "w") as f:
        f.write("x")
    agent.cow.rmtree(os.path.join(agent.S.LXC_PATH, "c1"))
    assert not os.path.lexists(os.path.join(agent.S.LXC_PATH, "c1"))
    # a deleted container's snapshots (cmd_delete of a container that is gone: _remove_tree)
    out = agent.cmd_delete({"name": "c1"})
    assert out["deleted"] and out.get("was_missing")
    assert not os.path.lexists(os.path.join(agent.S.SNAPSHOTS_PATH, "c1"))
    assert subvolumes(fs) == []
    # A symlink to a subvolume is removed, never followed.
    rootfs = make_rootfs(agent, "c2")
    sdir = snap(agent, rootfs, "s1", "c2")
    os.symlink(os.path.join(sdir, "rootfs"), os.path.join(agent.S.SNAPSHOTS_PATH, "c2", "s9"))
    agent.common._remove_tree(os.path.join(agent.S.SNAPSHOTS_PATH, "c2", "s9"))
    assert os.path.isdir(os.path.join(sdir, "rootfs", "etc"))


def test_disk_is_counted_by_extents_each_once(agent, fs):
    rootfs = make_rootfs(agent, big=16 * MiB)
    os.sync()
    alone = agent.store.du_once([rootfs])
    assert 16 * MiB <= alone < 17 * MiB
    sdirs = [snap(agent, rootfs, f"s{i}") for i in range(10)]
    os.sync()
    everything = agent.store.du_once([agent.S.SNAPSHOTS_PATH, rootfs])
    assert everything < alone + MiB  # ten snapshots share every extent with the rootfs
    assert agent.store.du_once([sdirs[0]]) >= 16 * MiB  # each one whole on its own
    assert agent.store.unique_bytes(sdirs[9]) < 64 << 10  # a fresh snapshot adds no data
    # The rootfs drops its copy of `big`: the snapshots hold it still, shared among them...
    os.unlink(os.path.join(rootfs, "big"))
    os.sync()
    assert agent.store.unique_bytes(sdirs[9]) < 64 << 10
    # ...and once only the last one holds it, removing that one frees it.
    for s in sdirs[:9]:
        agent.common._remove_tree(s)
    # Deleted subvolumes drop their references in the background: wake the cleaner, wait for it.
    subprocess.run(["btrfs", "filesystem", "sync", str(fs)], check=True, capture_output=True, timeout=120)
    subprocess.run(["btrfs", "subvolume", "sync", str(fs)], check=True, capture_output=True, timeout=120)
    os.sync()
    assert agent.store.unique_bytes(sdirs[9]) >= 16 * MiB
    # Measured by the filesystem itself: the ten snapshots took no data of their own.
    st = os.statvfs(fs)
    assert (st.f_blocks - st.f_bfree) * st.f_frsize < 64 * MiB


def test_the_probe_runs_real_subvolume_operations(agent, fs, tmp_path):
    caps = agent.store.storage_probe()
    assert caps["filesystem"] == "btrfs" and caps["native_cow"] == "btrfs subvolumes"
    assert caps["native_cow_used"] is True and caps["native_cow_not_used_because"] is None
    assert subvolumes(fs) == []  # the probe's scratch subvolumes are gone
    assert not [n for n in os.listdir(agent.S.CTWEB_PATH) if n.startswith(".cow-probe-")]
    plain = load_agent(root=tmp_path / "plain")  # the test's tmp directory: not btrfs
    caps = plain.store.storage_probe()
    assert caps["native_cow_used"] is False and caps["filesystem"] != "btrfs"
    # snapshots on another filesystem than the rootfs: not used (a snapshot cannot cross)
    plain.S.LXC_PATH = agent.S.LXC_PATH
    assert plain.cow.probe(plain.S.LXC_PATH, plain.S.SNAPSHOTS_PATH, plain.S.CTWEB_PATH)[0] is False


def test_a_snapshot_of_a_plain_rootfs_never_hard_links_into_a_subvolume(agent, fs):
    """A received rootfs is a plain directory: its snapshots share by hard links, never with a
    btrfs snapshot (no link crosses subvolumes)."""
    rootfs = make_rootfs(agent)
    snap(agent, rootfs, "s1")
    assert agent.criu._previous_rootfs("c1") is None
    assert agent.criu._native_cow(rootfs) is True
    plain = os.path.join(agent.S.LXC_PATH, "c1", "plain")
    os.makedirs(plain)
    assert agent.criu._native_cow(plain) is False


def test_a_migration_counts_btrfs_snapshots_whole(agent, fs, monkeypatch):
    """They share extents here, but a migration sends (and the target stores) each one whole."""
    rootfs = make_rootfs(agent, big=16 * MiB)
    for i in range(3):
        snap(agent, rootfs, f"s{i}")
    os.sync()
    with open(os.path.join(agent.S.LXC_PATH, "c1", "config"), "w") as f:
        f.write(f"lxc.rootfs.path = dir:{rootfs}\n")
    monkeypatch.setattr(agent.migrate, "_state", lambda name: "STOPPED")
    need = agent.cmd_migrate_prepare({"name": "c1", "migration": 1})["need_bytes"]
    assert need >= 4 * 16 * MiB  # the rootfs and three snapshots, each whole


def test_a_snapshot_of_a_stopped_container_is_one_read_only_btrfs_snapshot(agent, fs, monkeypatch):
    rootfs = make_rootfs(agent)
    with open(os.path.join(agent.S.LXC_PATH, "c1", "config"), "w") as f:
        f.write(f"lxc.rootfs.path = dir:{rootfs}\n")
    monkeypatch.setattr(agent.criu, "_state", lambda name: "STOPPED")
    monkeypatch.setattr(agent.common, "emit", lambda obj: None)
    out = agent.cmd_snapshot({"name": "c1", "snapshot": "s1", "stateful": False})
    copy = os.path.join(agent.S.SNAPSHOTS_PATH, "c1", "s1", "rootfs")
    assert out["rootfs_storage"] == "btrfs snapshot" and out["shared_with"] is None
    assert agent.cow.is_subvolume(copy) and agent.cow.is_read_only(copy)
    assert tree_sum(copy) == tree_sum(rootfs)
    assert out["size_bytes"] >= 8 * MiB and out["added_bytes"] < 64 << 10
    assert not [n for n in os.listdir(os.path.join(agent.S.SNAPSHOTS_PATH, "c1")) if n.startswith(".tmp-")]
    # A rootfs that is a plain directory (received by a migration) is copied with rsync as before.
    agent.cow.rmtree(rootfs)
    shutil.copytree(copy, rootfs, symlinks=True)
    out = agent.cmd_snapshot({"name": "c1", "snapshot": "s2", "stateful": False})
    plain = os.path.join(agent.S.SNAPSHOTS_PATH, "c1", "s2", "rootfs")
    assert "rootfs_storage" not in out and not agent.cow.is_subvolume(plain)
    assert tree_sum(plain) == tree_sum(rootfs)


def _feed(monkeypatch, data: bytes):
    r, w = os.pipe()

    def feed():
        try:
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BrokenPipeError:
            pass

    threading.Thread(target=feed, daemon=True).start()

    class Stdin:
        buffer = os.fdopen(r, "rb")

    monkeypatch.setattr(sys, "stdin", Stdin)
    return Stdin.buffer


def test_an_imported_container_gets_a_rootfs_subvolume_of_its_own(agent, fs, monkeypatch):
    rootfs = make_rootfs(agent)
    sdir = snap(agent, rootfs, "s1")  # a btrfs snapshot, exported as a plain tree
    with open(os.path.join(sdir, "config"), "w") as f:
        f.write(f"lxc.rootfs.path = dir:{rootfs}\nlxc.uts.name = c1\n")
    with open(os.path.join(sdir, "meta.json"), "w") as f:
        json.dump(
            {"snapshot": "s1", "container": "c1", "stateful": False, "created_at": "2026-12-01T10:00:00+00:00"}, f
        )
    os.rmdir(os.path.join(sdir, "images"))
    buf = io.BytesIO()
    agent.write_export(buf, "c1", "s1")
    stdin = _feed(monkeypatch, buf.getvalue())
    try:
        out = agent.cmd_import({"name": "c2", "stall_s": 5})
    finally:
        stdin.close()
    assert out["snapshot"] == "s1"
    new = os.path.join(agent.S.LXC_PATH, "c2", "rootfs")
    assert agent.cow.is_subvolume(new) and not agent.cow.is_read_only(new)
    assert tree_sum(new, times=False) == tree_sum(rootfs, times=False)  # (an archive keeps times to the µs)
    assert not [n for n in os.listdir(agent.S.LXC_PATH) if n.startswith(".")]


def test_a_received_rootfs_stays_a_plain_directory(agent, fs, monkeypatch):
    """A migration's delta is merged into the received rootfs by renames from a staging directory
    beside it: a rename cannot cross into a subvolume (EXDEV), so the rootfs stays plain there."""
    tar = make_tar([("c1", "dir", None), ("c1/config", "file", b"lxc.uts.name = c1\n"), ("c1/rootfs", "dir", None)])
    receive(agent, monkeypatch, tar)
    rootfs = os.path.join(agent.S.LXC_PATH, "c1", "rootfs")
    assert os.path.isdir(rootfs) and not agent.cow.is_subvolume(rootfs)
    delta = make_tar([("c1/rootfs/new", "file", b"from the delta")])
    receive(agent, monkeypatch, delta, what="delta")
    with open(os.path.join(rootfs, "new"), "rb") as f:
        assert f.read() == b"from the delta"


def test_a_rootfs_holding_a_subvolume_of_its_own_is_copied_whole_not_snapshotted(agent, fs, monkeypatch):
    """A container made a subvolume inside its rootfs (machinectl, docker's btrfs driver): a
    btrfs snapshot would hold an empty directory there, and a restore from it would empty the
    live one. Seen failing before the fix: the snapshot's var/lib/machines/data was empty."""
    rootfs = make_rootfs(agent)
    os.makedirs(os.path.join(rootfs, "var", "lib", "machines"))
    agent.cow.create_subvolume(os.path.join(rootfs, "var", "lib", "machines", "data"))
    with open(os.path.join(rootfs, "var", "lib", "machines", "data", "keep"), "w") as f:
        f.write("precious\n")
    with open(os.path.join(agent.S.LXC_PATH, "c1", "config"), "w") as f:
        f.write(f"lxc.rootfs.path = dir:{rootfs}\n")
    monkeypatch.setattr(agent.criu, "_state", lambda name: "STOPPED")
    monkeypatch.setattr(agent.common, "emit", lambda obj: None)
    out = agent.cmd_snapshot({"name": "c1", "snapshot": "s1", "stateful": False})
    copy = os.path.join(agent.S.SNAPSHOTS_PATH, "c1", "s1", "rootfs")
    assert "rootfs_storage" not in out and not agent.cow.is_subvolume(copy)
    with open(os.path.join(copy, "var", "lib", "machines", "data", "keep")) as f:
        assert f.read() == "precious\n"


def test_the_subvolumes_inside_a_rootfs_are_found_deep_in_its_tree_without_walking_it(agent, fs, monkeypatch):
    """Before each btrfs snapshot the agent asks whether the rootfs holds a subvolume of its own:
    the filesystem's root tree lists the subvolumes whose parent is the rootfs's (ROOT_REF), so
    one deep in the tree is found without stat()ing every directory (os.scandir fails here, so a
    walk would find nothing). Subvolumes elsewhere, and one inside a found one, are not listed."""
    rootfs = make_rootfs(agent)
    deep = os.path.join(rootfs, *[f"d{i}" for i in range(12)])
    os.makedirs(deep)
    agent.cow.create_subvolume(os.path.join(deep, "inner"))
    agent.cow.create_subvolume(os.path.join(deep, "inner", "innermost"))  # inside a subvolume: not root's
    agent.cow.create_subvolume(os.path.join(rootfs, "top"))
    agent.cow.create_subvolume(os.path.join(agent.S.LXC_PATH, "beside"))  # not inside the rootfs
    inner = os.path.relpath(os.path.join(deep, "inner"), rootfs)

    def no_walk(path):
        raise AssertionError(f"walked {path}")

    monkeypatch.setattr(agent.cow.os, "scandir", no_walk)
    assert agent.cow.nested_subvolumes(rootfs, most=10) == sorted([inner, "top"])
    assert len(agent.cow.nested_subvolumes(rootfs)) == 1  # most=1: the snapshot's question
    assert agent.cow.nested_subvolumes(os.path.join(agent.S.LXC_PATH, "beside"), most=10) == []
    assert agent.cow.nested_subvolumes(os.path.join(deep, "inner"), most=10) == ["innermost"]
    monkeypatch.undo()
    # the walk (where the kernel refuses the search) agrees
    assert sorted(agent.cow._walk_nested(rootfs, 10)) == sorted([inner, "top"])
