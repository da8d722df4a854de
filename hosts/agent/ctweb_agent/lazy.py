"""Post-copy (lazy pages): the source's lazy dump, the target's lazy-pages daemon, the
resumable page relay between them, and the migrate-dump/-restore/-resume/-abort/-cleanup steps."""

import collections
import json
import os
import re
import select
import socket
import ssl
import struct
import subprocess
import sys
import time

from . import cow, mjournal, pagelink, prefetch
from . import state as S
from .common import (
    CHILD_UMASK,
    AgentError,
    _du,
    _flag,
    _ms,
    _read_json,
    _remove_tree,
    _starttime,
    _write_json,
    agent_file,
    check_name,
    event,
    run,
)
from .contents import _criu_stats, _image_files
from .criu import (
    _criu_dump,
    _criu_log,
    _criu_restore,
    _freezer_state,
    _has_saved_state,
    _replug,
    _replug_config,
    _state_dir,
    _state_images,
    _thaw,
    _unplug,
)
from .downtime import AnswerWatch, FreezeWatch
from .images import _remove_stages
from .lxc import _cdir, _exists, _require, _state
from .migrate import _mig_dir, _mig_marker

# --- post-copy (lazy pages) ---------------------------------------------------------------
# The source's `criu dump --lazy-pages` (run by lxc-checkpoint -s, options from
# CRIU_CONFIG_FILE) writes the images without memory pages, then serves the pages from the
# frozen tasks over a socketpair (--ps-socket: no port) to the source's page relay. On the
# target, `criu lazy-pages --page-server --ps-socket` talks over another socketpair to the
# target's page relay. The two relays speak a resumable protocol (offsets, acks, a hello
# on every reconnection) over whatever the dashboard provides: `pages-attach` channels it
# opens on both hosts and pumps between, and re-opens after any link or worker fault. So
# neither CRIU process ever sees its connection close until the target holds every page.
# The long-lived processes run detached under a small watcher that records their exit
# status, so later subcommands can wait for them.

LAZY_DUMP = "lazy-dump"  # <mig dir>/lazy-dump.{json,out,rc}: the source's dump + page server
LAZY_PAGES = "lazy-pages"  # <mig dir>/lazy-pages.{json,out,rc}: the target's lazy-pages daemon
PAGE_RELAY = "page-relay"  # <mig dir>/page-relay.{json,out,rc}: this host's page relay
RELAY_VERSION = 1  # the resumable page relay's protocol (the probe reports it)
RELAY_STATUS = "page-relay-status.json"


def _spawn_watched(argv, mdir, tag, env=None, keep_fd=None):
    """Start argv detached (own session, stdio to <tag>.out) under a watcher process that
    writes its exit status to <tag>.rc. Returns {"pid", "watcher"} once it runs.
    `keep_fd` is handed to the program as its descriptor 3 (e.g. CRIU's --ps-socket)."""
    out_path, rc_path, info_path = (os.path.join(mdir, f"{tag}.{ext}") for ext in ("out", "rc", "json"))
    for path in (rc_path, info_path):
        if os.path.exists(path):
            os.unlink(path)
    pid = os.fork()
    if pid == 0:  # first child: detach, then fork the watcher and leave
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            if keep_fd is not None:
                os.dup2(keep_fd, 3)  # inheritable: dup2 clears O_CLOEXEC
                os.closerange(4, 1 << 16)
            else:
                os.closerange(3, 1 << 16)
            if os.fork() != 0:
                os._exit(0)
            try:
                kept = (3,) if keep_fd is not None else ()
                p = subprocess.Popen(
                    argv, stdin=0, stdout=1, stderr=2, env=env, close_fds=True, pass_fds=kept, umask=CHILD_UMASK
                )
                if kept:
                    os.close(3)  # only the program holds it: its end is the program's end
            except OSError as e:
                _write_json(rc_path + ".json", {"rc": 127, "error": str(e)})
                os.replace(rc_path + ".json", rc_path)
                os._exit(0)
            _write_json(
                info_path,
                {
                    "pid": p.pid,
                    "watcher": os.getpid(),
                    # A pid names its process only with its start time: after the host
                    # restarted (a crash), a new process may have the same pid.
                    "pid_start": _starttime(p.pid),
                    "watcher_start": _starttime(os.getpid()),
                    "argv": argv,
                    "started": time.time(),
                },
            )
            rc = p.wait()
            _write_json(rc_path + ".json", {"rc": rc, "ended": time.time()})
            os.replace(rc_path + ".json", rc_path)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    for _ in range(100):
        info = _read_json(info_path)
        if info or os.path.exists(rc_path):
            return info or {}
        time.sleep(0.02)
    raise AgentError(f"{argv[0]} did not start.")


def _watched_rc(mdir, tag):
    """The exit status of a watched process, or None while it runs."""
    data = _read_json(os.path.join(mdir, f"{tag}.rc"))
    if data is not None:
        return data.get("rc")
    info = _read_json(os.path.join(mdir, f"{tag}.json"))
    if not info or not _pid_alive(info.get("watcher"), info.get("watcher_start")):
        return -1 if info else None  # the watcher died without a word (or the host restarted)
    return None


def _pid_alive(pid, start=None):
    """Is pid alive, and (when its start time was recorded) still the same process?"""
    if not isinstance(pid, int) or pid <= 1:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[-1].split()
    except OSError:
        return False
    if fields[0] == "Z":
        return False
    return start is None or fields[19] == str(start)


def _kill_watched(mdir, tag, sig=15):
    info = _read_json(os.path.join(mdir, f"{tag}.json")) or {}
    pid = info.get("pid")
    if _watched_rc(mdir, tag) is None and _pid_alive(pid, info.get("pid_start")):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
        return True
    return False


def _tail(path, n=40):
    try:
        with open(path, errors="replace") as f:
            return "\n".join(f.read().splitlines()[-n:])
    except OSError:
        return ""


def _listening(port):
    """Is something listening on 127.0.0.1:port (or any address) in this network namespace?"""
    want = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    try:
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[1] in want and parts[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def _criu_config(mdir, tag, lines):
    path = os.path.join(mdir, f"criu-{tag}.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return dict(os.environ, CRIU_CONFIG_FILE=path)


def _private_dir(mdir):
    """The migration's directory holds the page relay's socket and status: root only."""
    os.makedirs(mdir, exist_ok=True)
    os.chmod(mdir, 0o700)


def _start_relay(mdir, role, direct=None, read_ahead=False):
    """Start this host's page relay for a post-copy; return the socket CRIU must use.
    CRIU gets the other end of a socketpair as --ps-socket: no port is ever opened for it.
    `direct`: the checked direct page link parameters (pagelink.check_params), written
    into the migration's root-only directory for the relay."""
    _private_dir(mdir)
    status = os.path.join(mdir, RELAY_STATUS)
    if os.path.exists(status):
        os.unlink(status)
    if direct is not None:
        pagelink.install(mdir, role, direct)
    mine, criu_end = socket.socketpair()
    try:
        cfg = {"dir": mdir, "role": role, "direct": direct is not None, "read_ahead": read_ahead}
        env = dict(os.environ, CTWEB_RELAY=json.dumps(cfg))
        _spawn_watched([sys.executable, agent_file(), "pages-relay"], mdir, PAGE_RELAY, env, mine.fileno())
    finally:
        mine.close()
    return criu_end


def _relay_status(mdir):
    return _read_json(os.path.join(mdir, RELAY_STATUS)) or {}


def _wait_direct(mdir, done, limit):
    """The relay's direct link status once `done(it)` holds (or at the limit)."""
    deadline = time.monotonic() + limit
    while True:
        d = _relay_status(mdir).get("direct") or {}
        if done(d) or time.monotonic() > deadline or _watched_rc(mdir, PAGE_RELAY) is not None:
            return d
        time.sleep(0.01)


def _lazy_dump(name, mdir, images, direct=None):
    """Start the lazy dump; return once the images are written. CRIU's page server then
    serves the frozen tasks' memory over a socketpair to this host's page relay."""
    criu_end = _start_relay(mdir, "source", direct)
    env = _criu_config(mdir, "dump", ["lazy-pages", "ps-socket 3"])
    argv = ["lxc-checkpoint", "-n", name, "-D", images, "-s"]
    unplugged = _unplug(name)  # no client segment may reach it once it dies (criu._unplug)
    t0 = time.monotonic()
    try:
        _spawn_watched(argv, mdir, LAZY_DUMP, env, criu_end.fileno())
    except BaseException:
        _replug(unplugged)
        raise
    finally:
        criu_end.close()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        rc = _watched_rc(mdir, LAZY_DUMP)
        if rc is not None:
            _kill_watched(mdir, PAGE_RELAY)
            _replug(unplugged, name)
            details = _criu_log(images, "dump")
            out = _tail(os.path.join(mdir, f"{LAZY_DUMP}.out"))
            if out.strip():
                details += "\n--- lxc-checkpoint ---\n" + out
            raise AgentError(
                f"CRIU could not dump {name} lazily (lxc-checkpoint exit status {rc}).",
                details,
                {"state": _state(name), "has_saved_state": _has_saved_state(name)},
            )
        if os.path.isfile(os.path.join(images, "inventory.img")):
            # CRIU writes the inventory last, then serves pages on the socketpair.
            time.sleep(0.05)
            if _watched_rc(mdir, LAZY_DUMP) is None:
                return _ms(t0)
            continue
        time.sleep(0.02)
    _kill_watched(mdir, LAZY_DUMP)
    _replug(unplugged, name)
    raise AgentError(f"The lazy dump of {name} did not start its page server within 300 s.", _criu_log(images, "dump"))


# The relays' frames: type (1 byte), value (8), payload length (4), payload.
_F_HELLO, _F_DATA, _F_ACK, _F_FIN, _F_ABORT = 1, 2, 3, 4, 5
_FRAME = struct.Struct(">BQI")
_RELAY_CHUNK = 256 * 1024
_FRAME_MAX = 4 * _RELAY_CHUNK  # a DATA frame's payload: 256 KiB through the dashboard, 1 MiB over TLS
_RELAY_WINDOW = 64 * 1024 * 1024  # unacknowledged bytes held before CRIU is read no further
_TLS_SEND = 1 << 20  # one TLS write (64 records): few Python calls per MiB
_TLS_READ = 8 << 20  # read a TLS link until it has nothing more, or this much


_TO_CRIU_MAX = 32 << 20  # bytes for our CRIU held before the link is read no further


class _Chunks:
    """Bytes in order, kept as the pieces they came in: appending, and dropping from the front,
    copy nothing of what stays (a bytearray cut at its front copies all of itself on its next
    growth: with tens of MiB held, that cost the relay most of its time)."""

    def __init__(self):
        self.q = collections.deque()
        self.head = 0  # bytes of q[0] already dropped
        self.n = 0

    def __len__(self):
        return self.n

    def append(self, data):
        if data:
            self.q.append(data)
            self.n += len(data)

    def read_at(self, pos, size):
        """Up to `size` bytes from `pos` (relative to the front), as one bytes (one copy)."""
        out, pos, left = [], pos + self.head, size
        for piece in self.q:
            if pos >= len(piece):
                pos -= len(piece)
                continue
            take = memoryview(piece)[pos : pos + left]
            out.append(take)
            left -= len(take)
            pos = 0
            if left <= 0:
                break
        if len(out) == 1 and len(out[0]) == len(out[0].obj):
            return out[0].obj  # a whole piece: no copy at all
        return b"".join(out)

    def peek(self, size):
        return self.read_at(0, size)

    def head_view(self, size):
        """Up to `size` bytes from the front of the first piece, without a copy."""
        return memoryview(self.q[0])[self.head : self.head + size] if self.q else b""

    def drop(self, size):
        size = min(size, self.n)
        self.n -= size
        size += self.head
        while self.q and size >= len(self.q[0]):
            size -= len(self.q.popleft())
        self.head = size if self.q else 0

    def clear(self):
        self.q.clear()
        self.head = self.n = 0


class _Relay:
    """One host's end of the page path: CRIU's socket on one side, the current attach
    connection (to the other host's relay, through the dashboard) on the other. Every byte
    from CRIU is kept until the peer acknowledges it; a new attach starts with a HELLO
    saying how much each side has, and the rest is sent again."""

    def __init__(self, mdir, role, criu_sock):
        self.mdir, self.role, self.criu = mdir, role, criu_sock
        self.criu.setblocking(False)
        self.out = _Chunks()  # from CRIU, not yet acknowledged by the peer
        self.out_base = 0  # offset of out[0]
        self.sent = 0  # offset sent on the current link
        self.to_criu = _Chunks()
        self.received = 0  # bytes from the peer, in order
        self.acked_sent = 0
        self.local_end = None  # "fin" or "abort" once CRIU's side ended
        self.peer_end = None  # ("fin", total) or ("abort", None)
        self.criu_shut = False
        self.link = None
        self.link_ready = False  # the peer's HELLO arrived on this link
        self.inbuf = bytearray()
        self.outq = _Chunks()
        self.attaches = 0
        self.done_at = None
        self.last_ack_t = 0.0
        self.last_status = 0.0
        self._end_sent = None  # the link the FIN/ABORT went out on
        self.direct = None  # pagelink.DirectLink where the pages may go host to host
        self.tls = False  # the current link is the direct TLS one
        self.tls_retry = 0  # a TLS write to retry with at least this many bytes
        self._rbuf = None  # a TLS link's read buffer (made with the first one)
        self.pf = None  # the target's read-ahead (prefetch.py): CRIU is answered from it
        self.pf_error = None
        self.pf_off = "not asked for"

    # --- the link -------------------------------------------------------------
    def attach(self, conn, tls=False):
        if self.link is not None:
            self.link.close()
        conn.setblocking(False)
        self.link, self.link_ready, self.inbuf, self.outq = conn, False, bytearray(), _Chunks()
        self.tls, self.tls_retry = tls, 0
        self.attaches += 1
        self._frame(_F_HELLO, self.received)

    def drop_link(self, why="the link ended"):
        if self.link is not None:
            self.link.close()
            if self.tls and self.direct is not None:
                self.direct.link_lost(why)
        self.link, self.link_ready, self.tls = None, False, False

    def link_recv(self):
        """Read what the link brings now into inbuf: True when the link ended. A TLS link is
        read until it has nothing more (select() does not see what TLS holds decrypted),
        record by record into one buffer, appended once."""
        if not self.tls:
            try:
                data = self.link.recv(_RELAY_CHUNK)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return True
            self.inbuf += data
            return not data
        if self._rbuf is None:
            self._rbuf = memoryview(bytearray(_TLS_READ))
        filled, ended = 0, False
        while filled < _TLS_READ:
            try:
                n = self.link.recv_into(self._rbuf[filled:])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                break
            except (OSError, ValueError):
                ended = True
                break
            if n == 0:
                ended = True
                break
            filled += n
        if filled:
            self.inbuf += self._rbuf[:filled]
        return ended and not filled

    def link_send(self, limit):
        """Send from outq; the number of bytes taken, or None when the link broke."""
        size = min(len(self.outq), max(limit, self.tls_retry))
        try:
            n = self.link.send(self.outq.peek(size))
        except (BlockingIOError, InterruptedError):
            return 0
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            self.tls_retry = size  # OpenSSL: the retry must bring at least these bytes
            return 0
        except (OSError, ValueError):
            return None
        self.tls_retry = 0
        self.outq.drop(n)
        return n

    def _frame(self, kind, value, payload=b""):
        self.outq.append(_FRAME.pack(kind, value, len(payload)))
        self.outq.append(payload)

    def on_frames(self):
        """Handle every whole frame in inbuf; the rest (a partial frame) stays for later."""
        buf, pos = self.inbuf, 0
        try:
            while len(buf) - pos >= _FRAME.size:
                kind, value, n = _FRAME.unpack_from(buf, pos)
                if n > _FRAME_MAX or kind not in (1, 2, 3, 4, 5):
                    raise ValueError("bad frame")
                start = pos + _FRAME.size
                if len(buf) - start < n:
                    return
                pos = start + n
                if kind == _F_HELLO:
                    self._acked(value)
                    self.sent = max(value, self.out_base)
                    self.link_ready = True
                    if self.tls and self.direct is not None:
                        self.direct.link_up()
                        self.status(force=True)  # the restore waits for this, not for the next 0.5 s tick
                elif kind == _F_DATA:
                    if value > self.received:
                        raise ValueError("a gap in the peer's data")
                    skip = self.received - value
                    if skip < n:
                        with memoryview(buf) as view:
                            data = bytes(view[start + skip : pos])  # one copy
                        self.received += n - skip
                        if self.pf is None:
                            self.to_criu.append(data)
                        else:
                            self.from_source(data)
                elif kind == _F_ACK:
                    self._acked(value)
                elif kind == _F_FIN:
                    self.peer_end = ("fin", value)
                elif kind == _F_ABORT:
                    self.peer_end = ("abort", None)
        finally:
            del buf[:pos]

    def from_source(self, data):
        """The source's answers, through the read-ahead; a source answering what was not asked
        ends the pull here as a broken one would (our CRIU is told nothing more)."""
        try:
            self.pf.feed_source(data)
        except prefetch.PrefetchError as e:
            self.pf_error = str(e)
            self.criu.close()
            self.criu_shut = True
            self.to_criu.clear()
            self.local_end = "abort"

    def from_criu(self, data):
        if self.pf is None:
            self.out.append(data)
        else:
            self.pf.feed_criu(data)

    def pf_flush(self):
        """What the read-ahead has for each side now."""
        if self.pf is not None and self.pf_error is None:
            to_source, to_criu = self.pf.take()
            self.out.append(to_source)
            self.to_criu.append(to_criu)

    def _acked(self, upto):
        if upto > self.out_base:
            self.out.drop(upto - self.out_base)
            self.out_base = upto

    def fill_link(self):
        if not self.link_ready:
            return
        while len(self.outq) < (4 * _TLS_SEND if self.tls else 2 * _RELAY_CHUNK):
            end = self.out_base + len(self.out)
            if self.sent < end:
                a = self.sent - self.out_base
                chunk = self.out.read_at(a, _TLS_SEND if self.tls else _RELAY_CHUNK)
                self._frame(_F_DATA, self.sent, chunk)
                self.sent += len(chunk)
                continue
            break
        now = time.monotonic()
        if self.received > self.acked_sent and (
            self.received - self.acked_sent >= 1 << 20 or now - self.last_ack_t >= 0.2
        ):
            self._frame(_F_ACK, self.received)
            self.acked_sent, self.last_ack_t = self.received, now
        if self.local_end and self.sent == self.out_base + len(self.out) and self._end_sent is not self.link:
            total = self.out_base + len(self.out)
            self._frame(_F_FIN if self.local_end == "fin" else _F_ABORT, total)
            self._end_sent = self.link

    # --- CRIU's side --------------------------------------------------------------
    def criu_ended(self):
        """CRIU closed its side: its normal end (the target pulled every page; the source's
        page server finished), or a death (then the peer must not end its CRIU)."""
        if self.role == "source" and self.criu_shut:
            self.local_end = "fin"  # we ended it: the target has every page
            return
        tag = LAZY_PAGES if self.role == "target" else LAZY_DUMP
        rc = None
        for _ in range(100):  # its watcher records the status just after the end
            rc = _watched_rc(self.mdir, tag)
            if rc is not None:
                break
            time.sleep(0.05)
        self.local_end = "fin" if rc == 0 else "abort"

    def status(self, force=False):
        now = time.monotonic()
        if not force and now - self.last_status < 0.5:
            return
        self.last_status = now
        _write_json(
            os.path.join(self.mdir, RELAY_STATUS),
            {
                "role": self.role,
                "from_criu": self.out_base + len(self.out),
                "acked_by_peer": self.out_base,
                "from_peer": self.received,
                "attached": self.link is not None,
                "attaches": self.attaches,
                # The page path now: host to host over TLS, or through the dashboard (its pump).
                "path": "direct-tls" if self.direct is not None and self.direct.active else "ssh-relay",
                "direct": self.direct.status() if self.direct is not None else None,
                "local_end": self.local_end,
                "peer_end": self.peer_end[0] if self.peer_end else None,
                "read_ahead": {"off": self.pf_off} if self.pf is None else {**self.pf.stats, "error": self.pf_error},
                "updated": time.time(),
            },
        )

    def finished(self):
        now = time.monotonic()
        if self.local_end == "abort":
            # Our CRIU is gone, so nothing is left to protect here: tell the peer, then go.
            self.done_at = self.done_at or now
            told = self._end_sent is not None and not self.outq
            return told or self.peer_end is not None or now - self.done_at > 30
        if self.local_end is None or self.peer_end is None:
            return False
        if self.peer_end[0] == "fin" and (self.received < self.peer_end[1] or self.to_criu):
            return False
        if self.pf is not None and self.pf_error is None and self.pf.holding() and not self.criu_shut:
            return False
        if self.out or self.outq:
            self.done_at = self.done_at or now
            return now - self.done_at > 30  # the peer's last acknowledgement may still come
        return True


def cmd_pages_relay(params):
    """The page relay (started detached by migrate-dump or migrate-restore, never by the
    dashboard): runs until both CRIU processes are done with each other. Its link to the
    other host's relay: an attach through the dashboard (`pages-attach` on its unix
    socket), or, where an admin allowed direct transfer, a TLS connection host to host
    (pagelink.py); an attach through the dashboard ends the direct link for good."""
    cfg = json.loads(os.environ.get("CTWEB_RELAY", "{}"))
    mdir, role = cfg["dir"], cfg["role"]
    criu_sock = socket.socket(fileno=3)
    path = os.path.join(mdir, "page-relay.sock")
    if os.path.lexists(path):
        os.unlink(path)
    old = os.umask(0o077)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.umask(old)
    os.chmod(path, 0o600)
    listener.listen(4)
    listener.setblocking(False)
    r = _Relay(mdir, role, criu_sock)
    if cfg.get("direct"):
        try:
            r.direct = pagelink.DirectLink(mdir, role)
        except (OSError, ValueError, KeyError) as e:  # unreadable parameters: the dashboard's path only
            r.direct = None
            _write_json(os.path.join(mdir, "page-relay-direct-error.json"), {"error": str(e)})
    if role == "target" and cfg.get("read_ahead"):
        psi = prefetch.local_psi()
        notes = []
        ranges = prefetch.ranges_of(os.path.join(mdir, "images"), notes) if psi is not None else {}
        if ranges:
            r.pf = prefetch.Prefetcher(ranges, psi)
        elif psi is None:
            r.pf_off = "this host's criu --version is not one it knows"
        else:
            r.pf_off = "no lazy pages in the images: " + "; ".join(notes[:5])
    r.status(force=True)  # the source's port, at once: migrate-dump reports it
    throttle = _relay_throttle(mdir)
    checked = time.monotonic()

    while not r.finished():
        r.pf_flush()
        d = r.direct if r.direct is not None and r.direct.active else None
        if d is not None and r.link is None:
            conn = d.connect_due()  # the target's side: one attempt when due (blocks at most seconds)
            if conn is not None:
                r.attach(conn, tls=True)
        rd, wr = [listener], []
        if d is not None:
            rd += d.read_fds()
            wr += d.write_fds()
        if r.local_end is None and len(r.out) < _RELAY_WINDOW:
            rd.append(r.criu)
        if r.to_criu and not r.criu_shut:
            wr.append(r.criu)
        tls_pending = False
        if r.link is not None:
            if len(r.to_criu) < _TO_CRIU_MAX:  # else our CRIU takes what it has first
                rd.append(r.link)
            r.fill_link()
            if r.outq:
                wr.append(r.link)
            tls_pending = r.tls and r.link in rd and r.link.pending() > 0
        try:
            readable, writable, _ = select.select(rd, wr, [], 0 if tls_pending else 0.2)
        except ValueError:
            readable, writable = [], []
        if d is not None:
            conn = d.on_ready(readable + writable)  # the source's side: a verified connection
            if conn is not None:
                r.attach(conn, tls=True)  # the target connected again: this link replaces the old one
                readable, writable = [x for x in readable if x is not r.link], []
        if listener in readable:
            try:
                conn, _ = listener.accept()
                if r.direct is not None and r.direct.active:
                    r.direct.give_up("the dashboard attached: the pages go through it from now on")
                r.attach(conn)
            except OSError:
                pass
        if r.criu in readable:
            got = 0
            while got < _TLS_SEND * 4 and len(r.out) < _RELAY_WINDOW:  # what CRIU has, in few calls
                try:
                    data = r.criu.recv(_RELAY_CHUNK)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    data = b""
                if data == b"":
                    r.criu_ended()
                    break
                r.from_criu(data)
                got += len(data)
        r.pf_flush()  # CRIU's request may be answered from what is here already: at once
        if r.to_criu and not r.criu_shut and (r.criu in writable or r.pf is not None):
            given = 0
            while r.to_criu and given < _TLS_SEND * 8:
                try:
                    n = r.criu.send(r.to_criu.head_view(_TLS_SEND))
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    r.criu_shut = True
                    r.to_criu.clear()
                    break
                r.to_criu.drop(n)
                given += n
        if r.link is not None and (r.link in readable or tls_pending):
            ended = r.link_recv()
            try:
                r.on_frames()
            except ValueError:
                r.drop_link("a bad frame")
            else:
                if ended:
                    r.drop_link()
        if r.link is not None and r.link in writable and r.outq:
            if r.link_send(throttle or (_TLS_SEND if r.tls else _RELAY_CHUNK)) is None:
                r.drop_link()
            elif throttle:
                time.sleep(0.1)  # test-only throttle: about 10 x throttle bytes a second
        # The peer's CRIU finished normally and we delivered all it sent: end ours too
        # (the source's page server takes the end for "all served" and finishes the dump).
        r.pf_flush()
        if (
            r.peer_end
            and r.peer_end[0] == "fin"
            and r.received >= r.peer_end[1]
            and not r.to_criu
            and (r.pf is None or not r.pf.holding() or r.pf_error)
        ):
            if not r.criu_shut:
                try:
                    r.criu.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                r.criu_shut = True
        r.status()
        if time.monotonic() - checked >= 0.5:  # a test may write its throttle just after we started
            throttle, checked = _relay_throttle(mdir), time.monotonic()
    if r.link is not None:
        r.fill_link()
        try:
            r.link.setblocking(True)
            r.link.settimeout(5)
            r.link.sendall(r.outq.peek(len(r.outq)))
        except (OSError, ValueError):
            pass
    r.status(force=True)
    return {"role": role, "from_criu": r.out_base + len(r.out), "from_peer": r.received}


def _relay_throttle(mdir):
    """Tests only: a throttle file the test itself writes into the migration directory
    (root-only, made for this one migration) slows the relay so a fault can hit the pull.
    Production never writes it; its presence is reported in the relay's status."""
    try:
        with open(os.path.join(mdir, "TEST-ONLY-throttle")) as f:
            return max(1024, int(f.read().strip()))
    except (OSError, ValueError):
        return 0


def cmd_pages_attach(params):
    """Bridge this SSH channel to the migration's page relay (the dashboard pumps bytes
    between the two hosts' attach channels)."""
    check_name(params.get("name"))
    path = os.path.join(_mig_dir(params), "page-relay.sock")
    sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sk.connect(path)
    except OSError as e:
        raise AgentError(f"No page relay runs for this migration here ({e.strerror}).") from None
    fds = [0, sk.fileno()]
    while True:
        readable, _, _ = select.select(fds, [], [])
        if 0 in readable:
            data = os.read(0, _RELAY_CHUNK)
            if not data:
                break
            sk.sendall(data)
        if sk.fileno() in readable:
            data = sk.recv(_RELAY_CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                n = os.write(1, view)
                view = view[n:]
    return None


def cmd_migrate_dump(params):
    name = _require(params.get("name"))
    lazy = _flag(params, "lazy", False)
    mdir = _mig_dir(params)
    direct = None
    if lazy and params.get("direct_pages") is not None:  # checked before anything changes
        direct = pagelink.check_params(params["direct_pages"], "source")
    images = os.path.join(mdir, "images")
    _remove_tree(images) if os.path.exists(images) else None
    os.makedirs(images)
    t0 = time.monotonic()
    event("dump", f"dumping {name}" + (" without its memory pages (lazy)" if lazy else ""), 10)
    freeze = FreezeWatch(name)  # when it stopped serving: the client-visible downtime's start
    if lazy:
        try:
            ms = _lazy_dump(name, mdir, images, direct)
        finally:
            freeze.stop()
        event("dump", f"images written after {ms} ms; the page server serves this host's page relay", 90)
        out = {
            "state": _state(name),
            "relay": RELAY_VERSION,
            "direct_pages": _direct_listening(mdir) if direct is not None else None,
            "stats": {"total_ms": _ms(t0)},
            "images_bytes": _du(images),
            "pages_bytes": _pages_bytes(images),  # what CRIU could not leave to the page server
        }
    else:
        try:
            _criu_dump(name, images, stop=True)
        finally:
            freeze.stop()
        stats = _criu_stats(images, "dump")
        stats["total_ms"] = _ms(t0)
        out = {"state": _state(name), "stats": stats, "images_bytes": _du(images), "pages_bytes": _pages_bytes(images)}
    # Last: "so many ms ago" is read against the moment this result is printed.
    out["frozen"] = freeze.report()
    return out


def _direct_listening(mdir):
    """The source relay's direct link: {"port": P} once it listens, or {"error": why}."""
    d = _wait_direct(mdir, lambda d: d.get("port") or d.get("state") in ("failed", "off"), 5)
    if d.get("port") and d.get("state") not in ("failed", "off"):
        return {"port": d["port"]}
    return {"error": d.get("error") or "the page relay did not start listening"}


def _direct_connected(mdir):
    """The target relay's first direct link: up (the peer's HELLO arrived), or given up."""
    d = _wait_direct(mdir, lambda d: d.get("state") in ("up", "failed", "off"), pagelink.SETUP_S + 5)
    if d.get("state") == "up":
        return "direct-tls", f"the page relays are linked host to host over TLS 1.3 ({d.get('connects')} connection)"
    return "ssh-relay", f"no direct link to the source's page relay ({d.get('error') or d.get('state') or 'no status'})"


def _pages_bytes(images):
    """Bytes of memory pages inside the images (CRIU's pages-N.img files): they travel with the images."""
    return sum(f["size"] for f in _image_files(images) if re.fullmatch(r"pages-\d+\.img", f["name"]))


def _start_lazy_pages(name, mdir, images, direct=None, read_ahead=True):
    criu_end = _start_relay(mdir, "target", direct, read_ahead)
    argv = ["criu", "lazy-pages", "--page-server", "--ps-socket", "3"]
    argv += ["-D", images, "-o", "lazy-pages.log", "-v4"]
    try:
        _spawn_watched(argv, mdir, LAZY_PAGES, None, criu_end.fileno())
    finally:
        criu_end.close()
    sock = os.path.join(images, "lazy-pages.socket")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rc = _watched_rc(mdir, LAZY_PAGES)
        if rc is not None:
            _kill_watched(mdir, PAGE_RELAY)
            raise AgentError(
                f"criu lazy-pages ended at once (exit status {rc}).",
                _criu_log(images, "lazy-pages") + "\n" + _tail(os.path.join(mdir, f"{LAZY_PAGES}.out")),
                {"state": _state(name)},
            )
        if os.path.exists(sock):
            return
        time.sleep(0.02)
    _kill_watched(mdir, LAZY_PAGES)
    _kill_watched(mdir, PAGE_RELAY)
    raise AgentError("criu lazy-pages did not open its socket within 30 s.", _criu_log(images, "lazy-pages"))


def cmd_migrate_restore(params):
    name = _require(params.get("name"))
    lazy = _flag(params, "lazy", False)
    mdir = _mig_dir(params)
    images = os.path.join(mdir, "images")
    direct = None
    if lazy and params.get("direct_pages") is not None:  # checked before anything changes
        direct = pagelink.check_params(params["direct_pages"], "target")
    t0 = time.monotonic()
    env = None
    page_path = None
    if lazy:
        event("restore", "starting criu lazy-pages and this host's page relay", 5)
        _start_lazy_pages(name, mdir, images, direct, _flag(params, "read_ahead", True))
        if direct is not None:
            # Before the restore: its processes' first faults need the pages' path.
            page_path = _direct_connected(mdir)
            event("restore", f"page path: {page_path[0]}: {page_path[1]}", 8, page_path=page_path[0])
        env = _criu_config(mdir, "restore", ["lazy-pages"])
    # pages_ready: this host's page relay and lazy-pages daemon are up, a relaying pump may attach
    event(
        "restore",
        f"restoring {name}" + (" (memory follows lazily)" if lazy else ""),
        10,
        **({"pages_ready": True} if lazy else {}),
    )
    answer = AnswerWatch(name)  # when its address answers here: the client-visible downtime's end
    try:
        _criu_restore(name, images, f"CRIU could not restore {name} on this host", False, env)
    except AgentError as e:
        answer.cancel()
        if lazy:
            _kill_watched(mdir, LAZY_PAGES)
            _kill_watched(mdir, PAGE_RELAY)
            e.details += "\n--- lazy-pages.log ---\n" + _criu_log(images, "lazy-pages")
        raise
    stats = _criu_stats(images, "restore")
    stats["total_ms"] = _ms(t0)
    out = {"state": _state(name), "stats": stats}
    if page_path is not None:
        out["page_path"], out["page_path_why"] = page_path
    out["answered"] = answer.report()  # last: "so many ms ago" is read against this result's line
    return out


def cmd_migrate_lazy_wait(params):
    """Wait up to wait_s seconds for a post-copy's long-lived CRIU process to end: role
    "target" waits for the lazy-pages daemon (every page arrived), role "source" for the
    dump's page server. No limit of its own: it returns {"done": false} with the page
    relay's counters, and the dashboard judges progress."""
    name = check_name(params.get("name"))
    role = params.get("role")
    if role not in ("source", "target"):
        raise AgentError("role must be source or target.")
    wait_s = params.get("wait_s", 20)
    if not isinstance(wait_s, (int, float)) or not 0 <= wait_s <= 300:
        raise AgentError("Bad wait_s.")
    mdir = _mig_dir(params)
    images = os.path.join(mdir, "images")
    tag, log = (LAZY_PAGES, "lazy-pages") if role == "target" else (LAZY_DUMP, "dump")
    if not os.path.exists(os.path.join(mdir, f"{tag}.json")) and not os.path.exists(os.path.join(mdir, f"{tag}.rc")):
        raise AgentError(f"No {log} process was started for this migration here.")
    t0 = time.monotonic()
    rc = _watched_rc(mdir, tag)
    while rc is None and time.monotonic() - t0 < wait_s:
        time.sleep(0.1)
        rc = _watched_rc(mdir, tag)
    relay = _relay_status(mdir)
    if rc == 0 and relay.get("path") == "direct-tls":
        # The relay's last counters (it writes them twice a second, and once more at its end,
        # just after this CRIU process's): the dashboard counted no byte of a direct pull itself.
        deadline = time.monotonic() + 2
        while _watched_rc(mdir, PAGE_RELAY) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        relay = _relay_status(mdir)
    if rc is None:
        return {"done": False, "relay": relay, "state": _state(name)}
    if rc != 0:
        raise AgentError(
            f"criu {log} ended with exit status {rc}.",
            _criu_log(images, log) + "\n" + _tail(os.path.join(mdir, f"{tag}.out")),
            {"state": _state(name), "ended": rc, "relay": relay},
        )
    out = {"done": True, "state": _state(name), "relay": relay}
    if role == "source":
        out["stats"] = _criu_stats(images, "dump")
    return out


def cmd_migrate_resume(params):
    """On the source, after the move failed: restore the container from its migration dump.
    If that fails too, the images become its saved state, so Start can try again.
    After a lazy dump the images hold no memory: the source can only go on if the dump
    process still holds its frozen tasks (see _lazy_resume)."""
    mjournal.end(_mig_dir(params))  # the change journal has no delta left to feed
    name = _require(params.get("name"))
    mdir = _mig_dir(params)
    images = os.path.join(mdir, "images")
    if os.path.exists(os.path.join(mdir, f"{LAZY_DUMP}.json")):
        return _lazy_resume(name, mdir, images)
    # No dump ever took the tasks (the link broke before the dump began, or CRIU rolled a failed
    # dump back): they are here, running or still frozen. A restore would be refused ("is
    # running") and the container, never stopped, taken for lost.
    state = _state(name)
    if state == "FROZEN" or (state == "RUNNING" and _freezer_state(name) == "FROZEN"):
        _thaw(name)
        state = _state(name)
    if state == "RUNNING":
        out = {"state": state, "resumed": f"{name} was never stopped here: its tasks run on, nothing to restore"}
        if replugged := _replug_config(name):  # a dump's agent that died after unplugging them
            out["replugged"] = replugged
        return out
    try:
        _criu_restore(name, images, f"CRIU could not resume {name} here", True)
    except AgentError as e:
        state_images = _state_images(name)
        if os.path.isfile(os.path.join(images, "inventory.img")) and not os.path.exists(state_images):
            os.makedirs(os.path.dirname(state_images), exist_ok=True)
            os.rename(images, state_images)
        e.data["has_saved_state"] = _has_saved_state(name)
        raise
    return {"state": _state(name), "stats": _criu_stats(images, "restore")}


def _descendants(pid):
    """(pid, comm) of every process below pid."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                head, _, tail = f.read().rpartition(")")
            comm = head.split("(", 1)[1]
            children.setdefault(int(tail.split()[1]), []).append((int(entry), comm))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def _criu_network_unlock(name):
    """Undo CRIU's network lock in the container's netns. CRIU 4.1 unlocks the network of
    a failed dump before the lazy page server runs, not after it: a rolled-back lazy dump
    leaves its CRIU chain dropping every packet (seen on the lab)."""
    rc, out, err = run(["lxc-info", "-n", name, "-pH"], timeout=20)
    pid = out.strip()
    if rc != 0 or not pid.isdigit():
        return False
    done = False
    for tool in ("iptables", "ip6tables"):
        ns = ["nsenter", "-t", pid, "-n", tool, "-w"]
        rc, out, err = run(ns + ["-S", "CRIU"], timeout=20)
        if rc != 0:
            continue
        for chain in ("INPUT", "OUTPUT"):
            while run(ns + ["-D", chain, "-j", "CRIU"], timeout=20)[0] == 0:
                pass
        run(ns + ["-F", "CRIU"], timeout=20)
        done = run(ns + ["-X", "CRIU"], timeout=20)[0] == 0 or done
    rc, out, err = run(["nsenter", "-t", pid, "-n", "nft", "list", "tables"], timeout=20)
    for line in out.splitlines() if rc == 0 else []:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[2].startswith("CRIU"):
            done = run(["nsenter", "-t", pid, "-n", "nft", "delete", "table", parts[1], parts[2]], timeout=20)[0] == 0
    return done


def _lazy_resume(name, mdir, images):
    """Give the tasks a lazy dump still holds back to the source. Closing the page server
    is no way: CRIU takes an unserved close for success and kills the tasks. An interrupted
    page server is a failed dump, though, and CRIU rolls a failed dump back (the tasks run
    on): its SIGALRM handler (the --timeout one) does not restart syscalls, so SIGALRM makes
    the page server's accept()/recv() fail."""
    info = _read_json(os.path.join(mdir, f"{LAZY_DUMP}.json")) or {}
    signalled = []
    if _watched_rc(mdir, LAZY_DUMP) is None and _pid_alive(info.get("pid"), info.get("pid_start")):
        for pid, comm in _descendants(info["pid"]):
            if comm == "criu":
                try:
                    os.kill(pid, 14)  # SIGALRM
                    signalled.append(pid)
                except OSError:
                    pass
    deadline = time.monotonic() + 60
    while _watched_rc(mdir, LAZY_DUMP) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    state = _state(name)
    if state in ("RUNNING", "FROZEN"):
        _thaw(name)
        unlocked = _criu_network_unlock(name)
        # The lazy dump took its veths out of their bridge (criu._unplug): back they go.
        replugged = _replug_config(name)
        return {
            "state": _state(name),
            "resumed": f"the lazy dump was interrupted (criu {signalled}) and rolled back",
            "network_unlocked": unlocked,
            "replugged": replugged,
        }
    raise AgentError(
        f"{name} could not be resumed here: its lazy dump holds no memory pages and the dump "
        f"process {'ended' if _watched_rc(mdir, LAZY_DUMP) is not None else 'still runs'}; it is {state}.",
        _criu_log(images, "dump"),
        {"state": state, "has_saved_state": False},
    )


def _restoring(images):
    """The pids of this migration's restore still running here: `lxc-checkpoint -r` and its
    `criu restore`, named by their images directory (a finished restore's LXC monitor is
    named "[lxc monitor]" and holds no such argument)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        prog = os.path.basename(argv[0]).decode(errors="replace") if argv else ""
        if prog in ("criu", "lxc-checkpoint") and images.encode() in argv and (b"-r" in argv or b"restore" in argv):
            found.append(int(entry))
    return found


def _end_restore(images, wait_s=10):
    """Kill what is left of this migration's restore (cut off mid-way, e.g. waiting for pages
    no dashboard serves any more: LXC then cannot even say how the container is). True if
    there was one."""
    pids = _restoring(images)
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    deadline = time.monotonic() + wait_s
    while pids and _restoring(images) and time.monotonic() < deadline:
        time.sleep(0.1)
    return bool(pids)


def end_restore_before_abort(params):
    """Before migrate-abort waits for the container's lock: a restore of this migration cut off
    while waiting for pages that will never come (its source resumed, or its dashboard link
    gone) holds that lock through the agent that started it, for as long as the restore's
    limit (15 min), and LXC cannot say how the container is meanwhile. The abort ends it first
    (only it: named by the migration's images directory), so that agent ends and the lock
    comes free."""
    mdir = _mig_dir(params)
    if os.path.isdir(mdir):
        _end_restore(os.path.join(mdir, "images"))


def cmd_migrate_abort(params):
    """On the target: remove only what this migration brought (a restore of it still running
    is ended first)."""
    name = check_name(params.get("name"))
    removed = []
    if mjournal.end(_mig_dir(params)):
        removed.append("change journal")
    if os.path.isdir(_mig_dir(params)) and _end_restore(os.path.join(_mig_dir(params), "images")):
        removed.append("restore")
    if os.path.isdir(_mig_dir(params)) and _kill_watched(_mig_dir(params), LAZY_PAGES, 9):
        removed.append("lazy-pages daemon")
    if os.path.isdir(_mig_dir(params)) and _kill_watched(_mig_dir(params), PAGE_RELAY, 9):
        removed.append("page relay")
    if os.path.exists(_mig_marker(name, params)) or os.path.exists(os.path.join(_mig_dir(params), "receiving")):
        if _exists(name) and _state(name) != "STOPPED":
            run(["lxc-stop", "-n", name, "-k"], timeout=60)
            if _state(name) != "STOPPED":
                raise AgentError(f"{name} is still {_state(name)} here and could not be stopped.")
        if _exists(name):
            run(["lxc-destroy", "-n", name], timeout=120)
        if os.path.exists(_cdir(name)):
            cow.rmtree(_cdir(name), ignore=True)
        if os.path.exists(_cdir(name)):
            raise AgentError(f"{_cdir(name)} could not be removed.")
        removed.append("container")
        for base in (S.SNAPSHOTS_PATH, S.STATE_PATH):
            if os.path.exists(os.path.join(base, name)):
                _remove_tree(os.path.join(base, name))
                removed.append(os.path.basename(base))
    if _remove_stages(params):
        removed.append("staging")
    if os.path.exists(_mig_dir(params)):
        _remove_tree(_mig_dir(params))
    return {"removed": removed}


def _end_relay(mdir):
    """Kill the page relay and wait for its watcher's last word (its .rc file): written after
    the directory's removal began, it left the directory behind (seen on the lab)."""
    if _kill_watched(mdir, PAGE_RELAY, 9):
        deadline = time.monotonic() + 5
        while _watched_rc(mdir, PAGE_RELAY) is None and time.monotonic() < deadline:
            time.sleep(0.02)


def cmd_migrate_cleanup(params):
    """On the source: after success remove the container (it runs on the target now);
    with remove=false only the migration's working files."""
    name = check_name(params.get("name"))
    remove = _flag(params, "remove", False)
    mjournal.end(_mig_dir(params))  # the source's change journal, if it still runs
    if _flag(params, "keep_state", False):
        # The move failed and the target is in doubt: the dump becomes the saved state.
        images = os.path.join(_mig_dir(params), "images")
        lazy = os.path.exists(os.path.join(_mig_dir(params), f"{LAZY_DUMP}.json"))
        if lazy and _watched_rc(_mig_dir(params), LAZY_DUMP) is None:
            # Its page server may still feed a running target: keep everything as it is.
            return {"removed": False, "has_saved_state": False, "lazy_dump_running": True}
        if (
            not lazy  # a lazy dump's images hold no memory: they are no saved state
            and os.path.isfile(os.path.join(images, "inventory.img"))
            and not os.path.exists(_state_images(name))
        ):
            os.makedirs(_state_dir(name), exist_ok=True)
            os.rename(images, _state_images(name))
        if os.path.exists(_mig_dir(params)):
            _end_relay(_mig_dir(params))
            _remove_tree(_mig_dir(params))
        return {"removed": False, "has_saved_state": _has_saved_state(name)}
    if remove and _exists(name):
        if _state(name) != "STOPPED":
            raise AgentError(f"{name} is {_state(name)} here: refusing to remove a running source.")
        run(["lxc-destroy", "-n", name], timeout=120, check=True)
        for base in (S.SNAPSHOTS_PATH, S.STATE_PATH):
            if os.path.exists(os.path.join(base, name)):
                _remove_tree(os.path.join(base, name))
    if os.path.exists(_mig_dir(params)):
        if _watched_rc(_mig_dir(params), LAZY_DUMP) is None and os.path.exists(
            os.path.join(_mig_dir(params), f"{LAZY_DUMP}.json")
        ):
            raise AgentError("The lazy dump still holds the frozen tasks here: refusing to remove its files.")
        _end_relay(_mig_dir(params))
        _remove_tree(_mig_dir(params))
    if os.path.lexists(_mig_marker(name, params)):
        os.unlink(_mig_marker(name, params))  # on a target that runs it now: it is simply ours
    return {"removed": remove}
