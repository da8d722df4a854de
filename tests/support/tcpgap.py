"""An independent TCP client of a container's echo service, outside the product: how long a
client saw no answer while the container migrated (the check on the client-visible downtime
a migration reports; used by a lab test and by `make bench`).

One connection waiting for a lost request only tries again on TCP's retransmission clock
(0.2 s, then 0.6, 1.4, 3 s after its first send), which would measure the client's back-off
as much as the container's absence. So the client holds many established connections and
sends a one-byte request on the next idle one every few milliseconds: right after the
container is back, a fresh request is answered at once. While no answer comes, the sends
spread out (every 3 % of the silence so far, at least every 5 ms) so the idle connections
last through a long absence: the gap is measured to within 3 % + 5 ms. All connections are
opened before any migration (a connection still in the listener's accept queue makes CRIU
refuse the dump)."""

from __future__ import annotations

import collections
import errno
import selectors
import socket
import threading
import time

# The service in the container: one thread, every connection echoed until its client closes it.
ECHO_SERVICE = (
    "import selectors, socket\n"
    "sel = selectors.DefaultSelector()\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 7000)); s.listen(512); sel.register(s, selectors.EVENT_READ)\n"
    "while True:\n"
    "    for key, _ in sel.select():\n"
    "        if key.fileobj is s:\n"
    "            c, _ = s.accept(); sel.register(c, selectors.EVENT_READ)\n"
    "        else:\n"
    "            try:\n"
    "                data = key.fileobj.recv(4096)\n"
    "                if data: key.fileobj.sendall(data); continue\n"
    "            except OSError:\n"
    "                pass\n"
    "            sel.unregister(key.fileobj); key.fileobj.close()\n"
)
PORT = 7000


class GapClient:
    """Requests on `connections` connections, one every `every_s`; answers' arrival times kept."""

    def __init__(self, ip: str, port: int = PORT, connections: int = 200, every_s: float = 0.005, spread: float = 0.03):
        self.ip, self.port, self.every_s, self.spread = ip, port, every_s, spread
        self.socks = []
        for _ in range(connections):
            s = socket.create_connection((ip, port), timeout=5)
            s.sendall(b"x")  # one round trip: the connection has an RTT sample (RTO 0.2 s, not 1 s)
            assert s.recv(1) == b"x"
            s.setblocking(False)
            self.socks.append(s)
        self.answers: list[float] = []  # time.monotonic() of each answer
        self.lost = 0  # connections that closed or failed (not expected)
        # How each was lost: (time.monotonic(), "send"/"recv", errno name or "closed"), so a
        # loss can be placed in the migration (and strategy) it happened in.
        self.losses: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> GapClient:
        self._thread.start()
        time.sleep(0.2)
        return self

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        idle = collections.deque(self.socks)
        for s in self.socks:
            sel.register(s, selectors.EVENT_READ)
        next_send = last_answer = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_send:
                if idle:
                    s = idle.popleft()  # it waits for its answer before it is used again
                    try:
                        s.send(b"x")
                    except OSError as e:
                        sel.unregister(s)
                        self._lose("send", e)
                next_send = now + max(self.every_s, self.spread * (now - last_answer))
                continue
            for key, _ in sel.select(max(0.0, next_send - now)):
                try:
                    data = key.fileobj.recv(64)
                except BlockingIOError:
                    continue
                except OSError as e:
                    sel.unregister(key.fileobj)
                    self._lose("recv", e)
                    continue
                if not data:
                    sel.unregister(key.fileobj)
                    self._lose("recv", None)
                    continue
                last_answer = time.monotonic()
                self.answers.append(last_answer)
                idle.append(key.fileobj)
        sel.close()

    def _lose(self, where: str, error: OSError | None) -> None:
        what = "closed" if error is None else (errno.errorcode.get(error.errno or 0) or repr(error))
        self.losses.append((time.monotonic(), where, what))
        self.lost += 1

    def losses_between(self, since: float, until: float) -> list[str]:
        """The connections lost between `since` and `until` (monotonic), e.g. 'recv ECONNRESET'."""
        return [f"{where} {what}" for t, where, what in self.losses if since <= t < until]

    def longest_gap_ms(self, since: float, until: float) -> float:
        """The longest time without any answer between `since` and `until` (monotonic)."""
        times = [since] + [t for t in self.answers if since < t < until] + [until]
        return round(max(b - a for a, b in zip(times, times[1:], strict=False)) * 1000, 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.socks:
            s.close()
