"""Failures explained: a catalogue of what CRIU's error lines mean, and a pure classifier.

When a checkpoint or restore fails, the agent sends back the error lines of CRIU's log (and
of lxc-checkpoint). The first of those lines that the catalogue knows says what went wrong:
`explain(text)` turns it into one sentence and a fix for the top of the failed operation.

The patterns were written from CRIU's own messages (4.x) and from the lines CRIU printed on
the lab when the failures were forced (tests/hosts/test_criu_errors.py holds them). Order
matters: the first class whose pattern matches a line wins, so narrow patterns come first.
No Django here: it is data and a function of text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class FailureClass:
    key: str  # stable word the API carries (result.explanation.class)
    label: str  # what the page calls the class
    sentence: str  # what happened, in one sentence
    fix: str  # what to do about it
    patterns: tuple[str, ...]  # regular expressions, searched in one error line


CATALOGUE: tuple[FailureClass, ...] = (
    FailureClass(
        "disk",
        "disk",
        "The host ran out of disk space while CRIU wrote the checkpoint images.",
        "Free space on the host's /var/lib/ctweb (old snapshots, saved states), or give it a bigger "
        "filesystem; a dump needs about the container's memory in free space.",
        (r"No space left on device", r"Disk quota exceeded", r"\bENOSPC\b"),
    ),
    FailureClass(
        "network-lock",
        "network lock",
        "CRIU could not lock the container's network (it blocks traffic with iptables or nftables while "
        "the processes are frozen).",
        "Install iptables (iptables-restore) on the host and check that the kernel has netfilter "
        "(xt_mark, or nftables if CRIU uses it); the debug bundle holds the host's netfilter state.",
        (
            r"Locking network failed",
            r"Unlocking network failed",
            r"iptables-restore",
            r"\bnftables\b|\bnft\b|libnftables",
            r"network[- ]lock",
        ),
    ),
    FailureClass(
        "sockets",
        "sockets",
        "A process in the container holds a socket CRIU cannot checkpoint on this host (a network "
        "connection or listener, or a socket whose peer is outside the container).",
        "Stop the program that holds the socket, or move the container cold (strategy restart); "
        "`criu check --all` in the debug bundle shows which socket features the host's kernel lacks.",
        (
            r"\binet socket\b|\binet6? sock",
            r"\bunix socket\b|external socket|unreachable peer",
            r"Can't dump .*socket",
            r"\bsk-(inet|unix|packet|netlink)\b|\btcp(_repair)?:|TCP repair",
            r"(netlink|packet) socket",
            r"socket .*(family|not supported|unsupported)",
        ),
    ),
    FailureClass(
        "tty",
        "tty / console",
        "A process in the container holds a terminal (a tty, a pty or the console) that CRIU cannot "
        "checkpoint or restore here.",
        "Start the container's programs detached from terminals (setsid, no attached console), or let "
        "lxc.console be a pty LXC owns; a shell attached with lxc-attach must exit before a checkpoint.",
        (r"\btty\b|\bptys?\b|/dev/pts|\bconsole\b", r"Don't have tty to inherit session"),
    ),
    FailureClass(
        "processes",
        "process tree",
        "A process in the container belongs to a session or process group that started outside the "
        "container (typically one started with lxc-attach), so the tree cannot be checkpointed whole.",
        "Start such processes as session leaders inside the container (`setsid`), or stop them before the checkpoint.",
        (
            r"session leader .*outside",
            r"Can't find a session leader",
            r"not a session leader",
            r"process group .*outside",
        ),
    ),
    FailureClass(
        "namespaces",
        "nested namespaces",
        "A process in the container runs in a namespace of its own (a nested container, a sandbox), "
        "which CRIU cannot checkpoint.",
        "Stop the nested container or sandbox before the checkpoint, or move the container cold (strategy restart).",
        (r"Can't dump nested .*namespace", r"nested .* namespace", r"external (pid|net)ns"),
    ),
    FailureClass(
        "files",
        "files",
        "A process in the container holds a file CRIU cannot checkpoint or reopen: one from outside the "
        "container's root, one missing or changed since the dump, a device file, or an unusual kind of file.",
        "CRIU's line names the file: one held from the host (a descriptor inherited from lxc-attach, a device "
        "such as a GPU) cannot move, so close it or restart that process; one missing on restore must be put "
        "back where it was.",
        (
            r"Can't lookup mount=\d+ for fd",
            r"Can't dump file \d+ of that type",
            r"\bfd=\d+|for fd \d+",
            r"ghost file|\bghost\b|deleted file|unlinked",
            r"\bfiles(-reg)?: |\bfsnotify\b|inotify|fanotify",
            r"file lock|\bflock\b|Unknown file",
            r"character device|block device|\brdev\b",
        ),
    ),
    FailureClass(
        "mounts",
        "mounts",
        "The container has a mount CRIU cannot checkpoint or recreate: a bind mount from the host, or a "
        "mount it cannot find or make again on restore.",
        "Remove the container's bind mounts from the host (lxc.mount.entry) before moving it: ctweb's config "
        "allowlist does not carry them to another host, and a restore needs each mount's source there.",
        (
            r"autodetected external mount",
            r"\bext-mount-map\b",
            r"\bmnt(ns)?: ",
            r"mountpoint|mount point|\bmount\b|move_mount|pivot_root|\bumount",
            r"fuse mount|autofs",
        ),
    ),
    FailureClass(
        "cgroups",
        "cgroups",
        "CRIU could not freeze, read or recreate the container's cgroups.",
        "Check that the host's cgroup layout (v1 controllers or v2) is the same on both hosts and that "
        "the freezer works; a container that cannot be frozen in time is often very busy or stuck in I/O.",
        (r"cgroup", r"freezer|Unable to freeze|can't freeze", r"Timeout reached\. Try to interrupt"),
    ),
    FailureClass(
        "cpu",
        "CPU",
        "The target host's CPU lacks features the checkpoint was made with, so the processes cannot run there.",
        "Migrate between hosts with the same CPU features (the preflight's cpuinfo check names them), "
        "or move the container cold (strategy restart).",
        (r"cpuinfo", r"CPU [Ff]eature", r"FPU feature|xsave|\bxfeatures?\b", r"\bcpu\b.*(mismatch|not supported)"),
    ),
    FailureClass(
        "security",
        "security modules",
        "A security module (AppArmor, SELinux, seccomp) the container was made with is missing or "
        "different on this host.",
        "Remove lxc.apparmor.* / lxc.selinux.* lines from the container's config, or migrate between "
        "hosts with the same security modules.",
        (r"[Aa]pp[Aa]rmor|SELinux|selinux|\bLSM\b|seccomp",),
    ),
    FailureClass(
        "kernel",
        "kernel features",
        "The host's kernel lacks a feature CRIU needs for this (or CRIU is too old for the kernel).",
        "Run `criu check --all` on the host (the debug bundle has its output) and install a CRIU that "
        "supports the kernel, or choose a strategy the host supports.",
        (
            r"vDSO|\bvdso\b",
            r"kerndat",
            r"not supported by (the )?kernel|[Kk]ernel doesn't support|kernel (is )?too old",
            r"\bUFFD\b|userfaultfd|soft[- ]dirty|mem_dirty_track|\bpagemap\b",
            r"page-pipe: tee|F_SETPIPE_SZ|pipe-max-size",
            r"is not supported|isn't supported",
        ),
    ),
)

# Lines CRIU prints as errors on every run here, which explain nothing (docs LAB facts).
NOISE = (
    re.compile(r"Can't setup RLIMIT_NOFILE"),
    re.compile(r"This is not fatal"),
)

# Where CRIU's error line comes from says what it is about when its words do not: the source
# file in "Error (criu/files-reg.c:2353): ...". Only files whose subject is one class.
SOURCE_FILES = {
    "files.c": "files",
    "files-reg.c": "files",
    "files-ext.c": "files",
    "file-lock.c": "files",
    "fsnotify.c": "files",
    "sk-inet.c": "sockets",
    "sk-tcp.c": "sockets",
    "sk-unix.c": "sockets",
    "sk-packet.c": "sockets",
    "sk-netlink.c": "sockets",
    "sk-queue.c": "sockets",
    "sockets.c": "sockets",
    "tty.c": "tty",
    "pstree.c": "processes",
    "namespaces.c": "namespaces",
    "mount.c": "mounts",
    "mount-v2.c": "mounts",
    "filesystems.c": "mounts",
    "autofs.c": "mounts",
    "cgroup.c": "cgroups",
    "cgroup-props.c": "cgroups",
    "seize.c": "cgroups",
    "netfilter.c": "network-lock",
    "cpu.c": "cpu",
    "kerndat.c": "kernel",
    "vdso.c": "kernel",
    "uffd.c": "kernel",
    "lsm.c": "security",
    "apparmor.c": "security",
    "seccomp.c": "security",
}
SOURCE_RE = re.compile(r"Error \((?:[\w.-]+/)*([\w.-]+\.c):\d+\)")
_COMPILED = tuple((c, tuple(re.compile(p) for p in c.patterns)) for c in CATALOGUE)
_BY_KEY = {c.key: c for c in CATALOGUE}
# CRIU: "(00.012345) Error (criu/x.c:12): ..." (also "pie: N: Error ..."); lxc: "... ERROR criu - ...".
ERROR_LINE = re.compile(r"\bError\b|\bERROR\b|\bErr\b")
STAMP = re.compile(r"^(?:\(\s*[\d.]+\)\s*)?(?:\d+:\s*)?(?:pie: \s*\d+:\s*)?")
LINE_LIMIT = 2000  # lines looked at: the first errors are the cause, the rest follow from them
CLASSES = tuple(c.key for c in CATALOGUE)


def error_lines(text: str) -> list[str]:
    """The error lines of a log excerpt, in order, without CRIU's timestamps and known noise."""
    out = []
    for raw in (text or "").splitlines()[:LINE_LIMIT]:
        line = raw.strip()
        if not ERROR_LINE.search(line) or any(n.search(line) for n in NOISE):
            continue
        out.append(STAMP.sub("", line)[:500])
    return out


def classify_line(line: str) -> FailureClass | None:
    """The class whose words the line has, else the class of the CRIU source file it names."""
    for cls, patterns in _COMPILED:
        if any(p.search(line) for p in patterns):
            return cls
    m = SOURCE_RE.search(line)
    return _BY_KEY.get(SOURCE_FILES.get(m.group(1), "")) if m else None


def explain(text: str) -> dict | None:
    """The first error line the catalogue knows, as {class, label, sentence, fix, line}; None
    when no line is known (the operation keeps its own error sentence, unexplained)."""
    for line in error_lines(text):
        cls = classify_line(line)
        if cls is not None:
            return {"class": cls.key, "label": cls.label, "sentence": cls.sentence, "fix": cls.fix, "line": line}
    return None
