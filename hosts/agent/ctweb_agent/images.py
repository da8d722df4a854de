"""Moving a container's files as tars: `send` (walked without following any symlink) and
`receive` (staged beneath the receiving directory, checked, then put in place), relayed by the
dashboard or direct (see transfer)."""

import errno
import io
import json
import os
import select
import stat
import sys
import tarfile
import time

from . import cow, journal, mjournal
from . import state as S
from .common import _NOFOLLOW_DIR, NAME_RE, AgentError, _ms, _read_json, check_name
from .criu import _rootfs
from .lxc import _apply_allowlist, _cdir, _read_config, _read_lines, _require
from .migrate import DELTA_MEMBER, SEND_KINDS, _manifest, _mig_dir, _send_sources
from .transfer import _direct_accept, _direct_connect, _direct_params, _DirectIn


def _tarinfo(arcname, st, linkname=""):
    info = tarfile.TarInfo(arcname)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = st.st_mtime
    if stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, linkname
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    else:
        return None  # sockets and the like do not travel
    return info


def _add_entry(tar, dir_fd, name, arcname, links):
    """Add one directory entry (not recursing). Returns the entry's lstat or None."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None  # deleted while we read: the delta will say so
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        first = links.get((st.st_dev, st.st_ino))
        if first:
            info = _tarinfo(arcname, st)
            info.type, info.linkname, info.size = tarfile.LNKTYPE, first, 0
            tar.addfile(info)
            return st
    linkname = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else ""
    info = _tarinfo(arcname, st, linkname)
    if info is None:
        return st
    if info.type == tarfile.REGTYPE:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=dir_fd)
        except (FileNotFoundError, OSError):
            return None
        with os.fdopen(fd, "rb") as f:
            fst = os.fstat(f.fileno())
            if not stat.S_ISREG(fst.st_mode):
                return None
            info.size = fst.st_size
            tar.addfile(info, _Exactly(f, fst.st_size))
        if st.st_nlink > 1:
            links[(st.st_dev, st.st_ino)] = arcname  # only once it is in the tar
        return st
    tar.addfile(info)
    return st


class _Exactly:
    """A reader that yields exactly n bytes: a file that grows or shrinks while we read it
    still matches the size its tar header promised (zero-padded if it shrank)."""

    def __init__(self, f, n):
        self.f, self.left = f, n

    def read(self, size=-1):
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.f.read(size)
        if len(data) < size:
            data += b"\0" * (size - len(data))
        self.left -= len(data)
        return data


def _tar_tree(tar, path, arcname):
    """Add a directory tree to `tar` without ever following a symlink."""
    links = {}
    top = os.open(path, _NOFOLLOW_DIR)
    try:
        tar.addfile(_tarinfo(arcname, os.fstat(top)))
        stack = [(top, arcname)]
        while stack:
            dir_fd, arc = stack.pop()
            try:
                names = sorted(os.listdir(dir_fd))
                for n in names:
                    st = _add_entry(tar, dir_fd, n, f"{arc}/{n}", links)
                    if st is not None and stat.S_ISDIR(st.st_mode):
                        try:
                            stack.append((os.open(n, _NOFOLLOW_DIR, dir_fd=dir_fd), f"{arc}/{n}"))
                        except OSError:
                            pass  # became a symlink or vanished: not followed
            finally:
                if dir_fd != top:
                    os.close(dir_fd)
    finally:
        os.close(top)


def _add_path(tar, root, rel, arcname, links=None):
    """Add one path below `root` (for the delta), walking its parents without following symlinks.
    `links`: shared by the delta's paths, so a file's other names sent with it stay its names."""
    parts = rel.split("/")
    fd = os.open(root, _NOFOLLOW_DIR)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
        _add_entry(tar, fd, parts[-1], arcname, {} if links is None else links)
    except OSError:
        pass  # a parent vanished or is a symlink now: nothing of it is sent
    finally:
        os.close(fd)


def cmd_send(params):
    name = _require(params.get("name"))
    what = params.get("what")
    if what not in SEND_KINDS:
        raise AgentError(f"Cannot send {what!r}.")
    direct = params.get("direct") is not None
    t0 = time.monotonic()
    out = _direct_connect(params) if direct else sys.stdout.buffer
    try:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            if what == "delta":
                _add_delta(tar, name, params)
            else:
                for path, arcname in _send_sources(name, params, what):
                    _tar_tree(tar, path, arcname)
        out.flush()
        if not direct:
            return None  # raw tar only: no JSON on stdout
        out.finish()
    finally:
        if direct:
            out.conn.close()
    return {"bytes": out.bytes, "sha256": out.hash.hexdigest(), "ms": _ms(t0)}


def _add_delta(tar, name, params):
    """What changed in the rootfs since the first copy, and what was deleted (a small rsync):
    from the migration's change journal when it can vouch for it (mjournal.py), else by
    walking the whole tree and comparing it with the first copy's manifest."""
    t0 = time.monotonic()
    mdir = _mig_dir(params)
    if not os.path.isfile(os.path.join(mdir, "manifest.json")):
        raise AgentError("No first copy was made for this migration.")
    root = _rootfs(name)
    rel_root = os.path.relpath(root, _cdir(name))
    held = _read_json(os.path.join(mdir, "held.json")) or []
    replaced = []
    try:
        links = _read_json(os.path.join(mdir, "links.json"))
        if not isinstance(links, dict):
            raise journal.Untrusted("the first copy's list of hard links is missing")
        changed, deleted, replaced = mjournal.delta(name, root, mdir, links, held)
        info = {"frozen_pass": "journal", "frozen_pass_paths": len(changed) + len(deleted)}
    except (journal.Untrusted, OSError) as e:
        info = {"frozen_pass": "walk", "frozen_pass_reason": str(e)[:500]}
        before = _read_json(os.path.join(mdir, "manifest.json")) or {}
        now = _manifest(root)
        # What was mapped shared when the rootfs was first sent is sent again whatever its time says.
        again = {p for p in held if isinstance(p, str) and now.get(p) is not None and stat.S_ISREG(now[p][0])}
        changed = sorted(p for p, v in now.items() if before.get(p) != v or p in again)
        deleted = sorted(p for p in before if p not in now)
    finally:
        mjournal.end(mdir)
    info["list_ms"] = _ms(t0)
    links = {}
    for rel in changed:
        _add_path(tar, root, rel, f"{name}/{rel_root}/{rel}", links)
    _add_path(tar, _cdir(name), "config", f"{name}/config")
    # replaced: directories created or moved in since the first copy, removed on the target
    # before the delta is put in place (what was in them there is not in them here).
    data = json.dumps({"deleted": deleted, "changed": len(changed), "replaced": replaced, **info}).encode()
    info = tarfile.TarInfo(DELTA_MEMBER)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# --- receive: beneath the receiving directory, never through a symlink ----------------------
# The tar comes from another host, and a compromised host controls every byte of it. It is
# unpacked into a fresh private (0700) staging directory beside its destination (same
# filesystem): every member is created relative to its parent directory's descriptor, each
# parent opened with O_NOFOLLOW, so nothing the archive plants (nor anything already on the
# disk) is ever followed. Only once the whole stream arrived (and, for a direct transfer,
# passed its authentication) is the staged tree renamed into place (a delta's files are
# renamed one by one into the existing container directory, again walking by descriptors).
# A refused or broken stream leaves only its staging directory, which is removed.

RECV_STAGE_PREFIX = ".ctweb-recv-"
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID
# The configured roots (LXC_PATH, CTWEB_PATH's directories) are the admin's: they may be
# symlinks (/var/lib/lxc -> /srv/lxc). Everything below them is never followed.
_ROOT_DIR = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_COPY_CHUNK = 1 << 20


def _split_member(name, what="member"):
    """A member name as path components; refused if absolute, empty or leading upwards."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\0" in name:
        raise AgentError(f"Refusing a tar {what} outside its directory: {name!r}")
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise AgentError(f"Refusing a tar {what} outside its directory: {name!r}")
    return parts


class _DirChain:
    """Directories beneath `base_fd`, each component opened with O_NOFOLLOW (a symlink on the way
    fails with ELOOP/ENOTDIR; missing ones made 0700 when `create`), keeping the chain of the last
    one open: a tar's members and a tree's walk come grouped, so the next directory shares most of
    its path with the last and only the rest is opened. At most one descriptor per path component
    is held. The descriptors are the chain's own: callers never close them."""

    def __init__(self, base_fd, create=False):
        self.base, self.create = base_fd, create
        self.names, self.fds = [], []

    def open(self, parts):
        keep = 0
        for have, want in zip(self.names, parts, strict=False):
            if have != want:
                break
            keep += 1
        for fd in self.fds[keep:]:
            os.close(fd)
        del self.names[keep:], self.fds[keep:]
        for part in parts[keep:]:
            at = self.fds[-1] if self.fds else self.base
            try:
                fd = os.open(part, _NOFOLLOW_DIR, dir_fd=at)
            except FileNotFoundError:
                if not self.create:
                    raise
                os.mkdir(part, 0o700, dir_fd=at)
                fd = os.open(part, _NOFOLLOW_DIR, dir_fd=at)
            self.names.append(part)
            self.fds.append(fd)
        return self.fds[-1] if self.fds else self.base

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.names, self.fds = [], []


def _open_beneath(base_fd, parts, create=False):
    """The directory base/parts... as _DirChain opens it, as a descriptor of the caller's own."""
    chain = _DirChain(base_fd, create)
    try:
        return os.dup(chain.open(parts))
    finally:
        chain.close()


def _lstat_at(dir_fd, name):
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dir_fd, name):
    """Remove one entry (a directory with all it holds), never following a symlink."""
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        # Descriptor-based: symlinks inside are removed, not followed; btrfs subvolumes deleted as one.
        cow.remove_at(dir_fd, name)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _in_rootfs(what, parts):
    """Is this member inside a rootfs (the only place for device nodes, setuid files, symlinks)?"""
    if what in ("rootfs", "delta"):
        return len(parts) > 2 and parts[1] == "rootfs"
    if what == "snapshots":
        return len(parts) > 3 and parts[2] == "rootfs"
    return False


def _check_member(m, what, top_name):
    """Refuse what a member may not be, naming it. Returns its path components."""
    parts = _split_member(m.name)
    if parts[0] != top_name:
        raise AgentError(f"Refusing a tar member outside {top_name}/: {m.name!r}")
    kind = (
        "dir"
        if m.isdir()
        else "file"
        if m.isreg()
        else "symlink"
        if m.issym()
        else "hardlink"
        if m.islnk()
        else "device"
        if m.ischr() or m.isblk()
        else "fifo"
        if m.isfifo()
        else None
    )
    if kind is None:
        raise AgentError(f"Refusing a tar member of an unknown kind: {m.name!r}")
    if len(parts) == 1 and kind != "dir":
        raise AgentError(f"Refusing {m.name!r}: the top of a received tree must be a plain directory.")
    inside = _in_rootfs(what, parts)
    if kind in ("symlink", "device", "fifo") and not inside:
        raise AgentError(f"Refusing a {kind} outside a rootfs: {m.name!r}")
    if m.mode & _SPECIAL_BITS and not inside:
        raise AgentError(f"Refusing a setuid/setgid member outside a rootfs: {m.name!r}")
    if what in ("rootfs", "delta") and len(parts) == 2:
        if parts[1] == "config.tmp":
            raise AgentError(f"Refusing {m.name!r}: the agent writes that name itself.")
        if parts[1] == "config" and kind not in ("file", "hardlink"):
            raise AgentError(f"Refusing {m.name!r}: a container's config must be a plain file.")
        if parts[1] == "rootfs" and kind != "dir":
            raise AgentError(f"Refusing {m.name!r}: a container's rootfs must be a plain directory.")
    if what == "snapshots" and len(parts) == 3 and parts[2] in ("config", "rootfs", "meta.json", "images"):
        if (parts[2] in ("rootfs", "images")) != (kind == "dir"):
            raise AgentError(f"Refusing {m.name!r}: not what a snapshot keeps under that name.")
    return parts, kind


class _Stager:
    """Unpacks members into a private staging directory, by descriptors only."""

    def __init__(self, stage_fd, what, top_name):
        self.fd, self.what, self.top_name = stage_fd, what, top_name
        self.files = {}  # member name -> True for regular files staged (hard-link sources)
        self.dirs = {}  # path components -> TarInfo of directory members (attributes set last)
        self.as_root = os.geteuid() == 0
        self.count = 0
        self._parents = _DirChain(stage_fd, create=True)  # members come grouped: the last parent's chain

    def close(self):
        self._parents.close()

    def _owner(self, m, leaf, dir_fd, fd=None):
        if not self.as_root:
            return
        if fd is not None:
            os.fchown(fd, m.uid, m.gid)
        else:
            os.chown(leaf, m.uid, m.gid, dir_fd=dir_fd, follow_symlinks=False)

    def add(self, m, tar):
        parts, kind = _check_member(m, self.what, self.top_name)
        leaf = parts[-1]
        parent = self._parents.open(parts[:-1])  # the chain's, closed by close()
        old = _lstat_at(parent, leaf)
        if old is not None and not (kind == "dir" and stat.S_ISDIR(old.st_mode)):
            _remove_at(parent, leaf)  # a child of the cached parent: the cache stays right
            for n in [n for n in self.files if n == m.name or n.startswith(m.name + "/")]:
                del self.files[n]
            for d in [d for d in self.dirs if d[: len(parts)] == tuple(parts)]:
                del self.dirs[d]
        self.files.pop(m.name, None)
        mode = stat.S_IMODE(m.mode)
        if kind == "dir":
            if old is None or not stat.S_ISDIR(old.st_mode):
                os.mkdir(leaf, 0o700, dir_fd=parent)
            self.dirs[tuple(parts)] = m
        elif kind == "file":
            fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=parent)
            with os.fdopen(fd, "wb", buffering=0) as out:
                src = tar.extractfile(m)
                while True:
                    chunk = src.read(_COPY_CHUNK)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[out.write(view) :]
                self._owner(m, leaf, parent, fd)
                os.fchmod(fd, mode)  # after chown, which clears setuid bits
                os.utime(fd, (m.mtime, m.mtime))
            self.files[m.name] = True
        elif kind == "symlink":
            os.symlink(m.linkname, leaf, dir_fd=parent)
            self._owner(m, leaf, parent)
            os.utime(leaf, (m.mtime, m.mtime), dir_fd=parent, follow_symlinks=False)
        elif kind == "hardlink":
            lparts = _split_member(m.linkname, "hard link")
            target = "/".join(lparts)
            if not self.files.get(target):
                raise AgentError(f"Refusing a hard link to what this tar did not bring: {m.name!r} -> {m.linkname!r}")
            if _in_rootfs(self.what, lparts) and not _in_rootfs(self.what, parts):
                raise AgentError(f"Refusing a hard link across directories: {m.name!r} -> {m.linkname!r}")
            src_fd = _open_beneath(self.fd, lparts[:-1])
            try:
                os.link(lparts[-1], leaf, src_dir_fd=src_fd, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(src_fd)
            self.files[m.name] = True
        else:  # device node or fifo, inside a rootfs only (checked)
            fmt = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            os.mknod(leaf, fmt | 0o600, os.makedev(m.devmajor, m.devminor) if fmt != stat.S_IFIFO else 0, dir_fd=parent)
            self._owner(m, leaf, parent)
            os.chmod(leaf, mode, dir_fd=parent)  # just made in our private directory: not a symlink
            os.utime(leaf, (m.mtime, m.mtime), dir_fd=parent, follow_symlinks=False)
        self.count += 1

    def apply_dir(self, parts, fd):
        m = self.dirs.get(tuple(parts))
        if m is None:
            return
        if self.as_root:
            os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, stat.S_IMODE(m.mode))
        os.utime(fd, (m.mtime, m.mtime))

    def finish_dirs(self):
        """Directory attributes last, as tar does: writing into them changed mtimes. Each after all
        it holds (the reverse of the sorted paths puts every descendant before its ancestors), so
        a directory made read-only is never opened again to reach one inside it."""
        chain = _DirChain(self.fd)
        try:
            for parts in sorted(self.dirs, reverse=True):
                self.apply_dir(parts, chain.open(parts))
        finally:
            chain.close()


def _stage(stage_fd, what, top_name, stream):
    """Unpack the tar read from `stream` into the staging directory; (stager, the delta's list)."""
    stager = _Stager(stage_fd, what, top_name)
    try:
        _stage_members(stager, stream)
    finally:
        stager.close()
    if what != "delta":
        stager.finish_dirs()
    return stager, stager.delta


def _stage_members(stager, stream):
    what = stager.what
    stager.delta = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for m in tar:
            if m.name == DELTA_MEMBER and what == "delta" and m.isreg():
                if m.size > (64 << 20):
                    raise AgentError("The delta's list of deletions is too big.")
                delta = json.load(tar.extractfile(m))
                if not isinstance(delta, dict):
                    raise AgentError("The delta's list of deletions is damaged.")
                stager.delta = delta
                continue
            try:
                stager.add(m, tar)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise
                raise AgentError(
                    f"Refusing a tar member that would lead outside its directory or cannot be created beneath it: {m.name!r} ({e.strerror or e})"
                ) from None


def _merge(stager, src_fd, dst_fd, parts):
    """Move a staged delta's entries into the container directory, descriptor by descriptor:
    a directory over a real directory is merged, anything else replaces what was there."""
    for n in sorted(os.listdir(src_fd)):
        sst = _lstat_at(src_fd, n)
        dst = _lstat_at(dst_fd, n)
        if stat.S_ISDIR(sst.st_mode) and dst is not None and stat.S_ISDIR(dst.st_mode):
            s = os.open(n, _NOFOLLOW_DIR, dir_fd=src_fd)
            try:
                d = os.open(n, _NOFOLLOW_DIR, dir_fd=dst_fd)
                try:
                    _merge(stager, s, d, parts + [n])
                    stager.apply_dir(parts + [n], d)
                finally:
                    os.close(d)
            finally:
                os.close(s)
            continue
        if dst is not None:
            _remove_at(dst_fd, n)
        if stat.S_ISDIR(sst.st_mode):
            s = os.open(n, _NOFOLLOW_DIR, dir_fd=src_fd)
            try:
                _finish_subtree(stager, s, parts + [n])
            finally:
                os.close(s)
        os.rename(n, n, src_dir_fd=src_fd, dst_dir_fd=dst_fd)


def _finish_subtree(stager, fd, parts):
    for n in os.listdir(fd):
        if stat.S_ISDIR(os.stat(n, dir_fd=fd, follow_symlinks=False).st_mode):
            s = os.open(n, _NOFOLLOW_DIR, dir_fd=fd)
            try:
                _finish_subtree(stager, s, parts + [n])
            finally:
                os.close(s)
    stager.apply_dir(parts, fd)


def _delete_beneath(rootfs_fd, deleted):
    """A delta's deletions: each resolved by descriptors below the rootfs, never through a symlink."""
    n = 0
    for rel in deleted if isinstance(deleted, list) else []:
        try:
            parts = _split_member(rel)
        except AgentError:
            continue  # never outside the rootfs
        try:
            parent = _open_beneath(rootfs_fd, parts[:-1])
        except OSError:
            continue  # a parent is gone or is a symlink: nothing to delete through it
        try:
            _remove_at(parent, parts[-1])
            n += 1
        except OSError:
            pass
        finally:
            os.close(parent)
    return n


def _dest_fd(what, name, params):
    """The directory the received tree goes into, opened without following a symlink."""
    if what in ("cpuinfo", "images"):
        os.makedirs(S.MIGRATIONS_PATH, exist_ok=True)
        base = os.open(S.MIGRATIONS_PATH, _ROOT_DIR)
        try:
            return _open_beneath(base, [str(int(params["migration"]))], create=True)
        finally:
            os.close(base)
    path = {"rootfs": S.LXC_PATH, "delta": S.LXC_PATH, "snapshots": S.SNAPSHOTS_PATH, "state": S.STATE_PATH}[what]
    os.makedirs(path, exist_ok=True)
    return os.open(path, _ROOT_DIR)


def _place(stager, stage_fd, dest_fd, what, name, top_name, delta):
    """Put the verified staged tree in place; returns how many deletions the delta made."""
    if _lstat_at(stage_fd, top_name) is None:
        if what in ("rootfs", "delta") and delta is None and stager.count == 0:
            raise AgentError(f"The {what} arrived empty.")
        top = None
    else:
        top = top_name
    if what == "rootfs":
        cfg, rootfs = _lstat_at(stage_fd, f"{top_name}/config"), _lstat_at(stage_fd, f"{top_name}/rootfs")
        if cfg is None or not stat.S_ISREG(cfg.st_mode) or rootfs is None or not stat.S_ISDIR(rootfs.st_mode):
            raise AgentError(f"The rootfs arrived without {name}/config or {name}/rootfs: nothing was put in place.")
    if what != "delta":
        if top is None:
            return 0
        old = _lstat_at(dest_fd, top)
        if old is not None:
            if what == "rootfs":
                raise AgentError(f"{name} exists on this host already.")
            _remove_at(dest_fd, top)  # a stale copy (or anything planted there) is replaced, not merged into
        os.rename(top, top, src_dir_fd=stage_fd, dst_dir_fd=dest_fd)
        return 0
    try:
        cdir = _open_beneath(dest_fd, [name])
    except OSError:
        raise AgentError(
            f"{name}'s directory is missing or not a plain directory: the delta has nowhere to go."
        ) from None
    try:
        # Checked before anything moves: a refused delta changes nothing.
        rootfs = _lstat_at(cdir, "rootfs")
        if rootfs is None or not stat.S_ISDIR(rootfs.st_mode):
            raise AgentError(f"{name}'s rootfs is not a plain directory: the delta is refused.")
        cfg = _lstat_at(cdir, "config")
        staged_cfg = _lstat_at(stage_fd, f"{top_name}/config") if top is not None else None
        if not (staged_cfg and stat.S_ISREG(staged_cfg.st_mode)) and not (cfg and stat.S_ISREG(cfg.st_mode)):
            raise AgentError(f"{name}'s config is not a plain file and the delta brings none: refused.")
        if delta and delta.get("replaced"):
            # Directories the source made anew (created or moved in): what the first copy put
            # there goes, and the delta brings them whole.
            try:
                rootfs = os.open("rootfs", _NOFOLLOW_DIR, dir_fd=cdir)
            except OSError:
                raise AgentError(f"{name}'s rootfs is not a plain directory: no deletions are made.") from None
            try:
                _delete_beneath(rootfs, delta.get("replaced"))
            finally:
                os.close(rootfs)
        if top is not None:
            src = os.open(top, _NOFOLLOW_DIR, dir_fd=stage_fd)
            try:
                _merge(stager, src, cdir, [top])
            finally:
                os.close(src)
        deleted = 0
        if delta:
            try:
                rootfs = os.open("rootfs", _NOFOLLOW_DIR, dir_fd=cdir)
            except OSError:
                raise AgentError(f"{name}'s rootfs is not a plain directory: no deletions are made.") from None
            try:
                deleted = _delete_beneath(rootfs, delta.get("deleted") or [])
            finally:
                os.close(rootfs)
        return deleted
    finally:
        os.close(cdir)


def _remove_stages(params):
    """Staging directories a killed receive of this migration left behind; True if any."""
    return remove_prefixed(
        f"{RECV_STAGE_PREFIX}{int(params['migration'])}-", (S.LXC_PATH, S.SNAPSHOTS_PATH, S.STATE_PATH)
    )


def remove_prefixed(prefix, bases):
    """Remove every entry named `prefix…` directly under each of `bases` (what a killed receive
    or import staged; the caller holds the container's lock); True if any."""
    found = False
    for base in bases:
        try:
            fd = os.open(base, _ROOT_DIR)
        except OSError:
            continue
        try:
            for n in os.listdir(fd):
                if n.startswith(prefix):
                    _remove_at(fd, n)
                    found = True
        finally:
            os.close(fd)
    return found


def _clear_config_names(name):
    """No symlink (nor anything else) may sit at config.tmp, and config must be a plain file,
    before the agent rewrites the config there."""
    base = os.open(S.LXC_PATH, _ROOT_DIR)
    try:
        cdir = _open_beneath(base, [name])
    finally:
        os.close(base)
    try:
        _remove_at(cdir, "config.tmp")
        st = _lstat_at(cdir, "config")
        if st is not None and not stat.S_ISREG(st.st_mode):
            _remove_at(cdir, "config")
            raise AgentError(f"{name}'s config was not a plain file: removed.")
    finally:
        os.close(cdir)


def _write_beneath(name, fname, text):
    """Write LXC_PATH/<name>/<fname> without following a symlink anywhere."""
    base = os.open(S.LXC_PATH, _ROOT_DIR)
    try:
        cdir = _open_beneath(base, [name])
    finally:
        os.close(base)
    try:
        fd = os.open(fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=cdir)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    finally:
        os.close(cdir)


class _Stalling:
    """Standard input that gives up when nothing arrives for `stall_s` seconds: a sender
    whose link died must not keep this host's copy (and the container's lock) forever."""

    def __init__(self, f, stall_s):
        self.fd, self.stall_s = f.fileno(), stall_s

    def read(self, size=-1):
        size = 1 << 20 if size is None or size < 0 else size
        ready, _, _ = select.select([self.fd], [], [], self.stall_s)
        if not ready:
            raise AgentError(f"Nothing arrived for {self.stall_s} s: the transfer was cut off.")
        return os.read(self.fd, size)

    def drain(self):
        """After the tar's end: read on to the end of the stream (the archive's zero padding).
        Leaving before it would close our channel while the dashboard still relays those last
        bytes, and it would take that for a receiver that stopped taking data."""
        extra = 0
        while True:
            data = self.read(1 << 16)
            if not data:
                return
            extra += len(data)
            if extra > (16 << 20):
                raise AgentError("The sender went on sending after the end of the tar.")

    def verify(self):
        """Relayed over the dashboard's own SSH channels: what came is what the source sent."""


def cmd_receive(params):
    name = check_name(params.get("name"))
    what = params.get("what")
    mdir = _mig_dir(params)
    if what not in ("rootfs", "delta", "snapshots", "state", "cpuinfo", "images"):
        raise AgentError(f"Cannot receive {what!r}.")
    if what == "rootfs" and os.path.lexists(_cdir(name)):
        raise AgentError(f"{name} exists on this host already.")
    stall = params.get("stall_s", 120)
    if not isinstance(stall, (int, float)) or not 1 <= stall <= 3600:
        raise AgentError("Bad stall_s.")
    direct = _direct_params(params, ("listen", "peer")) if params.get("direct") is not None else None
    dest_fd = _dest_fd(what, name, params)
    try:
        if what == "rootfs":
            # Said before the first byte lands, so an interrupted copy is still ours to remove.
            os.makedirs(mdir, exist_ok=True)
            with open(os.path.join(mdir, "receiving"), "w") as f:
                f.write(name + "\n")
        t0 = time.monotonic()
        top_name = {"cpuinfo": "cpu", "images": "images"}.get(what, name)
        stage = f"{RECV_STAGE_PREFIX}{int(params['migration'])}-{what}-{os.getpid()}-{os.urandom(4).hex()}"
        os.mkdir(stage, 0o700, dir_fd=dest_fd)
        stage_fd = os.open(stage, _NOFOLLOW_DIR, dir_fd=dest_fd)
        stream = None
        try:
            try:
                if direct:
                    conn = _direct_accept(direct, stall)
                    try:
                        stream = _DirectIn(conn, stall, direct["token"])
                        stager, delta = _stage(stage_fd, what, top_name, stream)
                        stream.drain()
                        stream.verify()  # nothing is put in place before this
                    finally:
                        conn.close()
                else:
                    relayed = _Stalling(sys.stdin.buffer, stall)
                    stager, delta = _stage(stage_fd, what, top_name, relayed)
                    relayed.drain()
                    relayed.verify()
                deleted = _place(stager, stage_fd, dest_fd, what, name, top_name, delta)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise AgentError(f"This host's disk is full: no space left for the {what}.") from None
                raise
            except tarfile.TarError as e:
                raise AgentError(f"The {what} arrived cut short or damaged ({e}).") from None
        finally:
            os.close(stage_fd)
            _remove_at(dest_fd, stage)
    finally:
        os.close(dest_fd)
    dropped = None
    if what in ("rootfs", "delta"):
        _clear_config_names(name)
        dropped = _sanitize_received_config(name)
    elif what == "snapshots":
        dropped = _sanitize_received_snapshots(name)
    if what == "rootfs":
        _write_beneath(name, f".ctweb-migration-{int(params['migration'])}", "received by migration\n")
    out = {"files": stager.count, "ms": _ms(t0), "deleted": deleted}
    if what == "delta" and isinstance(delta, dict):  # the source's word on its frozen pass
        out["delta"] = {k: delta.get(k) for k in ("frozen_pass", "frozen_pass_reason", "frozen_pass_paths", "list_ms")}
    if dropped:
        out["config_dropped"] = dropped
    if stream is not None:
        out["bytes"], out["sha256"] = stream.bytes, stream.hash.hexdigest()
    return out


def _sanitize_received_config(name):
    """A config that came from another host is rewritten here from the allowlist."""
    return _apply_allowlist(_cdir(name), name, _read_config(name), f"the config {name} arrived with")


def _sanitize_received_snapshots(name):
    """Each snapshot's config that came from another host, rewritten from the allowlist."""
    out = {}
    base = os.path.join(S.SNAPSHOTS_PATH, name)
    for snap in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        sdir = os.path.join(base, snap)
        if not NAME_RE.fullmatch(snap) or os.path.islink(sdir) or not os.path.isdir(sdir):
            continue
        try:
            lines = _read_lines(os.path.join(sdir, "config"))
        except OSError:
            lines = []  # none, or a symlink: the allowlist's baseline replaces it
        dropped = _apply_allowlist(sdir, name, lines, f"the config of snapshot {snap} as it arrived")
        if dropped:
            out[snap] = dropped
    return out
