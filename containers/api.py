from django.db import transaction
from django.db.models import Count, OuterRef, Subquery
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from ctweb.api import ApiError
from ctweb.audit import audit
from hosts.models import Host
from hosts.validators import validate_name

from . import events
from .models import Container, Operation
from .services import container_operation, create_container, sync_host


class OperationSerializer(serializers.ModelSerializer):
    container = serializers.CharField(source="container_name", allow_null=True)
    host = serializers.SlugRelatedField(slug_field="name", read_only=True)
    target_host = serializers.SlugRelatedField(slug_field="name", read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    url = serializers.SerializerMethodField()

    class Meta:
        model = Operation
        fields = [
            "id",
            "url",
            "kind",
            "status",
            "phase",
            "progress",
            "container",
            "host",
            "target_host",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
            "result",
            "error",
            "events",
            "parent",
        ]

    def get_url(self, op) -> str:
        return op.api_url()


class OperationSummarySerializer(OperationSerializer):
    class Meta(OperationSerializer.Meta):
        fields = [f for f in OperationSerializer.Meta.fields if f != "events"]


def operation_accepted(op: Operation) -> Response:
    return Response({"id": op.pk, "url": op.api_url()}, status=status.HTTP_202_ACCEPTED)


class OperationList(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("status", str),
            OpenApiParameter("container", str),
            OpenApiParameter("host", str),
            OpenApiParameter("kind", str),
            OpenApiParameter("limit", int),
            OpenApiParameter("offset", int),
        ],
        responses=OperationSummarySerializer(many=True),
    )
    def get(self, request):
        qs = Operation.objects.select_related("host", "target_host", "created_by")
        q = request.query_params
        if q.get("status"):
            if q["status"] not in Operation.Status.values:
                raise ApiError(f"status must be one of {', '.join(Operation.Status.values)}.", 400, "status")
            qs = qs.filter(status=q["status"])
        if q.get("container"):
            qs = qs.filter(container_name=q["container"])
        if q.get("host"):
            qs = qs.filter(host__name=q["host"])
        if q.get("kind"):
            qs = qs.filter(kind=q["kind"])
        try:
            limit = min(max(int(q.get("limit", 100)), 1), 500)
            offset = max(int(q.get("offset", 0)), 0)
        except ValueError:
            raise ApiError("limit and offset must be whole numbers.", 400) from None
        data = OperationSummarySerializer(qs[offset : offset + limit], many=True).data
        return Response(data)


class OperationDetail(APIView):
    @extend_schema(responses=OperationSerializer)
    def get(self, request, op_id):
        op = get_object_or_404(Operation.objects.select_related("host", "target_host", "created_by"), pk=op_id)
        return Response(OperationSerializer(op).data)


def cancel_operation(request, op: Operation) -> Operation:
    if not op.is_active:
        raise ApiError(f"Operation {op.pk} has already ended ({op.status}).", 409)
    with transaction.atomic():
        Operation.objects.filter(pk=op.pk).update(cancel_requested=True)
        # A job no worker has claimed yet can end here; a running one stops at its next safe point.
        ended = Operation.objects.filter(pk=op.pk, status=Operation.Status.PENDING).update(
            status=Operation.Status.CANCELLED, error="Cancelled before it started.", finished_at=timezone.now()
        )
    audit(request, "operation.cancel", op, detail=f"{op.kind} {'before start' if ended else 'requested'}")
    op.refresh_from_db()
    events.publish_operation(op)
    return op


class OperationCancel(APIView):
    @extend_schema(request=None, responses=OperationSerializer)
    def post(self, request, op_id):
        op = get_object_or_404(Operation, pk=op_id)
        op = cancel_operation(request, op)
        return Response(OperationSerializer(op).data, status=status.HTTP_202_ACCEPTED)


# --- containers --------------------------------------------------------------------


class ContainerSerializer(serializers.ModelSerializer):
    host = serializers.SlugRelatedField(slug_field="name", read_only=True)
    snapshots = serializers.SerializerMethodField()
    operation = serializers.SerializerMethodField()

    class Meta:
        model = Container
        fields = [
            "name",
            "host",
            "state",
            "ipv4",
            "ipv6",
            "type",
            "snapshots",
            "template",
            "command",
            "has_saved_state",
            "created_at",
            "updated_at",
            "operation",
        ]

    def get_snapshots(self, c) -> int:
        return c.n_snapshots if hasattr(c, "n_snapshots") else c.snapshots.count()

    def get_operation(self, c) -> str | None:
        """The running operation's URL, if any."""
        op_id = c.active_op if hasattr(c, "active_op") else None
        return f"/api/v1/operations/{op_id}/" if op_id else None


class ContainerCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63, trim_whitespace=False, validators=[validate_name])
    host = serializers.CharField(max_length=63, trim_whitespace=False)
    template = serializers.CharField(max_length=32, default="busybox", trim_whitespace=False)
    command = serializers.JSONField(required=False, allow_null=True, default=None)


class StateSerializer(serializers.Serializer):
    action = serializers.ChoiceField(choices=["start", "stop", "restart"])
    stateful = serializers.BooleanField(default=False)


def containers_queryset():
    active = Operation.objects.filter(container=OuterRef("pk"), status__in=Operation.ACTIVE).values("pk")[:1]
    return (
        Container.objects.select_related("host")
        .annotate(n_snapshots=Count("snapshots"), active_op=Subquery(active))
        .order_by("name")
    )


def _container(name: str) -> Container:
    return get_object_or_404(containers_queryset(), name=name)


class ContainerList(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("host", str), OpenApiParameter("state", str)],
        responses=ContainerSerializer(many=True),
    )
    def get(self, request):
        qs = containers_queryset()
        if request.query_params.get("host"):
            qs = qs.filter(host__name=request.query_params["host"])
        if request.query_params.get("state"):
            qs = qs.filter(state=request.query_params["state"].upper())
        return Response(ContainerSerializer(qs, many=True).data)

    @extend_schema(request=ContainerCreateSerializer, responses={202: dict})
    def post(self, request):
        s = ContainerCreateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        d = s.validated_data
        return operation_accepted(create_container(request, d["name"], d["host"], d["template"], d.get("command")))


class ContainerDetail(APIView):
    @extend_schema(responses=ContainerSerializer)
    def get(self, request, name):
        return Response(ContainerSerializer(_container(name)).data)

    @extend_schema(responses={202: dict})
    def delete(self, request, name):
        return operation_accepted(container_operation(request, _container(name), Operation.Kind.DELETE))


class ContainerState(APIView):
    @extend_schema(request=StateSerializer, responses={202: dict})
    def post(self, request, name):
        container = _container(name)
        s = StateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        if s.validated_data["stateful"]:
            raise ApiError("Stateful stop and start are not available in this version yet.", 400, "stateful")
        return operation_accepted(container_operation(request, container, s.validated_data["action"]))


class HostSync(APIView):
    @extend_schema(request=None, responses={202: dict})
    def post(self, request, name):
        return operation_accepted(sync_host(request, get_object_or_404(Host, name=name)))
