"""Host operation handlers: the probe."""

from django.utils import timezone

from containers.events import publish_fleet
from containers.runner import OperationContext, OperationFailed, handler

from . import ssh
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
    except ssh.HostKeyMismatch as e:
        raise OperationFailed(str(e)) from e
    except ssh.AgentFailed as e:
        set_host_status(host, Host.Status.OFFLINE, str(e))
        raise OperationFailed(str(e), e.details) from e
    except ssh.SSHError as e:
        host.refresh_from_db()
        if not host.is_blocked:
            set_host_status(host, Host.Status.OFFLINE, str(e))
        raise OperationFailed(str(e)) from e
    ctx.event("save", "saving capabilities", 95)
    caps = result.data
    set_host_status(host, Host.Status.ONLINE, "", capabilities=caps, last_probe_at=timezone.now())
    return {"capabilities": caps}
