"""CRIU checkpoints: snapshots (stateful or not), restore, the saved state of a stateful stop,
lxc-checkpoint, freezing and thawing, disk checks."""

import os
import re
import shutil
import subprocess
import tempfile
import time

from . import cow, journal, store
from . import state as S
from .cgroups import container_pids
from .common import (
    CHILD_UMASK,
    NAME_RE,
    AgentError,
    _du,
    _flag,
    _ms,
    _now,
    _read_json,
    _remove_tree,
    _write_json,
    check_name,
    event,
    run,
)
from .contents import _contents, _criu_stats, _image_files
from .lxc import (
    _apply_allowlist,
    _cdir,
    _config_value,
    _lxc_start,
    _read_config,
    _read_lines,
    _require,
    _state,
    _write_config_in,
    align_address,
)

# --- CRIU: snapshots, stateful stop/start ----------------------------------------------

DISK_MARGIN = 64 << 20  # bytes kept free beyond the estimate (logs, metadata, rounding)
LOG_LINE_RE = re.compile(r"\b(Error|Err|Warn|Warning)\b")


def _state_dir(name):
    return os.path.join(S.STATE_PATH, name)


def _state_images(name):
    return os.path.join(S.STATE_PATH, name, "images")


def _has_saved_state(name):
    return os.path.isfile(os.path.join(_state_images(name), "inventory.img"))


def _snap_dir(name, snap):
    return os.path.join(S.SNAPSHOTS_PATH, name, snap)


def _snapshot_names(name):
    base = os.path.join(S.SNAPSHOTS_PATH, name)
    try:
        names = [
            n for n in os.listdir(base) if NAME_RE.fullmatch(n) and os.path.isfile(os.path.join(base, n, "meta.json"))
        ]
    except OSError:
        return []
    return sorted(names, key=lambda n: os.path.getmtime(os.path.join(base, n, "meta.json")))


def _rootfs(name):
    value = _config_value(_read_config(name), "lxc.rootfs.path") or os.path.join(_cdir(name), "rootfs")
    path = value.split(":", 1)[1] if value.startswith("dir:") else value
    # Only the rootfs LXC keeps for it: a config pointing elsewhere must not make us copy,
    # roll back or delete some other directory of the host.
    if os.path.realpath(path) != os.path.realpath(os.path.join(_cdir(name), "rootfs")) or not os.path.isdir(path):
        raise AgentError(f"{name}'s rootfs is {value!r}; ctweb handles only {_cdir(name)}/rootfs.")
    return path


def _memory_bytes(name):
    """Memory the container's cgroup charges now (v1 or v2): what a dump may write."""
    for key in ("memory.usage_in_bytes", "memory.current"):
        rc, out, err = run(["lxc-cgroup", "-n", name, key], timeout=20)
        if rc == 0 and out.strip().isdigit():
            return int(out.strip())
    return 0


def _check_disk(estimate, what):
    os.makedirs(S.CTWEB_PATH, exist_ok=True)
    need = int(estimate * 1.2) + DISK_MARGIN
    free = shutil.disk_usage(S.CTWEB_PATH).free
    if free < need:
        raise AgentError(
            f"Not enough disk space for {what}: about {need >> 20} MiB needed under {S.CTWEB_PATH}, "
            f"{free >> 20} MiB free.",
            data={"needed_bytes": need, "free_bytes": free},
        )
    return need


def _criu_log(images, which, tail=25):
    """The lines of CRIU's log that explain a failure: errors and warnings, then the tail.
    The first errors are the cause (the dashboard classifies them, hosts/criu_errors.py) and
    the last ones what followed: of many, both ends are kept."""
    path = os.path.join(images, f"{which}.log")
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        return f"{which}.log: {e.strerror}"
    picked = [line for line in lines if LOG_LINE_RE.search(line)]
    if len(picked) > 60:
        picked = picked[:20] + [f"... ({len(picked) - 60} more error and warning lines) ..."] + picked[-40:]
    rest = [line for line in lines[-tail:] if line not in picked]
    text = "\n".join(picked)
    if rest:
        text += "\n--- last lines of {}.log ---\n{}".format(which, "\n".join(rest))
    return text


def _checkpoint_log(name):
    return os.path.join(_cdir(name), "lxc-checkpoint.log")


def _lxc_checkpoint(name, images, mode, env=None):
    """lxc-checkpoint -n NAME -D IMAGES [-s | -r]. The LXC monitor that a restore leaves
    behind keeps its caller's stdout/stderr: they go to a file, never to our pipes.
    `env` (e.g. CRIU_CONFIG_FILE for lazy pages) is passed to lxc-checkpoint and its criu."""
    argv = ["lxc-checkpoint", "-n", name, "-D", images]
    if mode == "stop":
        argv.append("-s")
    elif mode == "restore":
        argv.append("-r")
    log = _checkpoint_log(name)
    if os.path.exists(log) and os.path.getsize(log) > 1 << 20:
        os.truncate(log, 0)
    # Append: the monitor of an earlier restore may still hold this file open.
    with open(os.devnull, "rb") as devnull, open(log, "ab") as out:
        start = out.tell()
        out.write("--- {} {}\n".format(_now(), " ".join(argv)).encode())
        out.flush()
        # A dump keeps the container's lock even if this agent dies first: nobody may look
        # at (or resume) the container until CRIU has finished with it. A restore must not:
        # its LXC monitor lives as long as the container.
        keep = (S.LOCK_FD,) if S.LOCK_FD is not None and mode in ("stop", "dump") else ()
        try:
            p = subprocess.run(
                argv,
                umask=CHILD_UMASK,
                stdin=devnull,
                stdout=out,
                stderr=subprocess.STDOUT,
                close_fds=True,
                pass_fds=keep,
                timeout=900,
                env=env,
            )
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = 124
        except FileNotFoundError:
            raise AgentError("lxc-checkpoint is not installed on this host.") from None
    try:
        with open(log, "rb") as f:
            f.seek(start)
            output = f.read().decode(errors="replace").split("\n", 1)[-1][-3000:]
    except OSError:
        output = ""
    return rc, output


IFACE_RE = re.compile(r"[A-Za-z0-9_.@-]{1,15}")
SYS_NET = "/sys/class/net"


def _veths(name):
    """The host ends of the container's veths (lxc-info's Link lines) that exist here."""
    rc, out, _ = run(["lxc-info", "-n", name, "-H"], timeout=20)
    found = []
    for line in out.splitlines() if rc == 0 else []:
        key, _, veth = line.partition(":")
        veth = veth.strip()
        if key.strip() == "Link" and IFACE_RE.fullmatch(veth) and os.path.isdir(os.path.join(SYS_NET, veth)):
            found.append(veth)
    return found


def _unplug(name):
    """Take the host ends of the container's veths out of their bridges, before a dump that
    stops it; returns [(veth, bridge)] for _replug. Why: once such a dump has killed the
    processes, their sockets are gone but the container's network namespace lives on for a
    moment with its address, and CRIU's network lock no longer holds in it: a client's
    segment arriving then was answered with an RST (seen on the lab: `R` from the
    container's MAC on the source's veth, 0.78 s after lxc-checkpoint -s started, right as
    the dump ended), which ends a connection the target was about to restore. Off its
    bridge, nothing reaches the namespace: the client's segments are lost instead, and TCP
    sends them again to the target. The restore attaches its new veth only once the sockets
    are back (CRIU moves it into the bridge after restoring the tasks)."""
    links = []
    for veth in _veths(name):
        master = os.path.join(SYS_NET, veth, "master")
        if not os.path.islink(master):
            continue
        bridge = os.path.basename(os.readlink(master))
        if IFACE_RE.fullmatch(bridge) and run(["ip", "link", "set", "dev", veth, "nomaster"], timeout=20)[0] == 0:
            links.append((veth, bridge))
    return links


def _replug(links, name=None):
    """Put veths that _unplug took out back into their bridges (a dump failed and the
    container runs on here); a veth that is gone (the container stopped) is left alone.
    With `name`: nothing when the container is STOPPED (the dump went through)."""
    if name is not None and links and _state(name) == "STOPPED":
        return
    for veth, bridge in links:
        if os.path.exists(os.path.join(SYS_NET, veth)):
            run(["ip", "link", "set", "dev", veth, "master", bridge], timeout=20)


def _replug_config(name):
    """Tasks that a dump meant to stop run on here (it was rolled back, or never began, maybe
    after the agent that unplugged them died): every veth of the container in no bridge goes
    back into the bridge its config names (lxc.net.0.link; the agent writes that config).
    Returns the veths put back."""
    try:
        bridge = _config_value(_read_config(name), "lxc.net.0.link") or ""
    except OSError:
        return []
    if not IFACE_RE.fullmatch(bridge) or not os.path.isdir(os.path.join(SYS_NET, bridge, "bridge")):
        return []
    back = []
    for veth in _veths(name):
        if os.path.islink(os.path.join(SYS_NET, veth, "master")):
            continue  # in a bridge already
        if run(["ip", "link", "set", "dev", veth, "master", bridge], timeout=20)[0] == 0:
            back.append(veth)
    return back


def _criu_dump(name, images, stop):
    what = "dump and stop" if stop else "dump"
    unplugged = _unplug(name) if stop else []
    rc, output = -1, ""
    try:
        rc, output = _lxc_checkpoint(name, images, "stop" if stop else "dump")
    finally:
        dumped = rc == 0 and os.path.isfile(os.path.join(images, "inventory.img"))
        if not dumped:  # it may run on here: its veths go back (not if it stopped)
            _replug(unplugged, name)
        # Dumped and stopped: never back into the bridge. LXC may not say STOPPED yet (its state
        # lags lxc-checkpoint's exit under load), and a veth put back then let client segments
        # reach the dying namespace, which may answer them with RSTs (seen: 1.3 s of them).
    if not dumped:
        details = _criu_log(images, "dump")
        if output.strip():
            details += "\n--- lxc-checkpoint ---\n" + output.strip()
        state = _state(name)
        msg = f"CRIU could not {what} {name} (lxc-checkpoint exit status {rc})."
        raise AgentError(msg, details, {"state": state, "has_saved_state": _has_saved_state(name)})


def _freezer_state(name):
    rc, out, err = run(["lxc-cgroup", "-n", name, "freezer.state"], timeout=20)
    if rc == 0 and out.strip():
        return out.strip()
    rc, out, err = run(["lxc-cgroup", "-n", name, "cgroup.freeze"], timeout=20)  # cgroup v2
    if rc == 0 and out.strip() in ("0", "1"):
        return "FROZEN" if out.strip() == "1" else "THAWED"
    return None


def _thaw(name):
    """Thaw the container's freezer cgroup. lxc-unfreeze is not enough after a restore:
    CRIU (--manage-cgroups=full) restores the freezer state it dumped -- FROZEN for our
    snapshots, which freeze the container to copy its rootfs consistently -- while LXC
    believes the container RUNNING and does nothing. So write the cgroup file."""
    run(["lxc-unfreeze", "-n", name], timeout=60)
    for _ in range(500):
        state = _freezer_state(name)
        if state in (None, "THAWED"):
            return
        if state == "FROZEN":
            run(["lxc-cgroup", "-n", name, "freezer.state", "THAWED"], timeout=20)
            run(["lxc-cgroup", "-n", name, "cgroup.freeze", "0"], timeout=20)
        time.sleep(0.01)  # FREEZING/THAWING settle within ms
    raise AgentError(f"{name} stays frozen ({_freezer_state(name)}) after a restore.", data={"state": _state(name)})


def _criu_restore(name, images, failure, has_saved_state, env=None):
    rc, output = _lxc_checkpoint(name, images, "restore", env)
    state = _state(name)
    if rc == 0 and state in ("RUNNING", "FROZEN"):
        _thaw(name)
        return
    details = _criu_log(images, "restore")
    if output.strip():
        details += "\n--- lxc-checkpoint ---\n" + output.strip()
    if state != "STOPPED":
        run(["lxc-stop", "-n", name, "-k"], timeout=60)
        state = _state(name)
    raise AgentError(
        f"{failure} (lxc-checkpoint exit status {rc}); {name} is {state}.",
        details,
        {"state": state, "has_saved_state": has_saved_state},
    )


def _native_cow(rootfs):
    """Whether this snapshot's rootfs can be a btrfs snapshot: the rootfs is a subvolume on the
    filesystem of the snapshots (store.storage_probe tells whether the host supports it at all),
    holding no subvolume of its own (a btrfs snapshot would hold an empty directory there, and a
    restore from it would then empty it): such a rootfs is copied as on any filesystem."""
    if not (cow.is_subvolume(rootfs) and cow.same_filesystem(rootfs, S.SNAPSHOTS_PATH)):
        return False
    nested = cow.nested_subvolumes(rootfs)
    if nested:
        event("copy", f"the rootfs holds a btrfs subvolume of its own ({nested[0]}): copied, not snapshotted", 5)
        return False
    return True


def _native_snapshot(name, rootfs, dst, images, state):
    """The rootfs of a snapshot on btrfs: one read-only snapshot of the rootfs subvolume, taken
    while the container is frozen (after CRIU's dump of it when `images`), or at once when it is
    stopped. O(1) in the rootfs's size. Returns (frozen ms or None, the state after)."""
    if state != "RUNNING":
        event("copy", f"snapshotting the rootfs of {name} (btrfs)", 20)
        _btrfs_snapshot(rootfs, dst)
        return None, state
    event("freeze", f"freezing {name}", 40)
    t_freeze = time.monotonic()
    run(["lxc-freeze", "-n", name], timeout=60, check=True)
    try:
        if images:
            os.makedirs(images)
            event("dump", f"dumping {name} with CRIU (it keeps running)", 50)
            _criu_dump(name, images, stop=False)
        event("copy", "snapshotting the rootfs while frozen (btrfs)", 75)
        _btrfs_snapshot(rootfs, dst)
    finally:
        _thaw(name)
        frozen_ms = _ms(t_freeze)
    state = _state(name)
    if state != "RUNNING":
        raise AgentError(f"{name} is {state} after the snapshot, not RUNNING.", data={"state": state})
    return frozen_ms, state


def _btrfs_snapshot(rootfs, dst):
    try:
        cow.snapshot(rootfs, dst)
    except (cow.CowError, OSError) as e:
        raise AgentError(f"The btrfs snapshot of the rootfs failed: {e}") from None


def _previous_rootfs(name):
    """The rootfs copy of the container's newest snapshot here (the one to share with), or None.
    Never a btrfs snapshot: no hard link reaches into another subvolume."""
    for snap in reversed(_snapshot_names(name)):
        path = os.path.join(_snap_dir(name, snap), "rootfs")
        if os.path.isdir(path) and not os.path.islink(path) and not cow.is_subvolume(path):
            return path
    return None


def _budget(params):
    budget = params.get("budget_bytes")
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise AgentError("Bad budget_bytes.")
    return budget or None


def _check_budget(name, snap, budget, rootfs_new, memory):
    """Refuse (with the numbers) a snapshot that would take this host's snapshots past their budget."""
    used = store.du_once([S.SNAPSHOTS_PATH])
    estimate = rootfs_new + memory
    if used + estimate > budget:
        raise AgentError(
            f"Snapshot {snap} of {name} refused: this host's snapshots take {used >> 20} MiB and this one "
            f"would add about {estimate >> 20} MiB (rootfs changes {rootfs_new >> 20} MiB, memory up to "
            f"{memory >> 20} MiB), over the host's snapshot budget of {budget >> 20} MiB. Nothing was frozen.",
            data={
                "state": _state(name),
                "budget_bytes": budget,
                "used_bytes": used,
                "estimate_bytes": estimate,
                "rootfs_new_bytes": rootfs_new,
                "memory_bytes": memory,
            },
        )
    return used


def _frozen_pass(name, rootfs, copy, since_ns, changes, why_not, index):
    """Bring the running pass's copy up to date while the container is frozen: from the change
    journal when it can be trusted, else by walking the whole tree (and saying why). Returns
    the snapshot's stats about it."""
    if changes is not None:
        try:
            paths, trees, whole = changes.stop()
            pids = container_pids(name)
            if pids is None:
                raise journal.Untrusted(f"the processes of {name} could not be listed")
            whole |= journal.open_for_writing(rootfs, pids)
            listed, unshared = store.update_listed(rootfs, copy, since_ns, paths | whole, trees, index, whole)
            event("copy", f"frozen pass from the change journal: {listed} paths", 80)
            return {"frozen_pass": "journal", "frozen_pass_paths": listed, "frozen_pass_unshared": unshared}
        except journal.Untrusted as e:
            why_not = str(e)
        except (OSError, AgentError) as e:  # anything unexpected: the walk, which is always exact
            why_not = f"the journal's frozen pass failed: {e}"
    event("copy", f"frozen pass walks the whole rootfs ({why_not})", 80)
    try:  # what is held open for writing or mapped shared is copied whole by the walk too
        pids = container_pids(name)
        whole = journal.open_for_writing(rootfs, pids) if pids else ()
    except (journal.Untrusted, OSError):
        whole = ()
    unshared = store.update_in_place(rootfs, copy, since_ns, whole)
    return {"frozen_pass": "walk", "frozen_pass_reason": why_not, "frozen_pass_unshared": unshared}


def cmd_snapshot(params):
    """{name, snapshot, stateful=true, budget_bytes=None, journal=true}. Stateful: CRIU dump of
    the running container (it keeps running), plus its rootfs copied while frozen, so files and
    memory agree; the frozen pass copies what the change journal saw (journal=false: it walks
    the whole rootfs, as the fallback does).
    The rootfs copy shares every unchanged file with the previous snapshot (store.py); the
    memory pages are compressed with zstd once the container runs again."""
    name = _require(params.get("name"))
    snap = check_name(params.get("snapshot"), "snapshot")
    stateful = _flag(params, "stateful", True)
    use_journal = _flag(params, "journal", True)
    budget = _budget(params)
    t0 = time.monotonic()
    final = _snap_dir(name, snap)
    if os.path.lexists(final):
        raise AgentError(f"{name} has a snapshot named {snap} already.", data={"state": _state(name)})
    state = _state(name)
    if state not in ("RUNNING", "STOPPED"):
        raise AgentError(f"{name} is {state}; snapshots need it RUNNING or STOPPED.", data={"state": state})
    if stateful and state != "RUNNING":
        raise AgentError(f"{name} is {state}: a stateful snapshot needs a running container.", data={"state": state})
    rootfs = _rootfs(name)
    event("preflight", "checking disk space", 2)
    previous = _previous_rootfs(name)
    rootfs_bytes = _du(rootfs)
    native = _native_cow(rootfs)  # btrfs: the rootfs copy is one read-only snapshot, adding ~nothing
    rootfs_new = store.new_bytes_estimate(rootfs, previous) if previous and not native else None
    if rootfs_new is None:
        rootfs_new = 0 if native else rootfs_bytes
    memory = _memory_bytes(name) if stateful else 0
    if budget is not None:
        _check_budget(name, snap, budget, rootfs_new, memory)
    _check_disk(rootfs_new + memory, f"snapshot {snap} of {name}")
    tmp = os.path.join(S.SNAPSHOTS_PATH, name, f".tmp-{snap}")
    _remove_tree(tmp)
    os.makedirs(tmp)
    images = os.path.join(tmp, "images")
    tmp_rootfs = os.path.join(tmp, "rootfs")
    stats = {}
    frozen_ms = None
    try:
        _write_config_in(tmp, _read_config(name))
        if native:  # --- btrfs (cow.py): no copy, one read-only subvolume snapshot while frozen
            frozen_ms, state = _native_snapshot(name, rootfs, tmp_rootfs, images if stateful else None, state)
        elif state == "RUNNING":
            # Bulk copy while it runs, sharing with the previous snapshot; the second pass, frozen,
            # brings that copy up to date in place (only what changed since is written).
            shared = (
                f", sharing what did not change with {os.path.basename(os.path.dirname(previous))}" if previous else ""
            )
            event("copy", f"copying the rootfs of {name} ({rootfs_bytes >> 20} MiB) while it runs{shared}", 10)
            # The change journal starts before the running pass (journal.py): the frozen pass
            # then copies what changed since, instead of walking the whole tree.
            if not use_journal:
                changes, why_not = None, "the journal was turned off for this snapshot"
            elif not shutil.which("rsync"):
                changes, why_not = None, "no rsync on this host"
            else:
                changes, why_not = journal.start(rootfs)
            try:
                since_ns = store.pass_start()
                store.sync_new(rootfs, tmp_rootfs, [previous])
                index = store.file_index(rootfs) if changes else None
            except BaseException:
                if changes is not None:
                    changes.close()
                raise
            event("freeze", f"freezing {name}", 40)
            t_freeze = time.monotonic()
            try:
                run(["lxc-freeze", "-n", name], timeout=60, check=True)
                if stateful:
                    os.makedirs(images)
                    event("dump", f"dumping {name} with CRIU (it keeps running)", 50)
                    _criu_dump(name, images, stop=False)
                event("copy", "copying what changed in the rootfs while frozen", 75)
                # Never an attribute change written over a file shared with the previous snapshot.
                t_copy = time.monotonic()
                stats.update(_frozen_pass(name, rootfs, tmp_rootfs, since_ns, changes, why_not, index))
                stats["frozen_copy_ms"] = _ms(t_copy)
            finally:
                if changes is not None:
                    changes.close()
                _thaw(name)
                frozen_ms = _ms(t_freeze)
            state = _state(name)
            if state != "RUNNING":
                raise AgentError(f"{name} is {state} after the snapshot, not RUNNING.", data={"state": state})
        else:
            event("copy", f"copying the rootfs of {name} ({rootfs_bytes >> 20} MiB)", 20)
            store.sync_new(rootfs, tmp_rootfs, [previous])
        contents = None
        if stateful:
            stats = {**_criu_stats(images, "dump"), **stats}
            contents = _contents(images)  # decoded before the pages are compressed
            event("compress", "compressing the memory images", 85)
            compression, images_bytes, images_raw = store.compress_images(images)
        stats["total_ms"] = _ms(t0)
        if frozen_ms is not None:
            stats["frozen_ms"] = frozen_ms  # the container's downtime, dump + frozen copy
        event("copy", "writing metadata", 90)
        meta = {
            "snapshot": snap,
            "container": name,
            "stateful": stateful,
            "created_at": _now(),
            "stats": stats,
            "container_state": state,
            "shared_with": os.path.basename(os.path.dirname(previous)) if previous and not native else None,
        }
        if native:
            meta["rootfs_storage"] = "btrfs snapshot"  # shares extents with the rootfs and every snapshot
        if stateful:
            meta.update(images_compression=compression, images_bytes=images_bytes, images_raw_bytes=images_raw)
        _write_json(os.path.join(tmp, "meta.json"), meta)
        os.rename(tmp, final)
    except AgentError as e:
        _remove_tree(tmp)
        e.data["state"] = _state(name)  # after the thaw
        e.message += f" {name} is {e.data['state']}; no snapshot was kept."
        raise
    except BaseException:
        _remove_tree(tmp)
        raise
    # size: the whole snapshot, each inode once; added: what only it holds (the disk it took).
    meta["size_bytes"] = store.du_once([final])
    meta["added_bytes"] = store.unique_bytes(final)
    _write_json(os.path.join(final, "meta.json"), meta)
    images = os.path.join(final, "images")
    result = {
        **meta,
        "images": _image_files(images) if stateful else [],
        "contents": contents,
    }
    event("copy", f"snapshot {snap} of {name} done in {stats['total_ms']} ms", 100)
    return result


def _load_snapshot(name, snap):
    sdir = _snap_dir(name, snap)
    meta = _read_json(os.path.join(sdir, "meta.json"))
    if meta is None:
        raise AgentError(f"{name} has no snapshot {snap} on this host.", data={"state": _state(name)})
    return sdir, meta


def cmd_restore(params):
    """{name, snapshot}: kill the container, roll its rootfs (and config) back to the
    snapshot, then restore the processes (stateful) or cold start (stateless)."""
    name = _require(params.get("name"))
    snap = check_name(params.get("snapshot"), "snapshot")
    sdir, meta = _load_snapshot(name, snap)
    images = os.path.join(sdir, "images")
    stateful = bool(meta.get("stateful")) and os.path.isfile(os.path.join(images, "inventory.img"))
    if not os.path.isdir(os.path.join(sdir, "rootfs")):
        raise AgentError(f"Snapshot {snap} of {name} has no rootfs copy.", data={"state": _state(name)})
    rootfs = _rootfs(name)
    if stateful:  # what the images need, checked while the container still runs untouched
        if store.is_compressed(images) and not shutil.which("zstd"):
            raise AgentError(
                f"Snapshot {snap}'s memory images are compressed with zstd, which this host lacks "
                "(install the zstd package); nothing was changed.",
                data={"state": _state(name)},
            )
        _check_disk(meta.get("images_raw_bytes") or store.du_once([images]), f"restoring {snap}'s memory images")
    t0 = time.monotonic()
    event("stop", f"stopping {name}", 5)
    if _state(name) != "STOPPED":
        rc, out, err = run(["lxc-stop", "-n", name, "-k"], timeout=60)
        state = _state(name)
        if state != "STOPPED":
            raise AgentError(f"lxc-stop did not stop {name}.", (err or out)[-2000:], {"state": state})
    # A saved state belongs to the filesystem we are about to replace.
    _remove_tree(_state_dir(name))
    event("copy", f"rolling the rootfs of {name} back to {snap}", 20)
    store.sync(os.path.join(sdir, "rootfs"), rootfs)
    # The snapshot's config (it may have come from another host) only through the allowlist.
    try:
        snap_lines = _read_lines(os.path.join(sdir, "config"))
    except OSError:
        snap_lines = _read_config(name)
    dropped = _apply_allowlist(_cdir(name), name, snap_lines, f"the config of snapshot {snap}")
    t_restore = time.monotonic()
    if stateful:
        # CRIU restores from a private copy (decompressed): the snapshot itself is never written.
        work = store.restore_work_dir(name)
        compressed = store.is_compressed(images)
        event("restore", f"{'decompressing' if compressed else 'copying'} the memory images of {snap}", 50)
        t_images = time.monotonic()
        try:
            store.plain_images(images, work)
        except OSError as e:
            _remove_tree(work)
            raise AgentError(
                f"Cannot prepare the memory images of {snap} for the restore ({e.strerror or e}); {name} is STOPPED.",
                data={"state": _state(name), "has_saved_state": False},
            ) from None
        images_ms = _ms(t_images)
        event("restore", f"restoring the processes of {name} from {snap}", 60)
        try:
            _criu_restore(name, work, failure=f"Restoring {name} from snapshot {snap} failed", has_saved_state=False)
            stats = _criu_stats(work, "restore")
        finally:
            _keep_restore_log(name, work)
            _remove_tree(work)
        stats["images_ms"] = images_ms
        stats["images_compression"] = "zstd" if compressed else None
        moved = _align(name)
    else:
        event("restore", f"starting {name} (stateless snapshot: cold start)", 60)
        _lxc_start(name)
        stats = {}
        moved = None
    stats["restore_ms"] = _ms(t_restore)
    stats["total_ms"] = _ms(t0)
    event("restore", f"{name} restored from {snap} in {stats['total_ms']} ms", 100)
    out = {"name": name, "snapshot": snap, "state": _state(name), "stateful": stateful, "stats": stats}
    if dropped:
        out["config_dropped"] = dropped
    if moved:
        out["address_changed"] = moved
    return out


def _align(name):
    """The restored container on its own address (lxc.align_address), said as an event; a
    failure there leaves it running and says so, the restore itself having succeeded."""
    try:
        moved = align_address(name)
    except AgentError as e:
        given = bool(e.data.get("address_given"))  # only the default route failed
        now = "with its address but without its default route" if given else "with the address its snapshot had"
        event("restore", f"{e} It runs, {now}.", 95)
        return {"error": str(e), "address_given": given}
    if moved:
        was = ", ".join(moved["from"]) or "none"
        event("restore", f"{name} now has its own address {moved['to']} (its snapshot had {was})", 95)
    return moved


def _keep_restore_log(name, work):
    """CRIU's restore log, kept beside the container's config for its debug bundle."""
    try:
        shutil.copyfile(os.path.join(work, "restore.log"), os.path.join(_cdir(name), "criu-restore.log"))
    except OSError:
        pass


def cmd_delete_snapshot(params):
    name = check_name(params.get("name"))
    snap = check_name(params.get("snapshot"), "snapshot")
    sdir = _snap_dir(name, snap)
    if not os.path.isdir(sdir):
        raise AgentError(f"{name} has no snapshot {snap} on this host.")
    event("delete", f"deleting snapshot {snap} of {name}", 50)
    _remove_tree(sdir)
    return {"name": name, "snapshot": snap, "deleted": True}


def cmd_snapshot_contents(params):
    name = check_name(params.get("name"))
    snap = check_name(params.get("snapshot"), "snapshot")
    sdir, meta = _load_snapshot(name, snap)
    images = os.path.join(sdir, "images")
    if not os.path.isdir(images):
        return {"name": name, "snapshot": snap, "stateful": False, "contents": None}
    event("decode", f"decoding the CRIU images of {snap}", 50)
    if not store.is_compressed(images):
        return {"name": name, "snapshot": snap, "stateful": True, "contents": _contents(images)}
    # Not under the container's lock: a directory of its own (it may run beside another).
    os.makedirs(os.path.join(S.CTWEB_PATH, "restore"), mode=0o700, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"{name}.contents-", dir=os.path.join(S.CTWEB_PATH, "restore"))
    try:
        store.plain_images(images, work)
        return {"name": name, "snapshot": snap, "stateful": True, "contents": _contents(work)}
    finally:
        _remove_tree(work)
