"""Starting container operations: the checks every entry point (API, pages, lab) shares."""

from __future__ import annotations

import ipaddress
import shlex
import time

from django.db import IntegrityError, transaction
from django.utils import timezone

from core.api import ApiError
from core.audit import Actor, audit
from hosts.models import Host
from hosts.validators import validate_name
from operations import events, runner
from operations.models import Operation
from operations.runner import enqueue

from .models import Container

MAX_COMMAND_ARGS = 64
MAX_COMMAND_LEN = 4096


def active_operation(container: Container) -> Operation | None:
    return container.operations.filter(status__in=Operation.ACTIVE).order_by("created_at").first()


def busy_error(op: Operation) -> ApiError:
    err = ApiError(
        f"{op.container_name} already has an operation running ({op.kind}, {op.api_url()}). Wait for it or cancel it.",
        409,
    )
    err.operation_url = op.api_url()
    return err


def usable_host(name: str, field: str = "host") -> Host:
    try:
        host = Host.objects.get(name=name)
    except Host.DoesNotExist:
        raise ApiError(f"There is no host named {name}.", 400, field) from None
    if host.is_blocked:
        raise ApiError(f"{host.name} is blocked: {host.status_message}", 409, field)
    if not host.is_trusted:
        raise ApiError(f"{host.name} is not trusted yet: an admin must trust its host key first.", 409, field)
    if host.status != Host.Status.ONLINE:
        raise ApiError(f"{host.name} is {host.get_status_display()}: probe it until it is online.", 409, field)
    return host


def parse_command(command) -> list[str] | None:
    """A container's init: null, a string (split like a shell would, without running one) or a list."""
    if command is None or command == "":
        return None
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as e:
            raise ApiError(f"The command cannot be split into arguments: {e}.", 400, "command") from None
    elif isinstance(command, list) and all(isinstance(a, str) for a in command):
        argv = list(command)
    else:
        raise ApiError("The command must be a string or a list of strings.", 400, "command")
    if not argv or len(argv) > MAX_COMMAND_ARGS or sum(map(len, argv)) > MAX_COMMAND_LEN:
        raise ApiError(
            f"The command must have 1 to {MAX_COMMAND_ARGS} arguments and be shorter than {MAX_COMMAND_LEN} characters.",
            400,
            "command",
        )
    if any("\0" in a for a in argv):
        raise ApiError("The command may not contain NUL characters.", 400, "command")
    return argv


def allocate_ipv4(host: Host) -> tuple[str | None, dict | None]:
    """The next free address of the host's container network, unique across the fleet."""
    net = (host.capabilities or {}).get("network") or {}
    if not net.get("subnet"):
        return None, None
    subnet = ipaddress.ip_network(net["subnet"], strict=False)
    first, last = net.get("range", [2, subnet.num_addresses - 2])
    used = set(Container.objects.exclude(ipv4=None).values_list("ipv4", flat=True))
    for i in range(first, last + 1):
        addr = str(subnet.network_address + i)
        if addr not in used:
            return addr, net
    raise ApiError(f"The container network of {host.name} ({subnet}) has no free address left.", 409, "host")


def create_container(actor: Actor, name, host_name, template="busybox", command=None, queue: bool = True) -> Operation:
    """Reserve the name and an address, and queue the create (`queue=False`: the caller runs it)."""
    check_new_name(name)
    if not isinstance(template, str):
        raise ApiError("The template must be a string.", 400, "template")
    host = usable_host(host_name)
    templates = (host.capabilities or {}).get("templates") or []
    if template not in templates:
        raise ApiError(
            f"{host.name} has no template {template!r}; it offers: {', '.join(templates) or 'none'}.", 400, "template"
        )
    argv = parse_command(command)
    op = reserve_container(
        actor, name, host, Operation.Kind.CREATE, {"template": template, "command": argv}, queue,
        template=template, command=argv,
    )  # fmt: skip
    audit(actor, "container.create", op.container, detail=f"on {host.name} from {template}, op {op.pk}")
    return op


# Names under /containers/ that are the dashboard's own pages, so no container may take them.
PAGE_NAMES = frozenset({"new", "import"})


def check_new_name(name) -> None:
    """A new container's name, or ApiError (400, field name) saying why not."""
    try:
        validate_name(name)
    except Exception as e:
        raise ApiError(" ".join(getattr(e, "messages", [str(e)])), 400, "name") from None
    if name in PAGE_NAMES:
        raise ApiError(
            f"The name {name} is taken by the dashboard's own page /containers/{name}/: pick another.", 400, "name"
        )


def reserve_container(actor: Actor, name: str, host: Host, kind: str, params: dict, queue: bool = True, **fields):
    """Reserve a new container's name and an address on `host` (a record CREATING) and write the
    operation that makes it (`kind`: create, import), queued unless `queue` is False; the
    operation's params get the network as `network`."""
    check_new_name(name)
    for _ in range(3):  # two requests may pick the same address: the unique index decides
        ipv4, net = allocate_ipv4(host)
        try:
            with transaction.atomic():
                if Container.objects.filter(name=name).exists():
                    raise ApiError(f"A container named {name} exists already.", 409, "name")
                container = Container.objects.create(
                    name=name, host=host, state=Container.State.CREATING, ipv4=ipv4, **fields
                )
                op = Operation.objects.create(
                    kind=kind,
                    container=container,
                    container_name=name,
                    host=host,
                    created_by=actor.user,
                    params={**params, "network": net},
                )
                if queue:
                    enqueue(op)
        except IntegrityError:
            if Container.objects.filter(name=name).exists():
                raise ApiError(f"A container named {name} exists already.", 409, "name") from None
            continue
        return op
    raise ApiError("Could not reserve an address for the container; try again.", 409, "host")


# How long a person's request waits for an automatic check (the canary's trial dump, a few
# seconds) to step aside before it is refused like any other busy container.
AUTO_YIELD_SECONDS = 30.0


def cancel(actor, op: Operation, reason: str = "Cancelled before it started.") -> bool:
    """Ask an operation to cancel: one no worker has claimed yet ends here (True); a running
    one stops at its next safe point; a waiting one hears it when asked again."""
    with transaction.atomic():
        Operation.objects.filter(pk=op.pk).update(cancel_requested=True)
        ended = Operation.objects.filter(pk=op.pk, status=Operation.Status.PENDING).update(
            status=Operation.Status.CANCELLED, error=reason, finished_at=timezone.now()
        )
    if ended:
        runner.undo(op)
    if op.status == Operation.Status.WAITING:
        runner.ask_again(op.pk)
    audit(actor, "operation.cancel", op, detail=f"{op.kind} {'before start' if ended else 'requested'}")
    op.refresh_from_db()
    events.publish_operation(op)
    return bool(ended)


def step_aside(container: Container, seconds: float | None = None) -> None:
    """A person's operation goes before an automatic one: the canary's check is asked to cancel
    (a queued one never starts; a running trial dump, which leaves the container running, ends
    on its own) and is waited for, so an operator never meets a 409 for work nobody asked."""
    running = active_operation(container)
    if running is None or running.kind != Operation.Kind.CHECK or not (running.params or {}).get("auto"):
        return
    if cancel(None, running, "Stepped aside for an operator's request; checked again later."):
        return
    deadline = time.monotonic() + (AUTO_YIELD_SECONDS if seconds is None else seconds)
    while time.monotonic() < deadline:
        if not Operation.objects.filter(pk=running.pk, status__in=Operation.ACTIVE).exists():
            return
        time.sleep(0.1)


def container_operation(
    actor: Actor, container: Container, kind: str, target_host: Host | None = None, **params
) -> Operation:
    """Queue an operation on one container, refusing a second one while one runs (an automatic
    check steps aside first)."""
    step_aside(container)
    with transaction.atomic():
        # Lock the row so two requests cannot both see "nothing running".
        container = Container.objects.select_for_update().get(pk=container.pk)
        running = active_operation(container)
        if running:
            raise busy_error(running)
        host = container.host
        if not host.is_trusted or host.is_blocked:
            raise ApiError(f"{host.name} is not usable: {host.status_message or host.get_status_display()}.", 409)
        op = Operation.objects.create(
            kind=kind,
            container=container,
            container_name=container.name,
            host=host,
            target_host=target_host,
            created_by=actor.user,
            params=params,
        )
        enqueue(op)
    audit(actor, f"container.{kind}", container, detail=f"op {op.pk} {params or ''}".strip())
    return op


def sync_host(actor: Actor, host: Host) -> Operation:
    host = usable_host(host.name)
    running = host.operations.filter(kind=Operation.Kind.SYNC, status__in=Operation.ACTIVE).first()
    if running:
        return running
    with transaction.atomic():
        op = Operation.objects.create(kind=Operation.Kind.SYNC, host=host, created_by=actor.user)
        enqueue(op)
    audit(actor, "host.sync", host, detail=f"op {op.pk}")
    return op


# --- snapshots -----------------------------------------------------------------------


def next_snapshot_name(container: Container) -> str:
    taken = set(container.snapshots.values_list("name", flat=True))
    # Names of snapshots being taken right now are taken too.
    taken |= {
        op.params.get("snapshot")
        for op in container.operations.filter(kind=Operation.Kind.SNAPSHOT, status__in=Operation.ACTIVE)
    }
    i = 0
    while f"snap{i}" in taken:
        i += 1
    return f"snap{i}"


def snapshot_container(
    actor: Actor, container: Container, name: str | None = None, stateful: bool = True, schedule: int | None = None
) -> Operation:
    if name is not None:
        try:
            validate_name(name)
        except Exception as e:
            raise ApiError(" ".join(getattr(e, "messages", [str(e)])), 400, "name") from None
        if container.snapshots.filter(name=name).exists():
            raise ApiError(f"{container.name} already has a snapshot named {name}.", 409, "name")
    if stateful and container.state != Container.State.RUNNING:
        raise ApiError(
            f"{container.name} is {container.state}: a stateful snapshot needs a running container "
            "(take a stateless one instead).",
            409,
            "stateful",
        )
    params = {"snapshot": name or next_snapshot_name(container), "stateful": stateful}
    if schedule is not None:
        params["schedule"] = schedule  # the snapshot belongs to it (its retention may delete it)
    return container_operation(actor, container, Operation.Kind.SNAPSHOT, **params)


def restore_snapshot(actor: Actor, container: Container, snapshot) -> Operation:
    return container_operation(
        actor, container, Operation.Kind.RESTORE, snapshot=snapshot.name, stateful=snapshot.stateful
    )


def delete_snapshot(actor: Actor, container: Container, snapshot) -> Operation:
    return container_operation(actor, container, Operation.Kind.DELETE_SNAPSHOT, snapshot=snapshot.name)


def check_container(actor: Actor, container: Container, trial: bool = True) -> Operation:
    """Can it be checkpointed? A static scan of its processes on its host, and with `trial` a
    dump that leaves it running (containers/handlers.py check)."""
    if container.state != Container.State.RUNNING:
        raise ApiError(f"{container.name} is {container.state}: only a running container can be checked.", 409)
    return container_operation(actor, container, Operation.Kind.CHECK, trial=trial)


def change_state(actor: Actor, container: Container, action: str, stateful: bool = False, discard_state: bool = False):
    """start/stop/restart. As in LXD, a start resumes the memory a stateful stop saved;
    `discard_state` throws it away and starts cold instead."""
    if action not in ("start", "stop", "restart"):
        raise ApiError("action must be start, stop or restart.", 400, "action")
    if stateful and action != "stop":
        raise ApiError("Only a stop can be stateful; a start resumes saved state by itself.", 400, "stateful")
    if action == "stop" and stateful and container.state != Container.State.RUNNING:
        raise ApiError(
            f"{container.name} is {container.state}: only a running container can be stopped statefully.", 409
        )
    if discard_state and not container.has_saved_state:
        raise ApiError(f"{container.name} holds no saved state to discard.", 400, "discard_state")
    params = {}
    if stateful:
        params["stateful"] = True
    if discard_state:
        params["discard_state"] = True
    return container_operation(actor, container, action, **params)
