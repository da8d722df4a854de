"""A browser that goes away while an update is on its way: the server refuses the send (Daphne's
websocket layer raises autobahn's Disconnected), and the consumer takes it as the end of that
socket instead of letting it out as an error (the e2e suite fails on any ERROR line in the
stack's logs; the lab export test met "Exception inside application: Attempt to send on a
closed protocol" there). The server's refusal is played by a fake send here (pure logic)."""

import asyncio

import pytest
from autobahn.exception import Disconnected

from operations.consumers import FleetConsumer


def test_an_update_for_a_browser_that_went_away_ends_quietly():
    consumer = FleetConsumer()
    consumer.closed, consumer.checked_at = False, float("inf")  # as after connect(), just checked
    sent = []

    async def refused(message):
        raise Disconnected("Attempt to send on a closed protocol")

    consumer.base_send = refused
    asyncio.run(consumer.fleet_update({"kind": "container", "data": {"name": "c1"}}))
    assert consumer.closed is True
    asyncio.run(consumer.fleet_update({"kind": "container", "data": {"name": "c1"}}))  # nothing more is tried

    async def taken(message):
        sent.append(message)

    consumer.closed, consumer.base_send = False, taken
    asyncio.run(consumer.fleet_update({"kind": "container", "data": {"name": "c2"}}))
    assert len(sent) == 1 and '"c2"' in sent[0]["text"]


def test_any_other_error_of_a_send_is_still_an_error():
    consumer = FleetConsumer()
    consumer.closed, consumer.checked_at = False, float("inf")

    async def broken(message):
        raise ValueError("not about the socket")

    consumer.base_send = broken
    with pytest.raises(ValueError):
        asyncio.run(consumer.fleet_update({"kind": "container", "data": {}}))
