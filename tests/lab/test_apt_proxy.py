"""The lab's package proxy (lab/apt_proxy.py) forwards GET and HEAD of http://deb.debian.org/
only: it is no way out of the lab for anything else. (Forwarding itself is exercised by the
bare host's prepare, tests/hosts/test_e2e_lab_prepare.py.)"""

import http.client
import threading

import pytest

from lab import apt_proxy


@pytest.mark.parametrize(
    "method, url, allowed",
    [
        (
            "GET",
            "http://deb.debian.org/debian/dists/trixie/InRelease",
            ("deb.debian.org", "/debian/dists/trixie/InRelease"),
        ),
        ("HEAD", "http://deb.debian.org:80/debian/x.deb", ("deb.debian.org", "/debian/x.deb")),
        ("GET", "http://deb.debian.org.evil.example/debian/", None),
        ("GET", "http://evil.example/?deb.debian.org", None),
        ("GET", "http://user@deb.debian.org/debian/", None),
        ("GET", "https://deb.debian.org/debian/", None),
        ("GET", "http://deb.debian.org:8080/debian/", None),
        ("POST", "http://deb.debian.org/debian/", None),
        ("CONNECT", "deb.debian.org:443", None),
        ("GET", "/debian/dists/trixie/InRelease", None),
    ],
)
def test_it_forwards_only_gets_of_the_debian_registry(method, url, allowed):
    assert apt_proxy.allowed(method, url) == allowed


def test_a_running_proxy_refuses_other_hosts_and_connect_without_reaching_them():
    server = apt_proxy.Server(("127.0.0.1", 0), apt_proxy.Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        for method, target in (("GET", "http://127.0.0.1:1/secret"), ("CONNECT", "deb.debian.org:443")):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(method, target)
            resp = conn.getresponse()
            assert resp.status == 403, (method, target, resp.status)
            conn.close()
    finally:
        server.shutdown()
        server.server_close()
