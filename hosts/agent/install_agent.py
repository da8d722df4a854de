#!/usr/bin/python3 -I
"""ctweb-install-agent: install ctweb's host agent for a non-root SSH user, run with sudo.

    sudo -n /usr/local/sbin/ctweb-install-agent ctweb-agent-<16 hex>.pyz

The one thing the SSH user may run as root besides the agent itself (docs/HOSTS.md). It takes
the agent's bytes on its standard input, never a path: nothing the SSH user can name, link or
change is ever opened as root. It prints one line first:

- `have`: that agent is installed already (and matches its name); nothing is read;
- `send`: the caller then writes one JSON line {"size": N, "signature": "<SSH signature>"}
  and N bytes.

The bytes go into a new root-only file (O_EXCL, O_NOFOLLOW) in /var/lib/ctweb/agent (root's,
0700, checked not to be a symlink nor writable by anyone else); that copy, which no one else can
change, is hashed and must match the name, and its signature must verify against the
dashboard's key in /etc/ctweb/agent-signers (OpenSSH's `ssh-keygen -Y verify`, namespace
ctweb-agent): whoever can run this cannot install an agent of their own, whose name would be
its own hash. Only then is it renamed into place (0600, root). It ends with `installed NAME`,
or a sentence on stderr and exit status 1 (2 for a bad call), leaving no temporary file.

Standard library only; it is copied to hosts by the root setup (manage.py host sudo-setup),
not part of the agent's zipapp.
"""

import hashlib
import json
import os
import re
import secrets
import stat
import subprocess
import sys

CTWEB_DIR = "/var/lib/ctweb"
AGENT_DIR = CTWEB_DIR + "/agent"
SIGNERS = "/etc/ctweb/agent-signers"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
NAMESPACE = "ctweb-agent"
IDENTITY = "ctweb-dashboard"
NAME_RE = re.compile(r"ctweb-agent-([0-9a-f]{16})\.pyz")
MAX_SIZE = 32 << 20  # the agent is far smaller (~0.3 MiB); a host's disk is not for filling
MAX_HEADER = 64 << 10


class Refused(Exception):
    pass


def _root_dir(path, parent_fd=None, name=None):
    """A directory of root's, opened without following a symlink: made 0700 if missing,
    refused when it is not root's or others may write in it."""
    where = name if parent_fd is not None else path
    try:
        os.mkdir(where, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        pass
    try:
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as e:
        raise Refused(f"{path} is not a directory ctweb can use ({e.strerror}).") from None
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        os.close(fd)
        raise Refused(f"{path} must be root's and writable by root only.")
    return fd


def _sha256(fd):
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def _installed(agent_fd, name, prefix):
    """True if `name` is there, root's regular file, and its bytes match its name; one that does
    not match (a cut copy) is removed."""
    try:
        st = os.stat(name, dir_fd=agent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
        os.unlink(name, dir_fd=agent_fd)
        return False
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=agent_fd)
    try:
        ok = _sha256(fd).startswith(prefix)
    finally:
        os.close(fd)
    if not ok:
        os.unlink(name, dir_fd=agent_fd)
    return ok


def _read_header(stdin):
    line = bytearray()
    while len(line) <= MAX_HEADER:
        b = os.read(stdin, 1)
        if not b or b == b"\n":
            break
        line += b
    try:
        header = json.loads(line)
    except ValueError:
        raise Refused("The agent's header line is not JSON.") from None
    if not isinstance(header, dict):
        raise Refused("The agent's header line is not a JSON object.")
    size, signature = header.get("size"), header.get("signature")
    if type(size) is not int or not 0 < size <= MAX_SIZE:
        raise Refused(f"The agent's size must be 1 to {MAX_SIZE} bytes.")
    if not isinstance(signature, str) or not signature.startswith("-----BEGIN SSH SIGNATURE-----"):
        raise Refused("The agent comes without an SSH signature.")
    return size, signature


def _copy(stdin, fd, size):
    left = size
    while left:
        chunk = os.read(stdin, min(left, 1 << 20))
        if not chunk:
            raise Refused(f"The agent's bytes ended after {size - left} of {size}.")
        os.write(fd, chunk)
        left -= len(chunk)
    os.fsync(fd)


def _check_signers():
    try:
        st = os.stat(SIGNERS, follow_symlinks=False)
    except FileNotFoundError:
        raise Refused(f"{SIGNERS} is missing: run the root setup of docs/HOSTS.md.") from None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise Refused(f"{SIGNERS} must be a regular file of root's, writable by root only.")


def _verify(data_fd, sig_fd):
    """ssh-keygen verifies the copy (its standard input) against the signature (an open file of
    ours, by descriptor) and the dashboard's key in SIGNERS."""
    _check_signers()
    os.lseek(data_fd, 0, os.SEEK_SET)
    try:
        proc = subprocess.run(
            [SSH_KEYGEN, "-Y", "verify", "-f", SIGNERS, "-I", IDENTITY, "-n", NAMESPACE, "-s", f"/dev/fd/{sig_fd}"],
            stdin=data_fd,
            capture_output=True,
            pass_fds=(sig_fd,),
            env={"PATH": "/usr/bin:/bin", "LANG": "C"},
            timeout=60,
        )
    except FileNotFoundError:
        raise Refused(f"{SSH_KEYGEN} is missing: install openssh-client.") from None
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
        raise Refused(
            "The agent's signature does not verify against the dashboard's key in "
            f"{SIGNERS}{': ' + said[-1] if said else ''}."
        )


def install(name, stdin=0, out=None):
    out = out or sys.stdout
    m = NAME_RE.fullmatch(name)
    if m is None:
        raise Refused(f"{name!r} is not an agent's name (ctweb-agent-<16 hex>.pyz).")
    prefix = m.group(1)
    old_umask = os.umask(0o077)
    ctweb_fd = _root_dir(CTWEB_DIR)
    try:
        agent_fd = _root_dir(AGENT_DIR, ctweb_fd, "agent")
    finally:
        os.close(ctweb_fd)
    tmp = sig = None
    try:
        if _installed(agent_fd, name, prefix):
            out.write("have\n")
            out.flush()
            return "have"
        out.write("send\n")
        out.flush()
        size, signature = _read_header(stdin)
        token = secrets.token_hex(8)
        tmp, sig = f".install-{token}.tmp", f".install-{token}.sig"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(tmp, flags, 0o600, dir_fd=agent_fd)
        try:
            _copy(stdin, fd, size)
            digest = _sha256(fd)
            if not digest.startswith(prefix):
                raise Refused(f"The agent's bytes hash to {digest[:16]}, not to its name {name}.")
            sfd = os.open(sig, flags, 0o600, dir_fd=agent_fd)
            try:
                os.write(sfd, signature.encode())
                os.fsync(sfd)
                _verify(fd, sfd)
            finally:
                os.close(sfd)
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=agent_fd, dst_dir_fd=agent_fd)
        tmp = None
        os.fsync(agent_fd)
        out.write(f"installed {name}\n")
        out.flush()
        return "installed"
    finally:
        for leftover in (tmp, sig):
            if leftover:
                try:
                    os.unlink(leftover, dir_fd=agent_fd)
                except FileNotFoundError:
                    pass
        os.close(agent_fd)
        os.umask(old_umask)


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: ctweb-install-agent ctweb-agent-<16 hex>.pyz (the agent's bytes on stdin)\n")
        return 2
    if os.geteuid() != 0:
        sys.stderr.write("ctweb-install-agent runs as root (through sudo).\n")
        return 2
    try:
        install(argv[1])
    except Refused as e:
        sys.stderr.write(f"{e}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"Installing the agent failed: {e.strerror or e}.\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
