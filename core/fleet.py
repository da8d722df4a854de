"""Fleet settings an admin changes: the networks allowed for direct host-to-host transfer,
and how long a post-copy's page pull may go without progress.

By default a migration's bytes go through the dashboard: the worker relays them between
its two SSH connections, so no host has to reach or trust another and everything is
encrypted. An admin may name private networks on which two hosts send a migration's tars
and post-copy pages straight to each other instead, over TLS 1.3 with certificates the
worker makes for each migration (faster; the hosts must then reach each other, and a
source listens for its target during a post-copy). Only RFC 1918, loopback and IPv6
unique-local networks are accepted, and a migration goes direct only when both hosts' addresses (as the
dashboard knows them) are IP addresses inside the same allowed network.
"""

from __future__ import annotations

import ipaddress
import re

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from .api import ApiError
from .audit import audit
from .models import FleetSettings

FIELD = "direct_transfer_networks"
STALL_FIELD = "postcopy_stall_limit_s"
STALL_RANGE = (30, 86400)  # half a minute to a day without progress
BUDGET_FIELD = "snapshot_budget_mib"
BUDGET_MAX = 1 << 30  # MiB: a pebibyte per host is "no practical limit"
MAX_NETWORKS = 32
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "::1/128", "fc00::/7")
)


def clean_networks(value, text: bool = False) -> list[str]:
    """The networks as an admin gave them -> a normalised list, or ValidationError saying
    exactly what is wrong. A list of strings (the API), or with text=True one string with
    the networks separated by commas, spaces or lines (the settings page's text box)."""
    if text and isinstance(value, str):
        value = [v for v in re.split(r"[\s,]+", value) if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError(f"{FIELD} must be a list of networks such as 10.77.64.0/24.")
    if len(value) > MAX_NETWORKS:
        raise ValidationError(f"At most {MAX_NETWORKS} networks.")
    out: list[str] = []
    for raw in value:
        item = raw.strip()
        if len(item) > 64:
            raise ValidationError(f"{item[:64]!r}… is not a network.")
        try:
            net = ipaddress.ip_network(item)
        except ValueError:
            try:
                loose = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValidationError(
                    f"{item!r} is not a network: write an address and a prefix length, such as 10.77.64.0/24."
                ) from None
            raise ValidationError(f"{item} has host bits set: write the network itself, {loose}.") from None
        if not any(net.version == p.version and net.subnet_of(p) for p in PRIVATE_NETWORKS):
            raise ValidationError(
                f"{net} is not a private network. Direct transfer opens ports between hosts, so it is allowed only inside "
                "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, loopback or IPv6 unique-local (fc00::/7) networks."
            )
        if str(net) not in out:
            out.append(str(net))
    return out


def _save(request, field: str, clean, attr: str, describe) -> FleetSettings:
    """Validate with `clean()` and store one fleet setting (the caller checked the admin role);
    audited either way, the change as `describe(before, after)`."""
    try:
        value = clean()
    except ValidationError as e:
        audit(
            request,
            "settings.update",
            object_type="settings",
            object_name=field,
            outcome="refused",
            detail=e.messages[0],
        )
        raise
    with transaction.atomic():
        fs = FleetSettings.objects.select_for_update().get_or_create(pk=1)[0]
        before = getattr(fs, attr)
        setattr(fs, attr, value)
        fs.updated_at = timezone.now()
        fs.updated_by = request.user.get_username()
        fs.save()
    audit(request, "settings.update", object_type="settings", object_name=field, detail=describe(before, value))
    return fs


def save_direct_networks(request, value, text: bool = False) -> FleetSettings:
    """Validate and store the networks (the caller checked the admin role); audited either way."""
    return _save(
        request,
        FIELD,
        lambda: clean_networks(value, text),
        "direct_transfer_networks",
        lambda before, after: f"{', '.join(before or []) or 'none'} -> {', '.join(after) or 'none (relay only)'}",
    )


def _whole_number(value, lo: int, hi: int, sentence: str) -> int:
    """A whole number from lo to hi (digits in a string too, as a form sends them), else `sentence`."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationError(sentence)
    return value


def clean_stall_limit(value) -> int:
    """Seconds a post-copy's page pull may go without progress: an integer in STALL_RANGE."""
    lo, hi = STALL_RANGE
    return _whole_number(
        value,
        lo,
        hi,
        f"{STALL_FIELD} must be a whole number of seconds from {lo} to {hi} (the default is 600, 10 minutes).",
    )


def save_stall_limit(request, value) -> FleetSettings:
    """Validate and store the post-copy no-progress limit (the caller checked the admin role); audited either way."""
    return _save(
        request,
        STALL_FIELD,
        lambda: clean_stall_limit(value),
        "postcopy_stall_limit_s",
        lambda before, after: f"{before} s -> {after} s",
    )


def clean_budget(value) -> int:
    """MiB the snapshots on each host may take: a whole number from 0 (no budget) up."""
    return _whole_number(
        value,
        0,
        BUDGET_MAX,
        f"{BUDGET_FIELD} must be a whole number of MiB from 0 (no budget) to {BUDGET_MAX}: "
        "the most disk the snapshots on each host may take.",
    )


def save_budget(request, value) -> FleetSettings:
    """Validate and store the snapshot budget per host (the caller checked the admin role); audited either way."""
    return _save(
        request,
        BUDGET_FIELD,
        lambda: clean_budget(value),
        "snapshot_budget_mib",
        lambda before, after: f"{before or 'none'} MiB -> {after or 'none'} MiB",
    )


def snapshot_budget_bytes() -> int | None:
    """The snapshot budget each host has, in bytes, or None for no budget."""
    mib = FleetSettings.load().snapshot_budget_mib
    return mib << 20 if mib else None


def direct_route(source, target) -> tuple[dict | None, str]:
    """Whether a migration from `source` to `target` may send its tars directly.

    ({"network", "source_address", "target_address"}, why) when both hosts' addresses lie
    in one allowed network, else (None, why not). Read when the migration starts."""
    networks = [ipaddress.ip_network(n) for n in FleetSettings.load().direct_transfer_networks or []]
    if not networks:
        return None, "no direct-transfer network is configured"
    addresses = {}
    for host in (source, target):
        try:
            addresses[host.pk] = ipaddress.ip_address(host.address)
        except ValueError:
            return None, f"{host.name}'s address {host.address} is a name, not an IP address in an allowed network"
    a, b = addresses[source.pk], addresses[target.pk]
    for net in networks:
        if a.version == net.version == b.version and a in net and b in net:
            return {"network": str(net), "source_address": str(a), "target_address": str(b)}, (
                f"{source.name} ({a}) and {target.name} ({b}) are both in {net}, allowed by an admin"
            )
    return None, f"{source.name} ({a}) and {target.name} ({b}) are not both inside one allowed network"


def as_dict(fs: FleetSettings) -> dict:
    return {
        FIELD: list(fs.direct_transfer_networks or []),
        STALL_FIELD: fs.postcopy_stall_limit_s,
        BUDGET_FIELD: fs.snapshot_budget_mib,
        "updated_at": fs.updated_at,
        "updated_by": fs.updated_by,
    }


class FleetSettingsSerializer(serializers.Serializer):
    direct_transfer_networks = serializers.ListField(
        child=serializers.CharField(max_length=64),
        max_length=MAX_NETWORKS,
        help_text="Private networks (CIDR) on which hosts may send migrations directly to each other (TLS 1.3). "
        "Empty: every byte is relayed by the dashboard over SSH.",
    )
    postcopy_stall_limit_s = serializers.IntegerField(
        min_value=STALL_RANGE[0],
        max_value=STALL_RANGE[1],
        required=False,
        help_text="Seconds a post-copy's page pull may go without any progress before it is given up, both copies "
        "kept for an admin's decision (default 600). There is no limit on the pull's total time.",
    )
    snapshot_budget_mib = serializers.IntegerField(
        min_value=0,
        max_value=BUDGET_MAX,
        required=False,
        help_text="The most disk (MiB) the snapshots on each host may take; 0: no budget. A snapshot that would go "
        "past it is refused, with the numbers, before the container is frozen.",
    )
    updated_at = serializers.DateTimeField(read_only=True, allow_null=True)
    updated_by = serializers.CharField(read_only=True)


class FleetSettingsView(APIView):
    """GET: any role reads them. PUT/PATCH: admins change them (audited)."""

    write_role = "admin"

    @extend_schema(responses=FleetSettingsSerializer)
    def get(self, request):
        return Response(as_dict(FleetSettings.load()))

    @extend_schema(request=FleetSettingsSerializer, responses=FleetSettingsSerializer)
    def put(self, request):
        data = request.data
        if not isinstance(data, dict) or FIELD not in data:  # a PUT names the whole object (PATCH: a part)
            raise ApiError(f"{FIELD} is required (a list; empty for relay only).", 400, FIELD)
        return self._update(request, data)

    def _update(self, request, data: dict):
        for field, clean in ((STALL_FIELD, clean_stall_limit), (BUDGET_FIELD, clean_budget)):
            if field in data:  # checked before anything is saved
                try:
                    clean(data[field])
                except ValidationError as e:
                    audit(
                        request,
                        "settings.update",
                        object_type="settings",
                        object_name=field,
                        outcome="refused",
                        detail=e.messages[0],
                    )
                    raise ApiError(e.messages[0], 400, field) from e
        fs = None
        if FIELD in data:
            try:
                fs = save_direct_networks(request, data[FIELD])
            except ValidationError as e:
                raise ApiError(e.messages[0], 400, FIELD) from e
        if STALL_FIELD in data:
            fs = save_stall_limit(request, data[STALL_FIELD])
        if BUDGET_FIELD in data:
            fs = save_budget(request, data[BUDGET_FIELD])
        return Response(as_dict(fs))

    @extend_schema(request=FleetSettingsSerializer, responses=FleetSettingsSerializer)
    def patch(self, request):
        if isinstance(request.data, dict) and not {FIELD, STALL_FIELD, BUDGET_FIELD} & set(request.data):
            return Response(as_dict(FleetSettings.load()))
        if not isinstance(request.data, dict):
            raise ApiError("The body must be a JSON object.", 400)
        return self._update(request, request.data)
