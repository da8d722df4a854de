"""A snapshot as one archive: exported from its host to the dashboard's storage (downloaded
from there), and imported on any host as a new container with that snapshot.

The archive's format and its one check live in the agent package
(hosts/agent/ctweb_agent/exports.py): the dashboard runs that check on every archive it keeps
(an export, from a host that may lie) and on every archive before it sends one to a host (an
import, from anyone), and the importing host's agent runs it again, member by member as the
archive arrives, with the staging of a migration's receive: nothing is put in place on the host
before all of it matched. Archives are kept through Django's storage API
(settings.STORAGES["exports"]), like debug bundles, so the node that serves a download finds
what another node's worker kept."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.core.files import File
from django.core.files.storage import Storage, storages
from django.db import transaction
from django.http import FileResponse
from django.utils import timezone

from core.api import ApiError
from core.audit import Actor, audit
from hosts import ssh
from hosts.agent.ctweb_agent import exports as archive
from hosts.agent.ctweb_agent.common import AgentError
from hosts.handlers import failure
from operations.events import publish_fleet
from operations.models import Operation
from operations.runner import OperationContext, OperationFailed, WaitFor, handler, recovers, undoes

from . import handlers
from .handlers import (
    _network_params,
    agent_or_wait,
    container_of,
    container_state,
    lost_answer,
    record_snapshot,
    release_reservation,
    set_state,
)
from .models import Container, Snapshot
from .services import check_new_name, container_operation, reserve_container, usable_host

log = logging.getLogger(__name__)

STORAGE = "exports"


def _storage() -> Storage:
    return storages[STORAGE]


def export_file(op_id: int) -> str:
    """Where the archive of an export operation is kept."""
    return f"exports/op-{int(op_id)}.tar"


def download_url(op_id: int) -> str:
    return f"/api/v1/exports/{int(op_id)}"


def check(f) -> dict:
    """The one check of an archive (the agent package's), for the dashboard: its manifest, or
    OperationFailed with the sentence that says what is wrong."""
    try:
        return archive.verify(f, settings.EXPORT_MAX_BYTES)
    except AgentError as e:
        raise OperationFailed(f"The archive was refused: {e.message}") from None


class _Hashing:
    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def write(self, data):
        self.h.update(data)
        return self.f.write(data)


def _throttled(ctx: OperationContext, phase: str, base: int, span: int, total: int | None, what: str):
    last = [0.0]

    def on_bytes(n: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5:
            last[0] = now
            share = min(1.0, n / total) if total else 0.0
            ctx.event(phase, f"{what}: {n / 1048576:.1f} MiB", int(base + span * share), bytes=n)
            ctx.check_cancel()  # a cancel stops the stream (its channel is closed)

    return on_bytes


# --- export --------------------------------------------------------------------------------------


def export_snapshot(actor: Actor, container: Container, snapshot: Snapshot) -> Operation:
    return container_operation(actor, container, Operation.Kind.EXPORT, snapshot=snapshot.name)


@handler("export")
def export(ctx: OperationContext) -> dict:
    op, container = ctx.op, container_of(ctx)
    snap = op.params["snapshot"]
    snapshot = container.snapshots.filter(name=snap).first()
    if snapshot is None:
        raise OperationFailed(f"{container.name} has no snapshot {snap} any more.")
    host = op.host
    ctx.event("export", f"packing snapshot {snap} of {container.name} on {host.name}", 5)
    size = snapshot.size_bytes or None
    with tempfile.TemporaryFile(prefix="ctweb-export-") as tmp:
        out = _Hashing(tmp)
        try:
            with ssh.pooled(host) as conn:
                channel = conn.open_stream("export", {"name": container.name, "snapshot": snap})
                n = ssh.download(
                    channel,
                    out,
                    _throttled(ctx, "transfer", 5, 70, size, "archive"),
                    settings.EXPORT_MAX_BYTES,
                    settings.OPERATION_TIMEOUT_S,
                )
        except ssh.SSHError as e:
            raise failure(e, host, prefix=f"The export of {snap} from {host.name} failed: ") from e
        ctx.event("verify", f"checking the archive ({n / 1048576:.1f} MiB) against its manifest", 80)
        tmp.seek(0)
        man = check(tmp)
        if (man["container"], man["snapshot"]) != (container.name, snap):
            raise OperationFailed(
                f"{host.name} sent the archive of {man['container']}/{man['snapshot']}, not of {snap}."
            )
        ctx.event("save", "keeping the archive for download", 90)
        tmp.seek(0)
        name = export_file(op.pk)
        storage = _storage()
        if storage.exists(name):
            storage.delete(name)
        storage.save(name, File(tmp, name=f"op-{op.pk}.tar"))
    return {
        "download": download_url(op.pk),
        "file_name": f"ctweb-{container.name}-{snap}.tar",
        "bytes": n,
        "sha256": out.h.hexdigest(),
        "container": container.name,
        "snapshot": snap,
        "stateful": man["stateful"],
        "files": len(man["files"]),
        "kept_until": kept_until(timezone.now()),
    }


@recovers("export")
def recover_export(ctx: OperationContext) -> dict:
    """An export whose worker was lost is made again from the start: it only reads on its host,
    so doing it twice changes nothing there, and what it keeps is checked like any archive."""
    ctx.event("export", "the worker was lost; exporting again from the start", 5)
    return export(ctx)


# --- retention ----------------------------------------------------------------------------------

# An upload no import names any more (its import ended without removing it: a worker killed at
# that instant) is removed after this long; younger ones may belong to a request still reserving.
UPLOAD_GRACE_S = 3600


def kept_until(finished) -> str | None:
    """When the archive of an export that ended at `finished` goes (CTWEB_EXPORT_KEEP_DAYS),
    or None when kept archives never expire."""
    days = settings.EXPORT_KEEP_DAYS
    return (finished + timedelta(days=days)).isoformat() if days > 0 else None


def expire_exports(now: datetime | None = None) -> dict:
    """The retention of kept archives (Celery beat): the archive of every export that ended more
    than CTWEB_EXPORT_KEEP_DAYS ago, unless an import that has not ended reads it, and every
    upload no such import names, older than UPLOAD_GRACE_S. Returns what was removed."""
    now = now or timezone.now()
    storage = _storage()
    reading = Operation.objects.filter(kind=Operation.Kind.IMPORT, status__in=Operation.ACTIVE)
    in_use = {str(p.get("archive")) for p in reading.values_list("params", flat=True) if isinstance(p, dict)}
    removed = {"exports": [], "uploads": []}
    if settings.EXPORT_KEEP_DAYS > 0:
        old = Operation.objects.filter(
            kind=Operation.Kind.EXPORT,
            status=Operation.Status.SUCCESS,
            finished_at__lt=now - timedelta(days=settings.EXPORT_KEEP_DAYS),
        ).exclude(result__download=None)
        for op in old.order_by("pk"):
            name = export_file(op.pk)
            if name in in_use:
                continue
            _drop_archive(op, now)
            audit(
                Actor(None), "export.expire", op,
                detail=f"the archive of export {op.pk} ({op.container_name}), kept {settings.EXPORT_KEEP_DAYS:g} days",
            )  # fmt: skip
            removed["exports"].append(op.pk)
    try:
        uploads = storage.listdir("uploads")[1]
    except (FileNotFoundError, NotImplementedError):
        uploads = []
    for f in sorted(uploads):
        name = f"uploads/{f}"
        if name in in_use:
            continue
        try:
            age = (now - storage.get_modified_time(name)).total_seconds()
        except (OSError, NotImplementedError):
            continue  # its age unknown: never removed on a guess
        if age > UPLOAD_GRACE_S:
            storage.delete(name)
            removed["uploads"].append(name)
    if removed["exports"] or removed["uploads"]:
        log.info("export retention removed %s", removed)
    return removed


def stored_export(op_id) -> Operation:
    """A successful export whose archive is kept, or 404."""
    op = Operation.objects.filter(pk=op_id, kind=Operation.Kind.EXPORT, status=Operation.Status.SUCCESS).first()
    if op is None or not _storage().exists(export_file(op.pk)):
        raise ApiError(f"There is no kept export {op_id} (only a successful export operation keeps one).", 404)
    return op


def download(op_id) -> FileResponse:
    op = stored_export(op_id)
    name = (op.result or {}).get("file_name") or f"ctweb-export-{op.pk}.tar"
    return FileResponse(
        _storage().open(export_file(op.pk), "rb"), as_attachment=True, filename=name, content_type="application/x-tar"
    )


def delete_export(actor: Actor, op_id) -> None:
    """Remove a kept export's archive (the operation stays, saying when it was removed)."""
    op = stored_export(op_id)
    _drop_archive(op, timezone.now())
    audit(actor, "export.delete", op, detail=f"the archive of export {op.pk} ({op.container_name})")


def _drop_archive(op: Operation, when: datetime) -> None:
    """The export's record says its archive is gone, and the file goes with that change (on
    commit), never before."""
    with transaction.atomic():
        locked = Operation.objects.select_for_update().get(pk=op.pk)
        result = {**(locked.result or {}), "download": None, "archive_deleted_at": when.isoformat()}
        Operation.objects.filter(pk=op.pk).update(result=result)
        name = export_file(op.pk)
        transaction.on_commit(lambda: _storage().delete(name))


# --- import --------------------------------------------------------------------------------------


def _source(export_id, upload) -> dict:
    """The import's archive: a kept export's, or an upload kept until the import ends."""
    if (export_id is None) == (upload is None):
        raise ApiError("Give either an export (the id of an export operation) or an archive to upload.", 400, "export")
    if export_id is not None:
        try:
            source = stored_export(export_id)
        except ApiError as e:
            raise ApiError(str(e.detail), 400, "export") from None
        return {"archive": export_file(source.pk), "export": source.pk}
    if upload.size > settings.EXPORT_MAX_BYTES:
        raise ApiError(f"The archive is larger than {settings.EXPORT_MAX_BYTES >> 20} MiB.", 413, "archive")
    stored = _storage().save(f"uploads/{uuid.uuid4().hex}.tar", File(upload, name="upload.tar"))
    return {"archive": stored, "upload": True}


def import_archive(actor: Actor, name, host_name, export_id=None, upload=None) -> Operation:
    """Reserve `name` (and an address) on the host and queue the import of a kept export
    (`export_id`) or of an uploaded archive (`upload`, kept until its import ends)."""
    check_new_name(name)
    host = usable_host(host_name)
    if Container.objects.filter(name=name).exists():
        raise ApiError(f"A container named {name} exists already.", 409, "name")
    params = _source(export_id, upload)
    try:
        op = reserve_container(actor, name, host, Operation.Kind.IMPORT, params)
    except BaseException:
        _drop_upload_of(params)
        raise
    source = f"export {params['export']}" if "export" in params else "an uploaded archive"
    audit(actor, "container.import", op.container, detail=f"on {host.name} from {source}, op {op.pk}")
    return op


def import_into(actor: Actor, container_name, export_id=None, upload=None) -> Operation:
    """Queue the import of an archive's snapshot into an existing container (a snapshot of it,
    which a restore rolls it back to); an operation on the container like any other."""
    container = Container.objects.filter(name=container_name).first() if isinstance(container_name, str) else None
    if container is None:
        raise ApiError(f"There is no container named {container_name!r}.", 400, "container")
    params = _source(export_id, upload)
    try:
        return container_operation(actor, container, Operation.Kind.IMPORT, into=True, **params)
    except BaseException:
        _drop_upload_of(params)
        raise


def _drop_upload_of(params: dict) -> None:
    if params.get("upload") and str(params.get("archive", "")).startswith("uploads/"):
        try:
            _storage().delete(params["archive"])
        except OSError as e:
            log.warning("could not remove an uploaded archive: %s", e)


@undoes(Operation.Kind.IMPORT)
def undo_import(op: Operation) -> None:
    release_reservation(op)
    _drop_upload(op)


def _drop_upload(op: Operation) -> None:
    _drop_upload_of(op.params)


@handler("import")
def import_(ctx: OperationContext) -> dict:
    op, container = ctx.op, container_of(ctx)
    host, into = op.host, bool(op.params.get("into"))
    try:
        ctx.event("verify", "checking the archive (every member, the manifest, the checksums) on the dashboard", 2)
        with _storage().open(op.params["archive"], "rb") as f:
            man = check(f)
        if into and container.snapshots.filter(name=man["snapshot"]).exists():
            raise OperationFailed(
                f"{container.name} has a snapshot named {man['snapshot']} already: nothing was changed."
            )
        # What the recovery asks the host about, should this run's answer be lost.
        op.params = {**op.params, "snapshot": man["snapshot"]}
        Operation.objects.filter(pk=op.pk).update(params=op.params)
        size = sum(v["size"] for v in man["files"].values())
        ctx.event(
            "transfer",
            f"sending snapshot {man['snapshot']} of {man['container']} to {host.name}, which checks it again "
            "before it puts anything in place",
            20,
        )
        net = op.params.get("network") if not into else (host.capabilities or {}).get("network")
        params = {
            "name": container.name,
            "into": into,
            "network": _network_params(container, net) if net and net.get("subnet") else None,
            "max_bytes": settings.EXPORT_MAX_BYTES,
            "need_bytes": size,
            "stall_s": int(max(settings.SSH_DEAD_AFTER_S * 2, 10)),
        }
        with _storage().open(op.params["archive"], "rb") as f:
            try:
                with ssh.pooled(host) as conn:
                    n, data = ssh.upload(
                        conn.open_stream("import", params),
                        f,
                        _throttled(ctx, "transfer", 20, 50, size, "archive"),
                        ctx.relay(70, 25),
                        settings.OPERATION_TIMEOUT_S,
                    )
            except ssh.SSHError as e:
                raise failure(e, host, prefix=f"The import on {host.name} failed: ") from e
    except OperationFailed as e:
        if lost_answer(e):  # what the host did is unknown: its recovery asks it (recover_import)
            raise WaitFor(f"{e.message} Whether {host.name} placed the import is asked again until it answers.") from e
        if not into:
            release_reservation(op)  # the host refused: it places nothing before everything matched
        raise
    except BaseException:
        if not into:
            release_reservation(op)
        raise
    finally:
        _drop_upload(op)
    if not into:
        set_state(container, Container.State.STOPPED)
    snap = data.get("snapshot") or man["snapshot"]
    meta = data.get("meta") or {}
    snapshot = record_snapshot(op, container, snap, bool(man["stateful"]), meta, {})
    taken = _when(man.get("created_at"))
    if taken is not None:
        Snapshot.objects.filter(pk=snapshot.pk).update(created_at=taken)
    if man["stateful"]:  # what the snapshot page shows of its processes, decoded on the host (best effort)
        try:
            got = handlers.agent(ctx, host, "snapshot-contents", {"name": container.name, "snapshot": snap}, 95, 4)
            Snapshot.objects.filter(pk=snapshot.pk).update(contents=got.get("contents") or {})
        except OperationFailed as e:
            ctx.event("import", f"the snapshot's contents could not be read: {e.message}")
    if into:
        publish_fleet("container", container_state(container))
    return {
        "container": container.name,
        "into": into,
        "snapshot": snap,
        "stateful": man["stateful"],
        "from": {"container": man["container"], "snapshot": man["snapshot"], "export": op.params.get("export")},
        "bytes": n,
        "config_dropped": data.get("config_dropped") or [],
    }


def _when(text) -> datetime | None:
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else None


@recovers("import")
def recover_import(ctx: OperationContext) -> str | dict:
    """An import whose worker was lost or whose answer never came: the host is asked (under the
    container's lock, so after its import ended) whether the snapshot, and for a new container
    the container, are there. Found: they are recorded. Not found: nothing was placed (the
    agent places the whole import or nothing), and a new container's reservation goes."""
    op, container = ctx.op, ctx.op.container
    if container is None or op.host is None:
        return "Its container no longer exists: there was nothing to recover."
    into, snap = bool(op.params.get("into")), op.params.get("snapshot")
    params = {"name": container.name, **({"snapshot": snap} if snap else {})}
    seen = agent_or_wait(ctx, op.host, "inspect", params, 10, 60, f"{op.host.name} is asked again until it answers.")
    meta = seen.get("snapshot") if snap else None
    _drop_upload(op)
    if not meta or not (into or seen.get("exists")):
        if not into:
            release_reservation(op)
            return f"Nothing of the import was placed on {op.host.name}; the name {container.name} is free again."
        return f"Nothing of the import was placed on {op.host.name}; {container.name} is as it was."
    if not into:
        set_state(container, seen.get("state") or Container.State.STOPPED)
    if not container.snapshots.filter(name=snap).exists():
        record_snapshot(op, container, snap, bool(meta.get("stateful")), meta, {})
    publish_fleet("container", container_state(container))
    return {
        "container": container.name,
        "into": into,
        "snapshot": snap,
        "stateful": bool(meta.get("stateful")),
        "recovered": f"The import had finished on {op.host.name}: {container.name} and its snapshot {snap} are recorded.",
    }
