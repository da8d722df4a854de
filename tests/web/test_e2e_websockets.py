"""Websockets are for logged-in users with at least the viewer role."""

import asyncio
import json

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.support.stack import Api

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


ELSEWHERE = {
    "token revoked": "from core.models import ApiToken; ApiToken.objects.filter(user__username='{u}').delete()",
    # The token stays valid; the socket opened under the old password does not.
    "password reset": "from django.contrib.auth import get_user_model; u = get_user_model().objects.get(username='{u}'); "
    "u.set_password('another-passphrase-7'); u.save(update_fields=['password'])",
}


@pytest.mark.parametrize("change", sorted(ELSEWHERE))
def test_a_socket_closes_when_its_token_is_revoked_elsewhere(stack, change):
    """Through the real channel layer (Redis): a token revoked, or its user's password reset,
    in another process (here a management shell) closes the socket it opened, with 4403."""
    user = "ws-" + change.split()[0]
    token = (
        stack.python(
            "from django.contrib.auth import get_user_model; from core.models import ApiToken; "
            "from core.roles import set_role; "
            f"u, _ = get_user_model().objects.get_or_create(username='{user}'); set_role(u, 'viewer'); "
            "print(ApiToken.issue(u, 'ws')[1])"
        )
        .strip()
        .splitlines()[-1]
    )

    async def run():
        url = Api(stack, None).ws_url("/ws/events/")
        async with websockets.connect(url, additional_headers={"Authorization": f"Token {token}"}) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await asyncio.to_thread(stack.python, ELSEWHERE[change].format(u=user))
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            return first, closed.value.rcvd.code

    first, code = asyncio.run(run())
    assert first["type"] == "state"
    assert code == 4403


def test_an_idle_socket_stays_open_and_still_gets_updates(stack):
    """A socket that hears nothing for longer than the channel layer's 5 s wait still gets
    the next update, and nothing is logged (redis-py 8's 5 s read timeout used to end the
    consumer with "Timeout reading from .../redis.sock" and drop the socket). The stack's
    log check (tests/conftest.py) fails this test on any ERROR line."""

    async def run():
        url = Api(stack, None).ws_url("/ws/events/")
        async with websockets.connect(
            url, additional_headers={"Authorization": f"Token {stack.tokens['carol']}"}
        ) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await asyncio.sleep(12)
            await asyncio.to_thread(
                stack.python, "from operations.events import publish_fleet; publish_fleet('ping', {'n': 1})"
            )
            while True:  # other updates of the stack's fleet may come first
                later = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if later["type"] == "ping":
                    return first, later

    first, later = asyncio.run(run())
    assert first["type"] == "state"
    assert later == {"type": "ping", "data": {"n": 1}}
