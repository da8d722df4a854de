"""The authorisation matrix's table (every page and API route, each method, who may) and its world (a container, a snapshot, an operation, a host), shared by the matrix and the audit tests."""

from __future__ import annotations

import io

import pytest
from django.core.files.storage import storages

from containers.models import Container, Snapshot, SnapshotSchedule
from core.models import ApiToken
from hosts.models import Host
from operations.bundles import save_bundle
from operations.models import Operation

EXPORT_OP = 4242  # the world's kept export (its id is in a body below)

# route -> {method: (role needed, body, status a permitted user gets)}; the route's
# parameters are filled from ARGS. Pages answer anonymous users with a redirect to the
# login page, the API with 401; users whose role is too low get 403 from both.
# Bodies of API calls are JSON; bodies of pages are form fields.
PAGES = {
    "": {"get": ("viewer", None, 200)},
    "accounts/login/": {"get": ("public", None, 200), "post": ("public", {"username": "x", "password": "y"}, 200)},
    "accounts/logout/": {"post": ("public", {}, 302)},
    "admin/login/": {"get": ("public", None, 302)},  # the throttled login page, not Django admin's own
    "hosts/": {"get": ("viewer", None, 200)},
    "hosts/add/": {"get": ("admin", None, 200), "post": ("admin", {"name": "x;y"}, 200)},
    "hosts/<str:name>/": {"get": ("viewer", None, 200)},
    "hosts/<str:name>/trust": {"post": ("admin", {"fingerprint": "SHA256:nope"}, 302)},
    "hosts/<str:name>/probe": {"post": ("operator", {}, 302)},
    "hosts/<str:name>/prepare": {"post": ("admin", {}, 302)},
    "hosts/<str:name>/delete": {"post": ("admin", {"confirm": "no"}, 302)},
    "hosts/<str:name>/sync": {"post": ("operator", {}, 302)},
    "hosts/<str:name>/evacuate": {"post": ("operator", {}, 302)},
    "containers/": {"get": ("viewer", None, 200)},
    "containers/new/": {
        "get": ("operator", None, 200),
        "post": ("operator", {"name": "newbox", "host": "secrethost"}, 302),
    },
    "containers/import/": {  # without an archive: the form again, saying so
        "get": ("operator", None, 200),
        "post": ("operator", {"name": "importbox", "host": "secrethost"}, 400),
    },
    "containers/<str:name>/": {"get": ("viewer", None, 200)},
    "containers/<str:name>/state": {"post": ("operator", {"action": "start"}, 302)},
    "containers/<str:name>/migrate": {"post": ("operator", {"target_host": "otherhost", "strategy": "restart"}, 302)},
    "containers/<str:name>/history/": {"get": ("viewer", None, 200)},
    "containers/<str:name>/snapshot": {"post": ("operator", {"name": "newsnap"}, 302)},
    "containers/<str:name>/compare/": {"get": ("viewer", None, 200)},
    "containers/<str:name>/snapshots/<str:snap>/": {"get": ("viewer", None, 200)},
    "containers/<str:name>/snapshots/<str:snap>/<str:action>": {"post": ("operator", {}, 302)},
    "containers/<str:name>/schedules/": {"post": ("operator", {"every": "1", "unit": "hours"}, 302)},
    "containers/<str:name>/schedules/<id:schedule_id>/delete": {"post": ("operator", {}, 302)},
    "containers/<str:name>/<str:action>": {"post": ("operator", {"confirm": "secretbox"}, 302)},
    "snapshots/": {"get": ("viewer", None, 200)},
    "operations/": {"get": ("viewer", None, 200)},
    "operations/<id:op_id>/": {"get": ("viewer", None, 200)},
    "operations/<id:op_id>/cancel": {"post": ("operator", {}, 302)},
    "operations/<id:op_id>/decide": {"post": ("admin", {"action": "keep-waiting"}, 302)},
    "operations/<id:op_id>/import": {"post": ("operator", {"name": "importedbox", "host": "otherhost"}, 302)},
    "users/": {"get": ("admin", None, 200)},
    "audit/": {"get": ("admin", None, 200)},
    "settings/": {
        "get": ("viewer", None, 200),
        "post": ("admin", {"direct_transfer_networks": "10.9.9.0/24"}, 302),
    },
    "users/create": {
        "post": ("admin", {"username": "mallory", "password": "a-long-passphrase-9", "role": "admin"}, 302)
    },
    "users/<id:user_id>/update": {"post": ("admin", {"action": "deactivate"}, 302)},
    "tokens/": {"get": ("login", None, 200)},
    "tokens/create": {"post": ("login", {"name": "mine"}, 200)},
    "tokens/<id:token_id>/revoke": {"post": ("login", {}, 302)},  # the user's own token
    "api/schema/": {"get": ("public", None, 200)},
}


API = {
    "api/v1/hosts/": {"get": ("viewer", None, 200), "post": ("admin", {}, 400)},
    "api/v1/hosts/<str:name>/": {"get": ("viewer", None, 200), "delete": ("admin", None, 409)},  # it has containers
    "api/v1/hosts/<str:name>/trust": {"post": ("admin", {"fingerprint": "SHA256:nope"}, 400)},  # port 1: unreachable
    "api/v1/hosts/<str:name>/probe": {"post": ("operator", None, 202)},
    "api/v1/hosts/<str:name>/prepare": {"post": ("admin", {}, 202)},
    "api/v1/hosts/<str:name>/sync": {"post": ("operator", None, 202)},
    "api/v1/hosts/<str:name>/evacuate": {"post": ("operator", None, 202)},
    "api/v1/ssh-key/": {"get": ("viewer", None, 200)},
    "api/v1/settings/": {
        "get": ("viewer", None, 200),
        "put": ("admin", {"direct_transfer_networks": ["10.9.9.0/24"]}, 200),
        "patch": ("admin", {"direct_transfer_networks": []}, 200),
    },
    "api/v1/containers/": {
        "get": ("viewer", None, 200),
        "post": ("operator", {"name": "newbox", "host": "secrethost"}, 202),
    },
    "api/v1/containers/<str:name>/": {"get": ("viewer", None, 200), "delete": ("operator", None, 202)},
    "api/v1/containers/<str:name>/state": {"post": ("operator", {"action": "start"}, 202)},
    "api/v1/containers/<str:name>/migrate": {
        "post": ("operator", {"target_host": "otherhost", "strategy": "restart"}, 202)
    },
    # The world's container is stopped: an operator gets past the role check to the 409.
    "api/v1/containers/<str:name>/check": {"post": ("operator", {"trial": True}, 409)},
    "api/v1/containers/<str:name>/targets": {"get": ("viewer", None, 200)},
    "api/v1/containers/<str:name>/snapshots/": {
        "get": ("viewer", None, 200),
        "post": ("operator", {"name": "newsnap", "stateful": False}, 202),
    },
    "api/v1/containers/<str:name>/snapshots/compare": {"get": ("viewer", None, 200)},
    "api/v1/containers/<str:name>/snapshots/<str:snap>/": {
        "get": ("viewer", None, 200),
        "delete": ("operator", None, 202),
    },
    "api/v1/containers/<str:name>/snapshots/<str:snap>/restore": {"post": ("operator", None, 202)},
    "api/v1/containers/<str:name>/snapshots/<str:snap>/export": {"post": ("operator", None, 202)},
    # An export holds the container's files and memory: a viewer may not download it.
    "api/v1/exports/<id:op_id>": {"get": ("operator", None, 200), "delete": ("operator", None, 204)},
    "api/v1/imports": {"post": ("operator", {"export": EXPORT_OP, "host": "otherhost", "name": "importedbox"}, 202)},
    "api/v1/containers/<str:name>/schedules/": {
        "get": ("viewer", None, 200),
        "post": ("operator", {"every": 1, "unit": "hours"}, 201),
    },
    "api/v1/containers/<str:name>/schedules/<id:schedule_id>/": {
        "get": ("viewer", None, 200),
        "delete": ("operator", None, 204),
    },
    "api/v1/snapshots/": {"get": ("viewer", None, 200)},
    "api/v1/operations/": {"get": ("viewer", None, 200)},
    "api/v1/operations/<id:op_id>/": {"get": ("viewer", None, 200)},
    "api/v1/operations/<id:op_id>/cancel": {"post": ("operator", None, 202)},
    "api/v1/operations/<id:op_id>/decide": {"post": ("admin", {"action": "keep-waiting"}, 409)},
    "api/v1/operations/<id:op_id>/bundle": {"get": ("viewer", None, 200)},
}


@pytest.fixture
def world(users, tokens, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    settings.STORAGES = {
        **settings.STORAGES,
        "bundles": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": tmp_path / "bundles"},
        },
        "exports": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": tmp_path / "exports"},
        },
    }
    caps = {
        "templates": ["busybox"],
        "arch": "x86_64",
        "network": {"subnet": "10.9.9.0/24", "bridge": "lxcbr0", "range": [100, 120]},
    }
    key = dict(key_type="ssh-ed25519", key_data="AAAAC3NzaC1lZDI1NTE5AAAAIGbXYqIV8bzRLxNfJ6vHR5cP2xvQ6QFqD7PbSqPXW0Mg")
    host = Host.objects.create(
        name="secrethost", address="127.0.0.77", port=1, status=Host.Status.ONLINE, capabilities=caps,
        fingerprint="SHA256:x", **key,
    )  # fmt: skip
    Host.objects.create(
        name="otherhost", address="127.0.0.78", port=1, status=Host.Status.ONLINE, capabilities=caps,
        fingerprint="SHA256:y", **key,
    )  # fmt: skip
    box = Container.objects.create(name="secretbox", host=host, state=Container.State.STOPPED, ipv4="10.9.9.100")
    Snapshot.objects.create(container=box, name="secretsnap", stateful=False, created_by=users["bob"])
    Snapshot.objects.create(container=box, name="secretsnap2", stateful=False, created_by=users["bob"])
    pending = Operation.objects.create(kind="probe", host=host, created_by=users["alice"])
    failed = Operation.objects.create(
        kind="snapshot", status="failure", container=box, container_name="secretbox", host=host,
        created_by=users["bob"], error="secretbox: CRIU said no", result={"bundle": ["secrethost.tar.gz"]},
    )  # fmt: skip
    save_bundle(failed.pk, "secrethost.tar.gz", io.BytesIO(b"\x1f\x8b not really a tarball"))
    Operation.objects.create(
        pk=EXPORT_OP, kind="export", status="success", container=box, container_name="secretbox", host=host,
        created_by=users["bob"], result={"file_name": "ctweb-secretbox-secretsnap.tar"},
    )  # fmt: skip
    storages["exports"].save(f"exports/op-{EXPORT_OP}.tar", io.BytesIO(b"secret files and memory"))
    ApiToken.issue(users["carol"], "carol-script")
    sched = SnapshotSchedule.objects.create(
        container=box, every=1, unit="hours", stateful=False, next_run_at=box.created_at, created_by=users["bob"]
    )
    return {
        "sched": sched.pk,
        "users": users,
        "tokens": tokens,
        "pending_op": pending.pk,
        "failed_op": failed.pk,
        "export_op": EXPORT_OP,
        "carol": users["carol"].pk,
        "bundles": tmp_path / "bundles",
    }


def _url(route: str, world, user: str, missing: bool = False) -> str:
    args = {**ARGS, **ARGS_BY_ROUTE.get(route, {})}
    if route.startswith(("containers/", "api/v1/containers/")):
        args["name"] = "secretbox"
    path = route
    for key, value in args.items():
        for conv in ("str", "id"):
            tag = f"<{conv}:{key}>"
            if tag not in path:
                continue
            if missing and key in MISSING:
                value = MISSING[key]
            elif value == "own":
                owner = world["users"]["carol" if user == "anonymous" else user]
                value = ApiToken.objects.filter(user=owner).order_by("pk").first().pk
            elif value in world:
                value = world[value]
            path = path.replace(tag, str(value))
    return "/" + path + QUERY.get(route, "")


MATRIX = [(route, m, spec) for table in (PAGES, API) for route, methods in table.items() for m, spec in methods.items()]


# Query strings some reads need to answer 200.
QUERY = {
    "containers/<str:name>/compare/": "?a=secretsnap&b=secretsnap2",
    "api/v1/containers/<str:name>/snapshots/compare": "?a=secretsnap&b=secretsnap2",
    "api/schema/": "?format=json",
}


# Which object each route parameter names (per route where it differs), and a name that does not exist.
ARGS = {
    "name": "secrethost",
    "snap": "secretsnap",
    "op_id": "pending_op",
    "user_id": "carol",
    "token_id": "own",
    "schedule_id": "sched",
}


ARGS_BY_ROUTE = {
    "api/v1/operations/<id:op_id>/bundle": {"op_id": "failed_op"},
    "api/v1/exports/<id:op_id>": {"op_id": "export_op"},
    "operations/<id:op_id>/": {"op_id": "failed_op"},
    "operations/<id:op_id>/import": {"op_id": "export_op"},
    "api/v1/operations/<id:op_id>/": {"op_id": "failed_op"},
    "containers/<str:name>/snapshots/<str:snap>/<str:action>": {"action": "restore"},
    "containers/<str:name>/<str:action>": {"action": "delete"},
}


MISSING = {
    "name": "nosuchthing",
    "snap": "nosuchsnap",
    "op_id": 999999,
    "user_id": 999999,
    "token_id": 999999,
    "schedule_id": 999999,
}
