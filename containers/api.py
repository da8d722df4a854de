from datetime import date, datetime, time, timedelta

from django.db.models import Count, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import ApiError, StrictBooleanField, StrictCharField, StrictIntegerField
from core.audit import Actor, audit
from core.parsers import JSONParser
from hosts.models import Host
from hosts.validators import NAME_PATTERN, validate_name
from operations import runner
from operations.api import DisagreementSerializer, OperationAcceptedSerializer, operation_accepted
from operations.bundles import bundle_bytes
from operations.disagreements import disagreements
from operations.models import Operation

from . import exports, planning, schedules
from .compare import compare_snapshots
from .migration import STRATEGIES, start_evacuation, start_migration, strategy_support
from .models import Container, Snapshot
from .services import (
    cancel,
    change_state,
    check_container,
    container_operation,
    create_container,
    delete_snapshot,
    restore_snapshot,
    snapshot_container,
    sync_host,
)


class OperationSerializer(serializers.ModelSerializer):
    container = serializers.CharField(source="container_name", allow_null=True)
    host = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    target_host = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
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


class TargetSerializer(serializers.Serializer):
    host = serializers.CharField()
    strategies = serializers.DictField(
        child=serializers.CharField(allow_null=True), help_text="strategy -> null when possible, else why not"
    )


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
        limit, offset = _limits(q)
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
    cancel(request, op)
    return op


class OperationCancel(APIView):
    @extend_schema(request=None, responses={202: OperationSerializer})
    def post(self, request, op_id):
        op = get_object_or_404(Operation, pk=op_id)
        op = cancel_operation(request, op)
        return Response(OperationSerializer(op).data, status=status.HTTP_202_ACCEPTED)


def decide_operation(request, op: Operation, action) -> Operation:
    if not isinstance(action, str) or not action:
        raise ApiError("action must be the id of one of the operation's result.decision.actions.", 400, "action")
    try:
        op = runner.decide(op.pk, action, request.user)
    except runner.DecisionRefused as e:
        raise ApiError(str(e), 409, "action") from e
    audit(request, "operation.decide", op, detail=f"{op.kind} {action}")
    return op


class OperationDecide(APIView):
    """An admin's choice among the actions a waiting operation offers (result.decision)."""

    write_role = "admin"

    @extend_schema(request=None, responses={202: OperationSerializer})
    def post(self, request, op_id):
        op = get_object_or_404(Operation, pk=op_id)
        body = request.data if isinstance(request.data, dict) else {}
        op = decide_operation(request, op, body.get("action"))
        op.refresh_from_db()
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
            "config_warnings",
            "checkpointable",
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
    name = StrictCharField(max_length=63, trim_whitespace=False, validators=[NAME_PATTERN, validate_name])
    host = StrictCharField(max_length=63, trim_whitespace=False, validators=[NAME_PATTERN])
    template = StrictCharField(max_length=32, default="busybox", trim_whitespace=False)
    command = serializers.JSONField(required=False, allow_null=True, default=None)


class StateSerializer(serializers.Serializer):
    action = serializers.ChoiceField(choices=["start", "stop", "restart"])
    stateful = StrictBooleanField(default=False, help_text="stop: dump the memory first; the next start resumes it")
    discard_state = StrictBooleanField(default=False, help_text="start: throw away saved state, start cold")


def containers_queryset():
    # Both are subqueries per row, not a join and GROUP BY over every snapshot: a page of the list
    # costs the same with 200,000 snapshots as with 20, and count() for a pager leaves them out.
    snapshots = Snapshot.objects.filter(container=OuterRef("pk")).order_by().values("container")
    n_snapshots = Subquery(snapshots.annotate(n=Count("*")).values("n"))
    active = Operation.objects.filter(container=OuterRef("pk"), status__in=Operation.ACTIVE).values("pk")[:1]
    return (
        Container.objects.select_related("host")
        .annotate(n_snapshots=Coalesce(n_snapshots, 0), active_op=Subquery(active))
        .order_by("name")
    )


def container_rows(qs) -> list[dict]:
    """ContainerSerializer's output for each container, read with values(): a list is up to 1000 of
    them, and a model plus a serializer per row cost several times the query (bench/fleet.py)."""
    when = serializers.DateTimeField().to_representation
    return [
        {
            "name": r["name"],
            "host": r["host__name"],
            "state": r["state"],
            "ipv4": r["ipv4"],
            "ipv6": r["ipv6"],
            "type": r["type"],
            "snapshots": r["n_snapshots"],
            "template": r["template"],
            "command": r["command"],
            "has_saved_state": r["has_saved_state"],
            "config_warnings": r["config_warnings"],
            "checkpointable": r["checkpointable"],
            "created_at": when(r["created_at"]),
            "updated_at": when(r["updated_at"]),
            "operation": f"/api/v1/operations/{r['active_op']}/" if r["active_op"] else None,
        }
        for r in qs.values(
            "name",
            "host__name",
            "state",
            "ipv4",
            "ipv6",
            "type",
            "n_snapshots",
            "template",
            "command",
            "has_saved_state",
            "config_warnings",
            "checkpointable",
            "created_at",
            "updated_at",
            "active_op",
        )
    ]


def _container(name: str) -> Container:
    return get_object_or_404(containers_queryset(), name=name)


class ContainerList(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("host", str),
            OpenApiParameter("state", str),
            OpenApiParameter("limit", int, description="at most 1000; default 1000"),
            OpenApiParameter("offset", int),
        ],
        responses=ContainerSerializer(many=True),
    )
    def get(self, request):
        qs = containers_queryset()
        if request.query_params.get("host"):
            qs = qs.filter(host__name=request.query_params["host"])
        if request.query_params.get("state"):
            qs = qs.filter(state=request.query_params["state"].upper())
        limit, offset = _limits(request.query_params, default=1000, most=1000)
        return Response(container_rows(qs[offset : offset + limit]))

    @extend_schema(request=ContainerCreateSerializer, responses={202: OperationAcceptedSerializer})
    def post(self, request):
        s = ContainerCreateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        d = s.validated_data
        return operation_accepted(
            create_container(Actor.of(request), d["name"], d["host"], d["template"], d.get("command"))
        )


class ContainerDetailSerializer(ContainerSerializer):
    disagreements = serializers.SerializerMethodField()

    class Meta(ContainerSerializer.Meta):
        fields = [*ContainerSerializer.Meta.fields, "disagreements"]

    @extend_schema_field(DisagreementSerializer(many=True))
    def get_disagreements(self, c) -> list[dict]:
        """Where the tidy found the database and the hosts disagreeing about this container
        (the hosts win; see docs/RELIABILITY.md)."""
        return disagreements(container_name=c.name)


class ContainerDetail(APIView):
    @extend_schema(responses=ContainerDetailSerializer)
    def get(self, request, name):
        return Response(ContainerDetailSerializer(_container(name)).data)

    @extend_schema(responses={202: OperationAcceptedSerializer})
    def delete(self, request, name):
        return operation_accepted(container_operation(Actor.of(request), _container(name), Operation.Kind.DELETE))


class ContainerState(APIView):
    @extend_schema(request=StateSerializer, responses={202: OperationAcceptedSerializer})
    def post(self, request, name):
        container = _container(name)
        s = StateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return operation_accepted(change_state(Actor.of(request), container, **s.validated_data))


class CheckSerializer(serializers.Serializer):
    trial = StrictBooleanField(default=True, help_text="also a trial dump (it keeps running; the freeze is capped)")


class ContainerCheck(APIView):
    @extend_schema(request=CheckSerializer, responses={202: OperationAcceptedSerializer})
    def post(self, request, name):
        container = _container(name)
        s = CheckSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return operation_accepted(check_container(Actor.of(request), container, **s.validated_data))


class HostSync(APIView):
    @extend_schema(request=None, responses={202: OperationAcceptedSerializer})
    def post(self, request, name):
        return operation_accepted(sync_host(Actor.of(request), get_object_or_404(Host, name=name)))


# --- snapshots -----------------------------------------------------------------------


class SnapshotSerializer(serializers.ModelSerializer):
    container = serializers.CharField(source="container.name", read_only=True)
    host = serializers.CharField(source="container.host.name", read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = Snapshot
        fields = [
            "name",
            "container",
            "host",
            "stateful",
            "created_at",
            "size_bytes",
            "added_bytes",
            "images_bytes",
            "images_raw_bytes",
            "images_compression",
            "created_by",
            "stats",
        ]


class SnapshotDetailSerializer(SnapshotSerializer):
    class Meta(SnapshotSerializer.Meta):
        fields = SnapshotSerializer.Meta.fields + ["contents"]


class SnapshotCreateSerializer(serializers.Serializer):
    name = StrictCharField(
        max_length=63,
        required=False,
        allow_null=True,
        default=None,
        trim_whitespace=False,
        validators=[NAME_PATTERN, validate_name],
    )
    stateful = StrictBooleanField(default=True)


def _snapshot(container: Container, snap: str) -> Snapshot:
    return get_object_or_404(container.snapshots.select_related("created_by", "container__host"), name=snap)


def snapshot_queryset():
    return Snapshot.objects.select_related("container__host", "created_by").defer("contents")


MAX_IDS = 1000  # beyond this many matching containers a search reads most snapshots anyway


def filter_snapshots(qs, params):
    """Filters shared by the snapshot lists (API and pages): stateful, since, until, who, q."""
    if params.get("stateful"):
        if params["stateful"] not in ("true", "false"):
            raise ApiError("stateful must be true or false.", 400, "stateful")
        qs = qs.filter(stateful=params["stateful"] == "true")
    # Days as ranges of created_at, not created_at's date: the index on created_at serves a range.
    since = _date(params["since"], "since") if params.get("since") else date.min
    until = _date(params["until"], "until") if params.get("until") else date.max
    if since > date.min:
        qs = qs.filter(created_at__gte=_midnight(since))
    if until < date.max:
        qs = qs.filter(created_at__lt=_midnight(until + timedelta(days=1)))
    if params.get("created_by"):
        qs = qs.filter(created_by__username=params["created_by"])
    if params.get("container"):
        qs = qs.filter(container__name=params["container"])
    if params.get("host"):
        qs = qs.filter(container__host__name=params["host"])
    if params.get("q"):
        # Snapshot names OR container names. Written as a join, the OR reads every snapshot; with the
        # matching containers looked up first, both halves are index lookups (migration 0003).
        q = params["q"]
        containers = Container.objects.filter(name__icontains=q)
        ids = list(containers.values_list("pk", flat=True)[: MAX_IDS + 1])
        in_containers = Q(container__in=ids) if len(ids) <= MAX_IDS else Q(container__in=containers)
        qs = qs.filter(Q(name__icontains=q) | in_containers)
    return qs


def _midnight(day: date) -> datetime:
    """The start of a day in the site's time zone."""
    return timezone.make_aware(datetime.combine(day, time.min))


def _date(value: str, field: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ApiError(f"{field} must be a date like 2026-11-26.", 400, field) from None


MAX_OFFSET = 10**12  # past any real list; a larger OFFSET overflows the database's integer


def _limits(q, default: int = 100, most: int = 500) -> tuple[int, int]:
    try:
        return min(max(int(q.get("limit", default)), 1), most), min(max(int(q.get("offset", 0)), 0), MAX_OFFSET)
    except ValueError:
        raise ApiError("limit and offset must be whole numbers.", 400) from None


SNAPSHOT_FILTERS = [
    OpenApiParameter("stateful", str, enum=["true", "false", ""], description="empty: either"),
    OpenApiParameter("since", str, description="YYYY-MM-DD"),
    OpenApiParameter("until", str, description="YYYY-MM-DD"),
    OpenApiParameter("created_by", str),
    OpenApiParameter("limit", int),
    OpenApiParameter("offset", int),
]


class SnapshotList(APIView):
    @extend_schema(parameters=SNAPSHOT_FILTERS, responses=SnapshotSerializer(many=True))
    def get(self, request, name):
        container = _container(name)
        qs = filter_snapshots(snapshot_queryset().filter(container=container), request.query_params)
        limit, offset = _limits(request.query_params)
        return Response(SnapshotSerializer(qs[offset : offset + limit], many=True).data)

    @extend_schema(request=SnapshotCreateSerializer, responses={202: OperationAcceptedSerializer})
    def post(self, request, name):
        container = _container(name)
        s = SnapshotCreateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        return operation_accepted(
            snapshot_container(Actor.of(request), container, s.validated_data["name"], s.validated_data["stateful"])
        )


class SnapshotDetail(APIView):
    @extend_schema(responses=SnapshotDetailSerializer)
    def get(self, request, name, snap):
        return Response(SnapshotDetailSerializer(_snapshot(_container(name), snap)).data)

    @extend_schema(responses={202: OperationAcceptedSerializer})
    def delete(self, request, name, snap):
        container = _container(name)
        return operation_accepted(delete_snapshot(Actor.of(request), container, _snapshot(container, snap)))


class SnapshotRestore(APIView):
    @extend_schema(request=None, responses={202: OperationAcceptedSerializer})
    def post(self, request, name, snap):
        container = _container(name)
        return operation_accepted(restore_snapshot(Actor.of(request), container, _snapshot(container, snap)))


class SnapshotExport(APIView):
    """Pack the snapshot into one archive kept on the dashboard (an operation); its result's
    `download` is where to fetch it."""

    @extend_schema(request=None, responses={202: OperationAcceptedSerializer})
    def post(self, request, name, snap):
        container = _container(name)
        return operation_accepted(exports.export_snapshot(Actor.of(request), container, _snapshot(container, snap)))


class ExportDownload(APIView):
    """A kept export's archive. Operators and admins only: it holds the container's files and,
    for a stateful snapshot, its memory."""

    read_role = "operator"

    @extend_schema(responses={(200, "application/x-tar"): OpenApiTypes.BINARY})
    def get(self, request, op_id):
        return exports.download(op_id)

    @extend_schema(responses={204: None})
    def delete(self, request, op_id):
        """Remove the kept archive (the export operation stays in the history)."""
        exports.delete_export(Actor.of(request), op_id)
        return Response(status=204)


class ImportSerializer(serializers.Serializer):
    name = StrictCharField(
        max_length=63, required=False, trim_whitespace=False, validators=[NAME_PATTERN, validate_name],
        help_text="The new container (with host)",
    )  # fmt: skip
    host = StrictCharField(max_length=63, required=False, trim_whitespace=False, validators=[NAME_PATTERN])
    container = StrictCharField(
        max_length=63, required=False, trim_whitespace=False, validators=[NAME_PATTERN],
        help_text="Instead of name and host: an existing container, which gets the snapshot",
    )  # fmt: skip
    export = StrictIntegerField(min_value=1, max_value=999999999999999999, help_text="The id of an export operation")


class ImportUploadSerializer(serializers.Serializer):
    name = serializers.CharField(
        max_length=63, required=False, trim_whitespace=False, validators=[NAME_PATTERN, validate_name]
    )
    host = serializers.CharField(max_length=63, required=False, trim_whitespace=False, validators=[NAME_PATTERN])
    container = serializers.CharField(max_length=63, required=False, trim_whitespace=False, validators=[NAME_PATTERN])
    archive = serializers.FileField(help_text="An export archive (.tar)")


class ImportList(APIView):
    """A new container on `host` from a snapshot's archive, or (`container`) the snapshot added to
    an existing container: a kept export (JSON, `export`) or an uploaded archive (multipart,
    `archive`). Checked on the dashboard, then again on the host, before anything is put in place
    there."""

    parser_classes = [JSONParser, MultiPartParser]

    @extend_schema(
        request={"application/json": ImportSerializer, "multipart/form-data": ImportUploadSerializer},
        responses={202: OperationAcceptedSerializer},
    )
    def post(self, request):
        upload = request.content_type.startswith("multipart/")
        s = (ImportUploadSerializer if upload else ImportSerializer)(data=request.data)
        s.is_valid(raise_exception=True)
        d = s.validated_data
        source = {"upload": d["archive"]} if upload else {"export_id": d["export"]}
        actor = Actor.of(request)
        if d.get("container") is not None:
            if d.get("name") is not None or d.get("host") is not None:
                raise ApiError(
                    "Give either container (an existing one) or name and host (a new one).", 400, "container"
                )
            return operation_accepted(exports.import_into(actor, d["container"], **source))
        for field in ("name", "host"):
            if d.get(field) is None:
                raise ApiError(f"{field}: This field is required.", 400, field)
        return operation_accepted(exports.import_archive(actor, d["name"], d["host"], **source))


class SnapshotCompare(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("a", str, required=True), OpenApiParameter("b", str, required=True)],
        responses={200: dict},
    )
    def get(self, request, name):
        container = _container(name)
        a, b = request.query_params.get("a"), request.query_params.get("b")
        if not a or not b:
            raise ApiError("Give two snapshot names as a and b.", 400, "a" if not a else "b")
        return Response(compare_snapshots(_snapshot(container, a), _snapshot(container, b)))


class ScheduleSerializer(serializers.Serializer):
    id = serializers.IntegerField(read_only=True)
    every = serializers.IntegerField(min_value=1, help_text="How many units between two snapshots")
    unit = serializers.ChoiceField(choices=["minutes", "hours", "days"])
    stateful = serializers.BooleanField(default=True)
    keep_last = serializers.IntegerField(min_value=1, required=False, allow_null=True, help_text="Keep its newest K")
    keep_days = serializers.IntegerField(
        min_value=1, required=False, allow_null=True, help_text="Keep those younger than D days"
    )
    description = serializers.CharField(read_only=True)
    next_run_at = serializers.DateTimeField(read_only=True)
    last_run_at = serializers.DateTimeField(read_only=True, allow_null=True)
    last_note = serializers.CharField(read_only=True)
    snapshots = serializers.IntegerField(read_only=True, help_text="Its snapshots that exist now")


class ScheduleList(APIView):
    """A container's snapshot schedules. POST (operator) adds one; its snapshots and their
    deletions are ordinary operations run by Celery beat (containers/schedules.py)."""

    @extend_schema(responses=ScheduleSerializer(many=True))
    def get(self, request, name):
        container = _container(name)
        return Response([schedules.as_dict(s) for s in container.schedules.select_related("created_by")])

    @extend_schema(request=ScheduleSerializer, responses={201: ScheduleSerializer})
    def post(self, request, name):
        container = _container(name)
        s = schedules.create_schedule(Actor.of(request), container, request.data)
        return Response(schedules.as_dict(s), status=201)


class ScheduleDetail(APIView):
    @extend_schema(responses=ScheduleSerializer)
    def get(self, request, name, schedule_id):
        return Response(schedules.as_dict(_schedule(_container(name), schedule_id)))

    @extend_schema(responses={204: None})
    def delete(self, request, name, schedule_id):
        schedules.delete_schedule(Actor.of(request), _schedule(_container(name), schedule_id))
        return Response(status=204)


def _schedule(container, schedule_id):
    s = container.schedules.filter(pk=schedule_id).first()
    if s is None:
        raise ApiError(f"{container.name} has no schedule {schedule_id}.", 404)
    return s


class FleetSnapshots(APIView):
    """Search snapshots across the fleet (newest first)."""

    @extend_schema(
        parameters=SNAPSHOT_FILTERS
        + [OpenApiParameter("q", str), OpenApiParameter("container", str), OpenApiParameter("host", str)],
        responses=SnapshotSerializer(many=True),
    )
    def get(self, request):
        qs = filter_snapshots(snapshot_queryset(), request.query_params)
        limit, offset = _limits(request.query_params)
        return Response(SnapshotSerializer(qs[offset : offset + limit], many=True).data)


class OperationBundle(APIView):
    @extend_schema(responses={(200, "application/gzip"): bytes})
    def get(self, request, op_id):
        from django.http import HttpResponse

        op = get_object_or_404(Operation, pk=op_id)
        data = bundle_bytes(op)
        if data is None:
            raise ApiError(f"Operation {op.pk} has no debug bundle (only failed container operations keep one).", 404)
        response = HttpResponse(data, content_type="application/gzip")
        response["Content-Disposition"] = f'attachment; filename="ctweb-op-{op.pk}-bundle.tar.gz"'
        return response


class MigrateSerializer(serializers.Serializer):
    target_host = StrictCharField(max_length=63, trim_whitespace=False, validators=[NAME_PATTERN])
    strategy = serializers.ChoiceField(choices=list(STRATEGIES), default="auto")
    dry_run = StrictBooleanField(default=False, help_text="Predict every strategy; start nothing (200).")
    max_downtime_ms = StrictIntegerField(
        required=False,
        min_value=1,
        max_value=planning.MAX_DOWNTIME_MS,
        error_messages={
            k: planning.BUDGET_ERROR for k in ("invalid", "min_value", "max_value", "max_string_length", "null")
        },
        help_text="Pick the strategy whose predicted downtime fits (auto's order), or refuse with 409.",
    )


class StrategyPredictionSerializer(serializers.Serializer):
    possible = serializers.BooleanField()
    why_not = serializers.CharField(allow_null=True)
    predicted_downtime_ms = serializers.FloatField(allow_null=True)
    predicted_total_ms = serializers.FloatField(allow_null=True)
    calibration = serializers.DictField(allow_null=True)
    why_no_prediction = serializers.CharField(required=False)


class MigrationPlanSerializer(serializers.Serializer):
    container = serializers.CharField()
    source = serializers.CharField()
    target = serializers.CharField()
    strategies = serializers.DictField(child=StrategyPredictionSerializer())
    inputs = serializers.DictField()
    chosen = serializers.CharField(allow_null=True)
    why = serializers.CharField()
    max_downtime_ms = serializers.IntegerField(required=False)


class ContainerMigrate(APIView):
    @extend_schema(
        request=MigrateSerializer, responses={202: OperationAcceptedSerializer, 200: MigrationPlanSerializer}
    )
    def post(self, request, name):
        container = _container(name)
        s = MigrateSerializer(data=request.data)
        s.is_valid(raise_exception=True)
        d = s.validated_data
        budget = d.get("max_downtime_ms")
        if d["dry_run"]:
            return Response(planning.dry_run(container, d["target_host"], d["strategy"], budget))
        if budget is not None:
            op = planning.start_within_budget(Actor.of(request), container, d["target_host"], d["strategy"], budget)
            return operation_accepted(op)
        return operation_accepted(start_migration(Actor.of(request), container, d["target_host"], d["strategy"]))


class ContainerTargets(APIView):
    """For a migration picker: each other host and which strategies it allows, or why not."""

    @extend_schema(responses=TargetSerializer(many=True))
    def get(self, request, name):
        container = _container(name)
        hosts = Host.objects.exclude(pk=container.host_id)
        return Response([{"host": h.name, "strategies": strategy_support(container, container.host, h)} for h in hosts])


class HostEvacuate(APIView):
    @extend_schema(request=None, responses={202: OperationAcceptedSerializer})
    def post(self, request, name):
        return operation_accepted(start_evacuation(Actor.of(request), get_object_or_404(Host, name=name)))
