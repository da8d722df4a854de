"""Native copy-on-write on btrfs, through the kernel's ioctls (no btrfs-progs needed).

On a host whose /var/lib/lxc and /var/lib/ctweb are one btrfs filesystem, a container's rootfs
is a subvolume (made before lxc-create fills it) and a snapshot's rootfs is one read-only
subvolume snapshot of it, taken while the container is frozen: no copy, O(1) in the rootfs's
size. Nothing ever writes a read-only snapshot (the kernel refuses: EROFS), and the live rootfs
and the snapshots share extents that btrfs copies on the first write to either side, so a write
never reaches a snapshot.

A read-only subvolume cannot be emptied by unlinking (EROFS): every removal of a tree that may
hold one goes through `remove_at` / `rmtree` here, which destroy subvolumes (SNAP_DESTROY, root
only) and remove everything else as shutil.rmtree does.

Disk accounting: snapshots are separate subvolumes (their own st_dev) sharing extents, so
counting inodes would count a full copy per snapshot. On btrfs, `extent_bytes` counts the data
extents the files reference (FIEMAP), each physical byte once, and `unshared_bytes` those that
nothing else references (FIEMAP_EXTENT_SHARED). Metadata (directories, inodes, small files
stored inline in the metadata tree) is not in FIEMAP's physical space: `extent_bytes` counts
inline data by its size once per inode, `unshared_bytes` not at all (FIEMAP cannot tell whether a
snapshot still shares it), and the rest of the metadata is counted by neither: on a debian
rootfs, a few MiB per snapshot that was changed a lot, about nothing for an idle one.
"""

import errno
import fcntl
import os
import platform
import shutil
import stat
import struct
import tempfile

BTRFS_IOCTL_MAGIC = 0x94
BTRFS_FIRST_FREE_OBJECTID = 256  # the inode number of every subvolume's root directory
BTRFS_SUBVOL_RDONLY = 1 << 1
VOL_ARGS_SIZE = 4096  # struct btrfs_ioctl_vol_args and _v2 are both 4096 bytes
VOL_NAME_MAX = 4087  # btrfs_ioctl_vol_args: __s64 fd; char name[4088]
SUBVOL_NAME_MAX = 4039  # btrfs_ioctl_vol_args_v2's name[BTRFS_SUBVOL_NAME_MAX + 1]
FS_INFO_SIZE = 1024  # struct btrfs_ioctl_fs_info_args

_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)

# The ioctl number encoding: most architectures use the generic one; a few have their own.
if platform.machine().startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
    _IOC_WRITE, _IOC_READ, _IOC_SIZEBITS = 4, 2, 13
else:
    _IOC_WRITE, _IOC_READ, _IOC_SIZEBITS = 1, 2, 14
_IOC_DIRSHIFT = 16 + _IOC_SIZEBITS


def _ioc(direction, kind, nr, size):
    return (direction << _IOC_DIRSHIFT) | (size << 16) | (kind << 8) | nr


IOC_SUBVOL_CREATE = _ioc(_IOC_WRITE, BTRFS_IOCTL_MAGIC, 14, VOL_ARGS_SIZE)
IOC_SNAP_DESTROY = _ioc(_IOC_WRITE, BTRFS_IOCTL_MAGIC, 15, VOL_ARGS_SIZE)
IOC_SNAP_CREATE_V2 = _ioc(_IOC_WRITE, BTRFS_IOCTL_MAGIC, 23, VOL_ARGS_SIZE)
IOC_FS_INFO = _ioc(_IOC_READ, BTRFS_IOCTL_MAGIC, 31, FS_INFO_SIZE)
FIEMAP_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, reserved64[2], flags, reserved[3]
FS_IOC_FIEMAP = _ioc(_IOC_READ | _IOC_WRITE, ord("f"), 11, FIEMAP_HEADER.size)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_SHARED = 0x2000
FIEMAP_BATCH = 128
# The subvolumes inside a subvolume, from the filesystem's root tree (BTRFS_IOC_TREE_SEARCH) and
# each one's place (BTRFS_IOC_INO_LOOKUP): both root only (CAP_SYS_ADMIN), as the agent runs.
IOC_TREE_SEARCH = _ioc(_IOC_READ | _IOC_WRITE, BTRFS_IOCTL_MAGIC, 17, 4096)  # btrfs_ioctl_search_args
IOC_INO_LOOKUP = _ioc(_IOC_READ | _IOC_WRITE, BTRFS_IOCTL_MAGIC, 18, 4096)  # btrfs_ioctl_ino_lookup_args
# btrfs_ioctl_search_key: tree_id, min/max objectid, min/max offset, min/max transid, min/max
# type, nr_items, unused, unused1-4
SEARCH_KEY = struct.Struct("=7Q4I4Q")
SEARCH_NR_ITEMS = 64  # offset of nr_items in it
SEARCH_HEADER = struct.Struct("=3Q2I")  # transid, objectid, offset, type, len
ROOT_REF = struct.Struct("<2QH")  # btrfs_root_ref (on disk, little-endian): dirid, sequence, name_len
INO_LOOKUP = struct.Struct("=2Q")  # treeid, objectid; then name[4080]
BTRFS_ROOT_TREE_OBJECTID = 1
BTRFS_ROOT_REF_KEY = 156  # key (parent subvolume id, ROOT_REF, child subvolume id)
U64_MAX = (1 << 64) - 1


class CowError(Exception):
    pass


# --- what is where ----------------------------------------------------------------------------


def _fsid_fd(fd):
    try:
        buf = bytearray(FS_INFO_SIZE)
        fcntl.ioctl(fd, IOC_FS_INFO, buf)
    except OSError:
        return None  # ENOTTY (another filesystem) or anything else: not btrfs for us
    return bytes(buf[16:32])


def fsid(path):
    """The btrfs filesystem id of `path` (its nearest existing ancestor), or None if not btrfs."""
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent
    try:
        fd = os.open(probe, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        return _fsid_fd(fd)
    finally:
        os.close(fd)


def is_btrfs(path):
    return fsid(path) is not None


def is_subvolume(path):
    """A directory that is the root of a btrfs subvolume (never following a symlink)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_FIRST_FREE_OBJECTID and is_btrfs(path)


def _ino_lookup(fd, tree, objectid):
    """(tree id, path) of inode `objectid` of subvolume `tree` (0: the one `fd` is in); the
    path is relative to the subvolume's root, "" for the root itself, else ending in "/"."""
    buf = bytearray(4096)
    INO_LOOKUP.pack_into(buf, 0, tree, objectid)
    fcntl.ioctl(fd, IOC_INO_LOOKUP, buf)
    treeid = INO_LOOKUP.unpack_from(buf, 0)[0]
    name = bytes(buf[INO_LOOKUP.size :]).split(b"\0", 1)[0]
    return treeid, name


def _child_subvolumes(fd, most):
    """The subvolumes whose parent is the subvolume `fd` is the root of (relative paths, at
    most `most`): its ROOT_REF items in the filesystem's root tree, placed by INO_LOOKUP."""
    parent = _ino_lookup(fd, 0, BTRFS_FIRST_FREE_OBJECTID)[0]
    found, offset = [], 0
    while len(found) < most:
        buf = bytearray(4096)
        SEARCH_KEY.pack_into(
            buf, 0, BTRFS_ROOT_TREE_OBJECTID, parent, parent, offset, U64_MAX, 0, U64_MAX,
            BTRFS_ROOT_REF_KEY, BTRFS_ROOT_REF_KEY, 4096, 0, 0, 0, 0, 0,
        )  # fmt: skip
        fcntl.ioctl(fd, IOC_TREE_SEARCH, buf)
        items = struct.unpack_from("=I", buf, SEARCH_NR_ITEMS)[0]
        if not items:
            break
        pos = SEARCH_KEY.size
        for _ in range(items):
            _transid, objectid, child, kind, size = SEARCH_HEADER.unpack_from(buf, pos)
            pos += SEARCH_HEADER.size
            if kind == BTRFS_ROOT_REF_KEY and objectid == parent and size >= ROOT_REF.size:
                dirid, _sequence, name_len = ROOT_REF.unpack_from(buf, pos)
                name = bytes(buf[pos + ROOT_REF.size : pos + ROOT_REF.size + min(name_len, size - ROOT_REF.size)])
                found.append(os.fsdecode(_ino_lookup(fd, parent, dirid)[1] + name))
            pos += size
            offset = child + 1
        if offset > U64_MAX:
            break
    return sorted(found[:most])


def nested_subvolumes(root, most=1):
    """Up to `most` subvolumes inside the subvolume `root` (relative paths): a btrfs snapshot of
    `root` holds an empty directory where each of them is. Asked of the filesystem's root tree,
    which lists the subvolumes whose parent is `root`'s, wherever they are in it (one ioctl,
    whatever the tree's size; a subvolume inside one of those is not in root's snapshot either).
    Where the kernel refuses the search (no CAP_SYS_ADMIN) the tree is walked, never following
    a symlink, as is a `root` that is not a subvolume's root."""
    try:
        fd = os.open(root, _NOFOLLOW_DIR)
    except OSError:
        return []
    try:
        if os.fstat(fd).st_ino == BTRFS_FIRST_FREE_OBJECTID:
            return _child_subvolumes(fd, most)
    except OSError:
        pass
    finally:
        os.close(fd)
    return _walk_nested(root, most)


def _walk_nested(root, most):
    """nested_subvolumes by stat()ing every directory below `root` (a subvolume's root directory
    has inode 256 and a st_dev of its own)."""
    found = []
    try:
        top = os.lstat(root).st_dev
    except OSError:
        return found
    stack = [root]
    while stack and len(found) < most:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if not e.is_dir(follow_symlinks=False):
                        continue
                    st = e.stat(follow_symlinks=False)  # (readdir's inode number is the subvolume's id)
                except OSError:
                    continue
                if st.st_ino == BTRFS_FIRST_FREE_OBJECTID and st.st_dev != top:
                    found.append(os.path.relpath(e.path, root))
                    if len(found) >= most:
                        break
                    continue  # what is inside it is not in root's snapshot either
                stack.append(e.path)
    return found


def same_filesystem(a, b):
    fa = fsid(a)
    return fa is not None and fa == fsid(b)


def is_read_only(path):
    """Whether the subvolume at `path` refuses writes (statvfs's ST_RDONLY is per mount, not per
    subvolume: try making an entry, the kernel says EROFS)."""
    try:
        os.mkdir(os.path.join(path, ".ctweb-rw-probe"), 0o700)
    except OSError as e:
        return e.errno == errno.EROFS
    os.rmdir(os.path.join(path, ".ctweb-rw-probe"))
    return False


# --- subvolumes -------------------------------------------------------------------------------


def _split(path, limit):
    parent, name = os.path.split(os.path.abspath(path))
    raw = name.encode()
    if not raw or b"/" in raw or len(raw) > limit or name in (".", ".."):
        raise CowError(f"Bad subvolume name {name!r}.")
    return parent, raw


def _vol_args(raw, fd=0):
    # A bytearray: fcntl.ioctl copies an immutable argument into a 1024-byte buffer only.
    return bytearray(struct.pack("=q", fd) + raw.ljust(VOL_ARGS_SIZE - 8, b"\0"))


def _vol_args_v2(raw, fd, flags):
    # fd, transid, flags, 4 x u64 (size + qgroup pointer, or unused), name
    return bytearray(struct.pack("=qQQ32x", fd, 0, flags) + raw.ljust(VOL_ARGS_SIZE - 56, b"\0"))


def _ioctl_in_parent(parent, request, arg, what):
    pfd = os.open(parent, _NOFOLLOW_DIR)
    try:
        fcntl.ioctl(pfd, request, arg)
    except OSError as e:
        raise CowError(f"{what} failed: {e.strerror or e}") from e
    finally:
        os.close(pfd)


def create_subvolume(path):
    """A new, empty subvolume at `path` (which must not exist), mode 0755 like lxc-create's rootfs."""
    parent, raw = _split(path, VOL_NAME_MAX)
    _ioctl_in_parent(parent, IOC_SUBVOL_CREATE, _vol_args(raw), f"Creating the subvolume {path}")
    os.chmod(path, 0o755)


def snapshot(src, dst, readonly=True):
    """`dst` (which must not exist) becomes a snapshot of the subvolume `src`, read-only unless
    told otherwise. O(1): no data is copied; what a container writes after it never reaches it."""
    parent, raw = _split(dst, SUBVOL_NAME_MAX)
    sfd = os.open(src, _NOFOLLOW_DIR)
    try:
        if not _is_subvol_st(os.fstat(sfd)):  # else the kernel snapshots the whole subvolume holding it
            raise OSError(errno.EINVAL, f"{src} is not the root of a subvolume")
        arg = _vol_args_v2(raw, sfd, BTRFS_SUBVOL_RDONLY if readonly else 0)
        _ioctl_in_parent(parent, IOC_SNAP_CREATE_V2, arg, f"Snapshotting {src} to {dst}")
    finally:
        os.close(sfd)


def _destroy_at(parent_fd, name):
    fcntl.ioctl(parent_fd, IOC_SNAP_DESTROY, _vol_args(os.fsencode(name)))


def destroy(path):
    """Delete the subvolume at `path` with everything in it (read-only or not). Subvolumes nested
    inside it must go first (ENOTEMPTY otherwise): `rmtree` does that."""
    parent, raw = _split(path, VOL_NAME_MAX)
    _ioctl_in_parent(parent, IOC_SNAP_DESTROY, _vol_args(raw), f"Deleting the subvolume {path}")


# --- removing trees that may hold subvolumes -------------------------------------------------------


def _is_subvol_st(st):
    return stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_FIRST_FREE_OBJECTID


def _rm_at(parent_fd, name, ignore):
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError:
        if ignore:
            return
        raise
    try:
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent_fd)
            return
        fd = os.open(name, _NOFOLLOW_DIR, dir_fd=parent_fd)
        try:
            subvol = _is_subvol_st(st) and _fsid_fd(fd) is not None
            if subvol:
                try:  # the whole subvolume at once, read-only or not (root only)
                    _destroy_at(parent_fd, name)
                    return
                except OSError as e:
                    if e.errno != errno.ENOTEMPTY:  # ENOTEMPTY: subvolumes nested in it go first
                        raise
            for n in os.listdir(fd):
                _rm_at(fd, n, ignore)
        finally:
            os.close(fd)
        if subvol:
            _destroy_at(parent_fd, name)
        else:
            os.rmdir(name, dir_fd=parent_fd)
    except OSError:
        if not ignore:
            raise


def remove_at(dir_fd, name, ignore=False):
    """Remove the entry `name` of the directory `dir_fd` with all it holds, never following a
    symlink: like shutil.rmtree(name, dir_fd=dir_fd), but a btrfs subvolume in it is deleted as
    one (a read-only one cannot be emptied file by file)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
    elif _fsid_fd(dir_fd) is None:  # not btrfs: nothing here can be a subvolume of ours
        shutil.rmtree(name, dir_fd=dir_fd, ignore_errors=ignore)
    else:
        _rm_at(dir_fd, name, ignore)


def rmtree(path, ignore=False):
    """shutil.rmtree(path) that also deletes btrfs subvolumes (see remove_at)."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent, _NOFOLLOW_DIR)
    except OSError:
        if ignore:
            return
        raise
    try:
        remove_at(pfd, name, ignore)
    except OSError:
        if not ignore:
            raise
    finally:
        os.close(pfd)


# --- the probe ------------------------------------------------------------------------------------


def probe(rootfs_base, snapshots_base, scratch_base):
    """Whether snapshots here can be btrfs snapshots: rootfs and snapshot directories on one
    btrfs filesystem, and a real subvolume, read-only snapshot of it (refusing a write) and the
    deletion of both, in a scratch directory of `scratch_base`. Returns (used, why-not or None)."""
    if fsid(rootfs_base) is None:
        return False, "the container rootfs directory is not on btrfs"
    if fsid(rootfs_base) != fsid(snapshots_base):
        return False, "the container rootfs and the snapshots are not on one btrfs filesystem"
    try:
        os.makedirs(scratch_base, mode=0o700, exist_ok=True)
        d = tempfile.mkdtemp(prefix=".cow-probe-", dir=scratch_base)
    except OSError as e:
        return False, f"no scratch directory ({e.strerror or e})"
    try:
        sv, snap = os.path.join(d, "sv"), os.path.join(d, "snap")
        create_subvolume(sv)
        with open(os.path.join(sv, "f"), "wb") as f:
            f.write(b"ctweb")
        snapshot(sv, snap)
        if not is_read_only(snap):
            return False, "a read-only snapshot took a write"
        destroy(snap)
        destroy(sv)
        return True, None
    except (CowError, OSError) as e:
        return False, f"subvolume operations fail here ({e})"
    finally:
        rmtree(d, ignore=True)


# --- disk accounting by extents ------------------------------------------------------------------


def file_extents(fd):
    """[(physical, length, flags)] of the open regular file's data (FIEMAP, after a sync of it)."""
    out, start = [], 0
    want = FIEMAP_HEADER.size + FIEMAP_BATCH * FIEMAP_EXTENT.size
    while True:
        req = bytearray(want)
        FIEMAP_HEADER.pack_into(req, 0, start, 0xFFFFFFFFFFFFFFFF - start, FIEMAP_FLAG_SYNC, 0, FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, req)
        mapped = FIEMAP_HEADER.unpack_from(req, 0)[3]
        if not mapped:
            return out
        last = False
        for i in range(mapped):
            logical, physical, length, _r1, _r2, flags, *_ = FIEMAP_EXTENT.unpack_from(
                req, FIEMAP_HEADER.size + i * FIEMAP_EXTENT.size
            )
            out.append((physical, length, flags))
            start = logical + length
            last = last or bool(flags & FIEMAP_EXTENT_LAST)
        if last:
            return out


def _walk_files(paths):
    """(path, lstat) of every regular file under `paths`, never following a symlink."""
    for top in paths:
        try:
            st = os.lstat(top)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            yield top, st
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        for root, _dirs, files in os.walk(top):
            for n in files:
                p = os.path.join(root, n)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield p, st


def _extents_of(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOATIME", 0))
    except OSError:
        return None
    try:
        return file_extents(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def _union(ranges):
    total, end = 0, -1
    for a, b in sorted(ranges):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def extent_bytes(paths):
    """Disk bytes the files under `paths` reference, each physical byte once however many files
    and snapshots share it (plus inline data once per inode; metadata not counted)."""
    ranges, inline = [], {}
    for path, st in _walk_files(paths):
        extents = _extents_of(path)
        if extents is None:
            continue
        for physical, length, flags in extents:
            if flags & (FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_UNKNOWN):
                # A snapshot keeps its source's inode numbers and times: one inode's inline data once.
                inline[(st.st_ino, st.st_ctime_ns, st.st_size)] = min(length, st.st_size)
            else:
                ranges.append((physical, physical + length))
    return _union(ranges) + sum(inline.values())


def unshared_bytes(top):
    """Disk bytes that only `top` holds (what removing it would free): data extents referenced by
    no other file or snapshot, of files no hard link outside `top` reaches."""
    files = {}
    for path, st in _walk_files([top]):
        key = (st.st_dev, st.st_ino)
        seen = files.get(key)
        files[key] = (path, st.st_nlink, (seen[2] if seen else 0) + 1)
    ranges = []
    for path, nlink, count in files.values():
        if count < nlink:
            continue  # linked from outside top
        for physical, length, flags in _extents_of(path) or ():
            # Inline data lives in metadata leaves that FIEMAP never calls shared, though a
            # snapshot shares them with its source until either side changes: not counted.
            if not flags & (FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_UNKNOWN):
                ranges.append((physical, physical + length))
    return _union(ranges)
