"""Debug bundles: what a failed operation leaves behind for whoever looks into it.

Where they are kept and how they are served. What goes in them is the features' business
(runner.collects_bundle; the containers' operations fetch one from each host involved:
containers/handlers.py collect_bundle). Never the dashboard's own keys or settings.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

from django.conf import settings

from .models import Operation

log = logging.getLogger(__name__)


def bundle_dir(op_id: int) -> Path:
    return Path(settings.VAR_DIR) / "bundles" / f"op-{int(op_id)}"


def bundle_files(op: Operation) -> list[Path]:
    d = bundle_dir(op.pk)
    return sorted(d.glob("*.tar.gz")) if d.is_dir() else []


def bundle_bytes(op: Operation) -> bytes | None:
    """One tar.gz holding each host's bundle under its host name."""
    files = bundle_files(op)
    if not files:
        return None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f"op-{op.pk}/{f.name}")
    return buf.getvalue()
