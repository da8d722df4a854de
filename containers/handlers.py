"""Container operation handlers (registered with the runner) and the state refresh."""

from __future__ import annotations

import logging
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from core.audit import audit
from core.fleet import snapshot_budget_bytes
from hosts import criu_errors, ssh
from hosts.handlers import failure
from hosts.models import Host
from operations.bundles import save_bundle
from operations.events import publish_fleet
from operations.models import Operation
from operations.runner import OperationContext, OperationFailed, WaitFor, collects_bundle, enqueue, handler, undoes

from .models import Container, Snapshot, SnapshotSchedule

log = logging.getLogger(__name__)


def container_state(c: Container) -> dict:
    return {
        "name": c.name,
        "host": c.host.name,
        "state": c.state,
        "ipv4": c.ipv4,
        "ipv6": c.ipv6,
        "has_saved_state": c.has_saved_state,
    }


def container_of(ctx: OperationContext) -> Container:
    """The operation's container, or an honest failure if it was removed meanwhile."""
    if ctx.op.container is None:
        raise OperationFailed("The container of this operation no longer exists.")
    return ctx.op.container


def where(container: Container) -> str:
    """Where a container is now, in a sentence (from the database, refreshed)."""
    container.refresh_from_db()
    saved = " with its memory saved (Start resumes it)" if container.has_saved_state else ""
    return f"{container.name} is {container.state} on {container.host.name}{saved}."


def forget(container: Container, host_name: str | None) -> None:
    """Drop a container's records (its operations keep their history by name)."""
    name = container.name
    with transaction.atomic():
        Operation.objects.filter(container=container).update(container=None)
        container.delete()
    publish_fleet("container", {"name": name, "host": host_name, "state": "DELETED"})


def set_state(container: Container, state: str, **fields) -> None:
    Container.objects.filter(pk=container.pk).update(state=state, **fields)
    container.refresh_from_db()
    publish_fleet("container", container_state(container))


def agent(
    ctx: OperationContext | None,
    host: Host,
    subcommand: str,
    params: dict,
    base: int = 0,
    span: int = 100,
    timeout: float | None = None,
):
    """Run an agent subcommand on a host; any failure becomes an OperationFailed."""
    on_event = ctx.relay(base, span) if ctx else None
    if ctx:
        ctx.event("connect", f"connecting to {host.name}", base)
    try:
        with ssh.pooled(host) as conn:
            return conn.run_agent(subcommand, params, on_event=on_event, timeout=timeout).data
    except ssh.SSHError as e:
        raise failure(e, host) from e


def lost_answer(e: OperationFailed) -> bool:
    """The host's answer never came (the link broke, the agent died, no connection): what
    it did is unknown, not failed."""
    cause = e.__cause__
    if isinstance(cause, (ssh.HostKeyMismatch, ssh.HostNotTrusted)):
        return False
    return isinstance(cause, ssh.AgentLost) or (
        isinstance(cause, ssh.SSHError) and not isinstance(cause, ssh.AgentFailed)
    )


def agent_or_wait(ctx: OperationContext, host: Host, subcommand: str, params: dict, base: int, span: int, then: str):
    """agent(), but a lost answer makes the operation wait: its recovery asks the host again
    (with backoff) until it answers, instead of ending on a guess."""
    try:
        return agent(ctx, host, subcommand, params, base, span)
    except OperationFailed as e:
        if lost_answer(e):
            raise WaitFor(f"{e.message} {then}") from e
        raise


def _busy(container: Container) -> bool:
    """An operation of the container runs or waits: its state is the operation's to write. A
    listing taken meanwhile sees the operation's own steps (a trial dump's or a snapshot's
    FROZEN, a stop's half-way), which must not become the container's recorded state."""
    return container.operations.filter(status__in=Operation.ACTIVE).exists()


def _apply_listing(host: Host, listing: list[dict]) -> dict:
    """Bring the database in line with what a host says it has."""
    seen, added, changed, gone = set(), [], [], []
    for item in listing:
        name = item["name"]
        seen.add(name)
        state = item.get("state", "UNKNOWN")
        ipv4 = (item.get("ipv4") or [None])[0]
        ipv6 = (item.get("ipv6") or [None])[0]
        warnings = [str(w)[:120] for w in (item.get("config_warnings") or [])][:100]
        c = Container.objects.filter(name=name).first()
        if c is None:
            if ipv4 and Container.objects.filter(ipv4=ipv4).exists():
                ipv4 = None  # another container owns it in our records; don't guess
            c = Container.objects.create(
                name=name,
                host=host,
                state=state,
                ipv4=ipv4,
                ipv6=ipv6,
                template=item.get("template", ""),
                config_warnings=warnings,
            )
            added.append(name)
            publish_fleet("container", container_state(c))
        elif c.host_id != host.pk:
            log.warning("%s is listed on %s but belongs to %s in ctweb; left alone", name, host, c.host)
        elif (c.state != state or (ipv6 and c.ipv6 != ipv6)) and not _busy(c):
            set_state(c, state, ipv6=ipv6 or c.ipv6)
            changed.append(name)
        if c.host_id == host.pk and c.config_warnings != warnings:
            Container.objects.filter(pk=c.pk).update(config_warnings=warnings)
    # Containers ctweb knows on this host that the host no longer has (and no job is creating).
    for c in Container.objects.filter(host=host).exclude(name__in=seen).exclude(state=Container.State.CREATING):
        if not _busy(c):
            gone.append(c.name)
            if c.state != Container.State.UNKNOWN:
                set_state(c, Container.State.UNKNOWN)
    return {"added": added, "changed": changed, "missing": gone}


@handler("sync")
def sync(ctx: OperationContext) -> dict:
    host = ctx.op.host
    data = agent(ctx, host, "list", {}, 10, 70)
    ctx.event("save", "updating the container list", 90)
    out = _apply_listing(host, data["containers"])
    tidied = tidy_migrations(host, data.get("migrations") or [], data["containers"])
    if tidied:
        out["tidied_migrations"] = tidied
    return out


def tidy_migrations(host: Host, leftovers: list[dict], listing: list[dict] | None = None) -> list[int]:
    """Remove what ended migrations left on a host they could not reach at the time (its
    link was down, say): a target's partial copy, a source's working files. Only for
    operations that have ended, and never destructively on a guess: `listing` is what this
    host runs now (its `list`), and
    - a target's copy is removed only when this host does not run it and the host the
      database names, asked now, runs it;
    - a source's working files (its dump) are removed only when it runs here again, and its
      stopped copy with them only when it moved to the target and the target, asked now, runs it.
    The record follows the host: where this host (the target) runs a container that the
    database places on the source, and the source, asked now, does not run it, the hosts
    win: the record moves here (audited) and nothing is removed. Every disagreement is
    written on the migration (result.disagreement, shown on the host and container pages
    and in the API) and logged.
    One exception, an admin's decision: a post-copy resumed on its source by force marks
    the target's copy superseded (result.superseded); that copy is never followed, and is
    stopped and removed here once the source's copy is confirmed running."""
    here = {item.get("name"): item.get("state") for item in listing or []}
    tidied = []
    for item in leftovers:
        mid = item.get("migration")
        op = Operation.objects.filter(pk=mid, kind=Operation.Kind.MIGRATE).first() if isinstance(mid, int) else None
        if op is None or op.status not in Operation.TERMINAL or not op.container_name or listing is None:
            continue  # not ours, still running, or this host's containers unknown: left alone
        name = op.container_name
        owner = Container.objects.filter(name=name).select_related("host").first()
        params = {"name": name, "migration": mid}
        superseded = (op.result or {}).get("superseded")
        if op.target_host_id == host.pk and owner is not None and owner.host_id != host.pk:
            runs_here = here.get(name) not in (None, Container.State.STOPPED)
            try:
                there = agent(None, owner.host, "inspect", {"name": name}, timeout=60)
            except OperationFailed as e:
                log.info("tidy of migration %s waits: %s cannot be asked: %s", mid, owner.host, e.message)
                if runs_here and not superseded:
                    _disagree(
                        op,
                        f"{host.name} runs {name} ({here.get(name)}) but ctweb places it on {owner.host.name}, which "
                        "cannot be asked now: nothing was changed or removed.",
                    )
                continue
            runs_there = there.get("exists") and there.get("state") == Container.State.RUNNING
            if runs_here and not superseded:
                if runs_there:
                    _disagree(
                        op,
                        f"{host.name} runs {name} ({here.get(name)}) and so does {owner.host.name}, where ctweb places "
                        "it: nothing was removed; an admin must look at both hosts.",
                    )
                else:
                    _follow_host(op, owner, host, here[name], there)
                continue
            if not runs_there:
                _disagree(
                    op,
                    f"{name} does not run on {owner.host.name} ({there.get('state')}): what migration {mid} "
                    f"left on {host.name} is kept.",
                )
                continue
            sub, params = "migrate-abort", params  # it runs elsewhere: drop the partial (or superseded) copy
        elif owner is not None and owner.host_id == host.pk and here.get(name) == Container.State.RUNNING:
            sub, params = "migrate-cleanup", {**params, "remove": False}  # it runs here: working files only
        elif (
            owner is not None
            and op.host_id == host.pk
            and owner.host_id == op.target_host_id
            and here.get(name) in (None, Container.State.STOPPED)
        ):
            # It moved to the target, and this source's clean-up got no answer (its link was down
            # at the end): the stopped copy and the dump stay until the target, asked now, runs it.
            try:
                there = agent(None, owner.host, "inspect", {"name": name}, timeout=60)
            except OperationFailed as e:
                log.info("tidy of migration %s waits: %s cannot be asked: %s", mid, owner.host, e.message)
                continue
            if not (there.get("exists") and there.get("state") == Container.State.RUNNING):
                _disagree(
                    op,
                    f"{name} does not run on {owner.host.name} ({there.get('state')}), where ctweb places it: the copy "
                    f"migration {mid} left on {host.name} is kept.",
                )
                continue
            sub, params = "migrate-cleanup", {**params, "remove": True}
        else:
            continue  # no host is confirmed to run it: its dump and copies stay
        try:
            agent(None, host, sub, params, timeout=120)
            tidied.append(mid)
            log.info("removed what migration %s left on %s", mid, host)
        except OperationFailed as e:
            log.warning("could not remove what migration %s left on %s: %s", mid, host, e.message)
    return tidied


def _follow_host(op: Operation, owner: Container, host: Host, state: str, there: dict) -> None:
    """The hosts win: `host` runs the container the database placed elsewhere (which does not
    run it): the record moves to `host`, audited, and the disagreement stays visible."""
    was = owner.host.name
    Container.objects.filter(pk=owner.pk, host_id=owner.host_id).update(host=host, state=state)
    owner.refresh_from_db()
    sentence = (
        f"{host.name} runs {owner.name} ({state}) but ctweb placed it on {was} "
        f"({there.get('state') if there.get('exists') else 'not there'}): the record now follows {host.name}, "
        "where it runs; nothing was removed."
    )
    audit(None, "container.follow_host", owner, detail=f"migration {op.pk}: {was} -> {host.name} ({state})")
    _disagree(op, sentence)
    publish_fleet("container", container_state(owner))


def _disagree(op: Operation, sentence: str) -> None:
    log.warning("migration %s: %s", op.pk, sentence)
    if (op.result or {}).get("disagreement") != sentence:
        result = {**(op.result or {}), "disagreement": sentence, "disagreement_at": timezone.now().isoformat()}
        Operation.objects.filter(pk=op.pk).update(result=result)
        op.result = result


def refresh_host(host: Host) -> dict | None:
    """The periodic refresh: like sync, without an Operation row."""
    try:
        data = agent(None, host, "list", {}, timeout=60)  # a stuck host must not hold a worker thread
    except OperationFailed as e:
        log.info("refresh of %s failed: %s", host, e.message)
        return None
    out = _apply_listing(host, data["containers"])
    tidy_migrations(host, data.get("migrations") or [], data["containers"])
    return out


@handler("create")
def create(ctx: OperationContext) -> dict:
    op, container = ctx.op, ctx.op.container
    params = {
        "name": container.name,
        "template": op.params.get("template", "busybox"),
        "command": op.params.get("command"),
        "network": _network_params(container, op.params.get("network")),
    }
    try:
        data = agent(ctx, op.host, "create", params, 5, 90)
    except BaseException:
        # The agent removes what it made; the reservation goes too (only ever a reservation).
        release_reservation(op)
        raise
    set_state(container, data.get("state", "UNKNOWN"))
    return data


@undoes(Operation.Kind.CREATE)
def release_reservation(op: Operation) -> None:
    """Drop the name and address a create reserved, if the container never came to be."""
    container = Container.objects.filter(name=op.container_name, state=Container.State.CREATING).first()
    if container is not None:
        forget(container, op.host.name if op.host else None)


def _network_params(container: Container, net: dict | None) -> dict | None:
    if not net or not container.ipv4:
        return None
    return {
        "ipv4": container.ipv4,
        "prefix": int(net["subnet"].split("/")[1]),
        "bridge": net.get("bridge"),
        "gateway": net.get("gateway"),
    }


def _simple(ctx: OperationContext, subcommand: str, transitional: str | None) -> dict:
    container = container_of(ctx)
    before = container.state
    if transitional:
        set_state(container, transitional)
    try:
        params = {"name": container.name, **ctx.op.params}
        if subcommand == "delete":  # no recovery: it fails with the host's last word
            data = agent(ctx, ctx.op.host, subcommand, params, 5, 90)
        else:
            then = f"How {container.name} is on {ctx.op.host.name} is asked again until it answers."
            data = agent_or_wait(ctx, ctx.op.host, subcommand, params, 5, 90, then)
    except OperationFailed as e:
        # Tell the truth about where the container is now, not what we hoped.
        data = e.result or {}
        set_state(container, data.get("state") or before, **_saved_state(data))
        raise
    set_state(container, data.get("state", "UNKNOWN"), **_saved_state(data))
    return data


def _saved_state(data: dict) -> dict:
    return {"has_saved_state": bool(data["has_saved_state"])} if "has_saved_state" in data else {}


@handler("start")
def start(ctx: OperationContext) -> dict:
    return _simple(ctx, "start", Container.State.STARTING)


@handler("stop")
def stop(ctx: OperationContext) -> dict:
    return _simple(ctx, "stop", Container.State.STOPPING)


@handler("restart")
def restart(ctx: OperationContext) -> dict:
    return _simple(ctx, "restart", Container.State.STOPPING)


@handler("delete")
def delete(ctx: OperationContext) -> dict:
    container = container_of(ctx)
    data = _simple(ctx, "delete", Container.State.STOPPING)
    forget(container, container.host.name)
    return data


# --- snapshots -----------------------------------------------------------------------


def record_snapshot(op: Operation, container: Container, name: str, stateful: bool, meta: dict, contents: dict):
    """The Snapshot row for what the agent kept (its meta.json, or the snapshot's answer)."""
    return Snapshot.objects.create(
        container=container,
        name=name,
        stateful=stateful,
        created_by=op.created_by,
        size_bytes=meta.get("size_bytes") or 0,
        added_bytes=meta.get("added_bytes"),
        images_bytes=meta.get("images_bytes"),
        images_raw_bytes=meta.get("images_raw_bytes"),
        images_compression=meta.get("images_compression") or "",
        schedule=SnapshotSchedule.objects.filter(pk=op.params.get("schedule") or 0).first(),
        stats=meta.get("stats") or {},
        contents=contents,
    )


@handler("snapshot")
def snapshot(ctx: OperationContext) -> dict:
    op, container = ctx.op, container_of(ctx)
    name, stateful = op.params["snapshot"], bool(op.params.get("stateful", True))
    params = {"name": container.name, "snapshot": name, "stateful": stateful}
    budget = snapshot_budget_bytes()
    if budget:
        params["budget_bytes"] = budget  # checked by the agent before it freezes anything
    then = f"Whether {op.host.name} kept snapshot {name} is asked again until it answers."
    data = agent_or_wait(ctx, op.host, "snapshot", params, 5, 90, then)
    ctx.event("save", f"recording snapshot {name}", 97)
    record_snapshot(op, container, name, stateful, data, data.get("contents") or {})
    publish_fleet("container", container_state(container))
    return {k: v for k, v in data.items() if k != "contents"}


@handler("restore")
def restore(ctx: OperationContext) -> dict:
    op, container = ctx.op, container_of(ctx)
    snap = op.params["snapshot"]
    if not container.snapshots.filter(name=snap).exists():
        raise OperationFailed(f"{container.name} has no snapshot {snap} any more.")
    data = _simple(ctx, "restore", Container.State.STOPPING)
    set_state(container, container.state, has_saved_state=False)  # a restore replaces any saved state
    return data


@handler("delete-snapshot")
def delete_snapshot(ctx: OperationContext) -> dict:
    op, container = ctx.op, container_of(ctx)
    snap = op.params["snapshot"]
    data = agent(ctx, op.host, "delete-snapshot", {"name": container.name, "snapshot": snap}, 5, 90)
    container.snapshots.filter(name=snap).delete()
    publish_fleet("container", container_state(container))
    return data


# --- checkpointability ------------------------------------------------------------------

CHECK_CLASSES = frozenset(criu_errors.CLASSES) | {"devices", "unknown"}
MAX_CHECK_REASONS = 20


def _check_reason(item) -> dict | None:
    """One reason the host's scan gave, kept only as short text of a known class (a host may lie)."""
    if not isinstance(item, dict):
        return None
    cls = item.get("class") if item.get("class") in CHECK_CLASSES else "unknown"
    return {"class": cls, "sentence": str(item.get("sentence") or "")[:300], "fix": str(item.get("fix") or "")[:300]}


def _trial_reason(details: str) -> dict:
    found = criu_errors.explain(details)
    if found is None:
        return {
            "class": "unknown",
            "sentence": "The trial dump failed, with CRIU error lines ctweb does not recognise.",
            "fix": "Read CRIU's lines in the check operation's result (trial_log).",
        }
    return {"class": found["class"], "sentence": f"The trial dump failed: {found['sentence']}", "fix": found["fix"],
            "line": found["line"]}  # fmt: skip


@handler("check")
def check(ctx: OperationContext) -> dict:
    """Checkpointability: the host's static scan of the container's processes (namespaces,
    sessions, files from outside, device nodes, foreign sockets), and with `trial` a dump that
    leaves it running, into a private tmpfs, CRIU's freeze capped (the agent's `check`). The
    answer is the container's `checkpointable`: no (reasons), yes (a trial went through) or
    unknown (no blocker seen, not tried). A blocked container is a successful check."""
    op, container = ctx.op, container_of(ctx)
    before = container.checkpointable or {}
    trial = bool(op.params.get("trial", True))
    data = agent(ctx, op.host, "check", {"name": container.name, "trial": trial}, 5, 90)
    reasons = [r for r in map(_check_reason, list(data.get("reasons") or [])[:MAX_CHECK_REASONS]) if r]
    t = data.get("trial") if isinstance(data.get("trial"), dict) else None
    log_lines = ""
    if t is not None and t.get("ok") is not True:
        log_lines = str(t.get("details") or "")[:6000]
        reasons.append(_trial_reason(log_lines))
    now = timezone.now().isoformat()
    value = {
        "status": "no" if reasons else ("yes" if t is not None else "unknown"),
        "reasons": reasons,
        "verified_at": now if t is not None else None,
        "checked_at": now,
        "operation": op.pk,
    }
    if t is not None and t.get("ok") is True:
        for key in ("frozen_ms", "freezing_ms", "total_ms", "freeze_cap_s"):
            if isinstance(t.get(key), (int, float)) and not isinstance(t.get(key), bool):
                value[f"trial_{key}"] = t[key]
    ctx.event("save", f"{container.name}: checkpointable {value['status']}", 97)
    if before.get("status") == "yes" and value["status"] == "no":
        # Something changed since the last verification (an update, a new process): say so loudly.
        sentence = (
            f"{container.name} was checkpointable (verified {str(before.get('verified_at'))[:19]} UTC) and is "
            f"blocked now: {reasons[0]['sentence']} Fix: {reasons[0]['fix']}"
        )
        value["newly_blocked"] = sentence
        ctx.event("blocked", sentence)
        audit(None, "container.checkpointable_lost", container, outcome="blocked", detail=f"check {op.pk}: {sentence}")
        log.warning("%s", sentence)
    Container.objects.filter(pk=container.pk).update(checkpointable=value)
    publish_fleet("container", container_state(container))
    return {"checkpointable": value, "processes": data.get("processes"), "trial_log": log_lines}


def canary_checks(hours: float, now=None, limit: int = 5, quiet_minutes: float = 10) -> list[str]:
    """Scheduled: a check with a trial dump, as an ordinary operation (params.auto), of each
    running container whose last check is older than `hours` (or that was never checked), at
    most `limit` per tick, never beside another operation of the container and not within
    `quiet_minutes` of one (a container someone is working on is left alone; a person's request
    that meets a canary's check makes it step aside: services.step_aside). A container that
    was checkpointable and is blocked now is reported by the check itself (check above)."""
    now = now or timezone.now()
    recent = now - timedelta(minutes=quiet_minutes)
    started = []
    if hours <= 0:
        return started
    running = Container.objects.filter(state=Container.State.RUNNING, host__status=Host.Status.ONLINE).exclude(
        host__key_data=""
    )
    for c in running.select_related("host").order_by("name"):
        if len(started) >= limit:
            break
        checked = (c.checkpointable or {}).get("checked_at")
        try:
            fresh = checked and now - datetime.fromisoformat(checked) < timedelta(hours=hours)
        except (TypeError, ValueError):
            fresh = False
        if fresh or c.operations.filter(Q(finished_at__gte=recent) | Q(created_at__gte=recent)).exists():
            continue
        with transaction.atomic():
            # The row lock every operation's start takes (services.container_operation): a
            # request between the test above and this create cannot run beside the check.
            Container.objects.select_for_update().filter(pk=c.pk).first()
            if _busy(c):
                continue
            op = Operation.objects.create(
                kind=Operation.Kind.CHECK,
                container=c,
                container_name=c.name,
                host=c.host,
                phase="queued",
                params={"trial": True, "auto": True},
            )
            enqueue(op)
        started.append(c.name)
    return started


# Operations on containers leave debug bundles; a probe's failure is its own explanation.
@collects_bundle(
    Operation.Kind.CREATE,
    Operation.Kind.START,
    Operation.Kind.STOP,
    Operation.Kind.RESTART,
    Operation.Kind.DELETE,
    Operation.Kind.SNAPSHOT,
    Operation.Kind.RESTORE,
    Operation.Kind.DELETE_SNAPSHOT,
    Operation.Kind.MIGRATE,
)
def collect_bundle(op: Operation) -> list[str]:
    """Fetch a debug bundle from every host the operation touched: the CRIU logs, `uname -a`,
    `criu check`, the container's LXC config, mountinfo and the tail of dmesg (the agent's
    `bundle` subcommand makes a tar.gz there; it is fetched over SFTP). Best effort: never raises."""
    saved = []
    for host in [h for h in (op.host, op.target_host) if h is not None]:
        try:
            with ssh.connect(host, timeout=10) as conn:
                data = conn.run_agent("bundle", {"name": op.container_name or None, "op": op.pk}, timeout=120).data
                with tempfile.TemporaryDirectory(prefix="ctweb-bundle-") as tmp:
                    local = Path(tmp) / "bundle.tar.gz"
                    conn.fetch(data["path"], local)
                    with open(local, "rb") as f:
                        saved.append(save_bundle(op.pk, f"{host.name}.tar.gz", f))
        except Exception as e:  # the operation's own error matters more than its bundle
            log.warning("no debug bundle from %s for operation %s: %s", host, op.pk, e)
    return saved
