"""When a migrating container stops serving and when it answers again, seen from outside
its processes (the client-visible downtime in a migration's result).

- The freeze, on the source: the instant the container's freezer cgroup leaves THAWED
  during the dump (CRIU freezes the whole cgroup before it touches a task), read every
  millisecond from the cgroup file. CRIU thaws the cgroup again as soon as it has seized
  every task (criu/seize.c freeze_processes: the tasks stay stopped under ptrace), so the
  FROZEN moment lasts only milliseconds and a poller the scheduler holds back can miss it.
  The seizure itself lasts the whole dump: the container's init gaining a tracer
  (TracerPid in /proc/<init>/status, read in the same loop) is the other sign, milliseconds
  after the freeze. Where neither is seen, the instant the dump was started (later than the
  freeze never, earlier by CRIU's start-up: an upper bound).
- The answer, on the target: the first ICMP echo reply from the container's address,
  asked every 2 ms by this host from before the restore starts. The host is told the
  container's MAC first (it is in the container's config), so no ARP round stands between
  the container's return and the first reply.
- Served, on the target: the kernel answers ICMP as soon as the network namespace is back,
  but the container's processes may answer later (after a post-copy restore they fetch
  their memory from the source as they touch it). When the restored container has
  established TCP connections, the first rise of its network namespace's TcpExt
  TCPOrigDataSent counter after the answer (segments of new data, never retransmissions;
  read from /proc/<init>/net/netstat every 2 ms) is the moment its processes sent their
  clients something again. The restore waits for it up to SERVE_WAIT_S and says how long
  it waited, so the worker's own downtime does not count that wait.

Each instant goes to the dashboard as "so many ms before this result line": the dashboard
places both on its own clock by the moment each line arrived, so no two hosts' clocks are
ever compared (the error is the difference of two lines' one-way delays over SSH)."""

import ipaddress
import os
import re
import select
import socket
import struct
import threading
import time

from . import cgroups
from .common import run
from .lxc import _config_value, _init_pid, _network, _read_config

FREEZE_POLL_S = 0.001
PING_EVERY_S = 0.002
SERVE_POLL_S = 0.002
SERVE_WAIT_S = 2.0  # after the restore, for the container's first new TCP data


def _tracer(pid):
    """The TracerPid of /proc/<pid>/status, or None when it cannot be read (the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class FreezeWatch:
    """Started just before a dump: notes the monotonic instant the container froze (its
    freezer cgroup left THAWED) or, where that moment went unseen, was seized (its init
    gained a tracer)."""

    def __init__(self, name):
        self.pid = cgroups._init_pid(name)  # one lxc-info for both signs, just before the dump
        cg = cgroups.container_cgroup(name, self.pid)  # the container's whole cgroup, not its init's (init.scope on v2)
        self.path = cg.freeze if cg and os.path.isfile(cg.freeze) else None
        self.why = None if self.path else ("no freezer file at " + cg.freeze if cg else "its cgroup was not found")
        self.tracer = _tracer(self.pid) if self.pid else None  # before the dump: 0, unless already traced
        self.started = time.monotonic()
        self.at, self.how = None, None
        self._stop = threading.Event()
        self._thread = None
        if self.path or self.tracer is not None:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()

    def _watch(self):
        while not self._stop.is_set():
            if self.path and self._frozen():
                self.at, self.how = time.monotonic(), "freezer"
                return
            if self.tracer is not None:
                now = _tracer(self.pid)
                if now is None:
                    self.tracer = None  # its init is gone
                elif now != self.tracer:
                    self.at, self.how = time.monotonic(), "seized"
                    return
            if not self.path and self.tracer is None:
                return
            time.sleep(FREEZE_POLL_S)

    def _frozen(self):
        try:
            with open(self.path, "rb") as f:
                value = f.read().strip()
        except OSError as e:  # the cgroup went with the stopped container: watch the tracer only
            self.why, self.path = f"its freezer file could not be read: {e.strerror or e}", None
            return False
        return bool(value) and value not in (b"THAWED", b"0")

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)

    def report(self):
        """{"ago_ms", "how", "started_ago_ms"} for the result: call it last, just before returning
        the result. started_ago_ms: when the dump began, before anything of it (the veths' unplug
        included) touched the container: where its downtime starts."""
        self.stop()
        now = time.monotonic()
        at, how = (self.at, self.how) if self.at is not None else (self.started, "dump-start")
        out = {
            "ago_ms": round((now - at) * 1000, 1),
            "how": how,
            "started_ago_ms": round((now - self.started) * 1000, 1),
        }
        if self.at is None:
            out["why"] = self.why or "its freezer never left THAWED while the dump ran"
        return out


def _checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _echo_request(ident, seq):
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    payload = b"ctweb-downtime"
    return struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload


def container_address(name):
    """(IPv4, MAC, why not) from the container's config. Only an address inside this host's
    own container network is ever pinged (a config may have come from another host)."""
    try:
        lines = _read_config(name)
    except OSError:
        return None, None, "it has no config here"
    ip = (_config_value(lines, "lxc.net.0.ipv4.address") or "").split("/")[0]
    if not ip:
        return None, None, "it has no IPv4 address in its config"
    net = _network() or {}
    try:
        inside = ipaddress.ip_address(ip) in ipaddress.ip_network(net.get("subnet", ""), strict=False)
    except ValueError:
        inside = False
    if not inside:
        return None, None, f"{ip} is not in this host's container network (/etc/ctweb/network.json)"
    mac = (_config_value(lines, "lxc.net.0.hwaddr") or "").lower()
    return ip, mac if re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac) else None, None


def orig_data_sent(pid):
    """TcpExt TCPOrigDataSent of the network namespace process `pid` is in (segments that
    carried new data, not retransmissions), or None."""
    try:
        with open(f"/proc/{pid}/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:") and values.startswith("TcpExt:"):
            value = dict(zip(head.split()[1:], values.split()[1:], strict=False)).get("TCPOrigDataSent", "")
            return int(value) if value.isdigit() else None
    return None


def established(pid):
    """How many established TCP connections the network namespace of `pid` holds."""
    n = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                n += sum(1 for line in f.readlines()[1:] if line.split()[3:4] == ["01"])
        except OSError:
            pass
    return n


class AnswerWatch:
    """Started just before a restore: pings the container's address from this host until
    the first reply, and notes its monotonic instant; then, if the container holds
    established TCP connections, the instant its processes first send new data."""

    def __init__(self, name):
        self.name = name
        self.ip, mac, self.why = container_address(name)
        self.at = None
        self.served = None
        self.serve_why = None
        self.connections = None
        self._serve_until = None
        self._answered = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        if not self.ip:
            return
        try:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except OSError as e:
            self.why = f"no raw ICMP socket on this host ({e.strerror})"
            return
        self._mac = mac
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _teach_neighbour(self, mac):
        # A host that never talked to this address would ARP for it, and while the restore
        # runs nobody answers: Linux then asks again only every second. The container's MAC
        # is known (its config), so the host's first ping after the restore goes straight out.
        rc, out, err = run(["ip", "-o", "route", "get", self.ip], timeout=10)
        words = out.split()
        if rc != 0 or "dev" not in words or "via" in words:
            return
        dev = words[words.index("dev") + 1]
        run(["ip", "neigh", "replace", self.ip, "lladdr", mac, "dev", dev, "nud", "stale"], timeout=10)

    def _watch(self):
        try:
            self._ping()
        finally:
            self._answered.set()
        if self.at is not None and not self._stop.is_set():
            self._serve()

    def _ping(self):
        ident, seq = os.getpid() & 0xFFFF, 0
        try:
            if self._mac:  # here, beside the restore, not before it
                self._teach_neighbour(self._mac)
            while not self._stop.is_set() and self.at is None:
                seq = (seq + 1) & 0xFFFF
                try:
                    self._sock.sendto(_echo_request(ident, seq), (self.ip, 0))
                except OSError:
                    pass  # no route yet, a full queue: the next one
                until = time.monotonic() + PING_EVERY_S
                while self.at is None and (left := until - time.monotonic()) > 0:
                    if not select.select([self._sock], [], [], left)[0]:
                        break
                    packet, (src, _) = self._sock.recvfrom(2048)
                    ihl = (packet[0] & 0x0F) * 4 if packet else 0
                    icmp = packet[ihl : ihl + 8]
                    if src == self.ip and len(icmp) == 8:
                        kind, _, _, rid, _ = struct.unpack("!BBHHH", icmp)
                        if kind == 0 and rid == ident:
                            self.at = time.monotonic()
        finally:
            self._sock.close()

    def _serve(self):
        """After the answer: the first new TCP data the container's processes send."""
        pid = _init_pid(self.name)
        base = orig_data_sent(pid) if pid else None
        if base is None:
            self.serve_why = "its network namespace's TCP counters could not be read"
            return
        self.connections = established(pid)
        if not self.connections:
            self.serve_why = "it held no established TCP connection"
            return
        while not self._stop.is_set():
            now = orig_data_sent(pid)
            if now is None:
                self.serve_why = "it stopped"
                return
            if now > base:
                self.served = time.monotonic()
                return
            if self._serve_until is not None and time.monotonic() >= self._serve_until:
                self.serve_why = f"its {self.connections} TCP connections sent no new data within {SERVE_WAIT_S:g} s"
                return
            time.sleep(SERVE_POLL_S)

    def report(self, wait_s=3.0):
        """{"ago_ms"} once it answered (waiting up to wait_s more for it), else {"why"}; with
        "served_ago_ms" when its processes sent new TCP data (waiting up to SERVE_WAIT_S more
        for it: "served_wait_ms" says how long), else "served_why"."""
        if self._thread is None:
            return {"ago_ms": None, "why": self.why}
        self._answered.wait(wait_s)
        waited = time.monotonic()
        self._serve_until = waited + SERVE_WAIT_S
        self._thread.join(SERVE_WAIT_S + 1)
        self._stop.set()
        self._thread.join(1)
        if self.at is None:
            return {"ago_ms": None, "why": f"{self.ip} did not answer ICMP echo within {wait_s:g} s of the restore"}
        now = time.monotonic()
        out = {"ago_ms": round((now - self.at) * 1000, 1), "address": self.ip}
        out["served_wait_ms"] = round((now - waited) * 1000, 1)
        if self.served is not None:
            out["served_ago_ms"] = round((now - self.served) * 1000, 1)
            out["connections"] = self.connections
        else:
            out["served_why"] = self.serve_why or "it sent no new TCP data"
        return out

    def cancel(self):
        self._stop.set()
