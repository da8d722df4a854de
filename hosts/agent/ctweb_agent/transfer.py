"""Direct host-to-host transfer (only on networks an admin allowed): the one-time token, the
hello and the HMAC-SHA256 trailer, the listening receiver and the connecting sender."""

import hashlib
import hmac
import ipaddress
import os
import re
import select
import socket
import ssl
import sys
import time

from . import pagelink
from .common import AgentError, event

# --- direct transfer (only on networks an admin allowed) ----------------------------------
# The dashboard hands both agents the same one-time token over SSH. `receive` with
# direct={"listen": A, "peer": B, "token": T} listens on A (this host's own address) on an
# ephemeral port, says which in an event ("listening"), takes one connection from B that
# starts with the hello derived from the token, and stages the tar that follows with every
# check of a relayed one. `send` with direct={"bind": B, "address": A, "port": P, "token": T}
# connects from B to A:P, sends the hello, the tar, then a trailer: HMAC-SHA256 of every byte
# after the hello, keyed with another key derived from the token. The receiver puts nothing
# in place before that trailer is verified. The token itself never crosses the network (only
# HMAC(token, "hello") does, which gives nothing of the MAC key), so someone on the path can
# neither alter, truncate nor replace the stream unnoticed. The bytes are NOT encrypted. Both
# give up when the other side stalls, and stop at once when their standard input ends: the
# dashboard went away, was cancelled or gave up (it never writes more than the parameters line).

TOKEN_RE = re.compile(r"^[0-9a-f]{64}$")
DIRECT_CHUNK = 1 << 20
DIRECT_MAC_BYTES = 32


def _direct_keys(token):
    """(the hello line sent in the clear, the stream's MAC key), both derived from the token."""
    key = bytes.fromhex(token)
    hello = hmac.new(key, b"ctweb-direct-hello", hashlib.sha256).hexdigest()
    return (hello + "\n").encode(), hmac.new(key, b"ctweb-direct-mac", hashlib.sha256).digest()


def _direct_params(params, addresses):
    d = params.get("direct")
    if not isinstance(d, dict):
        raise AgentError("Bad direct-transfer parameters.")
    token = d.get("token")
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
        raise AgentError("Bad direct-transfer token.")
    out = {"token": token}
    for key in addresses:
        value = d.get(key)
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            out[key] = ipaddress.ip_address(value)
        except ValueError:
            raise AgentError(f"Bad direct-transfer address ({key}).") from None
    if d.get("tls") is not None:  # TLS 1.3 with this transfer's certificates (the dashboard always sends them)
        out["tls"] = pagelink.check_tls(d["tls"])
    if "port" in d or "address" in addresses:
        port = d.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise AgentError("Bad direct-transfer port.")
        out["port"] = port
    return out


def _stdin_fd():
    return sys.stdin.buffer.fileno()


def _check_dashboard(fd):
    """Called when standard input is readable: its end means the dashboard let go."""
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return
    if not data:
        raise AgentError("The dashboard ended the transfer (it was cancelled, failed elsewhere or lost its link).")


def _family(address):
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _direct_accept(d, stall):
    """Listen on our address; return the one connection from the peer that brings the token."""
    srv = socket.socket(_family(d["listen"]), socket.SOCK_STREAM)
    try:
        try:
            srv.bind((str(d["listen"]), 0))
        except OSError as e:
            raise AgentError(
                f"Cannot listen on {d['listen']} ({e.strerror or e}): for direct transfer, the address the "
                "dashboard knows this host by must be one of the host's own."
            ) from None
        srv.listen(4)
        port = srv.getsockname()[1]
        event("transfer", f"listening on {d['listen']}:{port} for {d['peer']}", listening=port)
        fd = _stdin_fd()
        deadline = time.monotonic() + stall
        expected = _direct_keys(d["token"])[0]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"{d['peer']} did not connect within {stall} s.")
            ready, _, _ = select.select([srv, fd], [], [], left)
            if fd in ready:
                _check_dashboard(fd)
            if srv not in ready:
                continue
            conn, addr = srv.accept()
            if ipaddress.ip_address(addr[0]) != d["peer"]:
                conn.close()  # only the source host may feed us; anyone else is ignored
                event("transfer", f"ignored a connection from {addr[0]} (not {d['peer']})")
                continue
            got = b""
            conn.settimeout(min(stall, 30))
            if d.get("tls"):
                try:
                    conn = pagelink.pinned(
                        pagelink.stream_context(d["tls"], server=True).wrap_socket(conn, server_side=True),
                        d["tls"]["peer_fingerprint"],
                    )
                except (OSError, ValueError) as e:
                    conn.close()
                    raise AgentError(
                        f"A connection from {d['peer']} did not present this transfer's certificate "
                        f"({pagelink.why(e)}): refused."
                    ) from None
            try:
                while len(got) < len(expected):
                    chunk = conn.recv(len(expected) - len(got))
                    if not chunk:
                        break
                    got += chunk
            except OSError:
                pass
            if not hmac.compare_digest(got, expected):
                conn.close()
                raise AgentError(f"A connection from {d['peer']} did not bring this transfer's token (hello): refused.")
            conn.settimeout(None)
            return conn
    finally:
        srv.close()


class _DirectIn:
    """The tar from the source host's socket: gives up on a stall, stops when the dashboard
    lets go, and reports the bytes received (the dashboard shows them as progress). The last
    DIRECT_MAC_BYTES of the stream are the sender's MAC of everything before them: held
    back from the tar reader and checked by verify()."""

    def __init__(self, conn, stall_s, token):
        self.conn, self.stall_s, self.fd = conn, stall_s, _stdin_fd()
        self.tls = isinstance(conn, ssl.SSLSocket)
        self._buf = memoryview(bytearray(DIRECT_CHUNK))  # TLS gives a record (16 KiB) per read
        if self.tls:
            conn.setblocking(False)  # read until TLS has nothing more; select() waits
        self.bytes, self._said = 0, 0.0
        self.mac = hmac.new(_direct_keys(token)[1], digestmod=hashlib.sha256)
        # Reported as "sha256" and compared by the dashboard with the sender's, over SSH: the
        # HMAC-SHA256 of the stream (one pass over the bytes does both jobs).
        self.hash = self.mac
        self.pending = bytearray()  # received, MACed, not yet handed on
        self.tail = b""  # the last bytes received: the trailer once the sender has closed
        self.eof = False

    def _wait(self):
        if self.tls and self.conn.pending():
            return  # decrypted already: select() would not see it
        while True:
            ready, _, _ = select.select([self.conn, self.fd], [], [], self.stall_s)
            if not ready:
                raise AgentError(f"Nothing arrived for {self.stall_s} s: the transfer was cut off.")
            if self.fd in ready:
                _check_dashboard(self.fd)
            if self.conn in ready:
                return

    def _recv(self, size):
        self._wait()
        if self.tls:
            filled, ended = 0, False
            while filled < len(self._buf):
                try:
                    n = self.conn.recv_into(self._buf[filled:])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                except OSError as e:
                    raise AgentError(f"The sending host's connection broke ({pagelink.why(e)}).") from None
                if not n:
                    ended = True
                    break
                filled += n
            if not filled and not ended:
                return  # nothing yet (select woke for a partial record)
            data = bytes(self._buf[:filled])
            if not data:
                self.eof = True
                return
        else:
            try:
                data = self.conn.recv(size)
            except OSError as e:
                raise AgentError(f"The sending host's connection broke ({e.strerror or e}).") from None
        if not data:
            self.eof = True
            return
        self.bytes += len(data)
        data = self.tail + data
        cut = len(data) - DIRECT_MAC_BYTES
        if cut > 0:
            self.mac.update(data[:cut])
            self.pending += data[:cut]
            self.tail = data[cut:]
        else:
            self.tail = data
        now = time.monotonic()
        if now - self._said >= 0.25:
            self._said = now
            event("transfer", f"{self.bytes / 1048576:.1f} MiB received", bytes=self.bytes)

    def read(self, size=-1):
        size = DIRECT_CHUNK if size is None or size < 0 else size
        while not self.eof and not self.pending:
            self._recv(DIRECT_CHUNK)  # big reads: the tar reader asks for 10 KiB at a time
        data = bytes(self.pending[:size])
        del self.pending[:size]
        return data

    def drain(self):
        """After the tar's end: read up to the sender's end of stream, so it knows we have it all."""
        extra = 0
        while True:
            data = self.read(1 << 16)
            if not data:
                break
            extra += len(data)
            if extra > (16 << 20):
                raise AgentError("The sending host went on sending after the end of the tar.")
        event("transfer", f"{self.bytes / 1048576:.1f} MiB received", bytes=self.bytes)

    def verify(self):
        if self.pending or len(self.tail) != DIRECT_MAC_BYTES or not hmac.compare_digest(self.tail, self.mac.digest()):
            raise AgentError(
                "The direct stream failed its authentication (altered, cut short or not sent by the source "
                "host's agent): nothing of it was put in place."
            )


class _DirectOut:
    """The tar to the target host's socket, in 1 MiB writes; stops when the dashboard lets go."""

    def __init__(self, conn, stall_s, mac_key):
        self.conn, self.stall_s, self.fd = conn, stall_s, _stdin_fd()
        self.buf = bytearray()
        self.bytes = 0
        self.broken = ""  # the sentence of a send that failed: every later write says it again
        self.mac = hmac.new(mac_key, digestmod=hashlib.sha256)
        self.hash = self.mac  # the "sha256" the dashboard compares: the stream's HMAC-SHA256
        conn.settimeout(stall_s)  # for each 1 MiB write

    def write(self, data):
        if self.broken:
            # tarfile writes its last block while it unwinds from our error: the same sentence
            # again, not a second failure of another kind.
            raise AgentError(self.broken)
        self.buf += data
        if len(self.buf) >= DIRECT_CHUNK:
            self.flush()
        return len(data)

    def flush(self, trailer=False):
        if self.broken:
            raise AgentError(self.broken)
        ready, _, _ = select.select([self.fd], [], [], 0)
        if ready:
            _check_dashboard(self.fd)
        if not self.buf:
            return
        if not trailer:
            self.mac.update(self.buf)
        # The chunk leaves self.buf before it is sent: a TLS socket's failed sendall leaves a view of
        # what it sent in its traceback, and a bytearray with a view alive cannot grow again.
        chunk, self.buf = self.buf, bytearray()
        try:
            self.conn.sendall(chunk)
        except TimeoutError:
            self.broken = f"The receiving host took nothing for {self.stall_s} s."
        except OSError as e:
            self.broken = f"The receiving host closed the connection ({e.strerror or e})."
        if self.broken:
            raise AgentError(self.broken)
        self.bytes += len(chunk)

    def finish(self):
        """All sent: end our side and wait for the receiver to read it all and close its own."""
        self.flush()
        self.buf += self.mac.digest()
        self.flush(trailer=True)
        self.conn.shutdown(socket.SHUT_WR)
        while True:
            ready, _, _ = select.select([self.conn, self.fd], [], [], self.stall_s)
            if not ready:
                raise AgentError(f"The receiving host did not finish reading within {self.stall_s} s.")
            if self.fd in ready:
                _check_dashboard(self.fd)
            if self.conn in ready:
                try:
                    if not self.conn.recv(4096):
                        return
                except OSError as e:
                    raise AgentError(f"The receiving host broke the connection ({e.strerror or e}).") from None


def _direct_connect(params):
    d = _direct_params(params, ("bind", "address"))
    stall = params.get("stall_s", 120)
    if not isinstance(stall, (int, float)) or not 1 <= stall <= 3600:
        raise AgentError("Bad stall_s.")
    conn = socket.socket(_family(d["address"]), socket.SOCK_STREAM)
    try:
        try:
            conn.bind((str(d["bind"]), 0))  # from our own address: the receiver checks it
        except OSError as e:
            raise AgentError(
                f"Cannot send from {d['bind']} ({e.strerror or e}): for direct transfer, the address the "
                "dashboard knows this host by must be one of the host's own."
            ) from None
        conn.settimeout(30)
        try:
            conn.connect((str(d["address"]), d["port"]))
            if d.get("tls"):
                conn = pagelink.pinned(
                    pagelink.stream_context(d["tls"], server=False).wrap_socket(conn), d["tls"]["peer_fingerprint"]
                )
            hello, mac_key = _direct_keys(d["token"])
            conn.sendall(hello)
        except OSError as e:  # ssl.SSLError too: the receiver did not present this transfer's certificate
            raise AgentError(f"Cannot connect to {d['address']} port {d['port']} ({pagelink.why(e)}).") from None
        return _DirectOut(conn, stall, mac_key)
    except BaseException:
        conn.close()
        raise
