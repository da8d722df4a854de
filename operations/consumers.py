"""Websockets: one operation's stream, and the fleet-wide stream.

On connect each sends the current state from the database first, then relays live
messages; a client that reconnects loses nothing because the row is the truth.
"""

import time

from channels.db import database_sync_to_async

try:  # what Daphne's websocket layer raises on a send after the client has gone
    from autobahn.exception import Disconnected
except ImportError:  # another ASGI server: it drops such a send itself
    Disconnected = ConnectionError
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from core.access import RECHECK_S, access_stamp, still_allowed, user_group
from core.roles import has_role
from operations.models import Operation

from . import events

CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404


class _Base(AsyncJsonWebsocketConsumer):
    groups_to_join: list[str]
    role = "viewer"

    async def connect(self):
        user = self.scope.get("user")
        allowed = await database_sync_to_async(has_role)(user, self.role)
        if not allowed:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        # What the user's access rests on now: a later change of it closes the socket.
        self.scope["ctweb_access_stamp"] = await database_sync_to_async(access_stamp)(user)
        self.groups_to_join = await self.setup()
        if self.groups_to_join is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        # Changes to this user's access reach the socket through their own group (core/access.py).
        self.groups_to_join.append(user_group(user.pk))
        self.closed = False
        self.checked_at = time.monotonic()
        # Join before reading the row, so nothing falls between the snapshot and the stream.
        for group in self.groups_to_join:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        await self.send_initial()

    async def disconnect(self, code):
        self.closed = True
        for group in getattr(self, "groups_to_join", None) or []:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def _allowed(self, force: bool = False) -> bool:
        """Is what opened this socket still enough? Asked on every access change, and before
        sending anything when the last check is older than RECHECK_S."""
        if self.closed:
            return False
        if force or time.monotonic() - self.checked_at >= RECHECK_S:
            self.checked_at = time.monotonic()
            if not await database_sync_to_async(still_allowed)(self.scope, self.role):
                self.closed = True
                await self.close(code=CLOSE_FORBIDDEN)
                return False
        return True

    async def auth_changed(self, message):
        await self._allowed(force=True)

    async def send_json(self, content, close=False):
        """Sent, or nothing when the browser went away between its close and our disconnect()
        (the server then refuses the send: not an error of ctweb's, and not logged as one)."""
        try:
            await super().send_json(content, close=close)
        except Disconnected:
            self.closed = True

    async def op_update(self, message):
        if await self._allowed():
            await self.send_json(
                {"type": "operation", "operation": message["operation"], "event": message.get("event")}
            )

    async def fleet_update(self, message):
        if await self._allowed():
            await self.send_json({"type": message["kind"], "data": message["data"]})


class OperationConsumer(_Base):
    async def setup(self):
        self.op_id = int(self.scope["url_route"]["kwargs"]["op_id"])
        exists = await database_sync_to_async(Operation.objects.filter(pk=self.op_id).exists)()
        return [events.operation_group(self.op_id)] if exists else None

    @database_sync_to_async
    def _state(self):
        op = Operation.objects.select_related("host", "target_host").get(pk=self.op_id)
        return events.operation_state(op), list(op.events)

    async def send_initial(self):
        state, evts = await self._state()
        await self.send_json({"type": "state", "operation": state, "events": evts})


class FleetConsumer(_Base):
    async def setup(self):
        return [events.FLEET_GROUP]

    @database_sync_to_async
    def _active(self):
        ops = Operation.objects.filter(status__in=Operation.ACTIVE).select_related("host", "target_host")[:100]
        return [events.operation_state(op) for op in ops]

    async def send_initial(self):
        await self.send_json({"type": "state", "active_operations": await self._active()})
