"""Sending operation state to websocket clients through the Channels layer."""

from core.live import send

FLEET_GROUP = "fleet"


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


def publish_operation(op, event: dict | None = None) -> None:
    message = {"type": "op.update", "operation": operation_state(op)}
    if event is not None:
        message["event"] = event
    send([operation_group(op.pk), FLEET_GROUP], message)


def publish_fleet(kind: str, payload: dict) -> None:
    send([FLEET_GROUP], {"type": "fleet.update", "kind": kind, "data": payload})
