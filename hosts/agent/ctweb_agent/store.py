"""How snapshots are kept on disk: rootfs copies that share unchanged files with the previous
snapshot (hard links, made by rsync --link-dest), memory images compressed with zstd, the disk
they take counted once per inode, and the host's disk budget for them.

The one rule that makes sharing safe: a shared inode is never written. Every rsync that may
link (--link-dest) writes into a directory it has just made empty, so it only ever creates
entries: a file equal to the previous snapshot's is linked to it, anything else is a new
file. rsync never links to its source, so the live rootfs never shares an inode with a
snapshot, and a restore (rsync from a snapshot into the rootfs) copies, never links. An rsync
over a directory that already holds shared files would change a linked file's mode or owner
in place (rsync applies attribute-only changes to the existing inode): so before the frozen
pass of a snapshot updates the running pass's copy, every shared entry whose attributes (or
anything else) changed since the running pass began is unlinked from the copy
(`unshare_changed`), and rsync writes it anew.

On btrfs (rootfs a subvolume on the filesystem of the snapshots), a snapshot's rootfs is instead one
read-only btrfs snapshot, taken while frozen, and the disk is counted by extents: see cow.py."""

import collections
import os
import shutil
import stat
import tempfile
import time

from . import cow
from . import state as S
from .common import AgentError, run
from .journal import Untrusted

ZSTD_SUFFIX = ".zst"
# --modify-window=-1: modification times compared to the nanosecond. With whole seconds (rsync's
# default), a file rewritten in place at its size within the second of its last write looks
# unchanged, and would be linked to the previous snapshot's copy (or, restoring, left as is).
RSYNC = ["rsync", "-aHAX", "--numeric-ids", "--modify-window=-1"]


def du_once(paths, extents=True):
    """Disk blocks (bytes) under `paths`, each inode counted once across all of them. On btrfs,
    each data extent once instead (snapshots are subvolumes sharing extents: cow.extent_bytes),
    unless `extents` is false: what copies of the trees take elsewhere (a btrfs snapshot's inodes
    are its own, st_dev apart, so each is counted whole)."""
    if extents and paths and cow.is_btrfs(paths[0]):
        return cow.extent_bytes(paths)
    seen, total = set(), 0
    for top in paths:
        try:
            st = os.lstat(top)
        except OSError:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
        if not stat.S_ISDIR(st.st_mode):
            continue
        for root, dirs, files in os.walk(top):
            for n in dirs + files:
                try:
                    st = os.lstat(os.path.join(root, n))
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                total += st.st_blocks * 512
    return total


def unique_bytes(top):
    """Disk blocks (bytes) of the inodes under `top` that nothing outside it links to: what
    removing `top` would free, and when it was just made, what it added to the disk. On btrfs, the
    data extents that nothing else references (cow.unshared_bytes)."""
    if cow.is_btrfs(top):
        return cow.unshared_bytes(top)
    counts, sizes = {}, {}
    for root, dirs, files in os.walk(top):
        for n in dirs + files:
            try:
                st = os.lstat(os.path.join(root, n))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            counts[key] = counts.get(key, 0) + 1
            sizes[key] = (st.st_blocks * 512, 1 if stat.S_ISDIR(st.st_mode) else st.st_nlink)
    return sum(size for key, (size, nlink) in sizes.items() if counts[key] >= nlink)


def sync_new(src, dst, link_dests=()):
    """Copy the tree `src` into `dst`, which must not exist yet, sharing every file that is
    identical (contents by size and mtime, mode, owner, ACLs, xattrs) with one in `link_dests`."""
    if os.path.lexists(dst):
        raise AgentError(f"Internal error: {dst} exists; a sharing copy only writes into a new directory.")
    os.makedirs(dst)
    if not shutil.which("rsync"):
        os.rmdir(dst)
        run(["cp", "-a", "--reflink=auto", src, dst], timeout=3600, check=True)
        return
    argv = RSYNC + [f"--link-dest={os.path.abspath(d)}" for d in link_dests if d and os.path.isdir(d)]
    _rsync(argv, src, dst)


def _rsync(argv, src, dst):
    rc, out, err = run(argv + [src.rstrip("/") + "/", dst.rstrip("/") + "/"], timeout=3600)
    if rc not in (0, 24):  # 24: files vanished while we copied (a running container)
        raise AgentError(f"rsync of {src} failed (exit status {rc}).", (err or out)[-3000:])


def sync(src, dst):
    """Make dst an exact copy of src (ownership, modes, hard links, ACLs, xattrs: file
    capabilities matter). rsync copies only what changed, so a second pass is cheap; without
    rsync, a whole copy."""
    os.makedirs(dst, exist_ok=True)
    if shutil.which("rsync"):
        _rsync(RSYNC + ["--delete"], src, dst)
        return
    shutil.rmtree(dst)
    run(["cp", "-a", "--reflink=auto", src, dst], timeout=3600, check=True)


# Inode change times come from the kernel's coarse clock, a tick or so behind the wall clock.
CTIME_MARGIN_NS = 100_000_000


def pass_start():
    """The time to give update_in_place() for a copy that begins now."""
    return time.time_ns() - CTIME_MARGIN_NS


def unshare_changed(src, dst, since_ns):
    """Before an rsync updates `dst` in place from `src`: unlink from `dst` every shared entry
    (a hard link: nlink > 1) whose attributes rsync would change on the inode itself, so that it
    writes a new file instead. Those are the entries whose mode or owner differ, or whose inode
    changed since `since_ns` (ctime: chmod, chown, xattrs, ACLs, writes). Anything else rsync
    changes goes through a new file and a rename, or an unlink. Returns how many were unlinked.
    Meant for a frozen container: nothing in `src` changes meanwhile."""
    n = 0
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(os.path.join(src, rel))
        except OSError:
            continue
        with it:
            for e in it:
                r = os.path.join(rel, e.name)
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(r)
                    continue
                target = os.path.join(dst, r)
                try:
                    dt = os.lstat(target)
                except OSError:
                    continue
                if stat.S_ISDIR(dt.st_mode) or dt.st_nlink < 2:
                    continue
                if st.st_ctime_ns >= since_ns or (st.st_mode, st.st_uid, st.st_gid) != (
                    dt.st_mode,
                    dt.st_uid,
                    dt.st_gid,
                ):
                    os.unlink(target)
                    n += 1
    return n


def update_in_place(src, dst, since_ns, whole=()):
    """The frozen pass of a snapshot: `dst` (a sharing copy of `src` made since `since_ns`, a
    wall-clock time in ns) made equal to `src` again, without writing any shared inode. Files
    in `whole` (relative; open for writing or mapped shared at the freeze) are copied whole:
    written through a mapping, their modification time need not have moved."""
    for rel in whole:
        rel = os.path.normpath(rel)
        st = None if rel.startswith("..") or os.path.isabs(rel) else _lstat_in(dst, rel)
        if st is not None and stat.S_ISREG(st.st_mode):
            os.unlink(os.path.join(dst, rel))
    unshared = unshare_changed(src, dst, since_ns)
    sync(src, dst)  # (without rsync nothing was shared: a whole copy again)
    return unshared


def file_index(src):
    """Every regular file under `src` by inode: {ino: rel} and, for inodes seen under more than
    one name, {ino: [rel, ...]}. Made while the container runs, after the journal started:
    the frozen pass finds in it the other names of a changed file (hard links)."""
    one, more = {}, {}
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(os.path.join(src, rel) if rel else src)
        except OSError:
            continue
        with it:
            for e in it:
                r = os.path.join(rel, e.name) if rel else e.name
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(r)
                        continue
                    if not e.is_file(follow_symlinks=False):
                        continue
                    ino = e.inode()
                except OSError:
                    continue
                if ino in one:
                    more.setdefault(ino, [one[ino]]).append(r)
                else:
                    one[ino] = r
    return one, more


def _remove(path, st):
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # unlinks: never writes a shared inode
    else:
        os.unlink(path)


def _unshare_entries(src, dst, since_ns):
    """unshare_changed's rule for the entries directly in `dst` (not below them); the names
    unlinked."""
    n = []
    with os.scandir(dst) as it:
        for e in it:
            try:
                dt = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(dt.st_mode) or dt.st_nlink < 2:
                continue
            st = _lstat(os.path.join(src, e.name))
            if (
                st is None
                or st.st_ctime_ns >= since_ns
                or (st.st_mode, st.st_uid, st.st_gid)
                != (
                    dt.st_mode,
                    dt.st_uid,
                    dt.st_gid,
                )
            ):
                os.unlink(e.path)
                n.append(e.name)
    return n


def update_listed(src, dst, since_ns, changed, trees, index, whole=(), max_paths=50_000):
    """The frozen pass from a change journal (journal.py): `dst`, a sharing copy of `src` made
    since `since_ns`, made equal to `src` again on the paths that may have changed (`changed`,
    relative, "." the root; `trees`: directories created or moved in, copied whole), without
    writing any shared inode. `index` is file_index(src) made after the journal began. Files in
    `whole` are copied whole, whatever their size and time say: written through a shared
    mapping, a file's modification time may not have moved since the running pass. Returns
    (paths given to rsync, entries unlinked or removed from dst). Raises journal.Untrusted
    when it cannot be exact (a changed file has a name it cannot find); the caller walks."""
    wanted = set()
    whole = {os.path.normpath(w) for w in whole}
    for rel in changed:
        rel = os.path.normpath(rel)
        if rel.startswith("../") or rel == ".." or os.path.isabs(rel):
            raise Untrusted(f"a journal path outside the rootfs: {rel!r}")
        wanted.add(rel)
        wanted.add(os.path.dirname(rel) or ".")
    # Directories created or moved in are copied whole; the outermost ones only.
    roots = sorted(os.path.normpath(t) for t in trees)
    tops = []
    for t in roots:
        if not any(t.startswith(p + "/") for p in tops):
            tops.append(t)
    removed = 0
    for top in tops:
        s = _lstat_in(src, top)
        d = _lstat_in(dst, top)
        if d is not None and stat.S_ISDIR(d.st_mode):
            shutil.rmtree(os.path.join(dst, top))
            removed += 1
        if s is None or not stat.S_ISDIR(s.st_mode):
            continue
        for root, dirs, files in os.walk(os.path.join(src, top)):
            for n in dirs + files:
                wanted.add(os.path.relpath(os.path.join(root, n), src))
            if len(wanted) > max_paths:
                raise Untrusted(f"more than {max_paths} paths changed")
    if len(wanted) > max_paths:
        raise Untrusted(f"more than {max_paths} paths changed")
    one, more = index
    # A file with several names, changed through one the journal saw go (written or chmodded
    # through a descriptor after unlinking that name): its other names are listed, whole.
    names_of = {p: ino for ino, paths in more.items() for p in paths}
    listed, groups = [], {}
    todo = collections.deque(sorted(wanted))
    seen = set(todo)
    while todo:
        rel = todo.popleft()
        s = _lstat_in(src, rel)
        target = os.path.join(dst, rel)
        d = _lstat_in(dst, rel)
        if s is None:
            if d is not None:
                _remove(target, d)
                removed += 1
            for other in more.get(names_of.get(rel), ()):
                whole.add(other)
                for path in reversed([other] + _parents(other)):
                    if path not in seen:
                        seen.add(path)
                        todo.append(path)
            continue
        if d is not None:
            if stat.S_IFMT(s.st_mode) != stat.S_IFMT(d.st_mode) or (rel in whole and stat.S_ISREG(d.st_mode)):
                _remove(target, d)
                removed += 1
            elif (
                not stat.S_ISDIR(d.st_mode)
                and d.st_nlink > 1
                and (s.st_ctime_ns >= since_ns or (s.st_mode, s.st_uid, s.st_gid) != (d.st_mode, d.st_uid, d.st_gid))
            ):
                os.unlink(target)  # shared: rsync writes it anew (the rule in this module's docstring)
                removed += 1
        listed.append(rel)
        if stat.S_ISREG(s.st_mode) and s.st_nlink > 1 and s.st_ino not in groups:
            # Its other names, changed with it: from the index and the journal.
            groups[s.st_ino] = s
            for other in more.get(s.st_ino, [one.get(s.st_ino)]):
                if other is not None and other not in seen:
                    for path in reversed([other] + _parents(other)):  # parents first
                        if path not in seen:
                            seen.add(path)
                            todo.append(path)
    names = {}
    for rel in listed:
        if (
            rel != "."
            and _lstat_in(dst, os.path.dirname(rel) or ".") is None
            and any(
                _lstat(os.path.join(dst, p)) is not None and not stat.S_ISDIR(_lstat(os.path.join(dst, p)).st_mode)
                for p in _parents(rel)
            )
        ):
            # A directory of the copy on the way is not a real one and was not listed: rsync
            # must never write through it.
            raise Untrusted(f"the copy has a non-directory on the way to {rel!r}")
        st = _lstat_in(src, rel)
        if (
            st is not None
            and st.st_ino in groups
            and (st.st_dev, st.st_ino)
            == (
                groups[st.st_ino].st_dev,
                st.st_ino,
            )
        ):
            names[st.st_ino] = names.get(st.st_ino, 0) + 1
    for ino, st in groups.items():
        if names.get(ino, 0) < st.st_nlink:
            raise Untrusted(f"a changed file has {st.st_nlink} names and the journal found {names.get(ino, 0)}")
    if "." in listed:
        # rsync given "." looks at every entry of the root, listed or not: the shared ones must
        # not get an attribute change in place (the rule of this module's docstring).
        gone = _unshare_entries(src, dst, since_ns)
        removed += len(gone)
        listed += [n for n in gone if n not in seen and _lstat(os.path.join(src, n)) is not None]
    listed.sort()
    if listed:
        with tempfile.NamedTemporaryFile(prefix=".files-from-", dir=os.path.dirname(dst.rstrip("/"))) as f:
            f.write(b"".join(os.fsencode(r) + b"\0" for r in listed))
            f.flush()
            # -a does not recurse with --files-from: exactly the listed entries (and their
            # parents' attributes); new directories were listed entry by entry above. -I: a
            # listed file is copied whatever its size and time say (a rename over a file of the
            # same size and time, or a write through a mapping, leaves both as they were).
            _rsync(RSYNC + ["-I", f"--files-from={f.name}", "--from0"], src, dst)
    return len(listed), removed


def _lstat(path):
    try:
        return os.lstat(path)
    except OSError:
        return None


def _lstat_in(root, rel):
    """lstat of root/rel, or None when it is missing or a directory on the way is not a real
    one (a symlink is never followed: in a container's tree it may point anywhere on the host)."""
    if rel == ".":
        return _lstat(root)
    parts = rel.split("/")
    path = root
    for i, part in enumerate(parts):
        path = os.path.join(path, part)
        st = _lstat(path)
        if st is None or (i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode)):
            return None
    return st


def _parents(rel):
    out = []
    while True:
        rel = os.path.dirname(rel)
        out.append(rel or ".")
        if not rel:
            return out


def new_bytes_estimate(src, link_dest):
    """About how many bytes a sharing copy of `src` would write (what is not in `link_dest`):
    rsync's dry run, which reads only metadata. The whole tree's size when nothing is shared."""
    if not link_dest or not shutil.which("rsync"):
        return None
    scratch = tempfile.mkdtemp(prefix=".estimate-", dir=os.path.dirname(os.path.dirname(link_dest)))
    try:
        rc, out, err = run(
            ["rsync", "-aH", "-n", "--stats", f"--link-dest={os.path.abspath(link_dest)}"]
            + [src.rstrip("/") + "/", os.path.join(scratch, "x") + "/"],
            timeout=600,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for line in out.splitlines():
        if line.startswith("Total transferred file size:"):
            digits = "".join(c for c in line.split(":", 1)[1] if c.isdigit())
            if digits:
                return int(digits)
    return None


# --- memory images at rest -------------------------------------------------------------


def zstd_version():
    if not shutil.which("zstd"):
        return None
    rc, out, err = run(["zstd", "-V"], timeout=20)
    return (out or err).strip().splitlines()[0][:100] if rc == 0 and (out or err).strip() else None


def compress_images(images):
    """Compress the memory pages (pages-*.img, nearly all of a dump) with zstd, in place.
    Returns (compression or None, stored bytes, raw bytes). Without zstd they stay as they are."""
    raw = sum(os.lstat(os.path.join(images, n)).st_size for n in os.listdir(images))
    pages = sorted(n for n in os.listdir(images) if n.startswith("pages-") and n.endswith(".img"))
    if not pages or not shutil.which("zstd"):
        return None, raw, raw
    # One zstd for all of them (each input becomes <input>.zst, the input removed).
    run(
        ["zstd", "-q", "-3", "-T0", "--rm", "-f", "--"] + [os.path.join(images, n) for n in pages],
        timeout=1800,
        check=True,
    )
    stored = sum(os.lstat(os.path.join(images, n)).st_size for n in os.listdir(images))
    return "zstd", stored, raw


def is_compressed(images):
    try:
        return any(n.endswith(ZSTD_SUFFIX) for n in os.listdir(images))
    except OSError:
        return False


def restore_work_dir(name):
    return os.path.join(S.CTWEB_PATH, "restore", name)


def plain_images(images, work):
    """A private copy of a snapshot's images in `work` (made afresh), decompressed, for CRIU
    to restore from: CRIU writes its log and statistics into its images directory, and the
    snapshot must stay exactly as it was taken. Returns the bytes written."""
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, mode=0o700)
    packed = []
    for n in sorted(os.listdir(images)):
        src = os.path.join(images, n)
        if not stat.S_ISREG(os.lstat(src).st_mode):
            continue  # a dump holds plain files only
        if n.endswith(ZSTD_SUFFIX):
            packed.append(src)
        else:
            shutil.copyfile(src, os.path.join(work, n))
    if packed:  # one zstd for all: <name>.zst -> work/<name>
        run(["zstd", "-q", "-d", "-f", "--output-dir-flat", work, "--"] + packed, timeout=1800, check=True)
    return sum(os.lstat(os.path.join(work, n)).st_size for n in os.listdir(work))


# --- what the host offers for snapshots (the probe) -----------------------------------------


def _fs_type(path):
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    rc, out, err = run(["stat", "-f", "-c", "%T", probe], timeout=20)
    return out.strip() if rc == 0 else None


def _reflink(path):
    """Whether this filesystem clones files (cp --reflink=always works here)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        d = tempfile.mkdtemp(prefix=".reflink-probe-", dir=path)
    except OSError:
        return None
    try:
        with open(os.path.join(d, "a"), "wb") as f:
            f.write(b"ctweb")
        rc, out, err = run(["cp", "--reflink=always", os.path.join(d, "a"), os.path.join(d, "b")], timeout=20)
        return rc == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


NATIVE_COW = {"btrfs": "btrfs subvolumes", "zfs": "ZFS datasets"}


def storage_probe():
    """How this host keeps snapshots: the filesystem under them, what it can share, zstd."""
    fs = _fs_type(S.SNAPSHOTS_PATH)
    lvm = shutil.which("lvs") is not None
    # A real subvolume, read-only snapshot and deletion in a scratch directory (cow.probe).
    cow_used, cow_why = cow.probe(S.LXC_PATH, S.SNAPSHOTS_PATH, S.CTWEB_PATH)
    return {
        "filesystem": fs,
        "sharing": "hardlink" if shutil.which("rsync") else "none",
        "reflink": _reflink(S.CTWEB_PATH),
        "native_cow": NATIVE_COW.get(fs or ""),
        "native_cow_used": cow_used,  # btrfs: new containers' rootfs are subvolumes, snapshots of them O(1)
        "native_cow_not_used_because": cow_why if NATIVE_COW.get(fs or "") else None,
        "lvm_tools": lvm,
        "overlayfs": _overlay_available(),
        "zstd": zstd_version(),
        "used_bytes": du_once([S.SNAPSHOTS_PATH]) if os.path.isdir(S.SNAPSHOTS_PATH) else 0,
    }


def _overlay_available():
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False
