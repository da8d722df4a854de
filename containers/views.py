from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from rest_framework.exceptions import APIException

from ctweb.decorators import role_required
from hosts.models import Host

from .api import cancel_operation, containers_queryset
from .models import Container, Operation
from .services import container_operation, create_container, sync_host


@role_required("viewer")
def operation_list(request):
    qs = Operation.objects.select_related("host", "target_host", "created_by")
    status = request.GET.get("status", "")
    if status in Operation.Status.values:
        qs = qs.filter(status=status)
    page = Paginator(qs, 50).get_page(request.GET.get("page"))
    return render(
        request, "operations/list.html", {"page": page, "status": status, "statuses": Operation.Status.values}
    )


@role_required("viewer")
def operation_detail(request, op_id):
    op = get_object_or_404(Operation.objects.select_related("host", "target_host", "created_by"), pk=op_id)
    return render(request, "operations/detail.html", {"op": op})


@role_required("operator")
@require_POST
def operation_cancel(request, op_id):
    op = get_object_or_404(Operation, pk=op_id)
    try:
        cancel_operation(request, op)
    except APIException as e:
        messages.error(request, str(e.detail))
    return redirect("operation-detail", op_id=op.pk)


# --- containers ----------------------------------------------------------------------


def _get_container(name: str) -> Container:
    return get_object_or_404(containers_queryset(), name=name)


@role_required("viewer")
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
def container_detail(request, name):
    container = _get_container(name)
    ops = Operation.objects.filter(container_name=name).select_related("host", "target_host", "created_by")[:50]
    return render(request, "containers/detail.html", {"c": container, "operations": ops})


@role_required("operator")
def container_create(request):
    error = None
    form = {"template": "busybox"}
    if request.method == "POST":
        form = request.POST
        try:
            op = create_container(
                request,
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
@require_POST
def container_action(request, name, action):
    container = _get_container(name)
    kinds = {"start": "start", "stop": "stop", "restart": "restart", "delete": "delete"}
    if action not in kinds:
        raise Http404()
    if action == "delete" and request.POST.get("confirm") != container.name:
        messages.error(request, f"Type {container.name} to confirm deleting it.")
        return redirect("container-detail", name=name)
    try:
        op = container_operation(request, container, kinds[action])
    except APIException as e:
        messages.error(request, str(e.detail))
        return redirect("container-detail", name=name)
    return redirect("operation-detail", op_id=op.pk)


@role_required("operator")
@require_POST
def host_sync(request, name):
    try:
        op = sync_host(request, get_object_or_404(Host, name=name))
    except APIException as e:
        messages.error(request, str(e.detail))
        return redirect("host-detail", name=name)
    return redirect("operation-detail", op_id=op.pk)
