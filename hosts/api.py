from django.db import IntegrityError, transaction
from django.db.models import Q
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers, status
from rest_framework.decorators import api_view
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import ApiError, StrictCharField, StrictIntegerField
from core.audit import Actor, audit
from operations.api import DisagreementSerializer, OperationAcceptedSerializer, operation_accepted
from operations.disagreements import disagreements
from operations.events import publish_fleet
from operations.models import Operation
from operations.runner import enqueue

from . import ssh
from .handlers import host_state
from .models import Host
from .prepare import start_prepare
from .validators import NAME_PATTERN, USER_PATTERN, validate_address, validate_name, validate_username


class HostSerializer(serializers.ModelSerializer):
    containers = serializers.SerializerMethodField()

    class Meta:
        model = Host
        fields = [
            "name",
            "address",
            "port",
            "username",
            "status",
            "status_message",
            "fingerprint",
            "offered_fingerprint",
            "capabilities",
            "last_probe_at",
            "created_at",
            "is_lab",
            "containers",
        ]

    def get_containers(self, host) -> int:
        return host.containers.count()


class HostCreateSerializer(serializers.Serializer):
    name = StrictCharField(max_length=63, validators=[NAME_PATTERN, validate_name], trim_whitespace=False)
    address = StrictCharField(max_length=253, validators=[validate_address], trim_whitespace=False)
    port = StrictIntegerField(default=22, min_value=1, max_value=65535)
    username = StrictCharField(
        default="root", max_length=32, validators=[USER_PATTERN, validate_username], trim_whitespace=False
    )


class TrustSerializer(serializers.Serializer):
    fingerprint = StrictCharField(max_length=100)


def _host_for_name(name: str) -> Host:
    return get_object_or_404(Host, name=name)


def add_host(actor: Actor, name: str, address: str, port: int, username: str) -> Host:
    """Look at the host's SSH key and save the host as untrusted. Nothing runs there yet."""
    if Host.objects.filter(name=name).exists():
        raise ApiError(f"A host named {name} already exists.", 409, "name")
    try:
        key = ssh.fetch_host_key(address, port)
    except ssh.SSHError as e:
        audit(actor, "host.add", object_type="host", outcome="failed", detail=str(e))
        raise ApiError(str(e), 400, "address") from e
    try:
        with transaction.atomic():
            host = Host.objects.create(
                name=name,
                address=address,
                port=port,
                username=username,
                status=Host.Status.UNTRUSTED,
                offered_key_type=key.get_name(),
                offered_key_data=key.get_base64(),
                offered_fingerprint=ssh.fingerprint(key),
            )
    except IntegrityError as e:
        raise ApiError(f"A host named {name} already exists.", 409, "name") from e
    audit(actor, "host.add", host, detail=f"{address}:{port} presented {host.offered_fingerprint}")
    publish_fleet("host", host_state(host))
    return host


def trust_host(actor: Actor, host: Host, fingerprint: str) -> Host:
    """Pin the key the host presents now, if it is the one the admin checked."""
    try:
        key = ssh.fetch_host_key(host.address, host.port)
    except ssh.SSHError as e:
        raise ApiError(str(e), 400) from e
    presented = ssh.fingerprint(key)
    if fingerprint.strip() != presented:
        audit(actor, "host.trust", host, outcome="refused", detail=f"asked {fingerprint}, host presents {presented}")
        raise ApiError(
            f"{host.name} presents {presented}, not the fingerprint given. Check the host before trusting it.",
            409,
            "fingerprint",
        )
    Host.objects.filter(pk=host.pk).update(
        key_type=key.get_name(),
        key_data=key.get_base64(),
        fingerprint=presented,
        offered_key_type="",
        offered_key_data="",
        offered_fingerprint="",
        status=Host.Status.TRUSTED,
        status_message="",
    )
    host.refresh_from_db()
    audit(actor, "host.trust", host, detail=presented)
    publish_fleet("host", host_state(host))
    return host


def start_probe(actor: Actor, host: Host) -> Operation:
    if not host.is_trusted:
        raise ApiError(
            f"{host.name} is not trusted: an admin must check and trust its host key first."
            if not host.is_blocked
            else host.status_message or "The host key changed.",
            409,
        )
    # A probe no worker has begun yet will see the host as it is now: it is the answer. One that
    # has begun may have read the host before what the operator just changed (an automatic
    # reprobe of an offline host, say), so the operator's own probe comes after it.
    queued = host.operations.filter(kind=Operation.Kind.PROBE, status=Operation.Status.PENDING).first()
    if queued:
        return queued
    with transaction.atomic():
        op = Operation.objects.create(kind=Operation.Kind.PROBE, host=host, created_by=actor.user, phase="queued")
        enqueue(op)
    audit(actor, "host.probe", host, detail=f"operation {op.pk}")
    return op


def remove_host(actor: Actor, host: Host) -> None:
    """Forget an empty host. Its containers must be migrated or deleted first."""
    if host.containers.exists():
        raise ApiError(f"{host.name} still has containers: migrate or delete them first.", 409)
    if Operation.objects.filter(Q(host=host) | Q(target_host=host), status__in=Operation.ACTIVE).exists():
        raise ApiError(f"{host.name} has an operation running.", 409)
    audit(actor, "host.delete", host)
    name = host.name
    host.delete()
    publish_fleet("host", {"name": name, "status": "deleted"})


class HostList(APIView):
    write_role = "admin"

    @extend_schema(responses=HostSerializer(many=True))
    def get(self, request):
        return Response(HostSerializer(Host.objects.all(), many=True).data)

    @extend_schema(request=HostCreateSerializer, responses={201: HostSerializer})
    def post(self, request):
        s = HostCreateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        host = add_host(Actor.of(request), **s.validated_data)
        return Response(HostSerializer(host).data, status=status.HTTP_201_CREATED)


class HostDetailSerializer(HostSerializer):
    disagreements = serializers.SerializerMethodField()

    class Meta(HostSerializer.Meta):
        fields = [*HostSerializer.Meta.fields, "disagreements"]

    @extend_schema_field(DisagreementSerializer(many=True))
    def get_disagreements(self, host) -> list[dict]:
        """Where the tidy found the database and the hosts disagreeing on migrations to or
        from this host (the hosts win; see docs/RELIABILITY.md)."""
        return disagreements(host=host)


class HostDetail(APIView):
    write_role = "admin"

    @extend_schema(responses=HostDetailSerializer)
    def get(self, request, name):
        return Response(HostDetailSerializer(_host_for_name(name)).data)

    @extend_schema(responses={204: None})
    def delete(self, request, name):
        remove_host(Actor.of(request), _host_for_name(name))
        return Response(status=status.HTTP_204_NO_CONTENT)


class HostTrust(APIView):
    write_role = "admin"

    @extend_schema(request=TrustSerializer, responses=HostSerializer)
    def post(self, request, name):
        host = _host_for_name(name)
        s = TrustSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return Response(HostSerializer(trust_host(Actor.of(request), host, s.validated_data["fingerprint"])).data)


class HostProbe(APIView):
    write_role = "operator"

    @extend_schema(request=None, responses={202: OperationAcceptedSerializer})
    def post(self, request, name):
        return operation_accepted(start_probe(Actor.of(request), _host_for_name(name)))


class PrepareNetworkSerializer(serializers.Serializer):
    bridge = StrictCharField(required=False, max_length=15, trim_whitespace=False)
    subnet = StrictCharField(max_length=18, trim_whitespace=False)
    range = serializers.ListField(
        child=StrictIntegerField(min_value=1, max_value=254), min_length=2, max_length=2, required=False
    )
    gateway = StrictCharField(required=False, allow_null=True, max_length=15, trim_whitespace=False)


class PrepareSerializer(serializers.Serializer):
    network = PrepareNetworkSerializer(
        required=False,
        allow_null=True,
        help_text="The container network ctweb may give addresses in (written to /etc/ctweb/network.json). "
        "Without it an existing description is kept, or one is made from the bridge's own address.",
    )


class HostPrepare(APIView):
    """Install and check what ctweb needs on the host (Debian 12, Debian 13, Ubuntu 24.04), then probe it."""

    write_role = "admin"

    @extend_schema(request=PrepareSerializer, responses={202: OperationAcceptedSerializer})
    def post(self, request, name):
        host = _host_for_name(name)
        s = PrepareSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        network = s.validated_data.get("network")
        return operation_accepted(start_prepare(Actor.of(request), host, dict(network) if network else None))


@extend_schema(
    responses=inline_serializer("SSHPublicKey", {"public_key": serializers.CharField()}),
)
@api_view(["GET"])
def ssh_public_key(request):
    """The dashboard's SSH public key, for `authorized_keys` on each host."""
    return Response({"public_key": ssh.public_key_line()})
