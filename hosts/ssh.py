"""The one module that talks SSH.

Every connection pins the host key an admin trusted: paramiko's RejectPolicy with the
pinned key as the only known key, never AutoAddPolicy. Commands sent to a host are
constant strings (the agent's path and a subcommand from a fixed list); everything a
user typed travels as JSON on the agent's standard input, never through a shell.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import secrets
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from django.conf import settings

from . import sudo
from .agent import AGENT_SUBCOMMANDS, agent_file_name, agent_source
from .models import Host
from .pagecerts import PageLinkKeys

log = logging.getLogger(__name__)

REMOTE_AGENT_DIR = "/var/lib/ctweb/agent"


class SSHError(Exception):
    """An expected failure talking to a host, phrased for the operator."""


class HostKeyMismatch(SSHError):
    def __init__(self, host_name: str, offered: paramiko.PKey):
        self.offered = offered
        super().__init__(
            f"The SSH host key of {host_name} has changed: it now presents {fingerprint(offered)}. "
            "Nothing will run there until an admin checks the host and trusts the new key."
        )


class HostNotTrusted(SSHError):
    pass


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint, as `ssh-keygen -lf` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# --- the fleet's key pair -----------------------------------------------------------
#
# One key for the whole fleet, the same file on every node (settings.SSH_KEY_PATH). It is
# made once, by `manage.py sshkey` (scripts/setup.sh), while no host exists; after that a
# node without it refuses to start (check_key_at_start): a node that made a key of its own
# would fail to log in to every host and the next refresh would mark the fleet offline.


class KeyMissing(SSHError):
    pass


def _key_path(path: Path | None = None) -> Path:
    return Path(path or settings.SSH_KEY_PATH)


def create_keypair(path: Path | None = None) -> bool:
    """Make the fleet's Ed25519 key at `path` unless a key is there already; True if this call
    made it. Safe against another process doing the same: the key is written to a file of its
    own and linked into place (O_EXCL semantics), so the path holds one whole key, the first."""
    path = _key_path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600, a name of its own
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(private)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if any key got there first: that one stays
        except FileExistsError:
            return False
    finally:
        os.unlink(tmp)
    _write_public(path)
    return True


def _write_public(path: Path) -> None:
    # For people (ssh-copy-id, authorized_keys); the dashboard reads the private key only.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pub.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(public_key_line(path) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path.with_name(path.name + ".pub"))


def key_problem(path: Path | None = None) -> str | None:
    """None if the fleet's key is there and readable, else the sentence that says what is wrong."""
    path = _key_path(path)
    try:
        paramiko.Ed25519Key.from_private_key_file(str(path))
    except FileNotFoundError:
        return f"The fleet's SSH key {path} is missing"
    except (OSError, paramiko.SSHException, ValueError) as e:
        return f"The fleet's SSH key {path} cannot be read ({e})"
    return None


def check_key_at_start(path: Path | None = None) -> None:
    """A web or worker node starting: without the fleet's key it refuses (SystemExit with one
    sentence) once hosts exist; before any host exists it makes the key (first run)."""
    problem = key_problem(path)
    if problem is None:
        return
    if Host.objects.exists():
        raise SystemExit(
            f"ctweb: {problem}: this node cannot reach the fleet's hosts. Copy the fleet's key there "
            "(the same file on every node, CTWEB_SSH_KEY); no new key is made once hosts exist."
        )
    create_keypair(path)


def public_key_line(path: Path | None = None) -> str:
    key = _private_key(path)
    return f"{key.get_name()} {key.get_base64()} ctweb-dashboard"


def _private_key(path: Path | None = None) -> paramiko.PKey:
    path = _key_path(path)
    try:
        return paramiko.Ed25519Key.from_private_key_file(str(path))
    except FileNotFoundError as e:
        raise KeyMissing(
            f"The fleet's SSH key {path} is missing on this node; copy it here (CTWEB_SSH_KEY) or, "
            "before any host is added, make it with `manage.py sshkey`."
        ) from e


# --- host keys ---------------------------------------------------------------------


def fetch_host_key(address: str, port: int, timeout: float | None = None) -> paramiko.PKey:
    """Ask the server for its host key without authenticating or running anything."""
    timeout = timeout or settings.SSH_CONNECT_TIMEOUT_S
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as e:
        raise SSHError(f"Cannot reach {address} port {port}: {e.strerror or e}.") from e
    transport = paramiko.Transport(sock)
    transport.banner_timeout = timeout
    try:
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, EOFError, OSError) as e:
        raise SSHError(f"{address} port {port} did not complete an SSH handshake: {e or type(e).__name__}.") from e
    finally:
        transport.close()


def key_from_parts(key_type: str, key_data: str) -> paramiko.PKey:
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(key_data))


# --- running the agent -------------------------------------------------------------


@dataclass
class AgentResult:
    data: dict
    stderr: str
    exit_status: int
    # This worker's monotonic clock when the result line arrived: an agent's "N ms before
    # this result" (a migration's freeze, its first answer) lands on one clock with it.
    received_at: float = 0.0


# The largest debug bundle a host may hand over through its agent (a host that lies is cut off).
BUNDLE_MAX_BYTES = 256 << 20
# How long the agent installer (a host whose SSH user is not root) may take, all told.
INSTALL_DEADLINE_S = 120


class AgentFailed(SSHError):
    """The agent reported an error (or died). `details` carries the log lines that explain it."""

    def __init__(self, message: str, details: str = "", data: dict | None = None):
        super().__init__(message)
        self.details = details
        self.data = data or {}


class AgentLost(AgentFailed):
    """The agent's answer never came (the link broke, or the agent died): what it did on the
    host is unknown until someone asks the host again."""


class SudoRefused(AgentFailed):
    """sudo did not run the agent (no sudo, no rule, a password asked for): nothing ran, and
    the sentence says what to put in place on the host."""


@lru_cache(maxsize=4)
def _signature(digest: str, key_path: str) -> str:
    return sudo.sign(agent_source()[0], _private_key(Path(key_path)))


def _agent_signature() -> str:
    """The fleet key's signature on this agent, for the installer of a non-root host."""
    return _signature(agent_source()[1], str(_key_path()))


# Agent subcommands that may be started ahead of their call (hosts/agent/ctweb_agent/commands.py:
# an agent of these whose input ends before any parameters does nothing).
PRESTARTABLE = ("migrate-restore",)


class Prestarted:
    """An agent subcommand started ahead (HostConnection.prestart_agent), waiting for its parameters."""

    def __init__(self, subcommand: str, channel: paramiko.Channel):
        self.subcommand, self._channel = subcommand, channel

    def take(self, subcommand: str) -> paramiko.Channel | None:
        """The waiting channel for this call (once), or None if it is for another or ended."""
        channel, self._channel = self._channel, None
        if channel is None or subcommand != self.subcommand or channel.closed or channel.exit_status_ready():
            if channel is not None:
                channel.close()
            return None
        return channel

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class HostConnection:
    def __init__(self, host, client: paramiko.SSHClient):
        self.host = host
        self.client = client
        self._agent_path: str | None = None

    def ensure_agent(self) -> str:
        """Copy the agent over unless this exact version is already there: over SFTP for root,
        through the installer with sudo for any other SSH user (install_agent)."""
        if self._agent_path:
            return self._agent_path
        remote = f"{REMOTE_AGENT_DIR}/{agent_file_name()}"
        if sudo.uses_sudo(self.host):
            try:
                self._install_with_sudo()
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise SSHError(f"Lost the connection to {self.host}: {e or type(e).__name__}.") from e
            self._agent_path = remote
            return remote
        source, _ = agent_source()
        sftp = self.client.open_sftp()
        try:
            try:
                sftp.stat(remote)
            except FileNotFoundError:
                path = ""
                for part in REMOTE_AGENT_DIR.strip("/").split("/"):
                    path += "/" + part
                    try:
                        sftp.stat(path)
                    except FileNotFoundError:
                        sftp.mkdir(path, 0o700)
                tmp = f"{remote}.{os.getpid()}.tmp"
                sftp.putfo(io.BytesIO(source), tmp)
                sftp.chmod(tmp, 0o700)
                sftp.posix_rename(tmp, remote)
        finally:
            sftp.close()
        self._agent_path = remote
        return remote

    def _install_with_sudo(self) -> None:
        """The SSH user is not root: it cannot write where the agent lives (root's). The
        installer, run with sudo, says `have`, or `send` and takes the agent's bytes with the
        dashboard's signature on its standard input, checks them and puts them in place."""
        source, _ = agent_source()
        transport = self.client.get_transport()
        if transport is None:
            raise EOFError("connection closed")
        channel = transport.open_session()
        try:
            channel.exec_command(sudo.installer_command(agent_file_name()))
            channel.settimeout(60)
            first = b""
            while not first.endswith(b"\n") and len(first) < 200:
                try:
                    chunk = channel.recv(1)
                except TimeoutError:
                    break
                if not chunk:
                    break
                first += chunk
            if first == b"send\n":
                header = {"size": len(source), "signature": _agent_signature()}
                channel.sendall(json.dumps(header).encode() + b"\n" + source)
            channel.shutdown_write()
            # A host that lies may talk or wait for ever: what it prints after its first line is
            # not kept, its stderr only to the last 64 KiB, and the whole exchange has a deadline.
            deadline = time.monotonic() + INSTALL_DEADLINE_S
            err = bytearray()
            while not channel.exit_status_ready() and time.monotonic() < deadline:
                try:
                    if not channel.recv(65536) and not channel.recv_stderr_ready():
                        break
                except TimeoutError:
                    pass
                while channel.recv_stderr_ready():
                    err = (err + channel.recv_stderr(65536))[-65536:]
            if not channel.status_event.wait(max(0.0, deadline - time.monotonic())):
                raise SSHError(f"The agent installer on {self.host} did not finish in {INSTALL_DEADLINE_S} s.")
            status = channel.recv_exit_status()
            while channel.recv_stderr_ready():
                err = (err + channel.recv_stderr(65536))[-65536:]
        finally:
            channel.close()
        if status == 0 and first in (b"have\n", b"send\n"):
            return
        said = err.decode(errors="replace")
        problem = sudo.refusal(self.host, said, status, "ctweb's agent installer")
        if problem:
            raise SudoRefused(problem)
        lines = [ln for ln in said.strip().splitlines() if ln.strip()]
        raise AgentFailed(
            f"The agent installer on {self.host} refused the agent: "
            + (lines[-1] if lines else f"exit status {status}"),
            said[-4000:],
        )

    def _exec_agent(self, subcommand: str) -> paramiko.Channel:
        path = self.ensure_agent()
        # Both parts are ours: a fixed directory with a hex digest, and a whitelisted word.
        command = sudo.agent_command(self.host, path, subcommand)
        transport = self.client.get_transport()
        if transport is None:  # closed already (a broken link the caller gave up on)
            raise EOFError("connection closed")
        channel = transport.open_session()
        channel.exec_command(command)
        return channel

    def prestart_agent(self, subcommand: str) -> Prestarted | None:
        """Start an agent subcommand ahead of its call: its process starts (SSH session, Python,
        the agent's imports) and waits for its parameters, which run_agent(prestarted=...) sends.
        For a call inside a migration's downtime. None if it could not be started (the call
        then starts its own). Unused, it is closed: its agent reads the end of its input and
        does nothing."""
        if subcommand not in PRESTARTABLE:
            raise ValueError(f"{subcommand!r} cannot be started ahead")
        try:
            return Prestarted(subcommand, self._exec_agent(subcommand))
        except (paramiko.SSHException, OSError, EOFError, SSHError):
            return None

    def run_agent(
        self,
        subcommand: str,
        params: dict | None = None,
        on_event: Callable[[dict], None] | None = None,
        timeout: float | None = None,
        prestarted: Prestarted | None = None,
    ) -> AgentResult:
        """Run one agent subcommand; relay its events; return its final result. `prestarted`:
        the agent prestart_agent started for this call, if it still waits."""
        if subcommand not in AGENT_SUBCOMMANDS:
            raise ValueError(f"unknown agent subcommand {subcommand!r}")
        channel = prestarted.take(subcommand) if prestarted is not None else None
        if channel is not None:
            try:  # its agent has started and waits for this line
                channel.sendall(json.dumps(params or {}).encode() + b"\n")
                channel.shutdown_write()
            except (paramiko.SSHException, OSError, EOFError):
                channel.close()
                channel = None  # ended meanwhile: a fresh one, as if none had been started
        try:
            if channel is None:
                channel = self._exec_agent(subcommand)
                channel.sendall(json.dumps(params or {}).encode() + b"\n")
                channel.shutdown_write()
            transport = channel.get_transport()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SSHError(f"Lost the connection to {self.host}: {e or type(e).__name__}.") from e
        channel.settimeout(1.0)
        deadline = time.monotonic() + (timeout or settings.OPERATION_TIMEOUT_S)
        stderr = bytearray()
        result, error, received_at = _outcome(_messages(_lines(channel, stderr, deadline), self.host), on_event)
        exit_status = channel.recv_exit_status() if channel.exit_status_ready() else -1
        channel.close()
        err_text = stderr.decode(errors="replace")
        if error is not None:
            raise AgentFailed(
                error.get("message") or "The agent reported an error.", error.get("details") or "", error.get("data")
            )
        if result is None:
            problem = sudo.refusal(self.host, err_text, exit_status)
            if problem:
                raise SudoRefused(problem)
            tail = "\n".join(err_text.strip().splitlines()[-20:])
            if not transport.is_active():
                raise AgentLost(f"The connection to {self.host} was lost before the agent finished.", tail)
            raise AgentLost(f"The agent on {self.host} ended without a result (exit status {exit_status}).", tail)
        return AgentResult(result, err_text, exit_status, received_at)

    def open_stream(self, subcommand: str, params: dict) -> paramiko.Channel:
        """Start an agent subcommand that streams raw bytes (a tar) on stdout or stdin.

        The parameters go first, as one JSON line; the caller reads or writes the rest."""
        if subcommand not in AGENT_SUBCOMMANDS:
            raise ValueError(f"unknown agent subcommand {subcommand!r}")
        try:
            path = self.ensure_agent()
            channel = self.client.get_transport().open_session()
            channel.exec_command(sudo.agent_command(self.host, path, subcommand))
            channel.sendall(json.dumps(params).encode() + b"\n")
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SSHError(f"Lost the connection to {self.host}: {e or type(e).__name__}.") from e
        return channel

    def stream(self, subcommand: str, params: dict | None, who: str) -> AgentProcess:
        """Start an agent subcommand that streams raw bytes, through an OpenSSH client
        process (see AgentProcess): for relays, where paramiko would be the bottleneck."""
        try:
            path = self.ensure_agent()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SSHError(f"Lost the connection to {self.host}: {e or type(e).__name__}.") from e
        return AgentProcess(self.host, path, subcommand, params, who)

    def fetch(self, remote: str, local: Path, remove: bool = True) -> int:
        """Copy a file the agent made under /var/lib/ctweb/ back here (and remove it there)."""
        if not remote.startswith("/var/lib/ctweb/") or ".." in remote.split("/"):
            raise SSHError(f"Refusing to fetch {remote!r} from {self.host}: not an agent file.")
        local.parent.mkdir(parents=True, exist_ok=True)
        if sudo.uses_sudo(self.host):
            # Not the SSH user's to read (root's, 0700): the agent hands a bundle over itself.
            m = re.fullmatch(r"/var/lib/ctweb/bundles/op-(\d+)\.tar\.gz", remote)
            if m is None:
                raise SSHError(f"Refusing to fetch {remote!r} from {self.host}: not a debug bundle.")
            with open(local, "wb") as out:
                return download(
                    self.open_stream("bundle-fetch", {"op": int(m.group(1))}), out, None, BUNDLE_MAX_BYTES, timeout=600
                )
        sftp = self.client.open_sftp()
        try:
            sftp.get(remote, str(local))
            if remove:
                sftp.remove(remote)
        finally:
            sftp.close()
        return local.stat().st_size

    def close(self) -> None:
        self.client.close()


def _messages(lines: Iterable[bytes], host=None) -> Iterator[dict]:
    """An agent's JSON lines as messages: a line that is not a JSON object is skipped (logged
    when `host` is named): a host that lies gets no further than that."""
    for line in lines:
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if isinstance(msg, dict):
            yield msg
        elif host is not None:
            log.warning("agent on %s printed a line that is not a JSON object: %r", host, line[:200])


def _outcome(messages: Iterable[dict], on_event) -> tuple[dict | None, dict | None, float]:
    """(its result, its error, when the result arrived) from an agent's messages; the others
    are progress, passed to `on_event`."""
    result, error, received_at = None, None, 0.0
    for msg in messages:
        kind = msg.get("type")
        if kind == "result":
            result = msg.get("data") or {}
            received_at = time.monotonic()
        elif kind == "error":
            error = msg
        elif on_event is not None:
            on_event(msg)
    return result, error, received_at


def _lines(channel: paramiko.Channel, stderr: bytearray, deadline: float) -> Iterator[bytes]:
    buf = b""
    while True:
        if time.monotonic() > deadline:
            channel.close()
            raise SSHError("The agent did not finish in time.")
        while channel.recv_stderr_ready():
            stderr.extend(channel.recv_stderr(65536))
            del stderr[:-65536]
        try:
            chunk = channel.recv(65536)
        except TimeoutError:
            if not channel.get_transport().is_active():
                break
            continue
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf
    while channel.recv_stderr_ready():
        stderr.extend(channel.recv_stderr(65536))


def mark_key_mismatch(host, offered: paramiko.PKey) -> None:
    Host.objects.filter(pk=host.pk).update(
        status=Host.Status.KEY_MISMATCH,
        status_message=str(HostKeyMismatch(host.name, offered)),
        offered_key_type=offered.get_name(),
        offered_key_data=offered.get_base64(),
        offered_fingerprint=fingerprint(offered),
    )


def _watch_link(transport: paramiko.Transport) -> None:
    """Notice a dead link in SSH_DEAD_AFTER_S, not TCP's quarter of an hour: keepalives keep
    something in flight, and the kernel drops the connection when it stays unacknowledged."""
    transport.set_keepalive(max(1, int(settings.SSH_DEAD_AFTER_S // 3)))
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        try:
            transport.sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(settings.SSH_DEAD_AFTER_S * 1000)
            )
        except OSError as e:
            log.info("TCP_USER_TIMEOUT not set: %s", e)


@contextmanager
def connect(host, timeout: float | None = None) -> Iterator[HostConnection]:
    """Open an authenticated SSH connection to a trusted host, with its key pinned."""
    conn = _open(host, timeout)
    try:
        yield conn
    finally:
        conn.close()


def _open(host, timeout: float | None = None) -> HostConnection:
    if host.is_blocked:
        raise (
            HostKeyMismatch(host.name, key_from_parts(host.offered_key_type, host.offered_key_data))
            if host.offered_key_data
            else SSHError(host.status_message)
        )
    if not host.key_data:
        raise HostNotTrusted(f"{host.name} is not trusted yet: an admin must check and trust its host key first.")
    timeout = timeout or settings.SSH_CONNECT_TIMEOUT_S
    pkey = _private_key()  # this node's problem if it is missing, not the host's (KeyMissing)
    client = paramiko.SSHClient()
    known = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
    client.get_host_keys().add(known, host.key_type, key_from_parts(host.key_type, host.key_data))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            hostname=host.address,
            port=host.port,
            username=host.username,
            pkey=pkey,
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )
    except paramiko.BadHostKeyException as e:
        client.close()
        mark_key_mismatch(host, e.key)
        raise HostKeyMismatch(host.name, e.key) from e
    except paramiko.AuthenticationException as e:
        client.close()
        raise SSHError(
            f"{host.name} refused the dashboard's SSH key for user {host.username}: install the public key "
            "shown on the Hosts page in that user's authorized_keys."
        ) from e
    except (OSError, paramiko.SSHException, EOFError) as e:
        client.close()
        raise SSHError(
            f"Cannot connect to {host.name} ({host.address} port {host.port}): {e or type(e).__name__}."
        ) from e
    _watch_link(client.get_transport())
    return HostConnection(host, client)


# The worker keeps idle connections to each host for a while: a job's agent call then costs
# one SSH channel, not a handshake (and the agent's SFTP check) every time. A connection is
# used by one job at a time: it is taken out of the pool while in use.
POOL_IDLE_S = 60
_pool: dict[int, list[tuple[HostConnection, tuple, float]]] = {}
_pool_lock = threading.Lock()


def _pool_key(host) -> tuple:
    return (host.pk, host.address, host.port, host.username, host.key_type, host.key_data)


def _alive(conn: HostConnection) -> bool:
    """One round trip: can this connection still open a channel?"""
    transport = conn.client.get_transport()
    if transport is None or not transport.is_active():
        return False
    try:
        transport.open_session(timeout=5).close()
        return True
    except (paramiko.SSHException, OSError, EOFError):
        return False


def _take(host) -> HostConnection | None:
    while True:
        with _pool_lock:
            idle = _pool.get(host.pk) or []
            if not idle:
                return None
            conn, key, last = idle.pop()
        if key == _pool_key(host) and time.monotonic() - last <= POOL_IDLE_S and _alive(conn):
            return conn
        conn.close()


@contextmanager
def pooled(host) -> Iterator[HostConnection]:
    """Like connect(), reusing an idle connection from the pool when it is still alive and
    still for the same address, user and pinned key. A connection that saw any error is
    closed, never reused."""
    if host.is_blocked or not host.key_data:
        with connect(host) as conn:  # raises the right error
            yield conn
        return
    conn = _take(host) or _open(host)
    conn.host = host
    ok = False
    try:
        yield conn
        ok = True
    finally:
        transport = conn.client.get_transport()
        if ok and transport is not None and transport.is_active():
            with _pool_lock:
                _pool.setdefault(host.pk, []).append((conn, _pool_key(host), time.monotonic()))
        else:
            conn.close()


# --- streams through OpenSSH client processes ----------------------------------------
#
# The bytes of a migration (tars, pages) cross the dashboard between two SSH connections.
# paramiko packs and unpacks every SSH packet in Python (about 45 MiB/s on the lab's
# machine against OpenSSH's 250), so the streams run through the OpenSSH client instead:
# one `ssh` process per host, pinned to the same host key (a known_hosts file written from
# the database, StrictHostKeyChecking=yes), with the dashboard's key and nothing else (no
# user config, no agent, no forwarding). The worker moves bytes from one process's stdout to
# the other's stdin with splice(2): kernel pipe to kernel pipe, counted, never copied
# through Python. Control (the agent's JSON results and events) stays on paramiko.

SSH_BINARY = "ssh"
PIPE_SIZE = 1 << 20  # fs.pipe-max-size's default: fewer, larger splices
CHUNK = 1 << 20  # what an export download or an import upload moves per read


def _known_hosts(host) -> str:
    """A known_hosts file holding only the key an admin trusted for this host."""
    key = key_from_parts(host.key_type, host.key_data)  # parsed: the line cannot carry anything else
    name = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
    line = f"{name} {key.get_name()} {key.get_base64()}\n"
    folder = Path(settings.VAR_DIR) / "ssh" / "known_hosts.d"  # this node's own, made from the database
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / hashlib.sha256(line.encode()).hexdigest()[:32]
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(line)
        os.replace(tmp, path)
    return str(path)


def ssh_argv(host, command: str | None, extra: dict[str, str] | None = None) -> list[str]:
    """The OpenSSH client's command line for one command on a trusted host (None: no command,
    a connection only, as a multiplexing master). `extra`: options of ours added (ControlPath)."""
    if host.is_blocked or not host.key_data:
        raise HostNotTrusted(f"{host.name} is not trusted: an admin must check and trust its host key first.")
    alive = max(1, int(settings.SSH_DEAD_AFTER_S // 3))
    options = {
        "BatchMode": "yes",
        "StrictHostKeyChecking": "yes",
        "UserKnownHostsFile": _known_hosts(host),
        "GlobalKnownHostsFile": "/dev/null",
        "UpdateHostKeys": "no",
        "CheckHostIP": "no",
        "IdentitiesOnly": "yes",
        "IdentityAgent": "none",
        "ForwardAgent": "no",
        "ForwardX11": "no",
        "ClearAllForwardings": "yes",
        "PermitLocalCommand": "no",
        "Compression": "no",
        "ConnectTimeout": str(int(settings.SSH_CONNECT_TIMEOUT_S)),
        # A dead link is noticed in about SSH_DEAD_AFTER_S, as with the paramiko connections.
        "ServerAliveInterval": str(alive),
        "ServerAliveCountMax": "3",
        "Ciphers": "^aes128-gcm@openssh.com",  # AES-NI where the CPU has it, first
        "LogLevel": "ERROR",
        **(extra or {}),
    }
    _private_key()  # this node's copy of the fleet's key, or KeyMissing (one sentence)
    argv = [SSH_BINARY, "-F", "/dev/null", "-T", "-i", str(_key_path())]
    for k, v in options.items():
        argv += ["-o", f"{k}={v}"]
    argv += ["-p", str(int(host.port)), "-l", host.username]
    return argv + (["-N", "--", host.address] if command is None else ["--", host.address, command])


class SSHLink:
    """One OpenSSH connection to a host held open for many sessions (connection
    multiplexing): its master process owns the connection, sessions started with `link=`
    run over it without a handshake of their own. The control socket lives in a directory
    made for this link (0700, this process's user), removed with it.

    Why: a post-copy's page pump starts a pair of sessions per round, many rounds a second
    while a link is down. Each through a fresh connection, the host that still answers (the
    source, holding the frozen container) took hundreds of SSH connections in 30 s and its
    sshd refused everyone (MaxStartups), the admin and the dashboard's own calls included.
    A link is made again only when it ended: its master exits when the connection dies
    (ServerAlive), when told to (`close`), or IDLE_S after its last session, so a worker
    that dies leaves no connection open for long."""

    IDLE_S = 30  # far above the pump's longest pause between two rounds (3 s)

    def __init__(self, host, who: str):
        self.host, self.who = host, who
        self.dir = tempfile.mkdtemp(prefix="ctweb-ssh-")
        self.path = os.path.join(self.dir, "control")
        self._log = os.path.join(self.dir, "log")
        # ControlPersist: once logged in, the master goes on in the background and this
        # process exits (0), or it fails (255) with the reason on stderr.
        try:
            argv = ssh_argv(host, None, {**self.options(), "ControlMaster": "yes", "ControlPersist": f"{self.IDLE_S}s"})
        except BaseException:  # not trusted (now), no key: nothing was started
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        try:
            with open(self._log, "wb") as err:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        except OSError as e:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise SSHError(f"Cannot run the OpenSSH client ({SSH_BINARY}) on the dashboard: {e.strerror or e}.") from e

    def wait_ready(self, stop: threading.Event | None = None) -> None:
        """Until the connection is up (the master runs and answers on its control socket)."""
        limit = settings.SSH_CONNECT_TIMEOUT_S + 10
        deadline = time.monotonic() + limit
        while self.proc.poll() is None:
            if stop is not None and stop.is_set():
                raise SSHError(f"Stopped while connecting to {self.host}.")
            if time.monotonic() > deadline:
                raise SSHError(f"Cannot connect to {self.host}: no login within {limit:.0f} s.")
            time.sleep(0.02)
        if self.proc.returncode != 0 or not self.alive():
            raise SSHError(f"Cannot connect to {self.host}: {_last_line(self.tail())}")

    def alive(self) -> bool:
        """Its master still answers (it removes the socket when it ends; one killed leaves
        a socket nobody listens on)."""
        sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sk.settimeout(2)
            sk.connect(self.path)
            return True
        except OSError:
            return False
        finally:
            sk.close()

    def options(self) -> dict[str, str]:
        """A session's options to run over this link."""
        return {"ControlMaster": "no", "ControlPath": self.path.replace("%", "%%")}

    def tail(self) -> str:
        try:
            with open(self._log, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """End the connection (and the sessions on it) now; from any thread."""
        if self.proc.poll() is None:
            self.proc.kill()  # still connecting
        if os.path.exists(self.path):
            argv = [SSH_BINARY, "-F", "/dev/null", "-o", f"ControlPath={self.path.replace('%', '%%')}"]
            try:  # asks the master through its socket: nothing goes to the host
                subprocess.run(
                    [*argv, "-O", "exit", "--", self.host.address], capture_output=True, timeout=10, check=False
                )
            except (OSError, subprocess.TimeoutExpired):
                pass  # it ends by itself IDLE_S after its last session

    def close(self) -> None:
        self.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class AgentProcess:
    """An agent subcommand that streams raw bytes, run through an OpenSSH client process.

    Its parameters go first on stdin, as one JSON line; given later (`begin`), the process is
    started ahead: the SSH handshake and the agent's start-up are done by the time they are
    needed (the agent waits for its parameters before doing anything). stdout and stdin are kernel pipes
    for splice(2); stderr (the agent's and ssh's own) and, for a receiver, its JSON lines
    are drained as they come so neither side ever blocks on a full pipe."""

    def __init__(
        self, host, agent_path: str, subcommand: str, params: dict | None, who: str, link: SSHLink | None = None
    ):
        if subcommand not in AGENT_SUBCOMMANDS:
            raise ValueError(f"unknown agent subcommand {subcommand!r}")
        self.host, self.who = host, who
        # Both parts are ours. Over `link`, a session on its connection (should the link end
        # just now, ssh connects by itself, with the same pinned options).
        argv = ssh_argv(host, sudo.agent_command(host, agent_path, subcommand), link.options() if link else None)
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
            )
        except OSError as e:
            raise SSHError(f"Cannot run the OpenSSH client ({SSH_BINARY}) on the dashboard: {e.strerror or e}.") from e
        self.stdin, self.stdout = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self.stderr_fd = self.proc.stderr.fileno()
        for fd in (self.stdin, self.stdout):
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # the default size works, with more splices
        for fd in (self.stdin, self.stdout, self.stderr_fd):
            os.set_blocking(fd, False)
        self.stderr = bytearray()
        self.out = b""  # JSON lines read from stdout (receivers only)
        self.out_ended = False
        if params is not None:
            self.begin(params)

    def begin(self, params: dict) -> None:
        try:
            os.write(self.stdin, json.dumps(params).encode() + b"\n")  # far below a pipe's size
        except OSError as e:  # the process ended already (its link, say)
            self.proc.poll()
            raise SSHError(f"Lost the connection to {self.host}: {_last_line(self.tail())}") from e

    def close_stdin(self) -> None:
        if not self.proc.stdin.closed:
            self.proc.stdin.close()

    def read_stderr(self) -> None:
        while True:
            try:
                chunk = os.read(self.stderr_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                return
            if not chunk:
                return
            self.stderr.extend(chunk)
            del self.stderr[:-65536]

    def read_out(self) -> None:
        """Take what the agent printed on stdout (a receiver's JSON lines)."""
        while not self.out_ended:
            try:
                chunk = os.read(self.stdout, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.out_ended = True
                return
            self.out += chunk
            if len(self.out) > 1 << 20 and b"\n" not in self.out[-65536:]:
                self.out = self.out[-65536:]  # a host that prints no lines gets no memory

    def lines(self) -> list[dict]:
        return list(_messages(self.out.split(b"\n")))

    def tail(self) -> str:
        self.read_stderr()
        return self.stderr.decode(errors="replace")[-4000:]

    def link_lost(self) -> bool:
        """ssh itself failed (exit status 255): the link, not the agent."""
        return self.proc.poll() == 255

    def kill(self) -> None:
        """End the process; its pipes stay open for whoever still polls them."""
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        """End the process (its SSH connection closes, so the agent sees its stream end)."""
        if self.proc.poll() is None:
            self.proc.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


class _Stalled(Exception):
    def __init__(self, side: str):
        self.side = side


def _splice(
    src: AgentProcess,
    dst: AgentProcess,
    moved: Callable[[int], None],
    stall_in: float,
    stall_out: float,
    side: tuple[AgentProcess, ...] = (),
    stop: threading.Event | None = None,
    deadline: float | None = None,
) -> None:
    """Move src's stdout into dst's stdin until src's end of stream, with splice(2).

    Meanwhile it drains every process's stderr and the stdout of `side` (receivers' lines).
    Raises _Stalled("in") when src sends nothing for stall_in s, _Stalled("out") when dst
    takes nothing for stall_out s, BrokenPipeError when dst is gone; returns on src's EOF,
    or when `stop` is set."""
    poller = select.poll()
    extra: dict[int, Callable[[], None]] = {}
    for p in {src, *side}:
        extra[p.stderr_fd] = p.read_stderr
    for p in side:
        if p is not src:
            extra[p.stdout] = p.read_out
    for fd in extra:
        poller.register(fd, select.POLLIN)
    want_in = True  # waiting for src to have data (else for dst to have room)
    poller.register(src.stdout, select.POLLIN)
    since = time.monotonic()
    while True:
        if stop is not None and stop.is_set():
            return
        now = time.monotonic()
        if deadline is not None and now > deadline:
            raise SSHError("The transfer did not finish in time.")
        if now - since > (stall_in if want_in else stall_out):
            raise _Stalled("in" if want_in else "out")
        ready = poller.poll(1000)
        go = False
        for fd, ev in ready:
            if fd in extra:
                extra[fd]()
                if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) and not ev & select.POLLIN:
                    poller.unregister(fd)
                    del extra[fd]
            else:
                go = True
        if not go:
            continue
        while True:
            try:
                n = os.splice(src.stdout, dst.stdin, PIPE_SIZE, flags=os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE)
            except BlockingIOError:
                # Nothing to take, or no room to put it: wait for the other side.
                poller.unregister(src.stdout if want_in else dst.stdin)
                want_in = not want_in
                if want_in:
                    poller.register(src.stdout, select.POLLIN)
                else:
                    poller.register(dst.stdin, select.POLLOUT)
                break
            if n == 0:
                return
            moved(n)
            since = time.monotonic()
            if stop is not None and stop.is_set():
                return


def relay(
    sender: AgentProcess,
    receiver: AgentProcess,
    on_bytes: Callable[[int], None] | None = None,
    timeout: float = 3600,
) -> tuple[int, dict]:
    """Pipe a sender agent's stdout into a receiver agent's stdin through this process.

    Neither host needs to trust the other: the bytes cross the dashboard's two SSH
    connections, encrypted both ways. Returns (bytes moved, the receiver's result).
    On any failure (or a cancel raised by on_bytes) both processes end, so both agents
    see their stream end and stop."""
    try:
        return _relay(sender, receiver, on_bytes, timeout)
    finally:
        sender.close()
        receiver.close()


def _relay(sender: AgentProcess, receiver: AgentProcess, on_bytes, timeout) -> tuple[int, dict]:
    sender.close_stdin()
    total = 0

    def moved(n: int) -> None:
        nonlocal total
        total += n
        if on_bytes:
            on_bytes(total)

    try:
        _splice(
            sender,
            receiver,
            moved,
            stall_in=60,
            stall_out=settings.SSH_DEAD_AFTER_S * 2,
            side=(receiver,),
            deadline=time.monotonic() + timeout,
        )
    except _Stalled as e:
        if e.side == "in":
            raise SSHError("The sending host stopped sending for 60 s.") from None
        why = _said(receiver)
        raise SSHError(f"The receiving host stopped taking data{': ' + why if why else ' for a while'}.") from None
    except OSError as e:  # the receiver's ssh is gone (EPIPE)
        why = _said(receiver)
        if why:
            raise AgentFailed(f"The receiving host stopped taking data: {why}") from e
        if receiver.link_lost():
            raise SSHError(f"Lost the connection to {receiver.host}: {_last_line(receiver.tail())}") from e
        raise SSHError(f"The receiving host stopped taking data: {e.strerror or e}.") from e
    try:
        status = sender.proc.wait(settings.SSH_DEAD_AFTER_S * 2)
    except subprocess.TimeoutExpired:
        raise SSHError("The sending host did not finish after sending everything.") from None
    if status == 255:
        raise SSHError(f"Lost the connection to {sender.host} while it was sending: {_last_line(sender.tail())}")
    if status != 0:
        problem = sudo.refusal(sender.host, sender.tail(), status)
        if problem:
            raise SudoRefused(problem)
        raise AgentFailed(f"The sending host failed (exit status {status}).", sender.tail())
    receiver.close_stdin()
    deadline = time.monotonic() + 600
    while not receiver.out_ended:
        if time.monotonic() > deadline:
            raise SSHError("The receiving host did not finish in time.")
        select.select([receiver.stdout, receiver.stderr_fd], [], [], 1.0)
        receiver.read_out()
        receiver.read_stderr()
    result = error = None
    for msg in receiver.lines():
        if msg.get("type") == "result":
            result = msg.get("data") or {}
        elif msg.get("type") == "error":
            error = msg
    if error is not None:
        raise AgentFailed(error.get("message") or "The receiving host failed.", error.get("details") or "")
    if result is None:
        problem = sudo.refusal(receiver.host, receiver.tail(), receiver.proc.poll() or 0)
        if problem:
            raise SudoRefused(problem)
        raise AgentFailed("The receiving host ended without a result.", receiver.tail())
    return total, result


def download(
    channel: paramiko.Channel,
    out: BinaryIO,
    on_bytes: Callable[[int], None] | None = None,
    max_bytes: int | None = None,
    timeout: float = 3600,
) -> int:
    """Copy what an agent subcommand of raw output (`export`) writes on its stdout into `out`;
    returns the bytes moved. Its failure (exit status, its sentence on stderr) is AgentFailed;
    a host that sends more than `max_bytes` is cut off. The channel is closed in any case (a
    cancel raised by on_bytes stops the agent)."""
    try:
        channel.shutdown_write()
        channel.settimeout(max(60.0, settings.SSH_DEAD_AFTER_S * 2))
        total = 0
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise SSHError("The transfer did not finish in time.")
            try:
                data = channel.recv(CHUNK)
            except TimeoutError:
                raise SSHError("The host stopped sending.") from None
            if not data:
                break
            total += len(data)
            if max_bytes is not None and total > max_bytes:
                raise SSHError(f"The host sent more than {max_bytes >> 20} MiB, the most ctweb keeps.")
            out.write(data)
            if on_bytes:
                on_bytes(total)
        status = channel.recv_exit_status()
        err = b""
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
        if status != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise AgentFailed(
                lines[0] if lines else f"The agent failed (exit status {status}).", "\n".join(lines[1:])[-4000:]
            )
        return total
    finally:
        channel.close()


def upload(
    channel: paramiko.Channel,
    source: BinaryIO,
    on_bytes: Callable[[int], None] | None = None,
    on_event: Callable[[dict], None] | None = None,
    timeout: float = 3600,
) -> tuple[int, dict]:
    """Feed `source` to an agent subcommand that reads it after its parameters line (`import`);
    returns (bytes sent, its result). An agent that refuses stops reading: its sentence is the
    error. The channel is closed in any case."""
    try:
        channel.settimeout(max(60.0, settings.SSH_DEAD_AFTER_S * 2))
        total = 0
        deadline = time.monotonic() + timeout
        while True:
            data = source.read(CHUNK)
            if not data:
                break
            try:
                channel.sendall(data)
            except (OSError, paramiko.SSHException, EOFError) as e:  # socket.timeout too
                why = _said_channel(channel)
                if why:
                    raise AgentFailed(why) from e
                # Its agent died, or the link did: what it did with what came is unknown.
                raise AgentLost(f"The host stopped taking the archive: {e or type(e).__name__}.") from e
            total += len(data)
            if on_bytes:
                on_bytes(total)
            if time.monotonic() > deadline:
                raise SSHError("The transfer did not finish in time.")
        channel.shutdown_write()
        stderr = bytearray()
        result, error, _ = _outcome(_messages(_lines(channel, stderr, deadline + 600)), on_event)
        if error is not None:
            raise AgentFailed(error.get("message") or "The host refused the archive.", error.get("details") or "")
        if result is None:
            raise AgentLost("The host ended without a result.", stderr.decode(errors="replace")[-4000:])
        return total, result
    finally:
        channel.close()


def _said_channel(channel: paramiko.Channel) -> str:
    """The error an agent printed on a paramiko channel before it stopped reading, if any."""
    try:
        channel.settimeout(1.0)
        for msg in _messages(_lines(channel, bytearray(), time.monotonic() + 3)):
            if msg.get("type") == "error":
                return str(msg.get("message") or "")
    except Exception:  # nothing more to learn from a dead channel
        pass
    return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "ssh ended"


def _said(receiver: AgentProcess) -> str:
    """The error an agent printed before it stopped reading (its disk filled up, say), if any."""
    until = time.monotonic() + 3
    while not receiver.out_ended and time.monotonic() < until:
        receiver.read_out()
        if any(m.get("type") == "error" for m in receiver.lines()):
            break
        select.select([receiver.stdout], [], [], 0.2)
    for msg in receiver.lines():
        if msg.get("type") == "error":
            return str(msg.get("message") or "")
    return ""


class _Agent:
    """An agent stream channel read as JSON lines without blocking (for `direct`)."""

    def __init__(self, channel: paramiko.Channel, who: str):
        self.channel, self.who = channel, who
        self.buf = b""
        self.stderr = bytearray()
        self.ended = False
        self.result: dict | None = None
        self.error: dict | None = None
        channel.settimeout(0.0)

    def poll(self) -> list[dict]:
        """Events that arrived since the last call; sets result/error/ended as they come."""
        out = []
        while self.channel.recv_stderr_ready():
            self.stderr.extend(self.channel.recv_stderr(65536))
            del self.stderr[:-65536]
        while not self.ended:
            try:
                chunk = self.channel.recv(65536)
            except TimeoutError:
                break
            except (OSError, paramiko.SSHException, EOFError):
                chunk = b""
            if not chunk:
                self.ended = True
                break
            self.buf += chunk
        lines = self.buf.split(b"\n")
        self.buf = b"" if self.ended else lines.pop()
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if msg.get("type") == "result":
                self.result = msg.get("data") or {}
            elif msg.get("type") == "error":
                self.error = msg
            else:
                out.append(msg)
        return out

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None or self.ended

    def failure(self) -> AgentFailed:
        if self.error is not None:
            return AgentFailed(self.error.get("message") or f"The {self.who} failed.", self.error.get("details") or "")
        tail = self.stderr.decode(errors="replace")[-4000:]
        if not self.channel.get_transport().is_active():
            return AgentFailed(f"The connection to the {self.who} was lost.", tail)
        return AgentFailed(f"The {self.who} ended without a result.", tail)


def direct(
    sender: HostConnection,
    receiver: HostConnection,
    params: dict,
    route: dict,
    on_bytes: Callable[[int], None] | None = None,
    on_tick: Callable[[], None] | None = None,
    timeout: float = 3600,
) -> tuple[int, dict]:
    """Have the sender agent stream a tar straight to the receiver agent over TLS 1.3.

    Only for hosts an admin allowed (`route` from core.fleet.direct_route). The receiver
    listens on its own address for one connection from the sender's address; both ends
    present certificates made for this one stream (hosts/pagecerts.py), each pinned by the
    other, and inside, the connection brings a one-time token; keys and token travel to both
    agents inside their parameters over SSH (never in a command line, never logged). The worker
    keeps both agents' standard input open: when it closes a channel (a failure, a cancel
    raised by on_bytes/on_tick, its own death) that agent stops at once. The receiver
    reports bytes as they arrive. Both agents hash the stream and the digests are compared
    here (they travel over SSH), so bytes altered on the way fail the transfer (the caller's
    recovery removes what arrived). Returns (bytes moved, the receiver's result)."""
    token = secrets.token_hex(32)
    keys = PageLinkKeys(0)
    channels: list[paramiko.Channel] = []
    try:
        rch = receiver.open_stream(
            "receive",
            {
                **params,
                "direct": {
                    "listen": route["target_address"],
                    "peer": route["source_address"],
                    "token": token,
                    "tls": keys.tls("target"),
                },
            },
        )
        channels.append(rch)
        recv = _Agent(rch, "receiving host")
        port = None
        deadline = time.monotonic() + 120  # the receiver may first wait for the container's lock
        while port is None:
            for msg in recv.poll():
                if isinstance(msg.get("listening"), int):
                    port = msg["listening"]
            if port is None and recv.done:
                raise recv.failure()
            if time.monotonic() > deadline:
                raise SSHError("The receiving host did not start listening within 120 s.")
            if on_tick:
                on_tick()
            if port is None:
                select.select([rch], [], [], 0.2)
        sch = sender.open_stream(
            "send",
            {
                **params,
                "direct": {
                    "bind": route["source_address"],
                    "address": route["target_address"],
                    "port": port,
                    "token": token,
                    "tls": keys.tls("source"),
                },
            },
        )
        channels.append(sch)
        send = _Agent(sch, "sending host")
        total = 0
        deadline = time.monotonic() + timeout
        while not (recv.done and send.done):
            for msg in recv.poll():
                if isinstance(msg.get("bytes"), int) and msg["bytes"] > total:
                    total = msg["bytes"]
                    if on_bytes:
                        on_bytes(total)
            send.poll()
            if recv.error is not None or (recv.ended and recv.result is None):
                raise recv.failure()
            if send.error is not None or (send.ended and send.result is None):
                # The receiver usually knows best why (its disk filled up, say): give it a moment.
                until = time.monotonic() + 3
                while not recv.done and time.monotonic() < until:
                    recv.poll()
                    select.select([rch], [], [], 0.2)
                raise (recv.failure() if recv.error is not None else send.failure())
            if time.monotonic() > deadline:
                raise SSHError("The transfer did not finish in time.")
            if on_tick:
                on_tick()
            if not (recv.done and send.done):
                select.select([ch for ch, a in ((rch, recv), (sch, send)) if not a.done], [], [], 0.2)
        result = recv.result or {}
        moved = int(result.get("bytes") or 0)
        sent = send.result or {}
        if sent.get("bytes") != moved:
            raise AgentFailed(f"The receiving host got {moved} bytes of the {sent.get('bytes')} the sending host sent.")
        # A second check beside TLS and the stream's MAC: both ends report the stream's
        # HMAC, and the digests come here over SSH. A difference means a changed stream.
        if not sent.get("sha256") or sent.get("sha256") != result.get("sha256"):
            raise AgentFailed(
                "What the receiving host got differs from what the sending host sent (the stream's HMAC-SHA256 differs): "
                "the direct stream was altered on the network."
            )
        if on_bytes and moved != total:
            on_bytes(moved)
        return moved, result
    finally:
        for channel in channels:
            try:
                channel.close()
            except Exception:  # noqa: BLE001 (gone already)
                pass


def _shutdown(channel: paramiko.Channel) -> None:
    try:
        channel.shutdown_write()
    except Exception:  # noqa: BLE001 (gone already)
        pass


class PagePump:
    """Carry a post-copy's pages between the two hosts' page relays, for as long as it takes.

    Each round starts `pages-attach` on both hosts (each a session on that host's SSHLink,
    one OpenSSH connection held for as long as it works, made again only once it ended) and
    splices bytes both ways; when either link or either end breaks, the round ends and a new
    one starts after a short backoff. A round starts no session on either host until both
    links are up: a host that does not answer costs the other one nothing. A pump made with
    `gated=True` opens its links at once but starts no round until `open_gate()`: a post-copy's
    target has no relay to attach to until its restore starts one, and rounds tried before that
    (an agent started on each host every 0.1 s, each failing on the target) take CPU from the
    dump, the transfer and the restore while the container is down. The
    relays' protocol (offsets, acks, a hello on each attach) makes the rounds one stream: no
    CRIU process sees its connection close. Bytes and rounds are counted so the caller can
    judge progress."""

    path = "ssh-relay"  # the pages cross this worker (postcopy.DirectPages: they do not)

    def __init__(self, source, target, params: dict, gated: bool = False):
        self.source, self.target, self.params = source, target, params
        self._gate = threading.Event()
        if not gated:
            self._gate.set()
        self.bytes_down = 0  # source -> target (pages)
        self.bytes_up = 0  # target -> source (requests)
        self.rounds = 0
        self.errors: list[str] = []
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self._procs: list[AgentProcess] = []
        self._links: list[SSHLink | None] = [None, None]
        self._thread = threading.Thread(target=self._run, daemon=True, name="ctweb-page-pump")

    def start(self) -> PagePump:
        self._thread.start()
        return self

    def open_gate(self) -> None:
        """The target's relay is up (or the caller cannot wait longer): rounds may start."""
        self._gate.set()

    def stop(self) -> None:
        self._stop.set()
        self._gate.set()
        for p in list(self._procs):
            p.kill()
        for link in list(self._links):
            if link is not None:
                link.kill()
        self._thread.join(15)

    def _note(self, msg: str) -> None:
        self.errors.append(f"{time.strftime('%H:%M:%S')} {msg}")
        del self.errors[:-50]

    def _run(self) -> None:
        from django.db import connection

        delay = 0.1
        started = time.monotonic()
        paths: list[str | None] = [None, None]
        try:
            while not self._stop.is_set():
                before = self.bytes_down + self.bytes_up
                procs: list[AgentProcess] = []
                try:
                    hosts = (self.source, self.target)
                    for i, host in enumerate(hosts):
                        if paths[i] is None:
                            with connect(host) as c:
                                paths[i] = c.ensure_agent()
                    for i, who in enumerate(("source", "target")):
                        link = self._links[i]
                        if link is None or not link.alive():
                            if link is not None:
                                self._links[i] = None
                                link.close()
                                self._note(f"{who}: the link ended; connecting again")
                            self._links[i] = link = SSHLink(hosts[i], who)
                            try:
                                link.wait_ready(self._stop)
                            except SSHError:
                                self._links[i] = None
                                link.close()
                                raise
                    self._gate.wait()  # the links are ready meanwhile; stop() opens it too
                    if self._stop.is_set():
                        break
                    for i, who in enumerate(("source", "target")):
                        procs.append(AgentProcess(hosts[i], paths[i], "pages-attach", self.params, who, self._links[i]))
                        self._procs = procs
                    if self._stop.is_set():
                        break
                    a, b = procs
                    self.rounds += 1
                    up = threading.Thread(target=self._copy, args=(b, a, "bytes_up"), daemon=True)
                    up.start()
                    self._copy(a, b, "bytes_down")
                    up.join(10)
                    for p in (a, b):
                        err = p.tail().strip()
                        if err:
                            self._note(f"{p.who}: {err.splitlines()[-1]}")
                except (SSHError, paramiko.SSHException, OSError, EOFError) as e:
                    self._note(f"{e or type(e).__name__}")
                finally:
                    for p in procs:
                        p.close()
                    self._procs = []
                moved = self.bytes_down + self.bytes_up > before
                if moved or time.monotonic() - started < 60:
                    delay = 0.1  # e.g. the target's relay starts with the restore, just after us
                else:
                    delay = min(delay * 1.5, 3.0)
                self._stop.wait(delay)
        finally:
            for i, link in enumerate(self._links):
                self._links[i] = None
                if link is not None:
                    link.close()
            connection.close()

    def _copy(self, src: AgentProcess, dst: AgentProcess, counter: str) -> None:

        def moved(n: int) -> None:
            setattr(self, counter, getattr(self, counter) + n)
            self.last_progress = time.monotonic()

        try:
            # The page path may rest for long (no fault): a dead link ends the ssh process
            # (ServerAlive), which ends the stream here.
            _splice(src, dst, moved, stall_in=float("inf"), stall_out=settings.SSH_DEAD_AFTER_S * 2, stop=self._stop)
        except _Stalled:
            self._note(f"{counter}: the {dst.who} took nothing for {settings.SSH_DEAD_AFTER_S * 2:.0f} s")
        except OSError as e:
            self._note(f"{counter}: {e.strerror or e}")
        finally:
            for p in (src, dst):  # the other direction ends too: the round is over
                p.kill()
