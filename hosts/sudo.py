"""A non-root SSH user with sudo (docs/HOSTS.md): the commands such a host runs, the sudoers
rules that allow exactly those, the root setup that puts the installer and the rules in place,
the dashboard's signature on the agent, and the one sentence for a sudo that refuses.

For a host whose SSH user is root nothing here is used: the agent is copied over SFTP and run as
`python3 <agent> <subcommand>`, as it always was."""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
import struct
from pathlib import Path

from .agent import install_agent

INSTALLER = "/usr/local/sbin/ctweb-install-agent"
PYTHON = "/usr/bin/python3"
SIGNERS = install_agent.SIGNERS
NAMESPACE = install_agent.NAMESPACE
IDENTITY = install_agent.IDENTITY
SUDOERS_FILE = "/etc/sudoers.d/ctweb"
INSTALLER_SOURCE = Path(install_agent.__file__)
# sudoers globs: `*` would match a `/` in an argument, 16 classes match exactly the hash.
HASH_GLOB = "[0-9a-f]" * 16


def uses_sudo(host) -> bool:
    return host.username != "root"


def agent_command(host, agent_path: str, subcommand: str) -> str:
    """The command line that runs one agent subcommand on `host` (all parts ours: a fixed
    directory with a hex digest, a subcommand from the agent's own list)."""
    if uses_sudo(host):
        return f"sudo -n {PYTHON} {agent_path} {subcommand}"
    return f"python3 {agent_path} {subcommand}"


def installer_command(agent_name: str) -> str:
    if not install_agent.NAME_RE.fullmatch(agent_name):
        raise ValueError(f"not an agent's name: {agent_name!r}")
    return f"sudo -n {INSTALLER} {agent_name}"


# The PATH the agent runs with as root: sudo keeps the caller's PATH unless secure_path is set,
# and the agent starts criu, lxc-* and the rest by name (the agent pins it too: commands.main).
SECURE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def sudoers(username: str) -> str:
    """/etc/sudoers.d/ctweb for the SSH user `username`: the agent and its installer, as root,
    without a password, and nothing else."""
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", username) or username == "root":
        raise ValueError(f"not a non-root user name: {username!r}")
    agent = f"{install_agent.AGENT_DIR}/ctweb-agent-{HASH_GLOB}.pyz"
    return (
        f"# ctweb (docs/HOSTS.md): the SSH user {username} runs ctweb's agent as root, and nothing else.\n"
        f"# Install as {SUDOERS_FILE} (root, 0440); check with visudo -c -f {SUDOERS_FILE}.\n"
        f'Defaults:{username} !requiretty, !use_pty, env_reset, !setenv, secure_path="{SECURE_PATH}"\n'
        f"{username} ALL=(root) NOPASSWD: {PYTHON} {agent} *\n"
        f"{username} ALL=(root) NOPASSWD: {INSTALLER} ctweb-agent-{HASH_GLOB}.pyz\n"
    )


def signers_line(public_key_line: str) -> str:
    """/etc/ctweb/agent-signers: the dashboard's public key, for agents only."""
    parts = public_key_line.split()
    if (
        len(parts) < 2
        or not re.fullmatch(r"ssh-[a-z0-9-]+", parts[0])
        or not re.fullmatch(r"[A-Za-z0-9+/=]+", parts[1])
    ):
        raise ValueError("not an OpenSSH public key line")
    return f'{IDENTITY} namespaces="{NAMESPACE}" {parts[0]} {parts[1]}\n'


def setup_script(username: str, public_key_line: str) -> str:
    """The root setup of a host whose SSH user is `username` (run once, as root, by an admin):
    sudo if missing, the installer, the dashboard's signing key, the sudoers rules (checked by
    visudo before they are put in place)."""
    rules = sudoers(username)
    signers = signers_line(public_key_line)
    installer = INSTALLER_SOURCE.read_text()
    for text in (rules, signers, installer):
        assert "CTWEB_EOF" not in text
    user = shlex.quote(username)
    return f"""#!/bin/sh
# ctweb's root setup for the SSH user {username} (docs/HOSTS.md). Run as root on the host.
set -eu
umask 022
if ! command -v sudo >/dev/null 2>&1; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends sudo
fi
id {user} >/dev/null
install -d -o root -g root -m 0755 /usr/local/sbin /etc/ctweb /etc/sudoers.d
install -d -o root -g root -m 0700 /var/lib/ctweb /var/lib/ctweb/agent
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/installer" <<'CTWEB_EOF'
{installer}CTWEB_EOF
cat > "$tmp/signers" <<'CTWEB_EOF'
{signers}CTWEB_EOF
cat > "$tmp/sudoers" <<'CTWEB_EOF'
{rules}CTWEB_EOF
visudo -c -q -f "$tmp/sudoers"
install -o root -g root -m 0755 "$tmp/installer" {INSTALLER}
install -o root -g root -m 0644 "$tmp/signers" {SIGNERS}
install -o root -g root -m 0440 "$tmp/sudoers" {SUDOERS_FILE}
echo "ctweb: {username} may now run ctweb's agent with sudo"
"""


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def sign(data: bytes, key) -> str:
    """An OpenSSH signature (SSHSIG, as `ssh-keygen -Y sign -n ctweb-agent` makes) of `data` by
    the fleet's key (a paramiko key): what the installer verifies with `ssh-keygen -Y verify`."""
    namespace = NAMESPACE.encode()
    digest = hashlib.sha512(data).digest()
    signed = b"SSHSIG" + _string(namespace) + _string(b"") + _string(b"sha512") + _string(digest)
    signature = key.sign_ssh_data(signed).asbytes()
    blob = (
        b"SSHSIG"
        + struct.pack(">I", 1)
        + _string(key.asbytes())
        + _string(namespace)
        + _string(b"")
        + _string(b"sha512")
        + _string(signature)
    )
    text = base64.b64encode(blob).decode()
    lines = [text[i : i + 70] for i in range(0, len(text), 70)]
    return "-----BEGIN SSH SIGNATURE-----\n" + "\n".join(lines) + "\n-----END SSH SIGNATURE-----\n"


def refusal(host, stderr: str, exit_status: int, what: str = "ctweb's agent") -> str | None:
    """The one sentence for a sudo that did not run `what` on `host` (no sudo, no rule, a
    password asked for, the installer missing), or None when sudo is not what stopped it."""
    if not uses_sudo(host):
        return None
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    setup = f"run the root setup of docs/HOSTS.md there (manage.py host sudo-setup {host.name} prints it)"
    for ln in lines:
        if exit_status == 127 and re.search(r"\bsudo\b.*not found", ln):
            return f"{host.name} has no sudo, which its SSH user {host.username} (not root) needs: {setup}, or connect as root."
        if re.match(r"sudo: .*: command not found", ln):
            return f"The agent installer {INSTALLER} is missing on {host.name}: {setup}."
        if (
            ln.startswith("sudo:")
            or "is not allowed to execute" in ln
            or "not in the sudoers file" in ln
            or "may not run sudo" in ln
        ):
            return (
                f"sudo refused {what} on {host.name} for the SSH user {host.username} ({ln.rstrip('.')}): "
                f"add the rules of docs/HOSTS.md with its root setup (manage.py host sudo-setup {host.name} prints it)."
            )
    return None
