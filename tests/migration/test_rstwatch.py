"""The RST watcher used by `make bench` to place a lost connection on a host: it picks the
RSTs to or from one address out of raw Ethernet frames, and nothing else."""

import socket
import struct

from tests.support.rstwatch import rst_of

MAC_CT = bytes.fromhex("02c70a4d4864")
MAC_CLIENT = bytes.fromhex("02c146ebdeba")


def frame(src, dst, sport, dport, flags, proto=socket.IPPROTO_TCP, ethertype=b"\x08\x00"):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, flags, 512, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst)
    )
    return MAC_CLIENT + MAC_CT + ethertype + ip + tcp


def test_an_rst_from_the_address_is_reported_with_its_sender():
    rst = rst_of(frame("10.77.72.100", "10.77.72.1", 7000, 52426, 0x14), "10.77.72.100")
    assert rst == {
        "mac": "02:c7:0a:4d:48:64",
        "src": "10.77.72.100:7000",
        "dst": "10.77.72.1:52426",
        "flags": "RA",
        "seq": 1000,
        "ack": 2000,
    }
    # To the address counts too (a client resetting the container's connection).
    assert rst_of(frame("10.77.72.1", "10.77.72.100", 52426, 7000, 0x04), "10.77.72.100")["flags"] == "R"


def test_other_segments_and_addresses_are_not_rsts():
    assert rst_of(frame("10.77.72.100", "10.77.72.1", 7000, 52426, 0x18), "10.77.72.100") is None  # PSH ACK
    assert rst_of(frame("10.77.72.101", "10.77.72.1", 7000, 52426, 0x04), "10.77.72.100") is None
    assert (
        rst_of(frame("10.77.72.100", "10.77.72.1", 7000, 52426, 0x04, proto=socket.IPPROTO_UDP), "10.77.72.100") is None
    )
    assert rst_of(frame("10.77.72.100", "10.77.72.1", 7000, 52426, 0x04, ethertype=b"\x86\xdd"), "10.77.72.100") is None
    assert rst_of(b"\x00" * 20, "10.77.72.100") is None
