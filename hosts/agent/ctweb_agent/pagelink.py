"""Post-copy pages host to host (only where an admin allowed direct transfer): the link
between the two hosts' page relays over TLS 1.3, both ends authenticated.

The dashboard makes two certificates for each migration (one per host, each self-signed,
fresh keys) and hands each agent its own certificate and key and the peer's certificate,
in its JSON parameters over SSH. The agent writes them only into the migration's
root-only directory (0600 files in the 0700 directory; never logged, never on a command
line). Each side trusts exactly the peer's certificate (the only entry of its trust store)
and checks its SHA-256 again after the handshake: no one else can connect, read or inject.

The source's relay listens on the source's own address (ephemeral port, the migrate-dump
result says which) and takes connections from the target's address only; the target's
relay connects (from its own address) and connects again with backoff whenever the link
breaks: the relays' protocol (HELLO with offsets, ACKs, unacknowledged data kept) makes
the connections one stream. A dead TCP connection (a network cut) is noticed by TCP
keepalives and TCP_USER_TIMEOUT. If the target cannot establish the link within
SETUP_S, it gives direct up for good and the pages go through the dashboard (its page
pump attaches as without direct transfer; an attach through the dashboard ends the direct
link on either relay for good)."""

import hashlib
import ipaddress
import json
import os
import shutil
import socket
import ssl
import tempfile
import time

from .common import AgentError

TLS_PARAMS = "page-tls.json"  # the addresses and the peer's fingerprint (no key)
OWN_KEY = "page-tls-own.key"
OWN_CERT = "page-tls-own.pem"
PEER_CERT = "page-tls-peer.pem"
SETUP_S = 10.0  # the target's first link must be up by then, else the pages go through the dashboard
CONNECT_TIMEOUT_S = 5.0  # one connection attempt (TCP connect, then the TLS handshake)
BACKOFF_MAX_S = 5.0
HANDSHAKE_S = 10.0  # an accepted connection must finish its handshake within this
MAX_PENDING = 4  # handshakes in progress on the listening side
MAX_PEM = 16384
# A dead link (a cut): unacknowledged data for this long, or an idle link that stops
# answering keepalives (5 s idle, then 3 probes 2 s apart), ends the connection.
USER_TIMEOUT_MS = 15000
KEEPIDLE_S, KEEPINTVL_S, KEEPCNT = 5, 2, 3


def _pem(value, kind, what):
    begin, end = f"-----BEGIN {kind}-----", f"-----END {kind}-----"
    if not isinstance(value, str) or len(value) > MAX_PEM or not value.strip().startswith(begin):
        raise AgentError(f"Bad direct page link parameters ({what}).")
    if not value.strip().endswith(end) or value.count("-----BEGIN") != 1:
        raise AgentError(f"Bad direct page link parameters ({what}).")
    return value.strip() + "\n"


def _ip(value, what):
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise AgentError(f"Bad direct page link address ({what}).") from None


def check_tls(d):
    """A direct stream's `tls` parameters: this host's certificate and key, the peer's certificate."""
    if not isinstance(d, dict):
        raise AgentError("Bad direct-transfer TLS parameters.")
    out = {
        "cert": _pem(d.get("cert"), "CERTIFICATE", "cert"),
        "key": _pem(d.get("key"), "PRIVATE KEY", "key"),
        "peer_cert": _pem(d.get("peer_cert"), "CERTIFICATE", "peer_cert"),
    }
    try:
        out["peer_fingerprint"] = fingerprint(out["peer_cert"])
    except (ValueError, TypeError):
        raise AgentError("Bad direct-transfer TLS parameters (peer_cert).") from None
    return out


def check_params(d, role):
    """The `direct_pages` parameters of migrate-dump (role source: listen, peer) or
    migrate-restore (role target: bind, address, port), with the certificates; checked
    before anything changes."""
    if not isinstance(d, dict):
        raise AgentError("Bad direct page link parameters.")
    out = {
        "cert": _pem(d.get("cert"), "CERTIFICATE", "cert"),
        "key": _pem(d.get("key"), "PRIVATE KEY", "key"),
        "peer_cert": _pem(d.get("peer_cert"), "CERTIFICATE", "peer_cert"),
    }
    try:
        out["peer_fingerprint"] = fingerprint(out["peer_cert"])
    except (ValueError, TypeError):
        raise AgentError("Bad direct page link parameters (peer_cert).") from None
    if role == "source":
        out["listen"], out["peer"] = _ip(d.get("listen"), "listen"), _ip(d.get("peer"), "peer")
    else:
        out["bind"], out["address"] = _ip(d.get("bind"), "bind"), _ip(d.get("address"), "address")
        port = d.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise AgentError("Bad direct page link port.")
        out["port"] = port
    return out


def fingerprint(pem):
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def _write_private(path, text):
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def install(mdir, role, d):
    """Write the checked parameters into the migration's root-only directory for the relay."""
    _write_private(os.path.join(mdir, OWN_KEY), d["key"])
    _write_private(os.path.join(mdir, OWN_CERT), d["cert"])
    _write_private(os.path.join(mdir, PEER_CERT), d["peer_cert"])
    public = {k: v for k, v in d.items() if k not in ("cert", "key", "peer_cert")}
    _write_private(os.path.join(mdir, TLS_PARAMS), json.dumps({**public, "role": role}))


def context(mdir, server):
    """TLS 1.3 only, our certificate, and the peer's certificate as the only one trusted."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(os.path.join(mdir, OWN_CERT), os.path.join(mdir, OWN_KEY))
    ctx.load_verify_locations(cafile=os.path.join(mdir, PEER_CERT))
    ctx.check_hostname = False  # no names: the peer's exact certificate is pinned
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server:
        ctx.num_tickets = 0  # no session resumption: one handshake, one certificate check each
    return ctx


def stream_context(tls, server):
    """The context of a direct stream: as context(), from checked parameters held in memory
    (OpenSSL reads a key only from a file: it lives for a moment in a private directory)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    tmp = tempfile.mkdtemp(prefix="ctweb-tls-")  # 0700
    try:
        for name in ("cert", "key"):
            fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(tls[name])
        ctx.load_cert_chain(os.path.join(tmp, "cert"), os.path.join(tmp, "key"))
    except (OSError, ssl.SSLError, ValueError):
        raise AgentError("Bad direct-transfer TLS parameters (cert, key).") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ctx.load_verify_locations(cadata=tls["peer_cert"])
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server:
        ctx.num_tickets = 0
    return ctx


def pinned(s, fingerprint_hex):
    """After the handshake: the peer presented exactly the pinned certificate."""
    peer = s.getpeercert(binary_form=True)
    if not peer or hashlib.sha256(peer).hexdigest() != fingerprint_hex:
        raise ssl.SSLError("the peer's certificate is not the pinned one")
    return s


def why(e):
    return _why(e)


def tune(sock):
    """Large buffers, and a dead peer noticed within seconds (keepalives, TCP_USER_TIMEOUT)."""
    for opt, value in (
        ((socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1),
        ((socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None)), KEEPIDLE_S),
        ((socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None)), KEEPINTVL_S),
        ((socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None)), KEEPCNT),
        ((socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None)), USER_TIMEOUT_MS),
        ((socket.IPPROTO_TCP, socket.TCP_NODELAY), 1),
    ):
        if opt[1] is None:
            continue
        try:
            sock.setsockopt(opt[0], opt[1], value)
        except OSError:
            pass


def _why(e):
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"its certificate is not the one this migration pinned ({e.verify_message})"
    return getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__


def _family(address):
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


class DirectLink:
    """One relay's side of the direct link: the listener and the handshakes in progress
    (source), or the connection attempts with backoff (target). The relay's loop asks for
    descriptors to wait on, hands back what is ready, and gets verified TLS connections."""

    def __init__(self, mdir, role):
        with open(os.path.join(mdir, TLS_PARAMS)) as f:
            self.cfg = json.load(f)
        self.mdir, self.role = mdir, role
        self.state = "connecting"  # connecting | up | down | failed | off
        self.error = None
        self.connects = 0  # verified links made
        self.refused = 0  # connections refused (wrong address, failed handshake)
        self.port = None
        self.srv = None
        self.pending = {}  # listening side: SSLSocket -> (deadline, wants write)
        self.started = time.monotonic()
        self.next_try = 0.0
        self.backoff = 0.2
        self.ever_up = False
        self.ctx = context(mdir, server=role == "source")
        if role == "source":
            try:
                srv = socket.socket(_family(self.cfg["listen"]), socket.SOCK_STREAM)
                srv.bind((self.cfg["listen"], 0))
                srv.listen(8)
                srv.setblocking(False)
                self.srv, self.port = srv, srv.getsockname()[1]
            except OSError as e:
                self._fail(f"cannot listen on {self.cfg['listen']} ({e.strerror or e})")

    @property
    def active(self):
        return self.state in ("connecting", "up", "down")

    def _fail(self, why, state="failed"):
        self.state, self.error = state, why
        if self.srv is not None:
            self.srv.close()
            self.srv = None
        for s in self.pending:
            s.close()
        self.pending.clear()

    def give_up(self, why):
        """For good: the pages go through the dashboard from now on."""
        if self.active:
            self._fail(why, "off" if self.ever_up else "failed")

    def _verified(self, s):
        pinned(s, self.cfg["peer_fingerprint"])
        s.setblocking(False)
        self.connects += 1
        return s

    # --- the relay's loop ---------------------------------------------------------
    def read_fds(self):
        return ([self.srv] if self.srv is not None else []) + [s for s, (_, w) in self.pending.items() if not w]

    def write_fds(self):
        return [s for s, (_, w) in self.pending.items() if w]

    def on_ready(self, ready):
        """Accept and handshake on the listening side; return a verified connection or None."""
        if not self.active or self.srv is None:
            return None
        now = time.monotonic()
        if self.srv in ready:
            try:
                conn, addr = self.srv.accept()
            except OSError:
                conn = None
            if conn is not None:
                if ipaddress.ip_address(addr[0]) != ipaddress.ip_address(self.cfg["peer"]) or (
                    len(self.pending) >= MAX_PENDING
                ):
                    conn.close()  # only the target host may connect
                    self.refused += 1
                else:
                    tune(conn)
                    conn.setblocking(False)
                    s = self.ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                    self.pending[s] = (now + HANDSHAKE_S, False)
                    ready = list(ready) + [s]
        done = None
        for s, (deadline, _) in list(self.pending.items()):
            if s not in ready and now < deadline:
                continue
            try:
                if now >= deadline:
                    raise TimeoutError("handshake took too long")
                s.do_handshake()
                done = self._verified(s)
                del self.pending[s]
                break
            except ssl.SSLWantReadError:
                self.pending[s] = (deadline, False)
            except ssl.SSLWantWriteError:
                self.pending[s] = (deadline, True)
            except (OSError, ValueError) as e:
                del self.pending[s]
                s.close()
                self.refused += 1
                self.error = f"refused a connection: {_why(e)}"
        return done

    def connect_due(self):
        """Connecting side, no link: one attempt when due; a verified connection or None."""
        if self.role != "target" or not self.active:
            return None
        now = time.monotonic()
        if not self.ever_up and now - self.started > SETUP_S:
            self._fail(f"no link within {SETUP_S:.0f} s ({self.error or 'no answer'})")
            return None
        if now < self.next_try:
            return None
        sock = socket.socket(_family(self.cfg["address"]), socket.SOCK_STREAM)
        try:
            tune(sock)
            sock.bind((self.cfg["bind"], 0))  # from our own address: the source checks it
            left = CONNECT_TIMEOUT_S if self.ever_up else max(0.5, SETUP_S - (now - self.started))
            sock.settimeout(min(CONNECT_TIMEOUT_S, left))
            sock.connect((self.cfg["address"], self.cfg["port"]))
            s = self.ctx.wrap_socket(sock, server_side=False)
            self.backoff = 0.2
            return self._verified(s)
        except (OSError, ValueError) as e:
            sock.close()
            self.error = f"{self.cfg['address']} port {self.cfg['port']}: {_why(e)}"
            self.next_try = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)
            if self.state == "up":
                self.state = "down"
            return None

    def link_up(self):
        self.state, self.ever_up, self.error = "up", True, None

    def link_lost(self, why):
        if self.active:
            self.state, self.error = "down", why
            self.next_try = time.monotonic() + 0.1

    def status(self):
        return {
            "state": self.state,
            "port": self.port,
            "connects": self.connects,
            "refused": self.refused,
            "error": self.error,
        }
