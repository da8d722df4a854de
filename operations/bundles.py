"""Debug bundles: what a failed operation leaves behind for whoever looks into it.

Where they are kept and how they are served. What goes in them is the features' business
(runner.collects_bundle; the containers' operations fetch one from each host involved:
containers/handlers.py collect_bundle). Never the dashboard's own keys or settings.
"""

from __future__ import annotations

import io
import logging
import tarfile
from typing import BinaryIO

from django.core.files import File
from django.core.files.storage import Storage, storages

from .models import Operation

log = logging.getLogger(__name__)

# Kept through Django's storage API (settings.STORAGES["bundles"]: files under var/bundles by
# default, S3-compatible storage through django-storages), so the web node that serves a bundle
# finds what another node's worker saved.
STORAGE = "bundles"


def _storage() -> Storage:
    return storages[STORAGE]


def _folder(op_id: int) -> str:
    return f"op-{int(op_id)}"


def save_bundle(op_id: int, file_name: str, content: BinaryIO) -> str:
    """Keep one host's bundle of an operation (replacing one of that name); its name."""
    name = f"{_folder(op_id)}/{file_name}"
    storage = _storage()
    if storage.exists(name):
        storage.delete(name)
    storage.save(name, File(content, name=file_name))
    return file_name


def bundle_files(op: Operation) -> list[str]:
    """The names of the operation's bundles (one per host), sorted."""
    try:
        _dirs, files = _storage().listdir(_folder(op.pk))
    except FileNotFoundError:
        return []
    return sorted(f for f in files if f.endswith(".tar.gz"))


def bundle_bytes(op: Operation) -> bytes | None:
    """One tar.gz holding each host's bundle under its host name."""
    names = bundle_files(op)
    if not names:
        return None
    storage = _storage()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in names:
            with storage.open(f"{_folder(op.pk)}/{name}", "rb") as f:
                data = f.read()
            info = tarfile.TarInfo(f"op-{op.pk}/{name}")
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
