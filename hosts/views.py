from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST, require_safe
from rest_framework.exceptions import APIException

from containers.api import containers_queryset
from containers.models import Operation
from containers.views import start_or_back
from ctweb.decorators import role_required

from . import ssh
from .api import HostCreateSerializer, add_host, remove_host, start_probe, trust_host
from .models import Host


def hosts_with_counts():
    """Hosts by name with their number of containers: a subquery per host, no GROUP BY over the fleet."""
    from containers.models import Container

    n = Container.objects.filter(host=OuterRef("pk")).order_by().values("host").annotate(n=Count("*")).values("n")
    return Host.objects.annotate(n_containers=Coalesce(Subquery(n), 0)).order_by("name")


def _get_host(name: str) -> Host:
    return get_object_or_404(Host, name=name)


@role_required("viewer")
@require_safe
def host_list(request):
    hosts = hosts_with_counts()
    page = Paginator(hosts, 100).get_page(request.GET.get("page"))
    return render(request, "hosts/list.html", {"page": page, "public_key": ssh.public_key_line()})


@role_required("viewer")
@require_safe
def host_detail(request, name):
    host = _get_host(name)
    ops = Operation.objects.filter(host=host).select_related("host", "target_host", "created_by")[:20]
    containers = containers_queryset().filter(host=host)
    from containers.jobs import disagreements

    return render(
        request,
        "hosts/detail.html",
        {"host": host, "operations": ops, "containers": containers, "disagreements": disagreements(host=host)},
    )


@role_required("admin")
@require_http_methods(["GET", "HEAD", "POST"])
def host_add(request):
    form_data = {"port": 22, "username": "root"}
    error = None
    if request.method == "POST":
        form_data = request.POST
        data = request.POST.dict()  # a form sends text: the port as a number, as the API takes it
        if data.get("port", "").isdigit():
            data["port"] = int(data["port"])
        s = HostCreateSerializer(data=data)
        if s.is_valid():
            try:
                host = add_host(request, **s.validated_data)
            except APIException as e:
                error = str(e.detail)
            else:
                messages.info(request, f"{host.name} presented {host.offered_fingerprint}. Check it, then trust it.")
                return redirect("host-detail", name=host.name)
        else:
            field, msgs = next(iter(s.errors.items()))
            error = f"{field}: {msgs[0]}"
    return render(request, "hosts/add.html", {"form": form_data, "error": error, "public_key": ssh.public_key_line()})


@role_required("admin")
@require_POST
def host_trust(request, name):
    host = _get_host(name)
    try:
        trust_host(request, host, request.POST.get("fingerprint", ""))
    except APIException as e:
        messages.error(request, str(e.detail))
    else:
        messages.success(request, f"{host.name}'s key is pinned. Probing it now.")
        op = start_probe(request, host)
        return redirect("operation-detail", op_id=op.pk)
    return redirect("host-detail", name=name)


@role_required("operator")
@require_POST
def host_probe(request, name):
    host = _get_host(name)
    return start_or_back(request, lambda: start_probe(request, host), f"/hosts/{host.name}/")


@role_required("admin")
@require_POST
def host_delete(request, name):
    host = _get_host(name)
    if request.POST.get("confirm") != host.name:
        messages.error(request, f"Type {host.name} to confirm removing it.")
        return redirect("host-detail", name=name)
    try:
        remove_host(request, host)
    except APIException as e:
        messages.error(request, str(e.detail))
        return redirect("host-detail", name=name)
    messages.success(request, f"{name} removed.")
    return redirect("host-list")
