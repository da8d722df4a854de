from django.db import transaction
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from ctweb.api import ApiError
from ctweb.audit import audit

from . import events
from .models import Operation


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
