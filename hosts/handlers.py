"""Host operation handlers: the probe."""

from django.db import transaction
from django.utils import timezone

from operations.events import publish_fleet
from operations.models import Operation
from operations.runner import OperationContext, OperationFailed, enqueue, explains, handler

from . import criu_errors, ssh
from .models import Host


def host_state(host: Host) -> dict:
    return {
        "name": host.name,
        "status": host.status,
        "criu_version": host.capabilities.get("criu_version"),
        "last_probe_at": host.last_probe_at.isoformat() if host.last_probe_at else None,
    }


def set_host_status(host: Host, status: str, message: str = "", **fields) -> None:
    Host.objects.filter(pk=host.pk).update(status=status, status_message=message, **fields)
    host.refresh_from_db()
    publish_fleet("host", host_state(host))


def failure(e: ssh.SSHError, host: Host | None = None, prefix: str = "", on: str = "") -> OperationFailed:
    """The one door from a job's SSH or agent error to its OperationFailed: the sentence (after
    `prefix`), and for an agent's error its log lines and data, and the name of the host they
    came from (`host`, or `on` where the caller keeps the host's status to itself). Given the
    `host`, one that cannot be reached is marked offline at once (the host lists show it),
    unless it is blocked (a changed key, marked already) or the fault is this node's own (its
    copy of the fleet's key missing: the host is fine)."""
    if isinstance(e, ssh.AgentFailed):
        lost = isinstance(e, ssh.AgentLost)
        return OperationFailed(f"{prefix}{e}", e.details, e.data, host=host.name if host else on, unanswered=lost)
    if host is not None and not isinstance(e, ssh.KeyMissing):
        host.refresh_from_db()
        if not host.is_blocked:
            set_host_status(host, Host.Status.OFFLINE, str(e))
    return OperationFailed(f"{prefix}{e}", unanswered=True)  # not reached: what it did is unknown, not refused


@explains
def explain_failure(op: Operation, e: OperationFailed) -> dict | None:
    """What CRIU's error lines in an agent's failure mean (hosts/criu_errors.py), and on which host."""
    found = criu_errors.explain(e.details)
    if found is not None and e.host:
        found["host"] = e.host
    return found


@handler("probe")
def probe(ctx: OperationContext) -> dict:
    host = ctx.op.host
    if host is None:
        raise OperationFailed("The host of this probe was removed.")
    ctx.event("connect", f"connecting to {host.name} ({host.address}:{host.port})", 5)
    try:
        with ssh.connect(host) as conn:
            ctx.event("upload", "checking the agent on the host", 15)
            conn.ensure_agent()
            ctx.event("probe", "probing", 20)
            result = conn.run_agent("probe", {}, on_event=ctx.relay(20, 70), timeout=300)
    except ssh.SSHError as e:
        if isinstance(e, ssh.AgentFailed):  # a host whose agent cannot probe it is not usable either
            set_host_status(host, Host.Status.OFFLINE, str(e))
        raise failure(e, host) from e
    ctx.event("save", "saving capabilities", 95)
    caps = result.data
    set_host_status(host, Host.Status.ONLINE, "", capabilities=caps, last_probe_at=timezone.now())
    return {"capabilities": caps}


REPROBE_FIRST_S = 15  # an offline host is probed again after this, doubling up to REPROBE_MAX_S
REPROBE_MAX_S = 300


def reprobe_delay(failures: int) -> int:
    """Seconds between the automatic probe that failed `failures` times in a row and the next."""
    return int(min(REPROBE_MAX_S, REPROBE_FIRST_S * 2 ** max(0, failures - 1)))


def reprobe_offline_hosts(now=None) -> list[str]:
    """Scheduled: probe again, with backoff, every trusted host marked offline (a network
    failure), so that it comes back online by itself when it answers. Each try is an
    ordinary probe operation (params.auto), visible in the operation list."""
    from datetime import timedelta

    now = now or timezone.now()
    started = []
    for host in Host.objects.filter(status=Host.Status.OFFLINE).exclude(key_data=""):
        probes = host.operations.filter(kind=Operation.Kind.PROBE)
        if probes.filter(status__in=Operation.ACTIVE).exists():
            continue
        failures, last = 0, None
        for op in probes.order_by("-created_at", "-id")[:20]:
            if not op.params.get("auto") or op.status != Operation.Status.FAILURE:
                break
            failures += 1
            last = last or (op.finished_at or op.created_at)
        if last is not None and now < last + timedelta(seconds=reprobe_delay(failures)):
            continue
        with transaction.atomic():
            op = Operation.objects.create(
                kind=Operation.Kind.PROBE, host=host, phase="queued", params={"auto": True, "attempt": failures + 1}
            )
            enqueue(op)
        started.append(host.name)
    return started
