"""Migration on each host: the migration's working directory, prepare/check, what `send`
archives, the CPU check."""

import os
import re
import shutil
import stat

from . import journal, mjournal, store
from . import state as S
from .cgroups import container_pids
from .common import AgentError, _du, _flag, _write_json, check_name, event, run
from .criu import DISK_MARGIN, _has_saved_state, _memory_bytes, _rootfs, _snapshot_names, _state_dir
from .estimate import _dumpable_bytes
from .lxc import _cdir, _require, _state

# --- migration -------------------------------------------------------------------------
# The dashboard relays tars between two hosts' agents: `send` writes one to stdout,
# `receive` reads one from stdin (after its JSON parameter line). No host talks to another,
# unless an admin allowed direct transfer on their network: then `receive` listens and
# `send` connects to it (see "direct transfer" below), and stdin only tells them the
# dashboard is still there.

SEND_KINDS = ("rootfs", "snapshots", "state", "cpuinfo", "delta", "images")
DELTA_MEMBER = ".ctweb-delta.json"


def _mig_dir(params):
    mid = params.get("migration")
    if not isinstance(mid, int) or mid <= 0:
        raise AgentError("Bad migration id.")
    return os.path.join(S.MIGRATIONS_PATH, str(mid))


def _mig_marker(name, params):
    return os.path.join(_cdir(name), f".ctweb-migration-{int(params['migration'])}")


def _manifest(root, links=None):
    """What the rootfs holds now: path -> [mode, size, mtime_ns, inode, link target, ctime_ns].
    The change time moves with every write, chmod, chown or utime (a file written in place
    and given back its old time, or chowned, keeps its size and modification time).
    `links`, if given, gets the names of every regular file with several: {inode: [path, ...]}."""
    out = {}
    for base, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(base, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            rel = os.path.relpath(p, root)
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            out[rel] = [st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, target, st.st_ctime_ns]
            if links is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                links.setdefault(str(st.st_ino), []).append(rel)
    return out


def _held(name, root):
    """Files of the rootfs the container's processes map shared (or hold open for writing) now.
    Written through a mapping whose page is already dirty, a file takes more writes without a
    page fault, so without a new modification time: the delta sends these whatever the manifest
    says (a file mapped later gets a new time at its first write). Read before and after the
    manifest. Best effort: nothing when the processes cannot be read."""
    pids = container_pids(name) if _state(name) in ("RUNNING", "FROZEN") else None
    if not pids:
        return set()
    try:
        return journal.open_for_writing(root, pids)
    except (journal.Untrusted, OSError):
        return set()


def cmd_migrate_prepare(params):
    name = _require(params.get("name"))
    mdir = _mig_dir(params)
    os.makedirs(mdir, exist_ok=True)
    rootfs_bytes = _du(_cdir(name))
    snaps = _snapshot_names(name)
    # Each inode once: snapshots share their unchanged files (hard links), and so do their copies;
    # btrfs snapshots share extents here but arrive as whole trees each (extents=False).
    snap_bytes = store.du_once([os.path.join(S.SNAPSHOTS_PATH, name)], extents=False) if snaps else 0
    state_bytes = _du(_state_dir(name)) if _has_saved_state(name) else 0
    memory = _memory_bytes(name) if _state(name) == "RUNNING" else 0
    dumpable = _dumpable_bytes(name) if memory else 0  # for the prediction (containers/prediction.py)
    event("preflight", f"{name}: rootfs {rootfs_bytes >> 20} MiB, memory {memory >> 20} MiB, {len(snaps)} snapshot(s)")
    return {
        "state": _state(name),
        "rootfs_bytes": rootfs_bytes,
        "memory_bytes": memory,
        "dumpable_bytes": dumpable,
        "snapshots": snaps,
        "has_saved_state": _has_saved_state(name),
        "need_bytes": rootfs_bytes + snap_bytes + state_bytes + memory,
    }


def cmd_migrate_check(params):
    """On the target, before anything moves: the name is free, the disk and bridge are there."""
    name = check_name(params.get("name"))
    if os.path.exists(_cdir(name)):
        raise AgentError(f"{name} exists on this host already.")
    need = params.get("need_bytes") or 0
    if not isinstance(need, int) or need < 0:
        raise AgentError("Bad need_bytes.")
    os.makedirs(S.LXC_PATH, exist_ok=True)
    free = shutil.disk_usage(S.LXC_PATH).free
    if free < int(need * 1.2) + DISK_MARGIN:
        raise AgentError(
            f"Not enough disk space: about {(int(need * 1.2) + DISK_MARGIN) >> 20} MiB needed, {free >> 20} MiB free."
        )
    bridge = params.get("bridge")
    if bridge and (
        not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", bridge) or not os.path.isdir(f"/sys/class/net/{bridge}/bridge")
    ):
        raise AgentError(f"This host has no bridge {bridge} for the container's network.")
    if shutil.which("criu") is None or shutil.which("lxc-checkpoint") is None:
        raise AgentError("CRIU or lxc-checkpoint is missing on this host.")
    os.makedirs(_mig_dir(params), exist_ok=True)
    return {"free_bytes": free}


def _send_sources(name, params, what):
    """(directory to archive, name inside the tar) pairs for one kind of send."""
    mdir = _mig_dir(params)
    if what == "rootfs":
        root = _rootfs(name)
        # The change journal first (mjournal.py): the delta, sent while the container is down,
        # then lists what changed since this walk began instead of walking the tree again.
        if _flag(params, "journal", True):
            mjournal.start(mdir, root)
        else:
            mjournal.not_started(mdir, "the journal was turned off for this migration")
        held = _held(name, root)
        links = {}  # the names of files with several, for the journal's delta (small: no walk to read)
        _write_json(os.path.join(mdir, "manifest.json"), _manifest(root, links))
        _write_json(os.path.join(mdir, "links.json"), links)
        _write_json(os.path.join(mdir, "held.json"), sorted(held | _held(name, root)))
        return [(_cdir(name), name)]
    if what == "snapshots":
        return [(os.path.join(S.SNAPSHOTS_PATH, name), name)]
    if what == "state":
        return [(_state_dir(name), name)]
    if what == "cpuinfo":
        cpu = os.path.join(mdir, "cpu")
        os.makedirs(cpu, exist_ok=True)
        run(["criu", "cpuinfo", "dump", "-D", cpu], timeout=60, check=True)
        return [(cpu, "cpu")]
    if what == "images":
        return [(os.path.join(mdir, "images"), "images")]
    raise AgentError(f"Cannot send {what!r}.")


def cmd_cpuinfo_check(params):
    cpu = os.path.join(_mig_dir(params), "cpu")
    rc, out, err = run(["criu", "cpuinfo", "check", "-D", cpu], timeout=60)
    if rc != 0:
        raise AgentError(
            "This host's CPU cannot run what the source's CPU dumped (criu cpuinfo check).", (err or out)[-3000:]
        )
    return {"cpu_compatible": True}
