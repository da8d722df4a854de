from dataclasses import dataclass
from typing import Any

from .clientip import client_ip
from .models import AuditEntry


@dataclass(frozen=True)
class Actor:
    """Who acts: the user, and for a request its address (the audit log records both). The
    services take one, not a request: a job acting for whoever started it (an evacuation's
    migrations), or a command, passes Actor(user)."""

    user: Any
    remote_addr: str | None = None

    @classmethod
    def of(cls, request) -> "Actor":
        return cls(request.user, client_ip(request) or None)


def _text(value: str, most: int) -> str:
    # What a request sent is recorded as text: never a NUL (PostgreSQL refuses it), never unbounded.
    return str(value).replace("\x00", "\ufffd")[:most]


def audit(
    request,
    action: str,
    obj=None,
    outcome: str = "ok",
    detail: str = "",
    object_type: str = "",
    object_name: str = "",
    user=None,
) -> AuditEntry:
    """Record a state-changing request. Call it from every view that changes something.
    `user` overrides the request's (a logout has already forgotten who it was). `request` may
    be an Actor (a service acting for a user)."""
    if isinstance(request, Actor):
        actor, request = request, None
        user = user if user is not None else actor.user
        remote_addr = actor.remote_addr
    else:
        remote_addr = client_ip(request) if request is not None else None
    if user is None:
        user = getattr(request, "user", None) if request is not None else None
    if user is not None and not user.is_authenticated:
        user = None
    if obj is not None and not object_type:
        object_type = obj._meta.model_name
    return AuditEntry.objects.create(
        user=user,
        username=user.get_username() if user else "",
        action=action,
        object_type=object_type,
        object_name=_text(obj if obj is not None else object_name, 200),
        outcome=outcome,
        detail=_text(detail, 2000),
        remote_addr=remote_addr or None,
    )
