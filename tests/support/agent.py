"""The host agent in a temporary root, for tests of its pure parts: a fresh copy per test, and tars fed to its receive as sshd would."""

from __future__ import annotations

import io
import os
import sys
import tarfile
import threading

import pytest

from tests.support.agent_loader import load_agent


@pytest.fixture
def agent(tmp_path):
    return load_agent(root=tmp_path)


def receive(agent, monkeypatch, tar_bytes: bytes, what="rootfs"):
    # A real descriptor, as from sshd: the agent reads it directly and gives up on a stall.
    r, w = os.pipe()

    def feed():
        with os.fdopen(w, "wb") as f:
            f.write(tar_bytes)

    threading.Thread(target=feed, daemon=True).start()

    class Stdin:
        buffer = os.fdopen(r, "rb")

    monkeypatch.setattr(sys, "stdin", Stdin)
    try:
        return agent.cmd_receive({"name": "c1", "migration": 1, "what": what})
    finally:
        Stdin.buffer.close()


def make_tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()
