"""The target relay's read-ahead for a post-copy's pages (hosts/agent/ctweb_agent/prefetch.py),
against a page server and a lazy-pages daemon that behave as CRIU 4.2's do (criu/page-xfer.c,
criu/uffd.c: answers in request order, an answer clamped at the end of a range, the server
ending on a request outside its ranges; one background request at a time growing by 64 KiB,
back to 64 KiB at each fault, a short answer's rest asked again). Pure logic: the real CRIU
on both ends is the post-copy lab tests' (tests/migration/test_e2e_lab_postcopy_read_ahead.py)."""

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PAGE = 4096


def page(dst, addr):
    return struct.pack("<QQ", dst, addr) * (PAGE // 16)


class Server:
    """CRIU's page server for a lazy dump: serves the lazy ranges, in order, or dies."""

    def __init__(self, pf_mod, psi, ranges, ppb=64):
        self.m, self.psi, self.ranges, self.ppb = pf_mod, psi, ranges, ppb
        self.buf = bytearray()
        self.requests = 0
        self.closed = False

    def feed(self, data):
        self.buf += data
        out = bytearray()
        while len(self.buf) >= self.psi.size:
            cmd, nr, vaddr, dst = self.psi.unpack_from(self.buf, 0)
            del self.buf[: self.psi.size]
            assert not self.closed, "a request after the close"
            if cmd in (self.m.PS_IOV_CLOSE, self.m.PS_IOV_FORCE_CLOSE):
                self.closed = True
                out += struct.pack("<i", 0)
                continue
            assert cmd == self.m.PS_IOV_GET, cmd
            self.requests += 1
            end = next((b for a, b in self.ranges.get(dst, []) if a <= vaddr < b), None)
            assert end is not None, f"the page server ends: no pages at {vaddr:#x} of {dst}"
            # page_pipe_read clamps at the end of its buffer's iovec: ranges come in ppb pieces
            end = min(end, vaddr + nr * PAGE, (vaddr // (self.ppb * PAGE) + 1) * self.ppb * PAGE)
            n = (end - vaddr) // PAGE
            out += self.psi.pack((4 << 16) | 6, n, vaddr, dst)
            out += b"".join(page(dst, vaddr + i * PAGE) for i in range(n))
        return bytes(out)


class Criu:
    """criu lazy-pages: faults (one page) and background requests, one of them at a time."""

    def __init__(self, pf_mod, psi, ranges, faults, rng):
        self.m, self.psi = pf_mod, psi
        self.todo = {d: [list(r) for r in rs] for d, rs in ranges.items()}
        self.faults = list(faults)
        self.rng = rng
        self.xfer = 16
        self.waiting = []  # (dst, vaddr, nr) in order
        self.buf = bytearray()
        self.got = {}
        self.closed = self.done = False

    def _take(self, dst, a, b):
        out = []
        for r in self.todo[dst]:
            s, e = r
            if e <= a or s >= b:
                out.append(r)
                continue
            if s < a:
                out.append([s, a])
            if b < e:
                out.append([b, e])
        self.todo[dst] = out

    def _owed(self, dst, addr):
        return any(s <= addr < e for s, e in self.todo[dst])

    def requests(self):
        out = bytearray()
        if self.faults and self.rng.random() < 0.3:
            dst, addr = self.faults.pop()
            if self._owed(dst, addr) and not any(
                w[0] == dst and w[1] <= addr < w[1] + w[2] * PAGE for w in self.waiting
            ):
                self.xfer = 16
                self.waiting.append((dst, addr, 1))
                out += self.psi.pack(self.m.PS_IOV_GET, 1, addr, dst)
        if not [w for w in self.waiting if w[2] > 1]:
            left = [(d, r) for d in sorted(self.todo) for r in self.todo[d]]
            left = [(d, r) for d, r in left if not any(w[0] == d and w[1] == r[0] for w in self.waiting)]
            if left:
                dst, (s, e) = left[0]
                n = min(self.xfer, (e - s) // PAGE)
                self.xfer = min(self.xfer + 16, 1024)
                self.waiting.append((dst, s, n))
                out += self.psi.pack(self.m.PS_IOV_GET, n, s, dst)
            elif not self.waiting and not self.closed:
                self.closed = True
                out += self.psi.pack(self.m.PS_IOV_FORCE_CLOSE, 0, 0, 0)
        return bytes(out)

    def answers(self, data):
        self.buf += data
        while True:
            if self.closed and not self.waiting:
                if len(self.buf) >= 4:
                    assert bytes(self.buf[:4]) == struct.pack("<i", 0)
                    del self.buf[:4]
                    self.done = True
                return
            if len(self.buf) < self.psi.size:
                return
            _cmd, nr, vaddr, dst = self.psi.unpack_from(self.buf, 0)
            want = self.waiting[0]
            assert (dst, vaddr) == want[:2] and 0 < nr <= want[2], ((dst, vaddr, nr), want)
            if len(self.buf) < self.psi.size + nr * PAGE:
                return
            body = bytes(self.buf[self.psi.size : self.psi.size + nr * PAGE])
            del self.buf[: self.psi.size + nr * PAGE]
            self.waiting.pop(0)
            for i in range(nr):
                a = vaddr + i * PAGE
                if self._owed(dst, a):
                    assert body[i * PAGE : (i + 1) * PAGE] == page(dst, a), f"wrong bytes at {a:#x}"
                    self.got[(dst, a)] = self.got.get((dst, a), 0) + 1
            self._take(dst, vaddr, vaddr + nr * PAGE)


def pieces(data, rng):
    """The bytes as a socket may give them: in pieces of any size."""
    out, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 7, 31, 32, 33, 4096, 65536, 1 << 20])
        out.append(data[pos : pos + n])
        pos += n
    return out


def run(agent, ranges, faults=(), seed=0, psi=None, **kw):
    m = agent.prefetch
    psi = psi or m.PSI
    rng = random.Random(seed)
    pf = m.Prefetcher(ranges, psi, **kw)
    server, criu = Server(m, psi, ranges), Criu(m, psi, ranges, faults, rng)
    peak, to_source = 0, b""
    for _ in range(200000):
        for piece in pieces(criu.requests(), rng):
            pf.feed_criu(piece)
        more, to_criu = pf.take()
        criu.answers(to_criu)
        for piece in pieces(server.feed(to_source + more), rng):
            pf.feed_source(piece)
        to_source, to_criu = pf.take()
        criu.answers(to_criu)
        peak = max(peak, pf.held_bytes + pf.inflight)
        if criu.done:
            break
    assert criu.done, "the pull never ended"
    return pf, server, criu, peak


def every_page(ranges):
    return {(d, a) for d, rs in ranges.items() for s, e in rs for a in range(s, e, PAGE)}


RANGES = {
    1: [(0x400000, 0x400000 + 300 * PAGE), (0x7F0000000000, 0x7F0000000000 + 1000 * PAGE)],
    7: [(0x10000, 0x10000 + 5 * PAGE)],
    42: [(0x55AA00000000, 0x55AA00000000 + 2048 * PAGE)],
}


def test_every_page_arrives_once_and_right_with_far_fewer_requests_than_criu_makes(agent):
    faults = [(42, 0x55AA00000000 + 1500 * PAGE), (1, 0x7F0000000000 + 999 * PAGE), (7, 0x10000 + 4 * PAGE)]
    pf, server, criu, _ = run(agent, RANGES, faults, chunk=64 * PAGE)
    assert set(criu.got) == every_page(RANGES)
    assert set(criu.got.values()) == {1}
    # each page crossed once: the read-ahead asked for every lazy range, nothing twice
    assert pf.stats["read_ahead_bytes"] <= len(every_page(RANGES)) * PAGE
    assert server.requests < 3353 // 16  # CRIU alone: one request per 64 KiB..4 MiB, and again after each fault


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)  # the module is stateless
@given(
    seed=st.integers(0, 10**6),
    faults=st.lists(st.tuples(st.sampled_from([1, 7, 42]), st.integers(0, 2047)), max_size=30),
    chunk=st.sampled_from([1, 3, 16, 256]),
    window=st.sampled_from([1, 4, 64]),
)
def test_any_faults_and_any_fragmentation_bring_every_page_once(agent, seed, faults, chunk, window):
    starts = {1: 0x7F0000000000, 7: 0x10000, 42: 0x55AA00000000}
    spans = {1: 1000, 7: 5, 42: 2048}
    fs = [(d, starts[d] + (i % spans[d]) * PAGE) for d, i in faults]
    ranges = {d: [(starts[d], starts[d] + spans[d] * PAGE)] for d in starts}
    pf, server, criu, peak = run(agent, ranges, fs, seed, chunk=chunk * PAGE, window=window * PAGE, held_max=96 * PAGE)
    assert set(criu.got) == every_page(ranges)
    assert set(criu.got.values()) == {1}
    # what it holds and has asked for stays bounded (a held_max, plus a chunk and CRIU's faults)
    assert peak <= 96 * PAGE + chunk * PAGE + 1024 * PAGE


def test_nothing_is_asked_before_criu_asks_and_its_first_request_goes_first(agent):
    """The restore runs (the container is down) until CRIU's first request: no read-ahead
    competes with it, and the restored tasks' first fault is the first request on the link."""
    m = agent.prefetch
    pf = m.Prefetcher(RANGES, m.PSI, chunk=64 * PAGE)
    assert pf.take() == (b"", b"")
    fault = 0x7F0000000000 + 500 * PAGE
    pf.feed_criu(m.PSI.pack(m.PS_IOV_GET, 1, fault, 1))
    to_source, _ = pf.take()
    first = m.PSI.unpack_from(to_source, 0)
    assert (first[0], first[1], first[2], first[3]) == (m.PS_IOV_GET, 1, fault, 1)
    later = [m.PSI.unpack_from(to_source, i)[2] for i in range(m.PSI.size, len(to_source), m.PSI.size)]
    assert later and later[0] == fault + PAGE  # the read-ahead goes on from there


def test_the_old_request_layout_before_criu_4_2(agent):
    m = agent.prefetch
    assert m.psi_for("Version: 4.2.1\n") is m.PSI and m.PSI.size == 32
    assert m.psi_for("Version: 4.1.1\n") is m.PSI_OLD and m.PSI_OLD.size == 24
    assert m.psi_for("criu: command not found") is None
    pf, _, criu, _ = run(agent, RANGES, psi=m.PSI_OLD, chunk=64 * PAGE)
    assert set(criu.got) == every_page(RANGES)


@pytest.mark.parametrize(
    "lie",
    [
        lambda h: (h[0], h[1], h[2] + PAGE, h[3]),  # another address
        lambda h: (h[0], h[1], h[2], h[3] + 1),  # another task
        lambda h: (h[0], h[1] + 1, h[2], h[3]),  # more pages than asked
        lambda h: (h[0], 0, h[2], h[3]),  # none
    ],
)
def test_a_source_answering_what_was_not_asked_is_refused(agent, lie):
    m = agent.prefetch
    pf = m.Prefetcher({1: [(0, 64 * PAGE)]}, m.PSI, chunk=4 * PAGE, window=4 * PAGE)
    pf.feed_criu(m.PSI.pack(m.PS_IOV_GET, 1, 0, 1))
    to_source, _ = pf.take()
    cmd, nr, vaddr, dst = m.PSI.unpack_from(to_source, 0)
    answer = m.PSI.pack(*lie((cmd, nr, vaddr, dst))) + b"\0" * (nr + 1) * PAGE
    with pytest.raises(m.PrefetchError):
        pf.feed_source(answer)


def test_a_command_it_does_not_know_passes_through_untouched_after_what_came_before(agent):
    m = agent.prefetch
    pf = m.Prefetcher({1: [(0, 8 * PAGE)]}, m.PSI, chunk=8 * PAGE, window=8 * PAGE)
    pf.feed_criu(m.PSI.pack(m.PS_IOV_GET, 2, 0, 1))
    strange = m.PSI.pack(99, 1, 2, 3) + b"more"
    pf.feed_criu(strange)
    to_source, _ = pf.take()
    # its own request for CRIU's pages, then the strange one as it came (no read-ahead after it)
    assert to_source[: m.PSI.size] == m.PSI.pack(m.PS_IOV_GET, 2, 0, 1) and to_source[m.PSI.size :] == strange
    answer = m.PSI.pack((4 << 16) | 6, 2, 0, 1) + page(1, 0) + page(1, PAGE)
    pf.feed_source(answer + b"whatever the server says")
    _, to_criu = pf.take()
    assert to_criu == m.PSI.pack((4 << 16) | 6, 2, 0, 1) + page(1, 0) + page(1, PAGE) + b"whatever the server says"
    pf.feed_criu(b"raw")
    pf.feed_source(b"raw too")
    assert pf.take() == (b"raw", b"raw too")


def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _entry(**fields):
    numbers = {"pages_id": 1, "vaddr": 1, "compat_nr_pages": 2, "in_parent": 3, "flags": 4, "nr_pages": 5}
    body = b"".join(_varint(numbers[k] << 3) + _varint(v) for k, v in fields.items())
    return struct.pack("<I", len(body)) + body


def test_the_lazy_ranges_come_from_the_pagemap_images(agent, tmp_path):
    m = agent.prefetch
    head = struct.pack("<II", m.IMG_COMMON_MAGIC, 0x56084025)
    (tmp_path / "pagemap-12.img").write_bytes(
        head
        + _entry(pages_id=3)
        + _entry(vaddr=0x400000, compat_nr_pages=0, flags=4, nr_pages=4)  # in the pages image: not lazy
        + _entry(vaddr=0x7F0000000000, compat_nr_pages=0, flags=2, nr_pages=256)  # lazy, as CRIU 4.2 writes it
        + _entry(vaddr=0x7F0000200000, compat_nr_pages=1, flags=2 | 4)  # as CRIU before 4.2 wrote it
    )
    (tmp_path / "pagemap-13.img").write_bytes(head + _entry(pages_id=4) + b"\xff\xff\xff\x7f")  # cut: a lie
    (tmp_path / "pagemap-x.img").write_bytes(b"")
    assert m.ranges_of(str(tmp_path)) == {
        12: [(0x7F0000000000, 0x7F0000000000 + 256 * PAGE), (0x7F0000200000, 0x7F0000200000 + PAGE)]
    }
