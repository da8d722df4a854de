"""Debug bundles: what a failed operation leaves behind for whoever looks into it.

From each host involved: the CRIU logs, `uname -a`, `criu check`, the container's LXC
config, mountinfo and the tail of dmesg (the agent's `bundle` subcommand makes a tar.gz
there; we fetch it over SFTP). Never the dashboard's own keys or settings.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

from django.conf import settings

from hosts import ssh
from operations.models import Operation

log = logging.getLogger(__name__)

# Operations on containers leave bundles; a probe's failure is its own explanation.
BUNDLE_KINDS = {
    Operation.Kind.CREATE,
    Operation.Kind.START,
    Operation.Kind.STOP,
    Operation.Kind.RESTART,
    Operation.Kind.DELETE,
    Operation.Kind.SNAPSHOT,
    Operation.Kind.RESTORE,
    Operation.Kind.DELETE_SNAPSHOT,
    Operation.Kind.MIGRATE,
}


def bundle_dir(op_id: int) -> Path:
    return Path(settings.VAR_DIR) / "bundles" / f"op-{int(op_id)}"


def collect(op: Operation) -> list[str]:
    """Fetch a bundle from every host the operation touched. Best effort: never raises."""
    if op.kind not in BUNDLE_KINDS:
        return []
    saved = []
    for host in [h for h in (op.host, op.target_host) if h is not None]:
        try:
            with ssh.connect(host, timeout=10) as conn:
                data = conn.run_agent("bundle", {"name": op.container_name or None, "op": op.pk}, timeout=120).data
                local = bundle_dir(op.pk) / f"{host.name}.tar.gz"
                conn.fetch(data["path"], local)
                saved.append(local.name)
        except Exception as e:  # the operation's own error matters more than its bundle
            log.warning("no debug bundle from %s for operation %s: %s", host, op.pk, e)
    return saved


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
