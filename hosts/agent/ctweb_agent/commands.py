"""The subcommands: `inspect`, the per-container lock, the dispatch table (the one list of
subcommands, which the dashboard takes from here) and main()."""

import fcntl
import json
import os
import sys
import time

from . import mjournal, store
from . import state as S
from .bundle import cmd_bundle, cmd_bundle_fetch
from .check import cmd_check
from .common import AGENT_UMASK, NAME_RE, AgentError, _flag, _private_modes, _read_json, _remove_tree, check_name, emit
from .containers import cmd_create, cmd_delete, cmd_list, cmd_restart, cmd_start, cmd_stop
from .criu import (
    _freezer_state,
    _has_saved_state,
    _replug_config,
    _snap_dir,
    _thaw,
    cmd_delete_snapshot,
    cmd_restore,
    cmd_snapshot,
    cmd_snapshot_contents,
)
from .estimate import cmd_estimate
from .exports import cmd_export, cmd_import, remove_import_stages
from .images import cmd_receive, cmd_send
from .lazy import (
    LAZY_DUMP,
    LAZY_PAGES,
    _watched_rc,
    cmd_migrate_abort,
    cmd_migrate_cleanup,
    cmd_migrate_dump,
    cmd_migrate_lazy_wait,
    cmd_migrate_restore,
    cmd_migrate_resume,
    cmd_pages_attach,
    cmd_pages_relay,
    end_restore_before_abort,
)
from .lxc import _exists, _state
from .migrate import _mig_dir, _mig_marker, cmd_cpuinfo_check, cmd_migrate_check, cmd_migrate_prepare
from .prepare import cmd_prepare
from .probe import cmd_probe


def cmd_inspect(params):
    """What this host holds of a container after a job was cut off (its worker died, its
    link broke): the container and its state, a migration's leftovers, a snapshot's.
    It runs under the container's lock, so it waits for whatever step was still running
    here (a dump goes on after the agent that started it died) and reports where it ended.
    With thaw=true a container left frozen by an interrupted snapshot or dump is thawed
    (never one a post-copy's page server holds frozen on purpose)."""
    name = check_name(params.get("name"))
    exists = _exists(name)
    out = {"exists": exists, "state": _state(name) if exists else None}
    holding = False
    if params.get("migration") is not None:
        mdir = _mig_dir(params)
        # A cut-off migration's change journal has nothing left to do (nor any delta to feed).
        out["journal_ended"] = mjournal.end(mdir)
        lazy = os.path.exists(os.path.join(mdir, f"{LAZY_DUMP}.json"))
        holding = lazy and _watched_rc(mdir, LAZY_DUMP) is None
        out["migration"] = {
            "dir": os.path.isdir(mdir),
            "images": os.path.isfile(os.path.join(mdir, "images", "inventory.img")),
            "receiving": os.path.exists(os.path.join(mdir, "receiving")),
            "received": os.path.exists(_mig_marker(name, params)),
            "lazy_dump": lazy,
            "lazy_dump_running": holding,
            "lazy_pages_running": _watched_rc(mdir, LAZY_PAGES) is None
            and os.path.exists(os.path.join(mdir, f"{LAZY_PAGES}.json")),
        }
    # LXC's word is not enough: a restore cut off between CRIU's restore (which puts back the
    # freezer state it dumped, FROZEN) and its thaw leaves LXC saying RUNNING over frozen tasks.
    frozen = exists and (out["state"] == "FROZEN" or (out["state"] == "RUNNING" and _freezer_state(name) == "FROZEN"))
    if frozen and not holding and _flag(params, "thaw", False):
        _thaw(name)
        out["state"] = _state(name)
        out["thawed"] = True
        if replugged := _replug_config(name):  # a dump's agent that died after unplugging them
            out["replugged"] = replugged
    out["has_saved_state"] = _has_saved_state(name)
    work = store.restore_work_dir(name)
    if os.path.lexists(work):
        _remove_tree(work)  # a cut-off restore's copy of a snapshot's images (we hold the lock)
    if remove_import_stages(name):  # a killed import's staging (we hold the lock imports take)
        out["removed_import_staging"] = True
    if params.get("snapshot") is not None:
        snap = check_name(params.get("snapshot"), "snapshot")
        tmp = os.path.join(S.SNAPSHOTS_PATH, name, f".tmp-{snap}")
        if os.path.lexists(tmp):
            _remove_tree(tmp)  # an unfinished copy: no job owns it any more (we hold the lock)
            out["removed_partial"] = True
        out["snapshot"] = _read_json(os.path.join(_snap_dir(name, snap), "meta.json"))
    return out


def _lock(name, wait):
    """Hold <container>.lock for this run (released when the process and any dump it
    started have exited). Waits up to `wait` seconds for another job to finish."""
    os.makedirs(S.LOCKS_PATH, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(S.LOCKS_PATH, name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise AgentError(
                    f"Another ctweb job is still working on {name} on this host; try again when it has finished."
                ) from None
            time.sleep(0.1)
    os.set_inheritable(fd, False)
    # Who holds it, for whoever wonders why a job waits (and for the fault tests).
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {sys.argv[1] if len(sys.argv) > 1 else ''}\n".encode(), 0)
    S.LOCK_FD = fd


# Subcommands that change a container (or, inspect, wait for what changes it) take its lock.
LOCKED = {
    "create",
    "start",
    "stop",
    "restart",
    "delete",
    "snapshot",
    "restore",
    "delete-snapshot",
    "migrate-prepare",
    "migrate-dump",
    "migrate-restore",
    "migrate-resume",
    "migrate-abort",
    "migrate-cleanup",
    "receive",
    "import",
    "inspect",
    "check",
}
LOCK_WAIT_S = {"inspect": 900}  # a dump the agent left behind may take this long to end


COMMANDS = {
    "probe": cmd_probe,
    "list": cmd_list,
    "create": cmd_create,
    "start": cmd_start,
    "stop": cmd_stop,
    "restart": cmd_restart,
    "delete": cmd_delete,
    "snapshot": cmd_snapshot,
    "restore": cmd_restore,
    "delete-snapshot": cmd_delete_snapshot,
    "snapshot-contents": cmd_snapshot_contents,
    "bundle": cmd_bundle,
    "bundle-fetch": cmd_bundle_fetch,
    "check": cmd_check,
    "estimate": cmd_estimate,
    "migrate-prepare": cmd_migrate_prepare,
    "migrate-check": cmd_migrate_check,
    "send": cmd_send,
    "receive": cmd_receive,
    "export": cmd_export,
    "import": cmd_import,
    "cpuinfo-check": cmd_cpuinfo_check,
    "migrate-dump": cmd_migrate_dump,
    "migrate-restore": cmd_migrate_restore,
    "migrate-resume": cmd_migrate_resume,
    "migrate-lazy-wait": cmd_migrate_lazy_wait,
    "migrate-abort": cmd_migrate_abort,
    "migrate-cleanup": cmd_migrate_cleanup,
    "inspect": cmd_inspect,
    "pages-attach": cmd_pages_attach,
    "pages-relay": cmd_pages_relay,  # started by migrate-dump/-restore only
    "migrate-journal": mjournal.cmd_migrate_journal,  # started by the presync's send only
    "prepare": cmd_prepare,
}
# These write a raw tar on stdout instead of JSON lines; their errors go to stderr
# (unless the tar goes directly to another host: then they print JSON lines too).
RAW_OUTPUT = {"send", "pages-attach", "export", "bundle-fetch"}
# Started by the agent itself (migrate-dump/-restore start their page relay, the presync its
# change journal), never asked for.
INTERNAL = {"pages-relay", "migrate-journal"}
# The subcommands the dashboard may ask for: hosts/agent takes them from here, and its SSH
# module refuses any other word.
DASHBOARD_COMMANDS = frozenset(COMMANDS) - INTERNAL


def _read_line(fd, limit=1 << 20):
    """The parameters line, read without buffering: `receive` reads a tar from the same
    descriptor right after it, and a buffered reader would keep part of that away."""
    out = bytearray()
    while len(out) < limit:
        b = os.read(fd, 1)
        if not b and not out:
            return None  # the end, before any parameters
        if not b or b == b"\n":
            break
        out += b
    return bytes(out)


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        emit({"type": "error", "message": "usage: ctweb-agent {{{}}}".format(",".join(sorted(COMMANDS)))})
        return 2
    # Nothing we start may inherit a descriptor from the SSH session: CRIU refuses to
    # dump processes holding files from outside their root (docs/LAB-NOTES.md).
    # (The page relay keeps its descriptor 3: CRIU's socket, handed over by its starter.)
    os.closerange(4 if argv[1] == "pages-relay" else 3, 1 << 16)
    os.umask(AGENT_UMASK)
    if os.environ.get("SUDO_USER"):
        # Run as root by a non-root SSH user (docs/HOSTS.md): nothing this run starts may find a
        # relative name in that user's home, where sudo leaves the working directory, nor a
        # program of that user's PATH (which sudo keeps unless the host's sudoers sets secure_path).
        os.chdir("/")
        os.environ["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    try:
        _private_modes()
    except OSError:
        pass  # never the reason a job fails
    raw = _read_line(0)
    if raw is None and argv[1] in ("send", "receive", "migrate-restore"):
        return 0  # started ahead by the dashboard and never used (hosts/ssh.py PRESTARTABLE): nothing was asked
    raw = (raw or b"").decode()  # (pages-relay takes its parameters from its environment)
    try:
        params = json.loads(raw) if raw.strip() else {}
        if not isinstance(params, dict):
            raise ValueError("parameters must be a JSON object")
    except ValueError as e:
        emit({"type": "error", "message": f"Bad parameters: {e}"})
        return 2
    try:
        if argv[1] in LOCKED and NAME_RE.fullmatch(str(params.get("name", ""))):
            if argv[1] == "migrate-abort":
                end_restore_before_abort(params)
            _lock(params["name"], LOCK_WAIT_S.get(argv[1], 30))
    except AgentError as e:
        emit({"type": "error", "message": e.message})
        return 1
    if argv[1] in RAW_OUTPUT and params.get("direct") is None:
        try:
            COMMANDS[argv[1]](params)
        except Exception as e:
            sys.stderr.write(f"{getattr(e, 'message', e)}\n{getattr(e, 'details', '')}\n")
            return 1
        return 0
    try:
        data = COMMANDS[argv[1]](params)
    except AgentError as e:
        emit({"type": "error", "message": e.message, "details": e.details, "data": e.data})
        return 1
    except Exception as e:
        import traceback

        emit({"type": "error", "message": f"agent crashed: {type(e).__name__}: {e}", "details": traceback.format_exc()})
        return 1
    emit({"type": "result", "data": data})
    return 0
