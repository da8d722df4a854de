"""Read-ahead for a post-copy's page pull, in the target's page relay (lazy.py).

CRIU's lazy-pages daemon asks the source's page server for pages one request at a time in the
background (64 KiB, growing by 64 KiB a request to 4 MiB, and back to 64 KiB at every page
fault: criu/uffd.c), so over a link of any round trip its pull is bound by that round trip,
not by the link's rate. The relay on the target therefore answers CRIU itself, from pages it
asked the source for ahead of CRIU: requests of CHUNK bytes for the lazy ranges of the images'
pagemaps (the only addresses the source serves), WINDOW bytes of them in flight, following the
point CRIU's own background requests reached. A page CRIU asks for that is neither held nor on
its way is asked for at once (a fault).

The protocol (criu/page-xfer.c): a request is struct page_server_iov {u32 cmd; u64 nr_pages;
u64 vaddr; u64 dst_id} (CRIU 4.2 on: 32 bytes on x86-64; before it nr_pages was u32, 24 bytes:
psi_for() picks by the target's CRIU, which speaks the source's protocol or fails anyway); PS_IOV_GET's answer is the same
header (its nr_pages possibly fewer: the server stops at the end of a range) and the pages;
PS_IOV_CLOSE / PS_IOV_FORCE_CLOSE is answered by an int32 status; answers come in the order of
the requests. dst_id is the task's id in the images (pagemap-<id>.img).

Nothing here trusts the source more than CRIU did: an answer that is not for what was asked
(another address or task, more pages than asked, none) is a protocol error (PrefetchError), and
the relay then ends the pull as if the source had broken it."""

import bisect
import collections
import os
import re
import struct
import subprocess

PSI = struct.Struct("<I4xQQQ")  # cmd, nr_pages, vaddr, dst_id: CRIU 4.2 on
PSI_OLD = struct.Struct("<IIQQ")  # before CRIU 4.2
STATUS = struct.Struct("<i")
PS_IOV_GET = 7
PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE = 0x1023, 0x1024
PS_CMD_MASK = 0xFFFF
PAGE = 4096
PE_LAZY = 1 << 1
IMG_COMMON_MAGIC = 0x54564319
CHUNK = 1 << 20  # one read-ahead request
WINDOW = 8 << 20  # read-ahead bytes asked for and not yet here
HELD_MAX = 96 << 20  # pages here that CRIU has not asked for yet: no more read-ahead beyond
MAX_RANGES = 1 << 20  # a pagemap from a source that lies stays bounded
MAX_PAGES = 1 << 28  # 1 TiB of pages in one request: more is not a request CRIU makes


class PrefetchError(ValueError):
    pass


def psi_for(version):
    """The request layout of a CRIU whose `criu --version` said `version`, or None (unknown)."""
    m = re.search(r"Version:\s*(\d+)\.(\d+)", version or "")
    if not m:
        return None
    return PSI if (int(m.group(1)), int(m.group(2))) >= (4, 2) else PSI_OLD


def local_psi():
    try:
        out = subprocess.run(["criu", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return psi_for(out)


def _varint(buf, pos):
    shift = value = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("a cut varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(msg):
    """A protobuf message's varint fields {number: value} (others skipped)."""
    out, pos = {}, 0
    while pos < len(msg):
        key, pos = _varint(msg, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            out[number], pos = _varint(msg, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, pos = _varint(msg, pos)
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
    if pos != len(msg):
        raise ValueError("a cut field")
    return out


def lazy_ranges(path):
    """The lazy ranges [(start, end)] of one pagemap image, in its order (CRIU writes it sorted)."""
    with open(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack_from("<I", data, 0)
    pos = 8 if magic == IMG_COMMON_MAGIC else 4
    out, first = [], True
    while pos < len(data):
        if len(data) - pos < 4:
            raise ValueError("a cut entry")
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if size > len(data) - pos:
            raise ValueError("a cut entry")
        entry = _fields(data[pos : pos + size])
        pos += size
        if first:  # PagemapHead {pages_id}
            first = False
            continue
        # nr_pages: field 5 (u64) from CRIU 4.2 on, field 2 (u32, compat_nr_pages: 0 then) before
        vaddr, nr, flags = entry.get(1, 0), entry.get(5) or entry.get(2, 0), entry.get(4, 0)
        if flags & PE_LAZY and 0 < nr <= MAX_PAGES and vaddr % PAGE == 0:
            out.append((vaddr, vaddr + nr * PAGE))
            if len(out) > MAX_RANGES:
                raise ValueError("too many ranges")
    return out


def ranges_of(images, notes=None):
    """{task id: lazy ranges} of every pagemap-<id>.img in `images` (an unreadable one: none;
    why, in `notes` when given)."""
    out = {}
    for n in sorted(os.listdir(images)):
        m = re.fullmatch(r"pagemap-(\d+)\.img", n)
        if not m:
            continue
        try:
            got = lazy_ranges(os.path.join(images, n))
        except (OSError, ValueError, struct.error) as e:
            if notes is not None:
                notes.append(f"{n}: {e}")
            continue
        if got:
            out[int(m.group(1))] = got
        elif notes is not None:
            notes.append(f"{n}: no lazy range")
    if notes is not None and not out and not notes:
        notes.append("no pagemap image")
    return out


class _Todo:
    """One task's lazy ranges not asked for yet: sorted, disjoint [start, end)."""

    def __init__(self, ranges):
        self.starts, self.ends = [], []
        for a, b in sorted(ranges):
            if self.ends and a < self.ends[-1]:
                a = self.ends[-1]  # overlapping entries from a lying source: keep them disjoint
            if a < b:
                self.starts.append(a)
                self.ends.append(b)

    def __bool__(self):
        return bool(self.starts)

    def next_from(self, addr, size):
        """Take up to `size` bytes of the first range ending after `addr` (from `addr`, or
        from its start), else of the first range: (start, end) taken, or None."""
        if not self.starts:
            return None
        i = bisect.bisect_right(self.ends, addr)
        if i == len(self.starts):
            i = 0
        a = max(self.starts[i], addr) if self.starts[i] <= addr < self.ends[i] else self.starts[i]
        b = min(self.ends[i], a + size)
        self.take(a, b)
        return a, b

    def take(self, a, b):
        """Remove [a, b) (whatever part of it is here)."""
        i = bisect.bisect_right(self.ends, a)
        while i < len(self.starts) and self.starts[i] < b:
            s, e = self.starts[i], self.ends[i]
            keep = []
            if s < a:
                keep.append((s, a))
            if b < e:
                keep.append((b, e))
            self.starts[i : i + 1] = [k[0] for k in keep]
            self.ends[i : i + 1] = [k[1] for k in keep]
            i += len(keep)
            if keep and keep[-1][0] >= b:
                break

    def end_of(self, addr):
        """The end of the range holding `addr`, or None."""
        i = bisect.bisect_right(self.ends, addr)
        return self.ends[i] if i < len(self.starts) and self.starts[i] <= addr else None


class _Held:
    """One task's pages here, not yet given to CRIU: {start: bytes} with sorted starts."""

    def __init__(self):
        self.starts, self.data = [], {}

    def put(self, addr, data):
        bisect.insort(self.starts, addr)
        self.data[addr] = data

    def find(self, addr):
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0:
            s = self.starts[i]
            if addr < s + len(self.data[s]):
                return s
        return None

    def give(self, addr, nr):
        """Up to `nr` pages from `addr` (which `find` found) as bytes, dropped from here."""
        s = self.find(addr)
        data = self.data.pop(s)
        self.starts.remove(s)
        off = addr - s
        n = min(nr * PAGE, len(data) - off)
        if off:
            self.put(s, data[:off])
        if off + n < len(data):
            self.put(addr + n, data[off + n :])
        return data[off : off + n]


class Prefetcher:
    """The target relay's side of the page protocol: feed_criu() with what CRIU sent,
    feed_source() with what the source's page server sent, then take() the bytes to send each
    way. Raises PrefetchError when the source answers what was not asked."""

    def __init__(self, ranges, psi=PSI, chunk=CHUNK, window=WINDOW, held_max=HELD_MAX):
        self.psi = psi
        self.todo = {dst: _Todo(r) for dst, r in ranges.items()}
        self.lazy = {dst: _Todo(r) for dst, r in ranges.items()}  # every lazy range (never taken from)
        self.chunk, self.window, self.held_max = chunk, window, held_max
        self.held = collections.defaultdict(_Held)
        self.held_bytes = 0
        self.asked = collections.deque()  # ours, in order: ("get", dst, vaddr, nr) | ("status",) | ("raw",)
        self.inflight = 0  # bytes of pages asked for and not yet here
        self.pending = collections.deque()  # CRIU's, in order: (dst, vaddr, nr) | ("close",) | ("raw",)
        self.criu_buf = bytearray()
        self.src = bytearray()
        self.to_source, self.to_criu = [], []
        self.status = None  # the source's answer to a close, for CRIU
        self.closing = False
        self.raw = False  # passing bytes through untouched (after a command we do not know)
        # (dst, address) where the read-ahead goes on: none until CRIU's first request, so that
        # nothing competes with the restore (the container is down until it ends) and the
        # restored tasks' first faults go first on the link
        self.cursor = None
        self.stats = {"asked": 0, "faults": 0, "given": 0, "read_ahead_bytes": 0}

    # --- CRIU's requests ---------------------------------------------------------------
    def feed_criu(self, data):
        if self.raw:
            self.to_source.append(bytes(data))
            return
        self.criu_buf += data
        pos = 0
        psi = self.psi
        while len(self.criu_buf) - pos >= psi.size:
            raw = bytes(self.criu_buf[pos : pos + psi.size])
            pos += psi.size
            cmd, nr, vaddr, dst = psi.unpack(raw)
            if cmd & PS_CMD_MASK == PS_IOV_GET and 0 < nr <= MAX_PAGES:
                self.pending.append((dst, vaddr, nr))
                if nr > 1 or self.cursor is None:  # a background request (a fault asks for one page)
                    self.cursor = (dst, vaddr + nr * PAGE)  # or the first: read ahead from there
                self._ensure(dst, vaddr, nr)
            elif cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                self.closing = True
                self.pending.append(("close",))
                self.asked.append(("status",))
                self.to_source.append(raw)
            else:  # not a request we know: everything from here on passes through
                self.raw = True
                self.pending.append(("raw",))
                self.asked.append(("raw",))
                self.to_source.append(raw + bytes(self.criu_buf[pos:]))
                pos = len(self.criu_buf)
        del self.criu_buf[:pos]

    def _asked_for(self, dst, addr):
        return any(a[0] == "get" and a[1] == dst and a[2] <= addr < a[2] + a[3] * PAGE for a in self.asked)

    def _ask(self, dst, a, b):
        nr = (b - a) // PAGE
        self.asked.append(("get", dst, a, nr))
        self.inflight += nr * PAGE
        self.to_source.append(self.psi.pack(PS_IOV_GET, nr, a, dst))
        self.stats["asked"] += 1

    def _ensure(self, dst, vaddr, nr):
        """CRIU needs [vaddr, +nr pages): if its first page is neither here nor on its way,
        ask for it now (what is left of CRIU's range, within one lazy range we know)."""
        held = self.held.get(dst)
        if (held is not None and held.find(vaddr) is not None) or self._asked_for(dst, vaddr):
            return
        end = vaddr + nr * PAGE
        todo, lazy = self.todo.get(dst), self.lazy.get(dst)
        if todo is not None and (left := todo.end_of(vaddr)) is not None:
            end = min(end, left)
            todo.take(vaddr, end)
        elif lazy is not None and (known := lazy.end_of(vaddr)) is not None:  # asked for before, given: again
            end = min(end, known)
        self.stats["faults"] += 1
        self._ask(dst, vaddr, end)

    # --- the source's answers ----------------------------------------------------------
    def feed_source(self, data):
        if self.raw and not self.asked:
            self.to_criu.append(bytes(data))
            return
        self.src += data
        pos = 0
        while self.asked:
            head = self.asked[0]
            if head[0] == "raw":
                self.asked.popleft()
                self._answer()  # what CRIU asked before it is all here now
                self.to_criu.append(bytes(self.src[pos:]))
                pos = len(self.src)
                break
            if head[0] == "status":
                if len(self.src) - pos < STATUS.size:
                    break
                self.status = bytes(self.src[pos : pos + STATUS.size])
                pos += STATUS.size
                self.asked.popleft()
                continue
            _, dst, vaddr, nr = head
            if len(self.src) - pos < self.psi.size:
                break
            _cmd, got, at, to = self.psi.unpack_from(self.src, pos)
            if to != dst or at != vaddr or not 0 < got <= nr:
                raise PrefetchError(
                    f"the source answered {got} pages at {at:#x} of task {to} for {nr} at {vaddr:#x} of task {dst}"
                )
            if len(self.src) - pos - self.psi.size < got * PAGE:
                break
            start = pos + self.psi.size
            self.held[dst].put(vaddr, bytes(self.src[start : start + got * PAGE]))
            self.held_bytes += got * PAGE
            pos = start + got * PAGE
            self.inflight -= nr * PAGE
            self.asked.popleft()
            rest = vaddr + got * PAGE
            lazy = self.lazy.get(dst)
            known = lazy.end_of(rest) if lazy is not None and got < nr and not self.closing and not self.raw else None
            if known is not None:
                # The server stopped at the end of one of its buffers: the rest, asked for at once
                # (only where the pagemap says it has pages: a request for none ends the server).
                self._ask(dst, rest, min(vaddr + nr * PAGE, known))
        del self.src[:pos]

    # --- both ways ---------------------------------------------------------------------
    def _answer(self):
        """Answer CRIU's requests in their order, as far as the pages are here."""
        while self.pending:
            head = self.pending[0]
            if head[0] == "close":
                if self.status is None:
                    return
                self.to_criu.append(self.status)
                self.pending.popleft()
                continue
            if head[0] == "raw":
                self.pending.popleft()
                continue
            dst, vaddr, nr = head
            held = self.held.get(dst)
            if held is None or held.find(vaddr) is None:
                if not self.raw and not self._asked_for(dst, vaddr):
                    self._ensure(dst, vaddr, nr)  # a short answer left it out: ask again
                return
            data = held.give(vaddr, nr)
            self.held_bytes -= len(data)
            self.stats["given"] += len(data)
            self.to_criu.append(self.psi.pack((4 << 16) | 6, len(data) // PAGE, vaddr, dst) + data)
            self.pending.popleft()

    def _read_ahead(self):
        while (
            not self.closing
            and not self.raw
            and self.cursor is not None
            and self.inflight < self.window
            and self.held_bytes + self.inflight < self.held_max
        ):
            dst, addr = self.cursor
            todo = self.todo.get(dst)
            if not todo:
                rest = [d for d in sorted(self.todo) if self.todo[d]]
                if not rest:
                    self.cursor = None
                    return
                dst, addr = rest[0], 0
                todo = self.todo[dst]
            a, b = todo.next_from(addr, self.chunk)
            self._ask(dst, a, b)
            self.stats["read_ahead_bytes"] += b - a
            self.cursor = (dst, b)

    def take(self):
        """(bytes for the source, bytes for CRIU) now."""
        if not self.raw:
            self._answer()
            self._read_ahead()
        out = b"".join(self.to_source), b"".join(self.to_criu)
        self.to_source.clear()
        self.to_criu.clear()
        return out

    def holding(self):
        """Something for CRIU is still to come out of here."""
        return bool(self.pending) or bool(self.to_criu)
