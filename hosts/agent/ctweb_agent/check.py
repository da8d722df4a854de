"""`check`: can this container be checkpointed? A static scan of its processes, read from the
host's /proc (namespaces, sessions, open files, sockets, device nodes), and, on request, a
trial dump that leaves it running, into a private tmpfs, with CRIU's freeze time capped."""

import os
import re
import shutil
import stat
import time

from . import state as S
from .common import AgentError, _ms, _now, event, run
from .contents import _criu_stats
from .criu import _criu_log, _lxc_checkpoint, _memory_bytes, _thaw
from .lxc import _mount_entry_ok, _read_config, _require, _state

NAMESPACES = ("mnt", "uts", "ipc", "net", "pid", "user", "cgroup", "time")
# (major, minor): null, zero, full, random, urandom, tty, console, ptmx, net/tun: what containers
# have and CRIU handles through LXC (pts, majors 136-143, too). Anything else (a GPU, /dev/fuse) is reported.
PLAIN_DEVICES = {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (10, 200)}
PTY_MAJORS = range(136, 144)
TRIAL_FREEZE_CAP_S = 10  # CRIU gives up freezing after this (its --timeout)
TRIAL_PATH_NAME = "trial"
MAX_REASONS = 50

SENTENCES = {
    "namespaces": (
        "Process {pid} ({comm}) runs in its own {ns} namespace (a nested container or sandbox).",
        "Stop the nested container or sandbox, or move the container cold (strategy restart).",
    ),
    "processes": (
        "Process {pid} ({comm}) belongs to a session that started outside the container (started with lxc-attach?).",
        "Start it inside the container as a session leader (setsid), or stop it before a checkpoint.",
    ),
    "files": (
        "Process {pid} ({comm}) holds {path} (fd {fd}), a file from outside the container's mounts.",
        "Close that file or restart the process inside the container; a descriptor inherited from the host "
        "cannot move with it.",
    ),
    "devices": (
        "Process {pid} ({comm}) holds the device node {path} (fd {fd}, {major}:{minor}).",
        "Devices such as GPUs cannot be checkpointed: stop the program that uses it, or move the container cold.",
    ),
    "mounts": (
        "It has a bind mount from the host ({source} on /{target}): a checkpoint works here, but the "
        "container cannot be restored on another host.",
        "Remove the lxc.mount.entry (ctweb's config allowlist does not carry it to another host), or keep the "
        "container on this host.",
    ),
    "sockets": (
        "Process {pid} ({comm}) holds {what} (fd {fd}).",
        "A socket from another network namespace cannot move with the container: close it or stop the program first.",
    ),
}


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _link(path):
    try:
        return os.readlink(path)
    except OSError:
        return None


def _stat_fields(pid):
    """(comm, ppid, session) from /proc/PID/stat; the comm may hold spaces and parentheses."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    try:
        return comm, int(rest[1]), int(rest[3])
    except (IndexError, ValueError):
        return None


def _inner_session(pid):
    """The process's session id as its innermost pid namespace sees it (NSsid's last number):
    0 when the session's leader is outside that namespace, as CRIU sees it."""
    m = re.search(r"^NSsid:\s*([\d\s]+)$", _read(f"/proc/{pid}/status") or "", re.M)
    values = m.group(1).split() if m else []
    return int(values[-1]) if values else None


def _init_pid(name):
    rc, out, err = run(["lxc-info", "-n", name, "-p", "-H"], timeout=20)
    out = out.strip()
    if rc != 0 or not out.isdigit():
        raise AgentError(f"{name} is not running: there is nothing to check.", data={"state": _state(name)})
    return int(out)


def _container_pids(init):
    """Every process of the container: those in its pid namespace and every descendant of its
    init (a nested namespace's processes are in another pid namespace)."""
    own_ns = _link(f"/proc/{init}/ns/pid")
    parents, found = {}, {init}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        fields = _stat_fields(pid)
        if fields is None:
            continue
        parents[pid] = fields[1]
        if own_ns and _link(f"/proc/{pid}/ns/pid") == own_ns:
            found.add(pid)
    grew = True
    while grew:
        more = {p for p, pp in parents.items() if pp in found and p not in found}
        found |= more
        grew = bool(more)
    return sorted(found)


def _mount_ids(pid):
    text = _read(f"/proc/{pid}/mountinfo") or ""
    return {line.split()[0] for line in text.splitlines() if line.split()}


def _fd_mount_id(pid, fd):
    m = re.search(r"^mnt_id:\s*(\d+)", _read(f"/proc/{pid}/fdinfo/{fd}") or "", re.M)
    return m.group(1) if m else None


def _sockets(init):
    """inode -> (kind, state) for the sockets of the container's network namespace."""
    out = {}
    for table, kind in (("tcp", "TCP"), ("tcp6", "TCP6"), ("udp", "UDP"), ("udp6", "UDP6"), ("raw", "raw")):
        for line in (_read(f"/proc/{init}/net/{table}") or "").splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9:
                out[cols[9]] = (kind, cols[3])
    for table, kind in (("unix", "unix"), ("packet", "packet"), ("netlink", "netlink")):
        for line in (_read(f"/proc/{init}/net/{table}") or "").splitlines()[1:]:
            cols = line.split()
            inode = cols[6] if table == "unix" and len(cols) > 6 else (cols[-1] if cols else None)
            if inode:
                out[inode] = (kind, None)
    return out


def scan(name):
    """The blockers a static look finds (a list of reasons) and how many processes it read."""
    init = _init_pid(name)
    pids = _container_pids(init)
    init_ns = {ns: _link(f"/proc/{init}/ns/{ns}") for ns in NAMESPACES}
    sockets = _sockets(init)
    reasons = []

    def add(cls, **facts):
        if len(reasons) < MAX_REASONS:
            sentence, fix = SENTENCES[cls]
            reasons.append({"class": cls, "sentence": sentence.format(**facts), "fix": fix, **facts})

    for line in _read_config(name):
        key, _, value = line.partition("=")
        parts = value.split()
        if key.strip() == "lxc.mount.entry" and len(parts) >= 4 and not _mount_entry_ok(value.strip()):
            if parts[0].startswith("/") and "bind" in parts[3].split(","):
                add("mounts", source=parts[0], target=parts[1].strip("/"))
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue  # gone meanwhile
        comm, ppid, session = fields
        for ns in NAMESPACES:
            mine = _link(f"/proc/{pid}/ns/{ns}")
            if mine and init_ns[ns] and mine != init_ns[ns]:
                add("namespaces", pid=pid, comm=comm, ns=ns)
                break
        if _link(f"/proc/{pid}/ns/pid") == init_ns["pid"] and _inner_session(pid) == 0:
            add("processes", pid=pid, comm=comm, session=session)
        mounts = _mount_ids(pid)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            target = _link(f"/proc/{pid}/fd/{fd}") or ""
            if target.startswith("socket:["):
                inode = target[8:-1]
                kind, st = sockets.get(inode, (None, None))
                if kind is None:  # (lxc-checkpoint keeps established TCP: measured on the lab)
                    add("sockets", pid=pid, comm=comm, fd=int(fd), what="a socket from outside its network namespace")
                continue
            if not target.startswith("/"):
                continue  # pipes, anon inodes: CRIU's business
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode):
                dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                if dev not in PLAIN_DEVICES and dev[0] not in PTY_MAJORS:
                    add("devices", pid=pid, comm=comm, fd=int(fd), path=target, major=dev[0], minor=dev[1])
                    continue
            mnt = _fd_mount_id(pid, fd)
            if mnt is not None and mounts and mnt not in mounts:
                add("files", pid=pid, comm=comm, fd=int(fd), path=target)
    return reasons, len(pids)


def _trial_dir(name):
    return os.path.join(S.CTWEB_PATH, TRIAL_PATH_NAME, name)


def _unmount(path):
    while os.path.ismount(path):
        if run(["umount", "-l", path], timeout=30)[0] != 0:
            break


def trial_dump(name, cap_s):
    """Dump the running container into a tmpfs of its own (it keeps running), CRIU's freeze
    capped at cap_s seconds; what it cost, or CRIU's error lines. Nothing stays behind."""
    path = _trial_dir(name)
    _unmount(path)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700)
    size = int(_memory_bytes(name) * 1.5) + (64 << 20)
    run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path], timeout=30, check=True)
    images = os.path.join(path, "images")
    try:
        os.makedirs(images)
        conf = os.path.join(path, "criu.conf")
        with open(conf, "w") as f:
            f.write(f"timeout {int(cap_s)}\n")
        t0 = time.monotonic()
        rc, output = _lxc_checkpoint(name, images, "dump", env={**os.environ, "CRIU_CONFIG_FILE": conf})
        took = _ms(t0)
        ok = rc == 0 and os.path.isfile(os.path.join(images, "inventory.img"))
        out = {"ok": ok, "total_ms": took, "freeze_cap_s": cap_s}
        if ok:
            stats = _criu_stats(images, "dump")
            out["frozen_ms"] = round(stats.get("frozen_time", 0) / 1000, 1)
            out["freezing_ms"] = round(stats.get("freezing_time", 0) / 1000, 1)
        else:
            out["details"] = _criu_log(images, "dump") + ("\n--- lxc-checkpoint ---\n" + output.strip())
        return out
    finally:
        if _state(name) == "FROZEN":
            _thaw(name)
        _unmount(path)
        shutil.rmtree(path, ignore_errors=True)


def cmd_check(params):
    """{name, trial=false, freeze_cap_s=10}: {status: yes|no|unknown, reasons, processes,
    trial, checked_at}. `no` when the scan or the trial found a blocker; `yes` only after a
    trial dump went through; `unknown` when the scan found nothing and no trial ran."""
    name = _require(params.get("name"))
    trial = params.get("trial", False)
    cap = params.get("freeze_cap_s", TRIAL_FREEZE_CAP_S)
    if not isinstance(trial, bool):
        raise AgentError("trial must be true or false.")
    if not isinstance(cap, int) or isinstance(cap, bool) or not 1 <= cap <= 120:
        raise AgentError("freeze_cap_s must be a whole number of seconds from 1 to 120.")
    state = _state(name)
    if state != "RUNNING":
        raise AgentError(f"{name} is {state}: only a running container can be checked.", data={"state": state})
    event("scan", f"reading the processes of {name}", 10)
    reasons, nprocs = scan(name)
    out = {"name": name, "processes": nprocs, "reasons": reasons, "trial": None, "checked_at": _now()}
    if trial:
        event("trial", f"trial dump of {name} (it keeps running; freeze capped at {cap} s)", 40)
        out["trial"] = trial_dump(name, cap)
    if reasons or (out["trial"] and not out["trial"]["ok"]):
        out["status"] = "no"
    elif out["trial"]:
        out["status"] = "yes"
    else:
        out["status"] = "unknown"
    out["state"] = _state(name)
    event("scan", f"{name}: checkpointable {out['status']}", 100)
    return out
