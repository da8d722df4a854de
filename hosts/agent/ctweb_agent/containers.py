"""The container subcommands: list, create, start, stop (stateful or not), restart, delete."""

import os
import time

from . import cow
from . import state as S
from .common import NAME_RE, AgentError, _du, _flag, _ms, _now, _remove_tree, _write_json, check_name, event, run
from .contents import _criu_stats
from .criu import (
    _check_disk,
    _criu_dump,
    _criu_restore,
    _has_saved_state,
    _memory_bytes,
    _snapshot_names,
    _state_dir,
    _state_images,
)
from .lxc import (
    INIT_PATH,
    _allowlisted,
    _apply_allowlist,
    _cdir,
    _check_network,
    _config_value,
    _configure,
    _console_tail,
    _exists,
    _ips,
    _lxc_start,
    _lxc_stop,
    _read_config,
    _require,
    _state,
    _templates,
)


def _describe(name):
    lines = _read_config(name) if _exists(name) else []
    ipv4, ipv6 = _ips(name)
    configured = _config_value(lines, "lxc.net.0.ipv4.address")
    if not ipv4 and configured:
        ipv4 = [configured.split("/")[0]]
    return {
        "name": name,
        "state": _state(name),
        "ipv4": ipv4,
        "ipv6": ipv6,
        "template": next((line.split("=", 1)[1] for line in lines if line.startswith("# ctweb template=")), ""),
        "command": _config_value(lines, "lxc.init.cmd") == "/" + INIT_PATH,
        "has_saved_state": _has_saved_state(name),
        "snapshots": _snapshot_names(name),
        "config_warnings": _allowlisted(name, lines)[1] if lines else [],
    }


def cmd_list(params):
    names = []
    if os.path.isdir(S.LXC_PATH):
        names = sorted(n for n in os.listdir(S.LXC_PATH) if NAME_RE.fullmatch(n) and _exists(n))
    return {"containers": [_describe(n) for n in names], "migrations": _migration_dirs()}


def _migration_dirs():
    """The migrations that left a working directory here (the dashboard removes those whose
    operation has ended): their id, and the container a target side was receiving."""
    out = []
    if os.path.isdir(S.MIGRATIONS_PATH):
        for d in sorted(os.listdir(S.MIGRATIONS_PATH)):
            if not d.isdigit():
                continue
            try:
                with open(os.path.join(S.MIGRATIONS_PATH, d, "receiving")) as f:
                    receiving = f.read().strip()
            except OSError:
                receiving = None
            out.append(
                {"migration": int(d), "receiving": receiving if receiving and NAME_RE.fullmatch(receiving) else None}
            )
    return out


def cmd_create(params):
    name = check_name(params.get("name"))
    template = params.get("template")
    command = params.get("command")
    if command is not None and (not isinstance(command, list) or not all(isinstance(a, str) for a in command)):
        raise AgentError("The command must be a list of strings.")
    network = _check_network(params.get("network"))
    if template not in _templates():
        raise AgentError(
            "This host has no template {!r} (it has: {}).".format(template, ", ".join(_templates()) or "none")
        )
    if os.path.exists(_cdir(name)):
        raise AgentError(f"A container named {name} exists on this host already.")
    event("create", f"creating {name} from {template}", 10)
    try:
        _rootfs_subvolume(name)
        if template == "busybox":
            run(["lxc-create", "-n", name, "-t", "busybox"], timeout=120, check=True)
        else:
            run(["lxc-create", "-n", name, "-t", f"ctweb-{template}"], timeout=300, check=True)
        event("configure", "configuring network and init", 50)
        _configure(name, template, command, network)
        event("start", f"starting {name}", 70)
        state = _lxc_start(name)
    except AgentError as e:
        # Nothing half-created stays behind.
        details = e.details or _console_tail(name)
        _destroy(name)
        raise AgentError(e.message, details) from None
    event("start", f"{name} is {state}", 100)
    return _describe(name)


def _rootfs_subvolume(name):
    """On btrfs, the rootfs lxc-create is about to fill is made a subvolume first (its dir backend
    fills an existing directory), so that snapshots of it are btrfs snapshots (cow.py)."""
    if not cow.is_btrfs(S.LXC_PATH):
        return
    os.makedirs(_cdir(name), mode=0o755)
    try:
        cow.create_subvolume(os.path.join(_cdir(name), "rootfs"))
    except cow.CowError as e:
        raise AgentError(f"Cannot make {name}'s rootfs a btrfs subvolume: {e}") from None


def _destroy(name):
    if not os.path.exists(_cdir(name)):
        return
    if _exists(name) and _state(name) != "STOPPED":
        run(["lxc-stop", "-n", name, "-k"], timeout=60)
    rc, out, err = run(["lxc-destroy", "-n", name], timeout=120)
    if os.path.exists(_cdir(name)):
        cow.rmtree(_cdir(name), ignore=True)


def cmd_start(params):
    """{name, discard_state=false}: restores the saved state of a stateful stop when there
    is one (result restored: true + CRIU's restore stats), else a cold start."""
    name = _require(params.get("name"))
    if _state(name) == "RUNNING":
        return _describe(name)
    if params.get("discard_state") and _has_saved_state(name):
        event("start", f"discarding the saved state of {name}", 10)
        _remove_tree(_state_dir(name))
    return _start(name, progress=20)


def _start(name, progress):
    if not _has_saved_state(name):
        event("start", f"starting {name}", progress)
        _lxc_start(name)
        return {**_describe(name), "restored": False}
    t0 = time.monotonic()
    images = _state_images(name)
    dropped = _apply_allowlist(_cdir(name), name, _read_config(name), f"{name}'s config")
    event("restore", f"restoring {name} from its saved state", progress)
    _criu_restore(name, images, failure=f"Restoring {name} from its saved state failed", has_saved_state=True)
    stats = _criu_stats(images, "restore")
    stats["total_ms"] = _ms(t0)
    # The processes run again: the state is spent (restoring it twice would fork the past).
    _remove_tree(_state_dir(name))
    event("restore", f"{name} restored in {stats['total_ms']} ms", 100)
    out = {**_describe(name), "restored": True, "stats": stats}
    if dropped:
        out["config_dropped"] = dropped
    return out


def cmd_stop(params):
    """{name, stateful=false}: stateful dumps the processes (lxc-checkpoint -s) into the
    container's saved state, which the next start restores."""
    name = _require(params.get("name"))
    if not _flag(params, "stateful", False):
        event("stop", f"stopping {name}", 20)
        _lxc_stop(name)
        return _describe(name)
    state = _state(name)
    if state != "RUNNING":
        raise AgentError(f"{name} is {state}: a stateful stop needs a running container.", data={"state": state})
    t0 = time.monotonic()
    _check_disk(_memory_bytes(name), f"the saved state of {name}")
    sdir = _state_dir(name)
    _remove_tree(sdir)  # a stale state of an earlier run (the container runs, so it is spent)
    images = _state_images(name)
    os.makedirs(images)
    event("dump", f"dumping {name} (CRIU) and stopping it", 20)
    try:
        _criu_dump(name, images, stop=True)
    except AgentError as e:
        _remove_tree(sdir)
        e.data.update(state=_state(name), has_saved_state=False)
        e.message += f" {name} is {e.data['state']}; no state was kept."
        raise
    stats = _criu_stats(images, "dump")
    stats["total_ms"] = _ms(t0)
    _write_json(os.path.join(sdir, "meta.json"), {"container": name, "created_at": _now(), "stats": stats})
    state = _state(name)
    if state != "STOPPED":
        # lxc-checkpoint -s said yes but the container runs on: the state is not a stop.
        _remove_tree(sdir)
        raise AgentError(f"{name} still runs after its stateful stop.", data={"state": state})
    event("dump", f"{name} dumped and stopped in {stats['total_ms']} ms", 100)
    return {**_describe(name), "stats": stats, "size_bytes": _du(images)}


def cmd_restart(params):
    name = _require(params.get("name"))
    event("stop", f"stopping {name}", 10)
    _lxc_stop(name)
    return _start(name, progress=50)


def cmd_delete(params):
    name = check_name(params.get("name"))
    if not _exists(name):
        # Already gone from this host (by hand, or a lost host copy): deleting it succeeds.
        _remove_tree(_state_dir(name))
        _remove_tree(os.path.join(S.SNAPSHOTS_PATH, name))
        return {"name": name, "state": "STOPPED", "deleted": True, "was_missing": True}
    event("stop", f"stopping {name}", 20)
    _lxc_stop(name)
    event("delete", f"destroying {name}", 60)
    rc, out, err = run(["lxc-destroy", "-n", name], timeout=120)
    if rc != 0 or _exists(name):
        raise AgentError(f"lxc-destroy failed for {name}.", (err or out)[-2000:], {"state": _state(name)})
    if os.path.lexists(_cdir(name)):  # what lxc-destroy left (a btrfs rootfs subvolume)
        cow.rmtree(_cdir(name), ignore=True)
    event("delete", f"removing the snapshots and saved state of {name}", 80)
    _remove_tree(_state_dir(name))
    _remove_tree(os.path.join(S.SNAPSHOTS_PATH, name))
    return {"name": name, "state": "STOPPED", "deleted": True}
