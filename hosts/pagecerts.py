"""Per-migration certificates for the direct host-to-host links: a post-copy's page link and
each direct stream of a tar (the agent's side: hosts/agent/ctweb_agent/pagelink.py). The worker makes two, one per host, each self-signed
with a fresh P-256 key, and hands each agent its own certificate and key and the peer's
certificate in its JSON parameters over SSH: each side trusts exactly the other's
certificate. Nothing is stored: the keys live in the worker's memory for the run and in the
migration's root-only directory on each host until its cleanup."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365  # a pull may wait long for an admin; the pin, not the date, is the check


def _certificate(common_name: str) -> dict[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # the hosts' clocks may differ
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return {
        "cert": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "key": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    }


class PageLinkKeys:
    """One migration's two certificates; `params(role, ...)` is what that host's agent gets."""

    def __init__(self, migration: int):
        self.source = _certificate(f"ctweb migration {migration} source")
        self.target = _certificate(f"ctweb migration {migration} target")

    def __repr__(self) -> str:  # never the keys, in a log or a traceback
        return "PageLinkKeys(<per-migration keys>)"

    def tls(self, role: str) -> dict:
        """A direct stream's `tls` parameters for one end: "source" (it sends, connecting) or
        "target" (it receives, listening)."""
        mine, peer = (self.source, self.target) if role == "source" else (self.target, self.source)
        return {**mine, "peer_cert": peer["cert"]}

    def for_source(self, listen: str, peer: str) -> dict:
        return {**self.source, "peer_cert": self.target["cert"], "listen": listen, "peer": peer}

    def for_target(self, bind: str, address: str, port: int) -> dict:
        return {**self.target, "peer_cert": self.source["cert"], "bind": bind, "address": address, "port": port}
