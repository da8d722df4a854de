"""The lab's package proxy: a bare lab host reaches the Debian registry only through this.

A lab host's network namespace reaches its own /24 and nothing else (no uplink, no NAT). A
bare host (lab/core.py `up_bare`) must still install packages the way a real host does, with
apt-get over its own network: its apt configuration names this proxy (Acquire::http::Proxy),
which listens on the lab bridge's address and forwards plain HTTP GET and HEAD requests to one
origin only, http://deb.debian.org (the registry the lab's rootfs comes from). Any other host,
method or scheme (CONNECT included) is refused with 403: the proxy is no way out of the lab
for anything else.

Standard library only. Run: python3 -I lab/apt_proxy.py ADDRESS PORT
"""

from __future__ import annotations

import http.client
import socketserver
import sys
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

ORIGIN = "deb.debian.org"
CHUNK = 1 << 16
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer", "upgrade"}


def allowed(method: str, url: str) -> tuple[str, str] | None:
    """(host, path) of a request the proxy forwards, or None: GET/HEAD of http://deb.debian.org/..."""
    if method not in ("GET", "HEAD"):
        return None
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname != ORIGIN or parts.port not in (None, 80) or parts.username:
        return None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return ORIGIN, path


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: apt copes, the proxy stays simple

    def _refuse(self) -> None:
        self.send_error(403, f"the lab proxy forwards only GET and HEAD of http://{ORIGIN}/")

    def _forward(self) -> None:
        target = allowed(self.command, self.path)
        if target is None:
            self._refuse()
            return
        host, path = target
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS and k.lower() != "host"}
        conn = http.client.HTTPConnection(host, 80, timeout=60)
        try:
            conn.request(self.command, path, headers=headers)
            resp = conn.getresponse()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_HEADERS and k.lower() != "transfer-encoding":
                    self.send_header(k, v)
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                while chunk := resp.read(CHUNK):
                    self.wfile.write(chunk)
        except OSError as e:
            self.log_message("upstream failed: %s", e)
            try:
                self.send_error(502, "the registry did not answer")
            except OSError:
                pass
        finally:
            conn.close()

    do_GET = do_HEAD = _forward

    def do_CONNECT(self) -> None:  # noqa: N802 - the method's name
        self._refuse()

    do_POST = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = do_CONNECT


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: apt_proxy.py ADDRESS PORT", file=sys.stderr)
        return 2
    with Server((argv[1], int(argv[2])), Handler) as server:
        print(f"lab apt proxy on {argv[1]}:{argv[2]} -> http://{ORIGIN}", flush=True)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
