"""Sending operation state to websocket clients through the Channels layer."""

import logging
import time

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

FLEET_GROUP = "fleet"
_quiet_until = 0.0  # after a failed publish, say so once a minute, not once per event


def operation_group(op_id: int) -> str:
    return f"operation.{op_id}"


def operation_state(op) -> dict:
    """The part of an operation a live view needs; the same shape the API returns."""
    return {
        "id": op.pk,
        "kind": op.kind,
        "status": op.status,
        "phase": op.phase,
        "progress": op.progress,
        "container": op.container_name or None,
        "host": op.host.name if op.host_id else None,
        "target_host": op.target_host.name if op.target_host_id else None,
        "error": op.error,
        "result": op.result,
        "started_at": op.started_at.isoformat() if op.started_at else None,
        "finished_at": op.finished_at.isoformat() if op.finished_at else None,
        "url": op.get_absolute_url(),
    }


def send(groups: list[str], message: dict) -> None:
    """Best effort: the database row stays the source of truth if Redis is away."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        for group in groups:
            async_to_sync(layer.group_send)(group, message)
    except Exception as e:  # never let a dropped message fail an operation
        global _quiet_until
        if time.monotonic() >= _quiet_until:
            log.warning("live updates are not reaching browsers (%s); the database still has everything", e)
            _quiet_until = time.monotonic() + 60


def publish_operation(op, event: dict | None = None) -> None:
    message = {"type": "op.update", "operation": operation_state(op)}
    if event is not None:
        message["event"] = event
    send([operation_group(op.pk), FLEET_GROUP], message)


def publish_fleet(kind: str, payload: dict) -> None:
    send([FLEET_GROUP], {"type": "fleet.update", "kind": kind, "data": payload})
