"""Websockets are for logged-in users with at least the viewer role."""

import asyncio
import json

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.stack import Api

pytestmark = pytest.mark.e2e


async def _connect(url, headers):
    async with websockets.connect(url, additional_headers=headers, open_timeout=10) as ws:
        return json.loads(await asyncio.wait_for(ws.recv(), 10))


@pytest.mark.parametrize("path", ["/ws/events/", "/ws/operations/1/"])
@pytest.mark.parametrize("who", ["anonymous", "dave", "bad-token"])
def test_it_refuses_users_without_a_role(stack, path, who):
    headers = {
        "anonymous": {},
        "dave": {"Authorization": f"Token {stack.tokens['dave']}"},
        "bad-token": {"Authorization": "Token not-a-token"},
    }[who]
    with pytest.raises(InvalidStatus) as e:
        asyncio.run(_connect(Api(stack, None).ws_url(path), headers))
    assert e.value.response.status_code == 403


def test_it_refuses_a_cross_site_page(stack):
    headers = {"Authorization": f"Token {stack.tokens['carol']}", "Origin": "http://evil.example"}
    with pytest.raises(InvalidStatus):
        asyncio.run(_connect(Api(stack, None).ws_url("/ws/events/"), headers))


def test_a_viewer_gets_the_fleet_state_first(stack):
    msg = asyncio.run(
        _connect(Api(stack, None).ws_url("/ws/events/"), {"Authorization": f"Token {stack.tokens['carol']}"})
    )
    assert msg["type"] == "state"
    assert isinstance(msg["active_operations"], list)
