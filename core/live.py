"""Messages to websocket groups through the Channels layer (operations' progress, the fleet's
changes, a user's changed access)."""

import logging
import time

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

_quiet_until = 0.0  # after a failed publish, say so once a minute, not once per event


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
