"""deploy/nginx-ctweb.conf in front of a stack, for real: Debian's nginx run as this test's own
process on loopback with a self-signed certificate. Login over HTTPS, Secure cookies, one HSTS
header, plain HTTP sent to HTTPS, and an operation's live progress over the websocket."""

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess

import pytest
import requests
import websockets

from tests.support.stack import ROOT, Api, Process, SSHServer, Stack, free_port, wait_for

pytestmark = pytest.mark.e2e
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def _site(tmp_path, web_port: int, https: int, http: int) -> str:
    """The deploy file with this test's ports and certificate; each replaced line must exist."""
    text = (ROOT / "deploy" / "nginx-ctweb.conf").read_text()
    for old, new in [
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{web_port};"),
        ("    listen 80;\n    listen [::]:80;\n", f"    listen 127.0.0.1:{http};\n"),
        ("    listen 443 ssl;\n    listen [::]:443 ssl;\n", f"    listen 127.0.0.1:{https} ssl;\n"),
        ("/etc/ssl/certs/ctweb.pem", str(tmp_path / "cert.pem")),
        ("/etc/ssl/private/ctweb.key", str(tmp_path / "key.pem")),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.fixture
def proxied(tmp_path):
    if not os.path.exists(NGINX):
        pytest.fail("nginx is missing: scripts/setup.sh installs it")
    stack = Stack()
    stack.env.update(HTTPS="1", TRUSTED_PROXIES="127.0.0.1")
    sshd = None
    try:
        stack.start()
        stack.tokens = stack.make_users()
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
            check=True, capture_output=True,
        )  # fmt: skip
        https, http = free_port(), free_port()
        (tmp_path / "site.conf").write_text(_site(tmp_path, stack.port, https, http))
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp_path / d).mkdir()
        (tmp_path / "nginx.conf").write_text(
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
            "events {}\nhttp {\n"
            f"  access_log {tmp_path}/access.log;\n"
            + "".join(f"  {d}_temp_path {tmp_path}/{d};\n" for d in ("proxy", "fastcgi", "uwsgi", "scgi"))
            + f"  client_body_temp_path {tmp_path}/body;\n  include {tmp_path}/site.conf;\n}}\n"
        )
        nginx = Process(
            "nginx", [NGINX, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(tmp_path / "nginx.conf")],
            dict(os.environ), tmp_path / "nginx.out",
        ).start()  # fmt: skip
        stack.procs["nginx"] = nginx
        url = f"https://127.0.0.1:{https}"
        wait_for(
            lambda: (
                requests.get(url + "/accounts/login/", verify=str(tmp_path / "cert.pem"), timeout=2).raise_for_status()
                or True
            ),
            20,
            "nginx",
        )
        sshd = SSHServer(stack.dashboard_public_key()).start()
        yield {
            "stack": stack,
            "url": url,
            "http": f"http://127.0.0.1:{http}",
            "ca": str(tmp_path / "cert.pem"),
            "sshd": sshd,
        }
        errors = stack.errors_since({p: 0 for p in stack.log_marks()})
        assert errors == [], "\n".join(errors)
    finally:
        if sshd:
            sshd.cleanup()
        stack.stop()


def _login(url, ca, username, password):
    s = requests.Session()
    s.trust_env = False  # a CA bundle named in the environment would win over verify=
    s.verify = ca
    form = s.get(url + "/accounts/login/", timeout=10)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
    r = s.post(
        url + "/accounts/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": token},
        headers={"Referer": url + "/accounts/login/", "Origin": url},
        allow_redirects=False,
        timeout=10,
    )
    return s, form, r


def test_behind_nginx_with_tls(proxied):
    url, ca, stack, sshd = proxied["url"], proxied["ca"], proxied["stack"], proxied["sshd"]
    s, form, r = _login(url, ca, "alice", "alice-password-1")
    assert r.status_code == 302, r.text[:500]
    # One HSTS header, from nginx, on pages and redirects alike.
    for resp in (form, r):
        assert resp.raw.headers.getlist("Strict-Transport-Security") == ["max-age=63072000"]
    cookies = {c.name: c for c in s.cookies}
    assert cookies["sessionid"].secure and cookies["csrftoken"].secure and cookies["ctweb_known"].secure
    assert "HttpOnly" in r.headers["Set-Cookie"]
    assert s.get(url + "/hosts/", timeout=10).status_code == 200  # logged in through the proxy

    # Bodies: 256 KiB everywhere but an import's upload, which nginx passes on to ctweb.
    archive = {"archive": ("a.tar", b"\0" * 600_000)}
    headers = {"Authorization": f"Token {stack.tokens['bob']}"}
    big = s.post(url + "/api/v1/containers/", files=archive, headers=headers, timeout=30)
    assert big.status_code == 413 and "nginx" in big.text, big.text[:200]  # refused by nginx itself
    upload = s.post(url + "/api/v1/imports", data={"name": "up1"}, files=archive, headers=headers, timeout=30)
    assert upload.status_code == 400 and upload.json()["field"] == "host", upload.text[:300]  # ctweb's answer

    plain = requests.get(proxied["http"] + "/hosts/?x=1", allow_redirects=False, timeout=10)
    assert plain.status_code == 301
    assert plain.headers["Location"] == "https://127.0.0.1/hosts/?x=1"  # the standard port

    # An operation's live progress over wss://, with the browser's session cookie and origin.
    admin = Api(stack, stack.tokens["alice"])
    assert (
        admin.post("/api/v1/hosts/", json={"name": "tls", "address": "127.0.0.1", "port": sshd.port}).status_code == 201
    )
    assert admin.post("/api/v1/hosts/tls/trust", json={"fingerprint": sshd.fingerprint()}).status_code == 200
    probe = s.post(
        url + "/api/v1/hosts/tls/probe",
        headers={"X-CSRFToken": s.cookies["csrftoken"], "Referer": url + "/hosts/", "Origin": url},
        timeout=10,
    )
    assert probe.status_code == 202, probe.text
    op_id = probe.json()["id"]

    async def follow():
        ctx = ssl.create_default_context(cafile=str(ca))
        cookie = "; ".join(f"{c.name}={c.value}" for c in s.cookies)
        ws_url = url.replace("https://", "wss://") + f"/ws/operations/{op_id}/"
        messages = []
        async with websockets.connect(ws_url, ssl=ctx, origin=url, additional_headers={"Cookie": cookie}) as ws:
            async with asyncio.timeout(90):
                async for raw in ws:
                    messages.append(json.loads(raw))
                    if messages[-1]["operation"]["status"] in ("success", "failure", "cancelled"):
                        return messages

    messages = asyncio.run(follow())
    assert messages[0]["type"] == "state"
    assert messages[-1]["operation"]["status"] == "success", messages[-1]["operation"]
    assert any(m.get("event") for m in messages[1:]), "no live event came through the proxy"
