"""A migration's change journal: so that the rootfs delta sent while the container is down
lists what changed since the presync instead of walking the whole tree.

The presync (`send` of the rootfs) and the delta (`send` of the delta, after the dump) are
two agent runs, minutes apart. So journal.py's fanotify journal runs in a detached process of
its own (`migrate-journal`, never asked for by the dashboard), started by the presync before
it walks the rootfs, and it keeps what it sees in memory. At the freeze the delta signals it
(SIGUSR1): it reads every event queued so far (all the container made: its tasks are dumped
or frozen by then) and writes <mig dir>/journal-result.json, then ends. The delta adds what
the frozen processes hold open for writing or map shared (journal.open_for_writing; none when
they are gone: their last release sent FAN_CLOSE_WRITE), the files held at the presync, and
every other name of a changed file with several names.

It never outlives its migration: migrate-cleanup, migrate-abort, migrate-resume and inspect
end it; it ends by itself when the migration's directory goes, when its journal cannot be
trusted any more (no point holding a filesystem mark), and after LIFETIME_S whatever happens
(an agent or a dashboard that died and never came back). Anything it cannot vouch for raises
journal.Untrusted with the reason, and the delta walks the whole tree as before.
"""

import json
import os
import select
import signal
import stat
import subprocess
import sys
import time

from . import journal
from .cgroups import container_pids
from .common import _NOFOLLOW_DIR, CHILD_UMASK, _read_json, _starttime, _write_json, agent_file
from .lxc import _state

INFO = "journal.json"  # {pid, pid_start, root, started, lifetime_s}: written once the mark is in place
RESULT = "journal-result.json"  # {paths, trees, whole, events} or {broken: why}
LOG = "journal.out"
COMMAND = "migrate-journal"
LIFETIME_S = 4 * 3600  # a presync of a big rootfs takes minutes; nothing takes hours
START_WAIT_S = 15
STOP_WAIT_S = 60


def _ours(info):
    """Does the journal process `info` names still run (the same process, not a reused pid)?"""
    pid = info.get("pid") if isinstance(info, dict) else None
    if not isinstance(pid, int) or pid <= 1:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[-1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == str(info.get("pid_start")) and COMMAND.encode() in argv


def start(mdir, root, lifetime_s=LIFETIME_S):
    """Start this migration's journal of `root` (before the presync walks it). Returns None,
    or why there is none (then the delta will walk, and say so)."""
    end(mdir)
    for n in (INFO, RESULT):
        if os.path.lexists(os.path.join(mdir, n)):
            os.unlink(os.path.join(mdir, n))
    cfg = {"dir": mdir, "root": os.path.realpath(root), "lifetime_s": lifetime_s}
    env = {**os.environ, "CTWEB_JOURNAL": json.dumps(cfg)}
    with open(os.path.join(mdir, LOG), "ab") as out:
        p = subprocess.Popen(
            [sys.executable, agent_file(), COMMAND],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            close_fds=True,
            start_new_session=True,  # not ended with the agent's SSH session
            umask=CHILD_UMASK,
        )
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        result = _read_json(os.path.join(mdir, RESULT))
        if result is not None:
            return str(result.get("broken") or "the journal ended at once")
        if _read_json(os.path.join(mdir, INFO)) is not None:
            return None
        if p.poll() is not None:
            why = f"the journal process ended at once (exit status {p.returncode})"
            _write_json(os.path.join(mdir, RESULT), {"broken": why})
            return why
        time.sleep(0.01)
    p.kill()
    p.wait()
    why = f"the journal did not start within {START_WAIT_S} s"
    _write_json(os.path.join(mdir, RESULT), {"broken": why})
    return why


def not_started(mdir, why):
    """No journal for this migration (turned off, or refused): the delta walks and says why."""
    end(mdir)
    _write_json(os.path.join(mdir, RESULT), {"broken": why})


def end(mdir, wait_s=5):
    """End this migration's journal process if it runs; True if it did."""
    info = _read_json(os.path.join(mdir, INFO))
    if not _ours(info):
        return False
    try:
        os.kill(info["pid"], signal.SIGTERM)
    except OSError:
        return False
    deadline = time.monotonic() + wait_s
    while _ours(info) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _ours(info):
        try:
            os.kill(info["pid"], signal.SIGKILL)
        except OSError:
            pass
    return True


def collect(mdir, wait_s=STOP_WAIT_S):
    """At the freeze: what the journal saw since the presync began, as (paths, trees, whole).
    Raises journal.Untrusted with the reason when it cannot say."""
    path = os.path.join(mdir, RESULT)
    result = _read_json(path)
    if result is None:
        info = _read_json(os.path.join(mdir, INFO))
        if info is None:
            raise journal.Untrusted("no change journal ran for this migration")
        if not _ours(info):
            raise journal.Untrusted("the journal process ended before the freeze")
        os.kill(info["pid"], signal.SIGUSR1)
        deadline = time.monotonic() + wait_s
        while result is None and time.monotonic() < deadline:
            time.sleep(0.002)
            result = _read_json(path)
            if result is None and not _ours(info):
                result = _read_json(path)
                break
    if result is None:
        raise journal.Untrusted(f"the journal gave no answer within {wait_s} s")
    if not isinstance(result, dict) or result.get("broken"):
        raise journal.Untrusted(str(result.get("broken") if isinstance(result, dict) else "a damaged journal result"))
    try:
        return tuple(set(map(str, result[k])) for k in ("paths", "trees", "whole"))
    except (KeyError, TypeError):
        raise journal.Untrusted("a damaged journal result") from None


def cmd_migrate_journal(params):
    """The journal process (started by the presync's `send`, never by the dashboard)."""
    cfg = json.loads(os.environ.get("CTWEB_JOURNAL", "{}"))
    mdir, root, lifetime = cfg["dir"], cfg["root"], float(cfg.get("lifetime_s", LIFETIME_S))
    result_path = os.path.join(mdir, RESULT)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    got = []
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGUSR1, lambda *a: got.append("collect"))
    signal.signal(signal.SIGTERM, lambda *a: got.append("end"))
    j, why = journal.start(root)
    if j is None:
        _write_json(result_path, {"broken": why})
        return None
    deadline = time.monotonic() + lifetime
    _write_json(
        os.path.join(mdir, INFO),
        {
            "pid": os.getpid(),
            "pid_start": _starttime(os.getpid()),
            "root": root,
            "started": time.time(),
            "lifetime_s": lifetime,
        },
    )
    try:
        while not got:
            if j.broken:
                # Nothing it says can be trusted now: let go of the mark (and its queue) at once.
                _write_json(result_path, {"broken": j.broken})
                return None
            if not os.path.isdir(mdir):
                return None  # the migration is over and its files are gone
            if time.monotonic() >= deadline:
                _write_json(result_path, {"broken": f"the journal reached its lifetime ({lifetime:.0f} s)"})
                return None
            if select.select([wake_r], [], [], 1.0)[0]:
                os.read(wake_r, 64)  # a signal came: its handler said which
        if got[0] != "collect":
            return None
        try:
            paths, trees, whole = j.stop()
        except journal.Untrusted as e:
            _write_json(result_path, {"broken": str(e)})
            return None
        _write_json(
            result_path, {"paths": sorted(paths), "trees": sorted(trees), "whole": sorted(whole), "events": j.events}
        )
    finally:
        j.close()
    return None


# --- the delta from the journal -------------------------------------------------------------


def _lstat_beneath(root_fd, rel):
    """lstat of root/rel, walking its parents without following a symlink; None when it (or a
    real directory on the way) is not there."""
    parts = rel.split("/")
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(fd)


def _walk_beneath(root_fd, top, limit):
    """Every entry below root/top (a real directory), relative to root; never through a symlink."""
    out = []
    stack = [top]
    while stack:
        rel = stack.pop()
        try:
            fd = os.open(rel, _NOFOLLOW_DIR, dir_fd=root_fd)
        except OSError:
            continue
        try:
            with os.scandir(fd) as it:
                for e in it:
                    r = f"{rel}/{e.name}"
                    out.append(r)
                    if e.is_dir(follow_symlinks=False):
                        stack.append(r)
        finally:
            os.close(fd)
        if len(out) > limit:
            raise journal.Untrusted(f"more than {limit} paths changed")
    return out


def _clean(rel):
    rel = os.path.normpath(str(rel))
    if rel == ".":
        return None  # the rootfs itself: the walk does not send it either
    if rel.startswith("../") or rel == ".." or os.path.isabs(rel) or "\0" in rel:
        raise journal.Untrusted(f"a journal path outside the rootfs: {rel[:200]!r}")
    return rel


def delta(name, root, mdir, links, held, max_paths=journal.MAX_PATHS):
    """The delta from the journal, once the container is down: (paths to send, paths deleted,
    directories to replace whole before the rest is put in place). `links`: the names of the
    files with several at the presync ({inode: [path, ...]}, for the other names of a changed
    file); `held`: what was held open for writing or mapped shared at the presync. Raises
    journal.Untrusted when it cannot be exact."""
    paths, trees, whole = collect(mdir)
    if _state(name) != "STOPPED":
        # Its tasks are frozen (a post-copy's page server holds them): what they hold open for
        # writing or map shared was written to without an event, maybe.
        pids = container_pids(name)
        if pids is None:
            raise journal.Untrusted(f"the processes of {name} could not be listed")
        whole |= journal.open_for_writing(root, pids)
    wanted = set()
    for rel in paths | whole | {h for h in held if isinstance(h, str)}:
        rel = _clean(rel)
        if rel is not None:
            wanted.add(rel)
    root_fd = os.open(root, _NOFOLLOW_DIR)
    try:
        tops = []
        for t in sorted(filter(None, map(_clean, trees))):
            if not any(t.startswith(p + "/") for p in tops):
                tops.append(t)
        replaced = []
        for top in tops:
            st = _lstat_beneath(root_fd, top)
            if st is None or not stat.S_ISDIR(st.st_mode):
                continue  # gone or not a directory now: listed as a path (sent or deleted)
            replaced.append(top)
            wanted.add(top)
            wanted.update(_walk_beneath(root_fd, top, max_paths))
        if len(wanted) > max_paths:
            raise journal.Untrusted(f"more than {max_paths} paths changed")
        # A changed file with several names: every name goes (a write through one name changed
        # them all); they are found in the presync's list of them or among the journal's paths.
        changed, deleted, groups = [], [], {}
        for rel in sorted(wanted):
            st = _lstat_beneath(root_fd, rel)
            if st is None:
                deleted.append(rel)
                continue
            changed.append(rel)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                groups.setdefault(st.st_ino, [st, set()])[1].add(rel)
        manifest = None
        for ino, (st, names) in groups.items():
            known = links.get(str(ino))
            candidates = {str(p) for p in known} if isinstance(known, list) else set()
            for source in ("links", "manifest"):
                if source == "manifest":
                    if len(names) >= st.st_nlink:
                        break
                    # A name linked since the presync to a file that had one name then: the
                    # presync's whole manifest knows that first name (read only in this case).
                    if manifest is None:
                        manifest = {}
                        for rel, v in (_read_json(os.path.join(mdir, "manifest.json")) or {}).items():
                            if isinstance(v, list) and len(v) > 3 and isinstance(v[0], int) and stat.S_ISREG(v[0]):
                                manifest.setdefault(v[3], set()).add(rel)
                    candidates = manifest.get(ino, set())
                for other in candidates - names:
                    o = _lstat_beneath(root_fd, other)
                    if o is not None and (o.st_dev, o.st_ino) == (st.st_dev, ino) and stat.S_ISREG(o.st_mode):
                        names.add(other)
                        if other not in wanted:
                            changed.append(other)
            if len(names) < st.st_nlink:
                raise journal.Untrusted(f"a changed file has {st.st_nlink} names and the journal found {len(names)}")
    finally:
        os.close(root_fd)
    return sorted(set(changed)), deleted, replaced
