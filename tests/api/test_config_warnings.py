"""Containers found by sync are shown, not trusted: the keys of their LXC config outside
ctweb's allowlist (the agent's `list` names them) are on the container page and in the API."""

from django.test import Client

from containers.handlers import _apply_listing
from containers.models import Container


def _listing(warnings):
    return [{"name": "found", "state": "STOPPED", "ipv4": [], "ipv6": [], "config_warnings": warnings}]


def test_sync_shows_the_keys_outside_the_allowlist(users, tokens, trusted_host):
    _apply_listing(trusted_host, _listing(["lxc.hook.pre-start", "lxc.include"]))
    assert Container.objects.get(name="found").config_warnings == ["lxc.hook.pre-start", "lxc.include"]
    api = Client(HTTP_AUTHORIZATION=f"Token {tokens['carol']}")
    one = api.get("/api/v1/containers/found/").json()
    assert one["config_warnings"] == ["lxc.hook.pre-start", "lxc.include"]
    row = next(r for r in api.get("/api/v1/containers/").json() if r["name"] == "found")
    assert row["config_warnings"] == one["config_warnings"]
    page = Client()
    page.force_login(users["carol"])
    html = page.get("/containers/found/").content.decode()
    assert 'id="config-warnings"' in html and "lxc.hook.pre-start" in html
    # a later sync that finds the config clean (rewritten by ctweb) clears them
    _apply_listing(trusted_host, _listing([]))
    assert Container.objects.get(name="found").config_warnings == []
    assert 'id="config-warnings"' not in page.get("/containers/found/").content.decode()
