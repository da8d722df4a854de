"""A change journal of a container's rootfs, so that the frozen pass of a snapshot copies what
changed instead of walking the whole tree while the container is frozen.

How it knows what changed (docs/RELIABILITY.md, "The frozen pass's change journal"):
- fanotify, a filesystem mark on the rootfs's filesystem, started before the running pass
  (the rsync of the whole tree) begins: every write(), truncate, chmod/chown/xattr, create,
  link, unlink, rename anywhere on that filesystem is reported with its directory's file
  handle and its name; handles are resolved (open_by_handle_at, /proc/self/fd) to paths and
  only those under the rootfs are kept. Changes made before the journal started were read by
  the running pass, which starts after it.
- A write through a shared writable mmap is not reported by FAN_MODIFY. The file's last
  release (__fput: close of the last fd, or the munmap of the last mapping) sends
  FAN_CLOSE_WRITE after those writes. So a file written since the journal began either was
  reported, or was still open for writing or mapped shared at the freeze: `open_for_writing`
  lists those from /proc/<pid>/fdinfo and /proc/<pid>/maps of the container's processes.
- A directory gone by the time its handle is resolved (ESTALE) is not a loss: its removal
  from the rootfs was reported in a directory that still exists (or its parent's was), and
  the frozen pass makes each listed path what it is at the freeze.

Anything it cannot vouch for raises Untrusted with the reason, and the caller walks the whole
tree as before (never a silently incomplete snapshot): fanotify refused, the kernel's queue
overflowed, a handle that cannot be resolved for another reason, too many changes, an open
file that cannot be placed, a changed file with hard links the journal did not see.
"""

import ctypes
import errno
import os
import select
import stat
import struct
import threading

# <sys/fanotify.h>
FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_CLOSE_WRITE = 0x8
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ONDIR = 0x40000000
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_UNLIMITED_QUEUE = 0x10
FAN_REPORT_FID = 0x200
FAN_REPORT_DFID_NAME = 0x400 | 0x800
FAN_MARK_ADD = 0x1
FAN_MARK_FILESYSTEM = 0x100
FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3
FANOTIFY_METADATA_VERSION = 3
AT_FDCWD = -100
O_PATH = 0o10000000

EVENTS = (
    FAN_MODIFY
    | FAN_ATTRIB
    | FAN_CLOSE_WRITE
    | FAN_CREATE
    | FAN_DELETE
    | FAN_MOVED_FROM
    | FAN_MOVED_TO
    | FAN_DELETE_SELF
    | FAN_MOVE_SELF
    | FAN_ONDIR
)
# A journal listing more paths than this is not worth it (the walk is then no slower): fall back.
MAX_PATHS = 50_000
# Events read (from the whole filesystem, most of them elsewhere) before it gives up.
MAX_EVENTS = 20_000_000

META = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
INFO = struct.Struct("=BBH")  # struct fanotify_event_info_header
FSID = 8
HANDLE = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type


class Untrusted(Exception):
    """The journal cannot vouch for the changes: walk the whole tree instead."""


_libc = None


def _c():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
        libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        _libc = libc
    return _libc


def _err(what):
    n = ctypes.get_errno()
    return f"{what}: {os.strerror(n)} (errno {n})"


class Journal:
    """Start before the running pass; `stop()` after the freeze gives what changed."""

    def __init__(self, root):
        self.root = os.path.realpath(root)
        self.prefix = self.root.rstrip("/") + "/"
        self.fd = None
        self.mount_fd = None
        self.changed = set()  # relative paths ("." is the root) whose state may differ
        self.trees = set()  # directories created or moved in: copied whole
        self.whole = set()  # files closed after a write (maybe through a mapping): copied whole
        self.cache = {}  # directory handle -> relative path, or None (outside the rootfs)
        self.events = 0
        self.broken = None  # why it cannot be trusted
        self._stop_r = self._stop_w = None
        self._thread = None
        self._lock = threading.Lock()

    def start(self):
        """Raises Untrusted when fanotify is not to be had here."""
        libc = _c()
        base = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_UNLIMITED_QUEUE
        fd = -1
        for flags in (base | FAN_REPORT_DFID_NAME | FAN_REPORT_FID, base | FAN_REPORT_DFID_NAME):
            fd = libc.fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC)
            if fd >= 0:
                break
        if fd < 0:
            raise Untrusted(_err("fanotify_init"))
        self.fd = fd
        path = self.root.encode()
        ok = False
        for mask in (EVENTS | FAN_EVENT_ON_CHILD, EVENTS, EVENTS & ~(FAN_DELETE_SELF | FAN_MOVE_SELF)):
            if libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, AT_FDCWD, path) == 0:
                ok = True
                break
        if not ok:
            message = _err("fanotify_mark")
            self.close()
            raise Untrusted(message)
        try:
            self.mount_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._stop_r, self._stop_w = os.pipe()
            self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
            self._thread.start()
        except BaseException:
            self._thread = None
            self.close()  # never a filesystem mark (and its unlimited queue) left behind
            raise
        return self

    def _run(self):
        try:
            while True:
                ready, _, _ = select.select([self.fd, self._stop_r], [], [])
                if self._stop_r in ready:
                    return
                self._drain()
        except Exception as e:  # anything unexpected: not trusted
            self.broken = self.broken or f"journal reader failed: {e!r}"

    def _drain(self):
        with self._lock:
            while self.broken is None:
                try:
                    buf = os.read(self.fd, 1 << 20)
                except BlockingIOError:
                    return
                if not buf:
                    return
                self._parse(buf)

    def _parse(self, buf):
        off = 0
        while off + META.size <= len(buf):
            length, vers, _, meta_len, mask, fd, pid = META.unpack_from(buf, off)
            if length < META.size or off + length > len(buf) or vers != FANOTIFY_METADATA_VERSION:
                self.broken = "a malformed fanotify event"
                return
            if fd >= 0:
                os.close(fd)
            self.events += 1
            if mask & FAN_Q_OVERFLOW:
                self.broken = "the kernel's event queue overflowed"
                return
            if self.events > MAX_EVENTS:
                self.broken = f"more than {MAX_EVENTS} events on the filesystem"
                return
            self._event(buf, off + meta_len, off + length, mask)
            if len(self.changed) > MAX_PATHS:
                self.broken = f"more than {MAX_PATHS} paths changed"
                return
            off += length

    def _event(self, buf, off, end, mask):
        own = None  # the object's own handle (FAN_REPORT_FID)
        placed = False
        while off + INFO.size <= end:
            kind, _, ln = INFO.unpack_from(buf, off)
            if ln < INFO.size or off + ln > end:
                self.broken = "a malformed fanotify info record"
                return
            if kind in (FAN_EVENT_INFO_TYPE_DFID_NAME, FAN_EVENT_INFO_TYPE_DFID, FAN_EVENT_INFO_TYPE_FID):
                h = off + INFO.size + FSID
                nbytes, htype = HANDLE.unpack_from(buf, h)
                handle = buf[h : h + HANDLE.size + nbytes]
                if kind == FAN_EVENT_INFO_TYPE_FID:
                    own = handle
                else:
                    name = "."
                    if kind == FAN_EVENT_INFO_TYPE_DFID_NAME:
                        raw = buf[h + HANDLE.size + nbytes : off + ln]
                        name = os.fsdecode(raw.split(b"\0", 1)[0]) or "."
                    self._record(handle, name, mask)
                    placed = True
                    if self.broken:
                        return
            off += ln
        if placed or own is not None:
            # With no directory, an event on the inode alone: its link count changed (link(),
            # unlink()), or its own DELETE_SELF/MOVE_SELF. The names themselves come as
            # CREATE/DELETE/MOVED_* in their directories, and the frozen pass finds every name
            # of a changed file (hard links) itself.
            return
        self.broken = f"a fanotify event (mask {mask:#x}) without its directory"

    def _resolve(self, handle):
        if handle in self.cache:
            return self.cache[handle]
        for _ in range(3):
            fd = _c().open_by_handle_at(self.mount_fd, handle, O_PATH | os.O_CLOEXEC)
            n = ctypes.get_errno() if fd < 0 else 0
            if n not in (errno.ENOMEM, errno.EINTR):
                break
        if fd < 0:
            if n in (errno.ESTALE, errno.ENOENT):
                # Gone: its removal from the rootfs (if it was in it) is reported in a
                # directory that still exists. Not cached: a handle is never reused.
                return None
            self.broken = _err("open_by_handle_at")
            return None
        try:
            if os.fstat(fd).st_nlink == 0:
                rel = None  # deleted, as above
            else:
                path = os.readlink(f"/proc/self/fd/{fd}")
                if path == self.root:
                    rel = "."
                elif path.startswith(self.prefix):
                    rel = path[len(self.prefix) :]
                else:
                    rel = None
        finally:
            os.close(fd)
        self.cache[handle] = rel
        return rel

    def _record(self, handle, name, mask):
        d = self._resolve(handle)
        if d is None:
            return
        rel = os.path.normpath(os.path.join(d, name)) if name != "." else d
        self.changed.add(rel)
        if mask & FAN_CLOSE_WRITE:
            self.whole.add(rel)
        if mask & (FAN_CREATE | FAN_MOVED_TO | FAN_MOVED_FROM | FAN_DELETE) and name != ".":
            self.changed.add(d)  # the directory's own times changed
            if mask & FAN_ONDIR and mask & (FAN_CREATE | FAN_MOVED_TO):
                self.trees.add(rel)

    def stop(self):
        """Every event queued so far (after the freeze: all the container made) read, the
        reader ended: (paths that may have changed, directories created or moved in, files to
        copy whole). Raises Untrusted if the journal cannot be trusted."""
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
            self._thread = None
            self._drain()
        broken = self.broken
        self.close()
        if broken:
            raise Untrusted(broken)
        return set(self.changed), set(self.trees), set(self.whole)

    def close(self):
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
            self._thread = None
        for attr in ("fd", "mount_fd", "_stop_r", "_stop_w"):
            fd = getattr(self, attr)
            if fd is not None and fd >= 0:
                os.close(fd)
            setattr(self, attr, None)


def start(root):
    """A running journal of `root`, or (None, reason) when fanotify is not to be had."""
    try:
        return Journal(root).start(), None
    except (Untrusted, OSError) as e:
        return None, str(e)


# --- what was open for writing, or mapped shared, at the freeze ------------------------------


def _place(root_st, prefix, pid, link, dev, ino, nlink=0):
    """The path under the rootfs of an open file (its link as /proc shows it), or None when
    it is not on the rootfs's filesystem. Raises Untrusted when it is but cannot be placed."""
    if dev != root_st.st_dev:
        return None
    if link.endswith(" (deleted)"):
        if nlink > 0:  # the name it was opened by is gone, but it has others: which, unknown
            raise Untrusted(f"process {pid} holds {link!r}, a file that still has other names")
        return None  # unlinked: in no tree
    for candidate in (link, prefix + link.lstrip("/")):
        try:
            st = os.lstat(candidate)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (dev, ino):
            path = os.path.realpath(candidate)
            if path.startswith(prefix):
                return path[len(prefix) :]
            if candidate == link:
                return None  # a host path outside the rootfs
    raise Untrusted(f"process {pid} has {link!r} open on the rootfs's filesystem, and it cannot be placed")


def open_for_writing(root, pids):
    """Relative paths of the files under `root` that the processes `pids` hold open for
    writing or map shared (read while they are frozen)."""
    root = os.path.realpath(root)
    prefix = root.rstrip("/") + "/"
    root_st = os.stat(root)
    out = set()
    for pid in pids:
        base = f"/proc/{pid}"
        try:
            fds = os.listdir(f"{base}/fd")
        except FileNotFoundError:
            continue  # ended
        for n in fds:
            try:
                with open(f"{base}/fdinfo/{n}") as f:
                    info = f.read()
                flags = int(info.split("flags:", 1)[1].split()[0], 8)
                if flags & os.O_ACCMODE == os.O_RDONLY:
                    continue
                st = os.stat(f"{base}/fd/{n}")
                link = os.readlink(f"{base}/fd/{n}")
            except FileNotFoundError:
                continue  # closed meanwhile
            except (OSError, IndexError, ValueError) as e:
                raise Untrusted(f"cannot read process {pid}'s fd {n}: {e}") from None
            if not stat.S_ISREG(st.st_mode) or st.st_nlink == 0:
                continue
            rel = _place(root_st, prefix, pid, link, st.st_dev, st.st_ino, st.st_nlink)
            if rel is not None:
                out.add(rel)
        try:
            with open(f"{base}/maps") as f:
                maps = f.read().splitlines()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise Untrusted(f"cannot read process {pid}'s maps: {e}") from None
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[1][1] != "w" or parts[1][3] != "s":  # written through: shared and writable
                continue
            # The mapped file itself (maps shows btrfs's anonymous device, not the file's).
            try:
                st = os.stat(f"{base}/map_files/{parts[0]}")
            except FileNotFoundError:
                continue  # unmapped meanwhile
            except OSError as e:
                raise Untrusted(f"cannot read process {pid}'s mapping {parts[0]}: {e}") from None
            if not stat.S_ISREG(st.st_mode) or st.st_nlink == 0:
                continue
            rel = _place(root_st, prefix, pid, parts[5], st.st_dev, st.st_ino, st.st_nlink)
            if rel is not None:
                out.add(rel)
    return out
