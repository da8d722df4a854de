"""Where the tidy found the database and the hosts disagreeing: kept on the migrations it looked
at (result.disagreement), shown to admins on the container and host pages and in their API."""

from __future__ import annotations

from django.db.models import Q

from .models import Operation


def disagreements(container_name: str | None = None, host=None, limit: int = 10) -> list[dict]:
    """The latest disagreements between the database and the hosts the tidy found (on the
    migrations it looked at), for a container or a host: what admins must see."""
    ops = Operation.objects.filter(kind=Operation.Kind.MIGRATE, result__has_key="disagreement")
    if container_name is not None:
        ops = ops.filter(container_name=container_name)
    if host is not None:
        ops = ops.filter(Q(host=host) | Q(target_host=host))
    return [
        {
            "migration": op.pk,
            "container": op.container_name,
            "sentence": op.result.get("disagreement"),
            "at": op.result.get("disagreement_at"),
        }
        for op in ops.order_by("-id")[:limit]
    ]
