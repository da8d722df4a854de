"""A snapshot as one archive: `export` writes it (a tar on stdout), `import` makes a new
container of it on this host, and `scan` is the one check of such an archive, run by the
dashboard before it keeps or sends one and by `import` while it stages one.

The archive is a plain tar (a stateful snapshot's memory pages are zstd-compressed already):

    export/                          a directory
    export/<snap>/config             the snapshot's LXC config (rewritten from the allowlist on import)
    export/<snap>/meta.json          what the exporting host recorded (for people; import writes its own)
    export/<snap>/rootfs/...         the snapshot's root filesystem
    export/<snap>/images/...         its CRIU images (stateful only)
    ctweb-export.json                the manifest, last: names, sizes and sha256 of every file

An archive is anyone's bytes: it is checked with every rule of a migration's receive (the
members of a snapshots tree: images._check_member), and more: no member twice, nothing after
the manifest, hard links only to files it brought before, sizes and counts bounded, one
snapshot only, and every file's size and sha256 equal to the manifest's. The checksums find
damage (a cut or altered download); they do not make an archive trustworthy: whoever wrote
the archive wrote its manifest. What makes an import safe is the receive's staging (nothing
written outside a private directory, never through a symlink) and the config allowlist."""

import hashlib
import json
import os
import re
import sys
import tarfile

from . import cow, store
from . import state as S
from .common import _NOFOLLOW_DIR, NAME_RE, AgentError, _flag, _now, _write_json, agent_file, check_name, event
from .criu import _check_disk
from .images import _ROOT_DIR, _check_member, _remove_at, _Stager, _Stalling, _tar_tree, remove_prefixed
from .lxc import _allowlisted, _cdir, _check_network, _read_lines, _require, _write_config_in

FORMAT = "ctweb-export"
VERSION = 1
TOP = "export"
MANIFEST = "ctweb-export.json"
MANIFEST_MAX = 64 << 20  # a manifest names every file: about 150 bytes each
MAX_MEMBERS = 400_000
IMPORT_STAGE_PREFIX = ".ctweb-import-"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CREATED_RE = re.compile(r"^[0-9T:.+\-Z ]{10,40}$")
# Keys of a snapshot's config that name its old container or its network: an import writes
# them for the new container (they would otherwise be reported as dropped on every import).
NAME_BOUND = ("lxc.rootfs.path", "lxc.uts.name", "lxc.console.logfile")


# --- writing one ------------------------------------------------------------------------------


class _Hashing:
    def __init__(self, f, h):
        self.f, self.h = f, h

    def read(self, size=-1):
        data = self.f.read(size)
        self.h.update(data)
        return data


class _SummingTar(tarfile.TarFile):
    """A tar writer that keeps each regular file's size and sha256 (and each hard link's target)."""

    def addfile(self, tarinfo, fileobj=None):
        if tarinfo.islnk():
            self.links[tarinfo.name] = tarinfo.linkname
        elif tarinfo.isreg() and fileobj is not None:
            h = hashlib.sha256()
            super().addfile(tarinfo, _Hashing(fileobj, h))
            self.sums[tarinfo.name] = {"size": tarinfo.size, "sha256": h.hexdigest()}
            return
        super().addfile(tarinfo, fileobj)


def _stage_archive(stage_fd, stall, max_bytes):
    """Read the archive on stdin into the staging directory, every member checked as it comes
    and every file against the manifest at the end (scan); returns the manifest."""
    event("import", "receiving and checking the archive", 5)
    stager = _Stager(stage_fd, "snapshots", TOP)
    stream = _Stalling(sys.stdin.buffer, stall)
    try:
        man = scan(_Counting(stream, max_bytes), Check(), stager.add)
    finally:
        stager.close()
    stream.drain()
    stager.finish_dirs()
    return man


def write_export(out, name, snap):
    """The archive of snapshot `snap` of `name`, written to `out`; returns its manifest."""
    check_name(name)
    check_name(snap, "snapshot")
    sdir = os.path.join(S.SNAPSHOTS_PATH, name, snap)
    try:
        with open(os.path.join(sdir, "meta.json"), "rb") as f:
            meta = json.loads(f.read(1 << 20).decode())
    except (OSError, ValueError):
        raise AgentError(f"{name} has no snapshot {snap} on this host.") from None
    if not isinstance(meta, dict):
        raise AgentError(f"The metadata of snapshot {snap} of {name} is damaged.")
    stateful = meta.get("stateful") is True and os.path.isfile(os.path.join(sdir, "images", "inventory.img"))
    tar = _SummingTar.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)
    tar.sums, tar.links = {}, {}
    try:
        top = tarfile.TarInfo(TOP)
        top.type, top.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(top)
        _tar_tree(tar, sdir, f"{TOP}/{snap}")  # never following a symlink (a migration's send)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "container": name,
            "snapshot": snap,
            "stateful": stateful,
            "created_at": str(meta.get("created_at") or ""),
            "exported_at": _now(),
            "agent": os.path.basename(agent_file()),
            "images_compression": meta.get("images_compression") if stateful else None,
            "files": tar.sums,
            "links": tar.links,
        }
        data = json.dumps(manifest, sort_keys=True).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode = len(data), 0o600
        tar.addfile(info, _Bytes(data))
    finally:
        tar.close()
    return manifest


class _Bytes:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def read(self, size=-1):
        end = len(self.data) if size is None or size < 0 else self.pos + size
        out = self.data[self.pos : end]
        self.pos += len(out)
        return out


def cmd_export(params):
    """{name, snapshot}: the archive on stdout (a raw output: errors go to stderr)."""
    write_export(sys.stdout.buffer, params.get("name"), params.get("snapshot"))
    sys.stdout.buffer.flush()


# --- checking one -----------------------------------------------------------------------------


class _Counting:
    """The archive's bytes, refused past `limit`."""

    def __init__(self, f, limit):
        self.f, self.limit, self.bytes = f, limit, 0

    def read(self, size=-1):
        data = self.f.read(size)
        self.bytes += len(data)
        if self.bytes > self.limit:
            raise AgentError(f"The archive is larger than {self.limit >> 20} MiB, the most this import takes.")
        return data


def parse_manifest(raw):
    """The manifest's JSON, each field checked for its type and form."""
    if len(raw) > MANIFEST_MAX:
        raise AgentError(f"The archive's manifest is larger than {MANIFEST_MAX >> 20} MiB.")
    try:
        man = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AgentError("The archive's manifest is not JSON.") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise AgentError("This is not a ctweb export (its manifest says another format).")
    if man.get("version") != VERSION:
        raise AgentError(f"This export is of version {man.get('version')!r}; this ctweb reads version {VERSION}.")
    for key, what in (("container", "container"), ("snapshot", "snapshot")):
        if not isinstance(man.get(key), str) or not NAME_RE.fullmatch(man[key]):
            raise AgentError(f"The manifest's {what} name is not a valid name.")
    if not isinstance(man.get("stateful"), bool):
        raise AgentError("The manifest's stateful is not true or false.")
    created = man.get("created_at")
    if not isinstance(created, str) or (created and not CREATED_RE.fullmatch(created)):
        raise AgentError("The manifest's created_at is not a time.")
    files, links = man.get("files"), man.get("links", {})
    if not isinstance(files, dict) or not isinstance(links, dict):
        raise AgentError("The manifest's files or links are not a table.")
    for n, v in files.items():
        if (
            not isinstance(v, dict)
            or not isinstance(v.get("size"), int)
            or isinstance(v.get("size"), bool)
            or v["size"] < 0
            or not isinstance(v.get("sha256"), str)
            or not SHA256_RE.fullmatch(v["sha256"])
        ):
            raise AgentError(f"The manifest's entry for {n[:200]!r} is not a size and a sha256.")
    if not all(isinstance(v, str) for v in links.values()):
        raise AgentError("The manifest's hard links are not names.")
    return man


class Check:
    """One pass over an archive's members, in order (`scan`)."""

    def __init__(self, max_members=MAX_MEMBERS):
        self.max_members = max_members
        self.sums = {}  # name -> [size, sha256 object]: the regular files, as read
        self.links = {}  # name -> target
        self.names = set()
        self.snaps = set()
        self.dirs = set()
        self.not_dirs = set()
        self.manifest = None
        self.count = 0

    def member(self, m):
        """Refuse what a member may not be, before anything of it is used; its kind."""
        self.count += 1
        if self.count > self.max_members:
            raise AgentError(f"The archive holds more than {self.max_members} members.")
        if self.manifest is not None:
            raise AgentError(f"The archive goes on after its manifest ({m.name[:200]!r}).")
        if m.name == MANIFEST:
            if not m.isreg() or m.size > MANIFEST_MAX:
                raise AgentError(f"The archive's manifest is not a file of at most {MANIFEST_MAX >> 20} MiB.")
            return "manifest"
        key = m.name.rstrip("/")
        if key in self.names:
            raise AgentError(f"The archive holds {m.name[:200]!r} twice.")
        self.names.add(key)
        parts, kind = _check_member(m, "snapshots", TOP)  # every rule of a migration's receive
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in self.not_dirs:  # the receive never creates anything through one
                raise AgentError(f"Refusing {m.name[:200]!r}: it lies beneath a member that is not a directory.")
        if len(parts) > 1:
            if not NAME_RE.fullmatch(parts[1]):
                raise AgentError(f"Refusing {m.name[:200]!r}: not a snapshot's name.")
            self.snaps.add(parts[1])
            if len(self.snaps) > 1:
                raise AgentError("The archive holds more than one snapshot.")
        if kind == "hardlink" and m.linkname not in self.sums:
            raise AgentError(f"Refusing a hard link to what the archive did not bring before: {m.name[:200]!r}")
        if kind == "hardlink":
            self.links[key] = m.linkname
        if kind == "dir":
            self.dirs.add(key)
        else:
            self.not_dirs.add(key)
        return kind

    def reader(self, m, f):
        """The member's content as read, hashed on the way."""
        h = hashlib.sha256()
        self.sums[m.name] = [m.size, h]
        return _Hashing(f, h)

    def finish(self):
        """After the last member: the manifest says exactly what came. Returns the manifest."""
        man = self.manifest
        if man is None:
            raise AgentError("The archive has no manifest (ctweb-export.json, its last member): cut short?")
        snap = man["snapshot"]
        if self.snaps != {snap}:
            raise AgentError(f"The archive's manifest names snapshot {snap}, which is not what it holds.")
        got = {n: {"size": s, "sha256": h.hexdigest()} for n, (s, h) in self.sums.items()}
        want = man["files"]
        for n in sorted(set(got) | set(want)):
            if n not in want:
                raise AgentError(f"{n[:200]!r} is in the archive but not in its manifest.")
            if n not in got:
                raise AgentError(f"{n[:200]!r} is in the manifest but not in the archive.")
            if got[n] != want[n]:
                raise AgentError(f"{n[:200]!r} does not match its checksum in the manifest: the archive is damaged.")
        if self.links != man.get("links", {}):
            raise AgentError("The archive's hard links are not those of its manifest.")
        base = f"{TOP}/{snap}"
        if f"{base}/config" not in got or f"{base}/rootfs" not in self.dirs:
            raise AgentError(f"The archive holds no config or no rootfs for snapshot {snap}.")
        if man["stateful"] and f"{base}/images/inventory.img" not in got:
            raise AgentError(f"The archive says snapshot {snap} is stateful but holds no CRIU images.")
        return man


class _CheckedTar:
    """What the receive's stager reads members through: their contents hashed on the way."""

    def __init__(self, tar, check):
        self.tar, self.check = tar, check

    def extractfile(self, m):
        return self.check.reader(m, self.tar.extractfile(m))


def scan(stream, check, stage=None):
    """Read an archive from `stream`, every member checked before it is used; with `stage(m,
    tar)` (the agent's import) each is staged, else only its content read and hashed. Returns
    the manifest once everything matched it."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            reading = _CheckedTar(tar, check)
            for m in tar:
                kind = check.member(m)
                if kind == "manifest":
                    check.manifest = parse_manifest(tar.extractfile(m).read(MANIFEST_MAX + 1))
                    continue
                if stage is not None:
                    try:
                        stage(m, reading)
                    except OSError as e:
                        raise AgentError(
                            f"Refusing a member that would lead outside its directory or cannot be created "
                            f"beneath it: {m.name[:200]!r} ({e.strerror or e})"
                        ) from None
                elif kind == "file":
                    f = reading.extractfile(m)
                    while f.read(1 << 20):
                        pass
    except tarfile.TarError as e:
        raise AgentError(f"The archive is cut short or damaged, or not a tar ({e}).") from None
    return check.finish()


def verify(fileobj, max_bytes):
    """The dashboard's check of an archive it keeps or sends: its manifest, once all matched."""
    return scan(_Counting(fileobj, max_bytes), Check())


# --- importing one ----------------------------------------------------------------------------


def _int_param(params, key, default=None, lo=0, hi=1 << 50):
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise AgentError(f"Bad {key}.")
    return value


def remove_import_stages(name):
    """What a killed import of `name` left (the caller holds its lock, which any import of that
    name holds while it runs); True if anything."""
    return remove_prefixed(f"{IMPORT_STAGE_PREFIX}{name}-", (S.LXC_PATH, S.SNAPSHOTS_PATH))


def cmd_import(params):
    """{name, network, into, max_bytes, need_bytes, stall_s} and the archive on stdin: a new
    stopped container `name` whose rootfs is the snapshot's, with the snapshot (stateful:
    restorable with its memory); with into=true, only the snapshot, added to the existing
    container `name` (its restore rolls the container back to it). Staged in private
    directories, checked member by member as it arrives and against the manifest once all came;
    only then put in place. A refused archive leaves nothing."""
    name = check_name(params.get("name"))
    network = _check_network(params.get("network"))
    into = _flag(params, "into", False)
    stall = _int_param(params, "stall_s", 120, 1, 3600)
    max_bytes = _int_param(params, "max_bytes", 64 << 30, 1)
    need = _int_param(params, "need_bytes", 0)
    if into:
        _require(name)
        return _import_into(name, network, stall, max_bytes, need)
    if os.path.lexists(_cdir(name)) or os.path.lexists(os.path.join(S.SNAPSHOTS_PATH, name)):
        raise AgentError(f"{name} exists on this host already.")
    _check_disk(need * 2, f"importing {name}")  # the snapshot and the container's own copy of its rootfs
    os.makedirs(S.SNAPSHOTS_PATH, exist_ok=True)
    os.makedirs(S.LXC_PATH, exist_ok=True)
    remove_import_stages(name)
    stage = f"{IMPORT_STAGE_PREFIX}{name}-{os.getpid()}-{os.urandom(4).hex()}"
    snaps_fd = os.open(S.SNAPSHOTS_PATH, _ROOT_DIR)
    lxc_fd = os.open(S.LXC_PATH, _ROOT_DIR)
    placed = []
    try:
        os.mkdir(stage, 0o700, dir_fd=snaps_fd)
        os.mkdir(stage, 0o700, dir_fd=lxc_fd)
        stage_fd = os.open(stage, _NOFOLLOW_DIR, dir_fd=snaps_fd)
        try:
            man = _stage_archive(stage_fd, stall, max_bytes)
            out = _complete(name, man, stage, network)
            os.rename(TOP, name, src_dir_fd=stage_fd, dst_dir_fd=snaps_fd)
            placed.append((snaps_fd, name))
            os.rename(stage, name, src_dir_fd=lxc_fd, dst_dir_fd=lxc_fd)
            placed.append((lxc_fd, name))
        finally:
            os.close(stage_fd)
    except BaseException:
        for fd, n in placed:
            _remove_at(fd, n)
        raise
    finally:
        for fd in (snaps_fd, lxc_fd):
            try:
                _remove_at(fd, stage)
            finally:
                os.close(fd)
    snap = man["snapshot"]
    meta_path = os.path.join(S.SNAPSHOTS_PATH, name, snap, "meta.json")
    sdir = os.path.dirname(meta_path)
    out["meta"]["size_bytes"] = store.du_once([sdir])
    out["meta"]["added_bytes"] = store.unique_bytes(sdir)
    _write_json(meta_path, out["meta"])
    event("import", f"{name} imported with snapshot {snap}", 100)
    return {"name": name, "state": "STOPPED", "snapshot": snap, **out}


def _complete(name, man, stage, network, container=True):
    """The staged snapshot made this host's (its config from the allowlist, its metadata ours)
    and, with `container`, the container's directory staged beside it: a copy of its rootfs
    and its config."""
    snap = man["snapshot"]
    sdir = os.path.join(S.SNAPSHOTS_PATH, stage, TOP, snap)
    cstage = os.path.join(S.LXC_PATH, stage)
    # Checked by the members' rules already (no symlink outside a rootfs); made sure here.
    for rel, want_dir in (("config", False), ("rootfs", True)):
        st = os.lstat(os.path.join(sdir, rel))
        if (st.st_mode & 0o170000 == 0o040000) != want_dir:
            raise AgentError(f"The archive's {rel} of snapshot {snap} is not what a snapshot keeps there.")
    lines = [ln for ln in _read_lines(os.path.join(sdir, "config")) if ln.partition("=")[0].strip() not in NAME_BOUND]
    if network is not None:
        lines = [ln for ln in lines if not ln.partition("=")[0].strip().startswith("lxc.net.")]
    config, dropped = _allowlisted(name, lines, network)
    if dropped:
        event("config", "dropped from the imported config: {}".format(", ".join(dropped)), config_dropped=dropped)
    _write_config_in(sdir, config)
    images = os.path.join(sdir, "images")
    meta = {
        "snapshot": snap,
        "container": name,
        "stateful": man["stateful"],
        "created_at": man["created_at"] or _now(),
        "imported_at": _now(),
        "imported_from": {"container": man["container"], "exported_at": str(man.get("exported_at") or "")[:40]},
        "stats": {},
        "shared_with": None,
    }
    if man["stateful"]:
        compressed = store.is_compressed(images)
        raw = sum(os.lstat(os.path.join(images, n)).st_size for n in os.listdir(images))
        meta.update(
            images_compression="zstd" if compressed else None,
            images_bytes=store.du_once([images]),
            images_raw_bytes=None,
        )
        if not compressed:
            meta["images_raw_bytes"] = raw
    _write_json(os.path.join(sdir, "meta.json"), meta)
    if not container:
        return {"meta": meta, "config_dropped": dropped, "stateful": man["stateful"]}
    event("import", f"copying the rootfs of snapshot {snap} for {name}", 70)
    _rootfs_copy(os.path.join(sdir, "rootfs"), os.path.join(cstage, "rootfs"))
    _write_config_in(cstage, config)
    return {"meta": meta, "config_dropped": dropped, "stateful": man["stateful"]}


def _rootfs_copy(src, dst):
    """The imported container's own rootfs: a copy, never a link; on btrfs, into a subvolume, so that
    its snapshots are btrfs snapshots (cow.py)."""
    if cow.is_btrfs(os.path.dirname(dst)):
        try:
            cow.create_subvolume(dst)
        except cow.CowError:
            pass
        else:
            store.sync(src, dst)
            return
    store.sync_new(src, dst)


def _import_into(name, network, stall, max_bytes, need):
    """The archive's snapshot added to the existing container `name` (we hold its lock)."""
    _check_disk(need, f"importing a snapshot into {name}")
    os.makedirs(S.SNAPSHOTS_PATH, exist_ok=True)
    remove_import_stages(name)
    stage = f"{IMPORT_STAGE_PREFIX}{name}-{os.getpid()}-{os.urandom(4).hex()}"
    snaps_fd = os.open(S.SNAPSHOTS_PATH, _ROOT_DIR)
    try:
        os.mkdir(stage, 0o700, dir_fd=snaps_fd)
        stage_fd = os.open(stage, _NOFOLLOW_DIR, dir_fd=snaps_fd)
        try:
            man = _stage_archive(stage_fd, stall, max_bytes)
            snap = man["snapshot"]
            if os.path.lexists(os.path.join(S.SNAPSHOTS_PATH, name, snap)):
                raise AgentError(f"{name} has a snapshot named {snap} already: nothing was changed.")
            out = _complete(name, man, stage, network, container=False)
            try:
                os.mkdir(name, 0o700, dir_fd=snaps_fd)
            except FileExistsError:
                pass
            own_fd = os.open(name, _NOFOLLOW_DIR, dir_fd=snaps_fd)  # its snapshots' directory, never a symlink
            top_fd = os.open(TOP, _NOFOLLOW_DIR, dir_fd=stage_fd)
            try:
                os.rename(snap, snap, src_dir_fd=top_fd, dst_dir_fd=own_fd)
            finally:
                os.close(top_fd)
                os.close(own_fd)
        finally:
            os.close(stage_fd)
    finally:
        try:
            _remove_at(snaps_fd, stage)
        finally:
            os.close(snaps_fd)
    sdir = os.path.join(S.SNAPSHOTS_PATH, name, snap)
    out["meta"]["size_bytes"] = store.du_once([sdir])
    out["meta"]["added_bytes"] = store.unique_bytes(sdir)
    _write_json(os.path.join(sdir, "meta.json"), out["meta"])
    event("import", f"snapshot {snap} imported into {name}", 100)
    return {"name": name, "snapshot": snap, "into": True, **out}
