"""How the agent keeps snapshots (hosts/agent/ctweb_agent/store.py), with the real rsync and
zstd of this machine: unchanged files shared with the previous snapshot, a shared file never
written through (not by a change in the rootfs, a restore, or a later write), each inode
counted once, memory pages compressed and given back byte for byte."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.support.trees import tree_sums

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")


def make_rootfs(path):
    path = str(path)
    os.makedirs(os.path.join(path, "etc"))
    os.makedirs(os.path.join(path, "var/log"))
    for i in range(20):
        with open(os.path.join(path, "etc", f"f{i}"), "wb") as f:
            f.write(os.urandom(64 << 10))
    with open(os.path.join(path, "var/log/app.log"), "w") as f:
        f.write("line\n")
    os.symlink("etc/f0", os.path.join(path, "link"))
    for i in range(20):
        os.utime(os.path.join(path, "etc", f"f{i}"), ns=(T0, T0))
    time.sleep(0.2)  # made before the snapshots begin (their files' change times are older)


T0 = 1_700_000_000 * 10**9 + 100  # a whole second and 100 ns


def rewrite_in_place(path, data: bytes):
    """Same size, and a modification time in the same second as before (only the ns differ)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 100))


def snapshot_rootfs(agent, rootfs, snap_dir, previous, between=None):
    """The rootfs copy as cmd_snapshot makes it: a running pass into a new directory sharing
    with the previous snapshot, then (the container frozen) that copy updated in place."""
    rootfs, snap_dir = str(rootfs), str(snap_dir)
    os.makedirs(snap_dir)
    copy = os.path.join(snap_dir, "rootfs")
    since = agent.store.pass_start()
    agent.store.sync_new(rootfs, copy, [previous])
    if between:
        between()
    agent.store.update_in_place(rootfs, copy, since)
    return copy


def test_an_unchanged_rootfs_costs_only_its_directories_the_second_time(agent, tmp_path):
    rootfs = tmp_path / "rootfs"
    make_rootfs(rootfs)
    s1 = snapshot_rootfs(agent, rootfs, tmp_path / "s1", None)
    s2 = snapshot_rootfs(agent, rootfs, tmp_path / "s2", s1)
    one = agent.store.du_once([s1])
    both = agent.store.du_once([s1, s2])
    assert one > 20 * (64 << 10)
    assert both - one < 64 << 10  # the second holds only its directory entries
    assert agent.store.unique_bytes(str(tmp_path / "s2")) < 64 << 10
    assert os.stat(os.path.join(s1, "etc/f3")).st_ino == os.stat(os.path.join(s2, "etc/f3")).st_ino
    assert tree_sums(s2) == tree_sums(rootfs)


def test_changes_while_frozen_never_reach_the_previous_snapshot(agent, tmp_path):
    """rsync over a directory of shared files would chmod/chown the shared inode in place:
    the frozen pass must write into a new directory. Seen failing with the frozen pass
    writing into the running pass's directory (the previous snapshot's f1 became 0600)."""
    rootfs = tmp_path / "rootfs"
    make_rootfs(rootfs)
    s1 = snapshot_rootfs(agent, rootfs, tmp_path / "s1", None)
    before = tree_sums(s1)

    def container_writes():
        os.chmod(rootfs / "etc/f1", 0o600)  # attributes only
        if os.geteuid() == 0:
            os.chown(rootfs / "etc/f2", 1234, 1234)
        rewrite_in_place(rootfs / "etc/f3", b"changed!")  # in place, same size, same second
        with open(rootfs / "var/log/app.log", "a") as f:
            f.write("more\n")
        os.unlink(rootfs / "etc/f4")
        try:  # an extended attribute only (where the filesystem keeps user ones)
            os.setxattr(rootfs / "etc/f5", "user.ctweb", b"1")
        except OSError:
            pass
        if os.geteuid() == 0:
            os.chown(rootfs / "link", 4321, 4321, follow_symlinks=False)  # a symlink's owner

    s2 = snapshot_rootfs(agent, rootfs, tmp_path / "s2", s1, between=container_writes)
    assert tree_sums(s1) == before
    assert tree_sums(s2) == tree_sums(rootfs)


def test_a_restore_then_writes_leave_every_snapshot_as_it_was(agent, tmp_path):
    rootfs = tmp_path / "rootfs"
    make_rootfs(rootfs)
    s1 = snapshot_rootfs(agent, rootfs, tmp_path / "s1", None)
    with open(rootfs / "etc/f5", "wb") as f:
        f.write(b"second")
    s2 = snapshot_rootfs(agent, rootfs, tmp_path / "s2", s1)
    sums = {s: tree_sums(s) for s in (s1, s2)}
    agent.store.sync(s1, str(rootfs))  # the restore's rollback
    assert tree_sums(rootfs) == sums[s1]
    for rel in ("etc/f0", "etc/f5", "var/log/app.log"):  # the container writes in place
        rewrite_in_place(rootfs / rel, b"XXXX")
        os.chmod(rootfs / rel, 0o640)
    assert {s: tree_sums(s) for s in (s1, s2)} == sums
    agent.store.sync(s1, str(rootfs))  # restored again: every rewrite rolled back
    assert tree_sums(rootfs) == sums[s1]
    shutil.rmtree(s1)  # deleting one snapshot leaves the other whole
    assert tree_sums(s2) == sums[s2]


def test_images_are_compressed_at_rest_and_given_back_exactly(agent, tmp_path):
    if shutil.which("zstd") is None:
        pytest.skip("needs zstd")
    images = tmp_path / "images"
    images.mkdir()
    pages = (b"A" * 4096 + os.urandom(4096)) * 256  # half compressible
    (images / "pages-1.img").write_bytes(pages)
    (images / "pages-2.img").write_bytes(pages[::-1])
    (images / "inventory.img").write_bytes(b"inv")
    compression, stored, raw = agent.store.compress_images(str(images))
    assert compression == "zstd"
    assert raw == 2 * len(pages) + 3
    assert stored < raw * 0.7
    stored_names = ["inventory.img", "pages-1.img.zst", "pages-2.img.zst"]
    assert sorted(os.listdir(images)) == stored_names
    assert agent.store.is_compressed(str(images))
    work = tmp_path / "work"
    assert agent.store.plain_images(str(images), str(work)) == raw
    assert (work / "pages-1.img").read_bytes() == pages
    assert (work / "pages-2.img").read_bytes() == pages[::-1]
    assert (work / "inventory.img").read_bytes() == b"inv"
    assert sorted(os.listdir(images)) == stored_names  # untouched


def test_without_zstd_images_stay_as_they_are(agent, tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    (images / "pages-1.img").write_bytes(b"P" * 8192)
    real_which = shutil.which
    monkeypatch.setattr(agent.store.shutil, "which", lambda n: None if n == "zstd" else real_which(n))
    assert agent.store.compress_images(str(images)) == (None, 8192, 8192)
    assert os.listdir(images) == ["pages-1.img"]


def test_a_sharing_copy_refuses_a_directory_that_exists(agent, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(agent.AgentError, match="only writes into a new directory"):
        agent.store.sync_new(str(tmp_path / "src"), str(tmp_path / "dst"), [])


def test_the_estimate_counts_only_what_the_previous_snapshot_lacks(agent, tmp_path):
    rootfs = tmp_path / "rootfs"
    make_rootfs(rootfs)
    s1 = snapshot_rootfs(agent, rootfs, tmp_path / "snaps/c/s1", None)
    assert agent.store.new_bytes_estimate(str(rootfs), s1) == 0
    (rootfs / "new.bin").write_bytes(b"x" * 100_000)
    assert agent.store.new_bytes_estimate(str(rootfs), s1) == 100_000
    assert [n for n in os.listdir(tmp_path / "snaps/c") if n.startswith(".estimate")] == []


def test_a_migration_counts_shared_snapshot_files_once(agent, tmp_path):
    """The target's disk check gets the snapshots' real disk, not one full rootfs per snapshot."""
    cdir = os.path.join(agent.S.LXC_PATH, "c1")
    make_rootfs(os.path.join(cdir, "rootfs"))
    with open(os.path.join(cdir, "config"), "w") as f:
        f.write("lxc.uts.name = c1\n")
    base = os.path.join(agent.S.SNAPSHOTS_PATH, "c1")
    previous = None
    for i in range(5):
        previous = snapshot_rootfs(agent, os.path.join(cdir, "rootfs"), os.path.join(base, f"s{i}"), previous)
        with open(os.path.join(base, f"s{i}", "meta.json"), "w") as f:
            f.write("{}")
    one = agent.store.du_once([os.path.join(base, "s0")])
    need = agent.cmd_migrate_prepare({"name": "c1", "migration": 1})["need_bytes"]
    rootfs = agent.common._du(cdir)
    assert need - rootfs < 2 * one  # five snapshots, one rootfs's worth of files (before: 5 x)


def test_a_restore_needing_zstd_on_a_host_without_it_changes_nothing(agent, tmp_path, monkeypatch):
    cdir = os.path.join(agent.S.LXC_PATH, "c1")
    make_rootfs(os.path.join(cdir, "rootfs"))
    with open(os.path.join(cdir, "config"), "w") as f:
        f.write("lxc.uts.name = c1\n")
    sdir = os.path.join(agent.S.SNAPSHOTS_PATH, "c1", "s1")
    snapshot_rootfs(agent, os.path.join(cdir, "rootfs"), sdir, None)
    os.makedirs(os.path.join(sdir, "images"))
    for n in ("inventory.img", "pages-1.img.zst"):
        with open(os.path.join(sdir, "images", n), "wb") as f:
            f.write(b"x")
    with open(os.path.join(sdir, "meta.json"), "w") as f:
        f.write('{"stateful": true}')
    with open(os.path.join(cdir, "rootfs", "etc", "f0"), "wb") as f:
        f.write(b"after the snapshot")
    before = tree_sums(cdir)
    real_which = shutil.which
    monkeypatch.setattr(agent.criu.shutil, "which", lambda n: None if n == "zstd" else real_which(n))
    with pytest.raises(agent.AgentError, match="compressed with zstd, which this host lacks"):
        agent.cmd_restore({"name": "c1", "snapshot": "s1"})
    assert tree_sums(cdir) == before


def test_the_probe_says_how_snapshots_are_kept(agent):
    st = agent.store.storage_probe()
    assert st["sharing"] == "hardlink"  # rsync is here (the module is skipped without it)
    assert st["filesystem"] and isinstance(st["reflink"], bool)
    assert (st["zstd"] is not None) == (shutil.which("zstd") is not None)
    assert os.listdir(agent.S.CTWEB_PATH) == []  # the reflink probe left nothing


def test_a_host_without_rsync_still_snapshots_and_restores_by_whole_copies(agent, tmp_path, monkeypatch):
    """No rsync on the host (its probe says sharing: none): both passes of a snapshot and a
    restore's roll-back fall back to `cp -a` and still give exact copies (the frozen pass
    used to call rsync regardless and fail with exit status 127)."""
    rootfs = tmp_path / "rootfs"
    make_rootfs(rootfs)
    bin_dir = tmp_path / "bin"  # a PATH with cp and no rsync
    bin_dir.mkdir()
    os.symlink(shutil.which("cp"), bin_dir / "cp")
    monkeypatch.setenv("PATH", str(bin_dir))
    copy = snapshot_rootfs(agent, rootfs, tmp_path / "s1", None)
    assert tree_sums(copy) == tree_sums(rootfs)
    rewrite_in_place(os.path.join(str(rootfs), "etc", "f1"), os.urandom(64 << 10))
    agent.store.sync(copy, str(rootfs))
    assert tree_sums(rootfs) == tree_sums(copy)
