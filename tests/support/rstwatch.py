"""Who resets a migrating container's TCP connections: every TCP segment with RST set to or
from one address, as seen on the machine's own interfaces (the lab's root bridge and the
veths of its hosts), with the sender's MAC, so a lost connection can be placed on a host and
in time. Needs root (an AF_PACKET socket); used by `make bench`'s client part and the lab
tests of the client-visible downtime. Outside the product, like tests/support/tcpgap.py."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time

ETH_P_ALL = 0x0003
PKTTYPES = {0: "to-host", 1: "broadcast", 2: "multicast", 3: "other-host", 4: "outgoing"}


def rst_of(frame: bytes, ip: str) -> dict | None:
    """The RST segment to or from `ip` in an Ethernet frame (IPv4 only), or None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    packet = frame[14:]
    ihl = (packet[0] & 15) * 4
    if packet[9] != socket.IPPROTO_TCP or len(packet) < ihl + 14:
        return None
    src, dst = socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])
    if ip not in (src, dst):
        return None
    sport, dport, seq, ack = struct.unpack("!HHII", packet[ihl : ihl + 12])
    flags = packet[ihl + 13]
    if not flags & 0x04:
        return None
    return {
        "mac": frame[6:12].hex(":"),
        "src": f"{src}:{sport}",
        "dst": f"{dst}:{dport}",
        "flags": "".join(c for bit, c in enumerate("FSRPAU") if flags >> bit & 1),
        "seq": seq,
        "ack": ack,
    }


class RstWatch:
    """Collects the RSTs to or from `ip` on all interfaces of this network namespace."""

    def __init__(self, ip: str):
        self.ip = ip
        self.seen: list[dict] = []  # each with "at" (time.monotonic()), "iface", "pkttype"
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def start_if_root(cls, ip: str) -> RstWatch | None:
        if os.geteuid() != 0:
            return None
        watch = cls(ip)
        watch._thread.start()
        return watch

    def _run(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._sock], [], [], 0.2)[0]:
                continue
            frame, addr = self._sock.recvfrom(256)
            rst = rst_of(frame, self.ip)
            if rst is None:
                continue
            rst.update(at=time.monotonic(), iface=addr[0])  # (ifname, proto, pkttype, ...)
            rst["pkttype"] = PKTTYPES.get(addr[2], str(addr[2]))
            self.seen.append(rst)

    def between(self, since: float, until: float) -> list[str]:
        """The RSTs seen between `since` and `until` (monotonic), one line each, with their
        time after `since`."""
        return [
            f"+{(r['at'] - since) * 1000:.0f} ms {r['iface']} ({r['pkttype']}) {r['flags']} "
            f"{r['src']} -> {r['dst']} from {r['mac']} seq={r['seq']} ack={r['ack']}"
            for r in self.seen
            if since <= r["at"] < until
        ]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
