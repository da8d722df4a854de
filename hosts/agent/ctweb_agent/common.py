"""What every part of the agent uses: errors, JSON-lines output (emit/event), running a
program from an argument list, name checks, small file helpers, root-only modes."""

import datetime
import json
import os
import re
import stat
import subprocess
import sys
import time

from . import cow
from . import state as S

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")

# Everything the agent itself creates is root-only (umask 077, set in main()); the programs
# it runs (lxc-create's templates, lxc-start and so the container's init, CRIU) keep the
# usual 022, so files made inside containers get their ordinary modes.
AGENT_UMASK = 0o077
CHILD_UMASK = 0o022


def _private_modes():
    """Make ctweb's directories on this host root-only, also those an older version left
    0755: /var/lib/ctweb, its direct subdirectories and their per-container/per-snapshot
    directories (a few chmods, never a walk of any rootfs), and ctweb's own files in them."""
    if not os.path.isdir(S.CTWEB_PATH) or os.path.islink(S.CTWEB_PATH):
        return
    todo = [S.CTWEB_PATH]
    for sub in sorted(os.listdir(S.CTWEB_PATH)):
        todo.append(os.path.join(S.CTWEB_PATH, sub))
    for level1 in (S.SNAPSHOTS_PATH, S.STATE_PATH, S.MIGRATIONS_PATH):
        if os.path.isdir(level1) and not os.path.islink(level1):
            for n in os.listdir(level1):
                todo.append(os.path.join(level1, n))
                if level1 == S.SNAPSHOTS_PATH:
                    d = os.path.join(level1, n)
                    if os.path.isdir(d) and not os.path.islink(d):
                        todo += [os.path.join(d, s) for s in os.listdir(d)]
    for files_in in (S.LOCKS_PATH, S.BUNDLES_PATH, os.path.join(S.CTWEB_PATH, "agent")):
        if os.path.isdir(files_in) and not os.path.islink(files_in):
            todo += [os.path.join(files_in, n) for n in os.listdir(files_in)]
    for path in todo:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            want = stat.S_IMODE(st.st_mode) & 0o700
        elif stat.S_ISREG(st.st_mode):
            want = stat.S_IMODE(st.st_mode) & 0o700
        else:
            continue
        if stat.S_IMODE(st.st_mode) != want:
            try:
                os.chmod(path, want, follow_symlinks=False)
            except (OSError, NotImplementedError):
                pass


class AgentError(Exception):
    def __init__(self, message, details="", data=None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.data = data or {}


def emit(obj):
    if S.DETACHED:
        return
    try:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        # The dashboard went away (its worker died, its link broke). Stopping half-way
        # would leave the container in a state nobody knows: finish the step instead, and
        # let the dashboard's recovery find the result (it waits for our lock).
        S.DETACHED = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)


def event(phase, message, progress=None, **extra):
    msg = {"type": "event", "phase": phase, "message": message, "t": time.time()}
    if progress is not None:
        msg["progress"] = progress
    msg.update(extra)
    emit(msg)


def run(argv, timeout=120, check=False, input=None):
    """Run a command from an argument list; return (returncode, stdout, stderr)."""
    try:
        p = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, close_fds=True, umask=CHILD_UMASK
        )
    except FileNotFoundError:
        if check:
            raise AgentError(f"{argv[0]} is not installed on this host.") from None
        return 127, "", f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        if check:
            raise AgentError(f"{argv[0]} did not finish within {timeout} s.") from None
        return 124, "", f"{argv[0]}: timed out"
    if check and p.returncode != 0:
        raise AgentError(
            f"{' '.join(argv[:2])} failed (exit status {p.returncode}).",
            (p.stderr or p.stdout)[-4000:],
        )
    return p.returncode, p.stdout, p.stderr


def check_name(name, what="container"):
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AgentError(f"Invalid {what} name {name!r}.")
    return name


def _ms(t0):
    return int(round((time.monotonic() - t0) * 1000))


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")  # noqa: UP017 (3.9 hosts)


def _flag(params, key, default):
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise AgentError(f"{key} must be true or false.")
    return value


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _remove_tree(path):
    # Only ever below /var/lib/ctweb: a wrong path here would be a disaster.
    real = os.path.realpath(path)
    if not real.startswith(S.CTWEB_PATH + "/") or real.count("/") < 5:
        raise AgentError(f"refusing to remove {path}")
    if os.path.lexists(path):
        cow.rmtree(path, ignore=True)  # shutil.rmtree, but btrfs subvolumes (read-only snapshots) too


def _du(path):
    total = 0
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            try:
                total += os.lstat(os.path.join(root, n)).st_blocks * 512
            except OSError:
                pass
    return total


# Safe tree walking for `send`: every path is opened relative to its parent directory's
# descriptor with O_NOFOLLOW, so a container that swaps a directory for a symlink while
# we read its running rootfs can never make us read a file of the host.
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def agent_file():
    """The file this agent runs from: the .pyz whose members are this package's modules
    (a page relay is started from it)."""
    return os.path.abspath(os.path.dirname(os.path.dirname(__file__)))


def _starttime(pid):
    """When a process started (clock ticks since boot), or None: with its pid, it names one
    process even after the host restarted and the pid was given again."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[-1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
