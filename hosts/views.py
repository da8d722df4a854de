from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST
from rest_framework.exceptions import APIException

from core.audit import Actor
from core.decorators import role_required
from operations.views import start_or_back

from . import ssh
from .api import HostCreateSerializer, add_host, remove_host, start_probe, trust_host
from .models import Host
from .prepare import start_prepare


def _get_host(name: str) -> Host:
    return get_object_or_404(Host, name=name)


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
                host = add_host(Actor.of(request), **s.validated_data)
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
        trust_host(Actor.of(request), host, request.POST.get("fingerprint", ""))
    except APIException as e:
        messages.error(request, str(e.detail))
    else:
        messages.success(request, f"{host.name}'s key is pinned. Probing it now.")
        op = start_probe(Actor.of(request), host)
        return redirect("operation-detail", op_id=op.pk)
    return redirect("host-detail", name=name)


@role_required("operator")
@require_POST
def host_probe(request, name):
    host = _get_host(name)
    return start_or_back(request, lambda: start_probe(Actor.of(request), host), f"/hosts/{host.name}/")


@role_required("admin")
@require_POST
def host_prepare(request, name):
    host = _get_host(name)
    subnet = request.POST.get("subnet", "").strip()
    network = {"subnet": subnet} if subnet else None
    return start_or_back(request, lambda: start_prepare(Actor.of(request), host, network), f"/hosts/{host.name}/")


@role_required("admin")
@require_POST
def host_delete(request, name):
    host = _get_host(name)
    if request.POST.get("confirm") != host.name:
        messages.error(request, f"Type {host.name} to confirm removing it.")
        return redirect("host-detail", name=name)
    try:
        remove_host(Actor.of(request), host)
    except APIException as e:
        messages.error(request, str(e.detail))
        return redirect("host-detail", name=name)
    messages.success(request, f"{name} removed.")
    return redirect("host-list")
