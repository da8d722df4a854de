"""Searching a debug bundle's contents (not only its member names) for secrets."""

from __future__ import annotations

import gzip
import io
import tarfile


def members(data: bytes, prefix: str = ""):
    """(name, content) of every file in a tar(.gz), descending into tars and gzips inside it."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            name = prefix + m.name
            if not m.isfile():
                yield name, m.name.encode()  # a link's target is content too
                continue
            content = tar.extractfile(m).read()
            yield name, content
            if content[:2] == b"\x1f\x8b":
                try:
                    inner = gzip.decompress(content)
                except OSError:
                    continue
                yield name + "!gunzip", inner
                try:
                    yield from members(inner, name + "!")
                except tarfile.TarError:
                    pass
            elif content[257:262] == b"ustar":
                yield from members(content, name + "!")


def secret_fragments(private_key: str, secret_key: str, tokens: dict) -> dict:
    """What must not appear: a line of the private key's body (any of them would do to find
    it), the SECRET_KEY and every token."""
    body = [line for line in private_key.strip().splitlines() if line and not line.startswith("-----")]
    out = {f"private key line {i + 1}": line for i, line in enumerate(body)}
    out["private key header"] = "PRIVATE KEY-----"
    out["SECRET_KEY"] = secret_key
    out.update({f"token of {u}": t for u, t in tokens.items()})
    return out


def leaks(data: bytes, fragments: dict) -> list[tuple[str, str]]:
    """(what, member) for every fragment found in any member's content."""
    found = []
    scanned = 0
    for name, content in members(data):
        scanned += 1
        for what, value in fragments.items():
            if value and value.encode() in content:
                found.append((what, name))
    assert scanned > 0, "an empty bundle proves nothing"
    return found
