"""The container's cgroup: the one cgroup whose subtree holds all of a container's processes
and that lxc-freeze (and CRIU) freezes. Used by the frozen pass's process list (criu.py), the
migration's list of held files (migrate.py) and the freeze instant (downtime.py).

How it is found: LXC 4.0 and later (cgfsng, v1 and v2 alike) creates one cgroup per container
named `lxc.payload.<name>` (`lxc.payload.<name>-<n>` when that name was taken), below the
cgroup LXC was started in; its monitor lives beside it in `lxc.monitor.<name>`. The container's
init starts in the payload cgroup, but need not stay there: with systemd as the init on cgroup
v2 the init moves to `<payload>/init.scope` and its services to `<payload>/system.slice/...`,
and `lxc.cgroup.dir.container.inner` puts the init one level down too. So the container's
cgroup is the init's own cgroup path (/proc/<init>/cgroup) climbed up to its deepest component
that names this container's payload. The keys that would place the cgroup elsewhere
(`lxc.cgroup.dir*`) are dropped from every config the agent writes (lxc.py's allowlist). Where
the path names no payload of this container, the answer is None: the callers then say so or
take their safe way (the init's own cgroup alone would miss the processes beside it).

The hierarchy used: the v1 freezer hierarchy where it is mounted (hybrid hosts too, as LXC
freezes through it there), else the unified v2 one (`cgroup.freeze`)."""

import os
import re
from collections import namedtuple

from .lxc import _init_pid

# dir: the container's cgroup on this host's mounts; freeze: its file saying whether it is frozen
Cgroup = namedtuple("Cgroup", "dir freeze")


def parse(text):
    """/proc/<pid>/cgroup -> [(hierarchy id, [controllers], path)]."""
    rows = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[2].startswith("/"):
            rows.append((parts[0], [c for c in parts[1].split(",") if c], parts[2]))
    return rows


def payload(path, name):
    """The deepest ancestor-or-self of cgroup `path` that is container `name`'s payload cgroup
    (named `lxc.payload.<name>` or `lxc.payload.<name>-<n>`), or None."""
    parts = [p for p in path.split("/") if p]
    pattern = re.compile(r"lxc\.payload\." + re.escape(name) + r"(-[0-9]+)?")
    for i in range(len(parts), 0, -1):
        if pattern.fullmatch(parts[i - 1]):
            return "/" + "/".join(parts[:i])
    return None


def _mounts(mountinfo):
    """[(root, mount point, fstype, super options)] of the cgroup mounts in a mountinfo text."""
    out = []
    for line in mountinfo.splitlines():
        if " - " not in line:
            continue
        left, right = line.split(" - ", 1)
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((fields[3], fields[4], tail[0], tail[2].split(",")))
    return out


def _on_mount(path, root, point):
    """Cgroup `path` (from /proc/<pid>/cgroup) as a directory under a mount of `root` at `point`, or None."""
    if root != "/":
        root = root.rstrip("/")
        if path != root and not path.startswith(root + "/"):
            return None
        path = path[len(root) :]
    return os.path.join(point, path.lstrip("/")) if path.strip("/") else point


def locate(proc_cgroup, mountinfo, name, isdir=os.path.isdir):
    """Container `name`'s cgroup from its init's /proc/<pid>/cgroup text and this host's
    /proc/self/mountinfo text: a Cgroup(dir, freeze file), or None."""
    rows = parse(proc_cgroup)
    mounts = _mounts(mountinfo)
    v1 = next((path for _hid, controllers, path in rows if "freezer" in controllers), None)
    v2 = next((path for hid, controllers, path in rows if hid == "0" and not controllers), None)
    for path, fstype, freeze in ((v1, "cgroup", "freezer.state"), (v2, "cgroup2", "cgroup.freeze")):
        top = payload(path, name) if path else None
        if top is None:
            continue
        for root, point, kind, options in mounts:
            if kind != fstype or (fstype == "cgroup" and "freezer" not in options):
                continue
            where = _on_mount(top, root, point)
            if where and isdir(where):
                return Cgroup(where, os.path.join(where, freeze))
    return None


def container_cgroup(name, pid=None):
    """Running container `name`'s cgroup on this host (Cgroup(dir, freeze)), or None when it
    does not run or its cgroup cannot be told (see the module's note). `pid`: its init's, when
    the caller asked LXC already."""
    pid = pid or _init_pid(name)
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            proc_cgroup = f.read()
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    except OSError:
        return None
    return locate(proc_cgroup, mountinfo, name)


def pids_in(directory):
    """Every process in cgroup `directory` and its descendants, sorted, or None if one could not be read."""
    pids = set()
    for root, _dirs, _files in os.walk(directory):
        try:
            with open(os.path.join(root, "cgroup.procs")) as f:
                pids.update(int(p) for p in f.read().split())
        except (OSError, ValueError):
            return None
    return sorted(pids)


def container_pids(name):
    """All processes of running container `name` (its cgroup's whole subtree), or None."""
    cg = container_cgroup(name)
    found = pids_in(cg.dir) if cg else None
    return found or None
