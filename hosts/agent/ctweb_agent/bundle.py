"""`bundle`: a debug bundle of a container's logs and configs, without secrets."""

import glob
import io
import os
import sys
import tarfile
import time

from . import state as S
from .common import AgentError, agent_file, check_name, event, run
from .criu import _state_dir
from .lxc import _cdir, _exists

# --- debug bundle -----------------------------------------------------------------------

BUNDLE_FILE_LIMIT = 8 << 20  # the tail of a bigger log is enough
SECRET_PREFIXES = ("/root/.ssh", "/etc/ssh", "/home")


def _secret(path):
    real = os.path.realpath(path)
    base = os.path.basename(real)
    return (
        any(real == p or real.startswith(p + "/") for p in SECRET_PREFIXES)
        or base.startswith(("id_rsa", "id_ed25519", "id_ecdsa", "id_dsa", "ssh_host_"))
        or base.endswith((".key", ".pem"))
    )


def _bundle_dirs(name, dirs):
    """Images/state dirs to collect logs from, as real paths below /var/lib/ctweb."""
    out = []
    if dirs is not None:
        if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
            raise AgentError("dirs must be a list of paths relative to /var/lib/ctweb.")
        for d in dirs:
            norm = os.path.normpath(d)
            if os.path.isabs(d) or norm.startswith("..") or "\x00" in d:
                raise AgentError(f"Bad bundle directory {d!r}: give a path relative to {S.CTWEB_PATH}.")
            real = os.path.realpath(os.path.join(S.CTWEB_PATH, norm))
            if not real.startswith(S.CTWEB_PATH + "/"):
                raise AgentError(f"Bad bundle directory {d!r}.")
            out.append(real)
        return out
    if name:
        out.append(_state_dir(name))
        out += sorted(glob.glob(os.path.join(S.SNAPSHOTS_PATH, name, "*")))
    return out


VERSION_COMMANDS = (
    ("criu", ["criu", "--version"]),
    ("lxc", ["lxc-start", "--version"]),
    ("iptables", ["iptables", "--version"]),
    ("nft", ["nft", "--version"]),
    ("python3", ["python3", "--version"]),
)


def _versions():
    """One line per program the checkpoints depend on, and the kernel, and this agent."""
    lines = [f"kernel: {os.uname().release}", f"agent: {os.path.basename(agent_file())}"]
    for what, argv in VERSION_COMMANDS:
        rc, out, err = run(argv, timeout=20)
        text = (out or err).strip().splitlines()
        lines.append(f"{what}: {text[0] if rc == 0 and text else f'unavailable (exit status {rc})'}")
    return "\n".join(lines) + "\n"


def cmd_bundle(params):
    """{op, name=null, dirs=null}: a tar.gz of what explains a failure, at
    /var/lib/ctweb/bundles/op-<op>.tar.gz (the dashboard fetches and deletes it)."""
    op = params.get("op")
    if not isinstance(op, int) or isinstance(op, bool) or op < 0:
        raise AgentError("op must be a non-negative integer.")
    name = params.get("name")
    if name is not None:
        check_name(name)
    dirs = _bundle_dirs(name, params.get("dirs"))
    os.makedirs(S.BUNDLES_PATH, exist_ok=True)
    path = os.path.join(S.BUNDLES_PATH, f"op-{op}.tar.gz")
    tmp = path + ".tmp"
    prefix = f"op-{op}"
    members = []
    event("bundle", "collecting logs and host facts", 20)

    def add_bytes(tar, arcname, data):
        info = tarfile.TarInfo(f"{prefix}/{arcname}")
        info.size = len(data)
        info.mtime = int(time.time())
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
        members.append(arcname)

    def add_file(tar, src, arcname):
        if _secret(src) or not os.path.isfile(src) or os.path.islink(src):
            return
        try:
            with open(src, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > BUNDLE_FILE_LIMIT:
                    f.seek(size - BUNDLE_FILE_LIMIT)
                add_bytes(tar, arcname, f.read(BUNDLE_FILE_LIMIT))
        except OSError as e:
            add_bytes(tar, arcname + ".error", f"{src}: {e}\n".encode())

    def add_cmd(tar, arcname, argv, keep_tail=None, timeout=60):
        rc, out, err = run(argv, timeout=timeout)
        text = out + (("\n--- stderr ---\n" + err) if err.strip() else "")
        if keep_tail:
            text = "\n".join(text.splitlines()[-keep_tail:]) + "\n"
        add_bytes(tar, arcname, f"$ {' '.join(argv)}\n(exit status {rc})\n{text}".encode())

    with tarfile.open(tmp, "w:gz") as tar:
        add_cmd(tar, "host/uname.txt", ["uname", "-a"])
        add_cmd(tar, "host/criu-check.txt", ["criu", "check"], timeout=90)
        # Every feature CRIU would use, with what this kernel lacks (failures explained).
        add_cmd(tar, "host/criu-check-all.txt", ["criu", "check", "--all"], timeout=90)
        add_cmd(tar, "host/criu-version.txt", ["criu", "--version"])
        add_cmd(tar, "host/lxc-version.txt", ["lxc-start", "--version"])
        add_bytes(tar, "host/versions.txt", _versions().encode())
        # CRIU locks a container's network with iptables (or nftables) during a dump.
        add_cmd(tar, "host/netfilter-iptables.txt", ["iptables-save"])
        add_cmd(tar, "host/netfilter-ip6tables.txt", ["ip6tables-save"])
        add_cmd(tar, "host/netfilter-nft.txt", ["nft", "list", "ruleset"])
        add_cmd(tar, "host/dmesg-tail.txt", ["dmesg"], keep_tail=200)
        add_file(tar, "/proc/self/mountinfo", "host/mountinfo.txt")
        add_file(tar, "/etc/os-release", "host/os-release.txt")
        if name:
            cdir = _cdir(name)
            for fname in ("config", "lxc.log", "console.log", "lxc-checkpoint.log", "criu-restore.log"):
                add_file(tar, os.path.join(cdir, fname), f"container/{fname}")
            if _exists(name):
                add_cmd(tar, "container/lxc-info.txt", ["lxc-info", "-n", name])
        for d in dirs:
            rel = os.path.relpath(d, S.CTWEB_PATH)
            for root, subdirs, fnames in os.walk(d):
                subdirs[:] = [s for s in subdirs if s != "rootfs"]  # never the container's files
                for fname in sorted(fnames):
                    if fname.endswith(".log") or fname.startswith("stats-") or fname in ("meta.json", "config"):
                        src = os.path.join(root, fname)
                        add_file(tar, src, os.path.join("ctweb", rel, os.path.relpath(src, d)))
    os.replace(tmp, path)
    size = os.path.getsize(path)
    event("bundle", f"bundle written ({size} bytes)", 100)
    return {"path": path, "size_bytes": size, "files": members}


def cmd_bundle_fetch(params):
    """{op}: the bundle `bundle` wrote for that operation, on stdout (a raw output), then removed:
    how a dashboard whose SSH user is not root (it cannot read /var/lib/ctweb) fetches it."""
    op = params.get("op")
    if not isinstance(op, int) or isinstance(op, bool) or op < 0:
        raise AgentError("op must be a non-negative integer.")
    path = os.path.join(S.BUNDLES_PATH, f"op-{op}.tar.gz")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise AgentError(f"No bundle for operation {op} on this host ({e.strerror}).") from None
    try:
        out = sys.stdout.buffer
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            out.write(chunk)
        out.flush()
    finally:
        os.close(fd)
    os.unlink(path)
