import json
from datetime import date, timedelta

from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST, require_safe
from rest_framework.exceptions import APIException

from core.api import ApiError
from core.audit import Actor
from core.decorators import role_required
from hosts.models import Host
from operations.disagreements import disagreements
from operations.display import downtime_breakdown, phase_spans, predicted_vs_actual
from operations.models import Operation
from operations.views import start_or_back

from . import planning, schedules
from .api import _midnight, cancel_operation, containers_queryset, decide_operation, filter_snapshots, snapshot_queryset
from .compare import compare_snapshots
from .exports import export_snapshot, import_archive
from .migration import start_evacuation, start_migration, strategy_support
from .models import Container
from .services import (
    change_state,
    check_container,
    container_operation,
    create_container,
    delete_snapshot,
    restore_snapshot,
    snapshot_container,
    sync_host,
)


@role_required("viewer")
@require_safe
def operation_list(request):
    """Every operation of the fleet, newest first, with filters that survive paging."""
    qs = Operation.objects.select_related("host", "target_host", "created_by")
    f = request.GET
    if f.get("status") in Operation.Status.values:
        qs = qs.filter(status=f["status"])
    if f.get("kind") in Operation.Kind.values:
        qs = qs.filter(kind=f["kind"])
    if f.get("host"):
        qs = qs.filter(Q(host__name=f["host"]) | Q(target_host__name=f["host"]))
    if f.get("container"):
        qs = qs.filter(container_name=f["container"])
    if f.get("created_by"):
        qs = qs.filter(created_by__username=f["created_by"])
    for field, days, lookup in (("since", 0, "created_at__gte"), ("until", 1, "created_at__lt")):
        if f.get(field):
            try:
                day = date.fromisoformat(f[field]) + timedelta(days=days)
            except (ValueError, OverflowError):
                messages.error(request, f"{field} must be a date like 2026-11-26.")
            else:  # a range of created_at, which its index serves (not created_at's date)
                qs = qs.filter(**{lookup: _midnight(day)})
    page = Paginator(qs, 50).get_page(f.get("page"))
    ctx = {
        "page": page,
        "f": f,
        "filtered": any(f.get(k) for k in ("status", "kind", "host", "container", "created_by", "since", "until")),
        "statuses": Operation.Status.values,
        "kinds": Operation.Kind.values,
        "hosts": Host.objects.values_list("name", flat=True),
    }
    return render(request, "operations/list.html", ctx)


@role_required("viewer")
@require_safe
def operation_detail(request, op_id):
    op = get_object_or_404(Operation.objects.select_related("host", "target_host", "created_by", "container"), pk=op_id)
    ctx = {
        "op": op,
        "hosts": Host.objects.order_by("name") if op.kind == Operation.Kind.EXPORT else [],
        "phases": phase_spans(op.events, op.finished_at),
        "downtime": downtime_breakdown(op.result) if op.kind == Operation.Kind.MIGRATE else None,
        "predicted": predicted_vs_actual(op.result) if op.kind == Operation.Kind.MIGRATE else [],
        "children": op.children.select_related("host", "target_host"),
    }
    return render(request, "operations/detail.html", ctx)


@role_required("operator")
@require_POST
def operation_cancel(request, op_id):
    op = get_object_or_404(Operation, pk=op_id)
    try:
        cancel_operation(request, op)
    except APIException as e:
        messages.error(request, str(e.detail))
    return redirect("operation-detail", op_id=op.pk)


@role_required("operator")
@require_POST
def export_import(request, op_id):
    """Import a kept export (this export operation's archive) as a new container."""
    op = get_object_or_404(Operation, pk=op_id, kind=Operation.Kind.EXPORT)
    name, host = request.POST.get("name", ""), request.POST.get("host", "")
    return start_or_back(
        request, lambda: import_archive(Actor.of(request), name, host, export_id=op.pk), f"/operations/{op.pk}/"
    )


@role_required("admin")
@require_POST
def operation_decide(request, op_id):
    op = get_object_or_404(Operation, pk=op_id)
    try:
        decide_operation(request, op, request.POST.get("action", ""))
    except APIException as e:
        messages.error(request, str(e.detail))
    return redirect("operation-detail", op_id=op.pk)


# --- containers ----------------------------------------------------------------------


def _get_container(name: str) -> Container:
    return get_object_or_404(containers_queryset(), name=name)


@role_required("viewer")
@require_safe
def container_list(request):
    qs = containers_queryset()
    host, state = request.GET.get("host", ""), request.GET.get("state", "")
    if host:
        qs = qs.filter(host__name=host)
    if state:
        qs = qs.filter(state=state)
    page = Paginator(qs, 100).get_page(request.GET.get("page"))
    ctx = {
        "page": page,
        "host": host,
        "state": state,
        "states": Container.State.values,
        "hosts": Host.objects.all(),
    }
    return render(request, "containers/list.html", ctx)


@role_required("viewer")
@require_safe
def container_detail(request, name):
    container = _get_container(name)
    ops = Operation.objects.filter(container_name=name).select_related("host", "target_host", "created_by")[:20]
    targets = []
    for h in Host.objects.exclude(pk=container.host_id):
        strategies = strategy_support(container, container.host, h)
        refused = json.dumps({k: v for k, v in strategies.items() if v})
        targets.append({"host": h, "strategies": strategies, "refused": refused})
    return render(
        request,
        "containers/detail.html",
        {"c": container, "operations": ops, "targets": targets, "disagreements": disagreements(container.name)},
    )


@role_required("operator")
@require_http_methods(["GET", "HEAD", "POST"])
def container_create(request):
    error = None
    form = {"template": "busybox", "host": request.GET.get("host", "")}
    if request.method == "POST":
        form = request.POST
        try:
            op = create_container(
                Actor.of(request),
                form.get("name", ""),
                form.get("host", ""),
                form.get("template", "busybox"),
                form.get("command") or None,
            )
        except APIException as e:
            error = str(e.detail)
        else:
            return redirect("operation-detail", op_id=op.pk)
    hosts = Host.objects.filter(status=Host.Status.ONLINE)
    return render(request, "containers/create.html", {"form": form, "error": error, "hosts": hosts})


@role_required("operator")
@require_http_methods(["GET", "HEAD", "POST"])
def container_import(request):
    """Import an export archive uploaded from the browser as a new container (the API's
    POST /api/v1/imports with an upload; the archive is checked before any host sees it)."""
    error = None
    form = {"host": request.GET.get("host", "")}
    if request.method == "POST":
        form = request.POST
        try:
            op = import_archive(
                Actor.of(request), form.get("name", ""), form.get("host", ""), upload=request.FILES.get("archive")
            )
        except APIException as e:
            error = str(e.detail)
        else:
            return redirect("operation-detail", op_id=op.pk)
    hosts = Host.objects.filter(status=Host.Status.ONLINE)
    ctx = {"form": form, "error": error, "hosts": hosts, "max_mib": settings.EXPORT_MAX_BYTES >> 20}
    return render(request, "containers/import.html", ctx, status=400 if error else 200)


@role_required("operator")
@require_POST
def container_action(request, name, action):
    container = _get_container(name)
    kinds = {"delete": "delete", "check": "check"}
    if action not in kinds:
        raise Http404()
    if action == "check":  # with a trial dump: the page's button means "verify it now"
        return start_or_back(
            request, lambda: check_container(Actor.of(request), container), container.get_absolute_url()
        )
    if action == "delete" and request.POST.get("confirm") != container.name:
        messages.error(request, f"Type {container.name} to confirm deleting it.")
        return redirect("container-detail", name=name)
    return start_or_back(
        request, lambda: container_operation(Actor.of(request), container, kinds[action]), container.get_absolute_url()
    )


@role_required("operator")
@require_POST
def host_sync(request, name):
    host = get_object_or_404(Host, name=name)
    return start_or_back(request, lambda: sync_host(Actor.of(request), host), f"/hosts/{host.name}/")


# --- snapshots and history -----------------------------------------------------------


@role_required("operator")
@require_POST
def container_state(request, name):
    """Start, stop (optionally stateful), restart; the form says which."""
    container = _get_container(name)
    stateful, discard = request.POST.get("stateful") == "1", request.POST.get("discard_state") == "1"
    return start_or_back(
        request,
        lambda: change_state(
            Actor.of(request), container, request.POST.get("action", ""), stateful=stateful, discard_state=discard
        ),
        container.get_absolute_url(),
    )


@role_required("operator")
@require_POST
def snapshot_create(request, name):
    container = _get_container(name)
    snap, stateful = request.POST.get("name") or None, request.POST.get("stateful") == "1"
    return start_or_back(
        request,
        lambda: snapshot_container(Actor.of(request), container, snap, stateful=stateful),
        container.get_absolute_url(),
    )


@role_required("operator")
@require_POST
def schedule_create(request, name):
    container = _get_container(name)
    data: dict = {"unit": request.POST.get("unit")}
    for k in ("every", "keep_last", "keep_days"):  # a form's digits as numbers, anything else as typed
        v = (request.POST.get(k) or "").strip()
        data[k] = int(v) if v.isdigit() else (v or None)
    data["stateful"] = request.POST.get("stateful") == "1"
    try:
        s = schedules.create_schedule(Actor.of(request), container, data)
    except ApiError as e:
        messages.error(request, str(e.detail))
    else:
        messages.success(request, f"Snapshots of {container.name} will be taken {schedules.describe(s)}.")
    return redirect(container.get_absolute_url())


@role_required("operator")
@require_POST
def schedule_delete(request, name, schedule_id):
    container = _get_container(name)
    s = get_object_or_404(container.schedules, pk=schedule_id)
    schedules.delete_schedule(Actor.of(request), s)
    messages.success(request, "The schedule is removed; its snapshots stay.")
    return redirect(container.get_absolute_url())


@role_required("operator")
@require_POST
def snapshot_action(request, name, snap, action):
    container = _get_container(name)
    snapshot = get_object_or_404(container.snapshots, name=snap)
    starts = {"restore": restore_snapshot, "delete": delete_snapshot, "export": export_snapshot}
    if action not in starts:
        raise Http404()
    back = f"/containers/{container.name}/snapshots/{snapshot.name}/"
    return start_or_back(request, lambda: starts[action](request, container, snapshot), back)


@role_required("viewer")
@require_safe
def snapshot_detail(request, name, snap):
    container = _get_container(name)
    snapshot = get_object_or_404(container.snapshots.select_related("created_by"), name=snap)
    others = container.snapshots.exclude(pk=snapshot.pk).values_list("name", flat=True)
    return render(request, "snapshots/detail.html", {"c": container, "s": snapshot, "others": others})


@role_required("viewer")
@require_safe
def snapshot_compare(request, name):
    container = _get_container(name)
    a = get_object_or_404(container.snapshots, name=request.GET.get("a", ""))
    b = get_object_or_404(container.snapshots, name=request.GET.get("b", ""))
    return render(request, "snapshots/compare.html", {"c": container, "diff": compare_snapshots(a, b)})


@role_required("viewer")
@require_safe
def container_timeline(request, name):
    """Snapshots and operations of one container, newest first (also those of hosts it left)."""
    container = _get_container(name)
    params = request.GET
    try:
        snaps = filter_snapshots(snapshot_queryset().filter(container=container), params)
    except APIException as e:
        messages.error(request, str(e.detail))
        snaps = snapshot_queryset().filter(container=container)
    ops = Operation.objects.filter(container_name=name).select_related("host", "target_host", "created_by")
    if params.get("created_by"):
        ops = ops.filter(created_by__username=params["created_by"])
    if params.get("stateful") in ("true", "false"):
        ops = ops.none()  # the stateful filter is about snapshots
    entries = [{"at": s.created_at, "snapshot": s} for s in snaps[:500]]
    entries += [{"at": o.created_at, "op": o} for o in ops[:500]]
    entries.sort(key=lambda e: e["at"], reverse=True)
    page = Paginator(entries, 50).get_page(params.get("page"))
    return render(request, "containers/timeline.html", {"c": container, "page": page, "f": params})


@role_required("viewer")
@require_safe
def snapshot_search(request):
    try:
        qs = filter_snapshots(snapshot_queryset(), request.GET)
    except APIException as e:
        messages.error(request, str(e.detail))
        qs = snapshot_queryset()
    page = Paginator(qs, 50).get_page(request.GET.get("page"))
    return render(request, "snapshots/search.html", {"page": page, "f": request.GET})


@role_required("operator")
@require_POST
def container_migrate(request, name):
    container = _get_container(name)
    target, strategy = request.POST.get("target_host", ""), request.POST.get("strategy", "auto")
    budget = request.POST.get("max_downtime_ms", "").strip()

    def start():
        if not budget:
            return start_migration(Actor.of(request), container, target, strategy)
        if not budget.isdigit() or not 1 <= int(budget) <= planning.MAX_DOWNTIME_MS:
            raise ApiError(planning.BUDGET_ERROR, 400, "max_downtime_ms")
        return planning.start_within_budget(Actor.of(request), container, target, strategy, int(budget))

    return start_or_back(request, start, container.get_absolute_url())


@role_required("operator")
@require_POST
def host_evacuate(request, name):
    host = get_object_or_404(Host, name=name)
    return start_or_back(request, lambda: start_evacuation(Actor.of(request), host), f"/hosts/{host.name}/")
