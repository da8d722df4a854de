from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Count, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.shortcuts import get_object_or_404, redirect, render
from django.views import defaults
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from containers.api import containers_queryset
from containers.models import Container
from core.audit import audit
from core.decorators import role_required
from core.fleet import save_budget, save_direct_networks, save_stall_limit, snapshot_budget_bytes
from core.middleware import error_response
from core.models import ApiToken, AuditEntry, FleetSettings
from core.roles import ROLES, has_role, role_of, set_role
from hosts import ssh
from hosts.models import Host
from hosts.validators import USER_RE
from operations.disagreements import disagreements
from operations.models import Operation

User = get_user_model()


def bad_request(request, exception=None):
    if request.path.startswith("/api/"):
        return error_response(request, "The request is malformed.", 400)
    return defaults.bad_request(request, exception)


def not_found(request, exception=None):
    if request.path.startswith("/api/"):
        return error_response(request, "Not found.", 404)
    return defaults.page_not_found(request, exception)


def server_error(request):
    if request.path.startswith("/api/"):
        return error_response(request, "Something went wrong on the server; the error is logged.", 500)
    return defaults.server_error(request)


def admin_login(request):
    """Django admin's login URL: sent to the throttled login page, keeping where to go next."""
    from urllib.parse import urlencode

    from django.utils.http import url_has_allowed_host_and_scheme

    nxt = request.GET.get("next", "/admin/")
    if not url_has_allowed_host_and_scheme(nxt, allowed_hosts={request.get_host()}):
        nxt = "/admin/"
    return redirect(f"{settings.LOGIN_URL}?{urlencode({'next': nxt}, safe='/')}")


@role_required("viewer")
@require_safe
def home(request):
    ctx = {
        "hosts": hosts_with_counts()[:100],
        "active": Operation.objects.filter(status__in=Operation.ACTIVE).select_related("host", "target_host")[:20],
        "recent": Operation.objects.select_related("host", "target_host")[:10],
    }
    return render(request, "home.html", ctx)


@role_required("admin")
@require_safe
def user_list(request):
    users = User.objects.order_by("username").prefetch_related("groups", "api_tokens")
    page = Paginator(users, 100).get_page(request.GET.get("page"))
    page.object_list = [
        {"user": u, "role": role_of(u) if u.is_active else None, "tokens": list(u.api_tokens.all())}
        for u in page.object_list
    ]
    return render(request, "users/list.html", {"page": page, "roles": ROLES})


@role_required("admin")
@require_POST
def user_create(request):
    username = request.POST.get("username", "").strip()
    password = request.POST.get("password", "")
    role = request.POST.get("role") or None
    error = None
    if not USER_RE.fullmatch(username):
        error = "User names are lowercase letters, digits, '_' and '-' (at most 32, starting with a letter)."
    elif User.objects.filter(username=username).exists():
        error = f"{username} already exists."
    elif role not in (None, *ROLES):
        error = "Unknown role."
    else:
        try:
            validate_password(password)
        except ValidationError as e:
            error = " ".join(e.messages)
    if error:
        messages.error(request, error)
        return redirect("user-list")
    with transaction.atomic():
        user = User.objects.create_user(username=username, password=password)
        set_role(user, role)
    audit(request, "user.create", user, detail=f"role {role}")
    messages.success(request, f"{username} created with role {role or 'none'}.")
    return redirect("user-list")


@role_required("admin")
@require_POST
def user_update(request, user_id):
    user = get_object_or_404(User, pk=user_id)
    action = request.POST.get("action")
    if user == request.user and action in ("deactivate", "role"):
        messages.error(request, "You cannot change your own role or deactivate yourself.")
        return redirect("user-list")
    if action == "role":
        role = request.POST.get("role") or None
        if role not in (None, *ROLES):
            messages.error(request, "Unknown role.")
            return redirect("user-list")
        set_role(user, role)
        audit(request, "user.role", user, detail=f"role {role}")
        messages.success(request, f"{user.username} is now {role or 'without a role'}.")
    elif action in ("deactivate", "activate"):
        user.is_active = action == "activate"
        user.save(update_fields=["is_active"])
        audit(request, f"user.{action}", user)
        messages.success(request, f"{user.username} {action}d.")
    elif action == "password":
        password = request.POST.get("password", "")
        try:
            validate_password(password, user)
        except ValidationError as e:
            messages.error(request, " ".join(e.messages))
            return redirect("user-list")
        user.set_password(password)
        user.save(update_fields=["password"])
        audit(request, "user.password", user)
        messages.success(request, f"{user.username}'s password was reset.")
    else:
        messages.error(request, "Unknown action.")
    return redirect("user-list")


@login_required
@require_safe
def token_list(request):
    return render(request, "users/tokens.html", {"tokens": request.user.api_tokens.all()})


@login_required
@require_POST
def token_create(request):
    name = "".join(ch for ch in request.POST.get("name", "") if ch.isprintable()).strip()[:100]
    token, key = ApiToken.issue(request.user, name)
    audit(request, "token.create", object_type="token", detail=f"{token.prefix}… {name}")
    return render(request, "users/tokens.html", {"tokens": request.user.api_tokens.all(), "new_key": key})


@login_required
@require_POST
def token_revoke(request, token_id):
    # Admins may revoke anyone's token; everyone else only their own.
    qs = ApiToken.objects.all() if role_of(request.user) == "admin" else request.user.api_tokens.all()
    token = get_object_or_404(qs, pk=token_id)
    audit(request, "token.revoke", object_type="token", detail=f"{token.user} {token.prefix}…")
    token.delete()
    messages.success(request, "Token revoked.")
    return redirect(request.POST.get("next") if request.POST.get("next") == "/users/" else "token-list")


@role_required("admin")
@require_safe
def audit_log(request):
    from datetime import date

    qs = AuditEntry.objects.all()
    f = request.GET
    if f.get("user"):
        qs = qs.filter(username=f["user"])
    if f.get("action"):
        qs = qs.filter(action__startswith=f["action"])
    if f.get("object"):
        qs = qs.filter(object_name__icontains=f["object"])
    for field, lookup in (("since", "at__date__gte"), ("until", "at__date__lte")):
        if f.get(field):
            try:
                qs = qs.filter(**{lookup: date.fromisoformat(f[field])})
            except ValueError:
                messages.error(request, f"{field} must be a date like 2026-11-26.")
    page = Paginator(qs, 100).get_page(f.get("page"))
    return render(request, "users/audit.html", {"page": page, "f": f})


@role_required("viewer")
@require_http_methods(["GET", "HEAD", "POST"])
def fleet_settings(request):
    """Everyone with a role reads the fleet settings; only admins change them."""
    typed = None
    status = 200
    if request.method == "POST":
        if not has_role(request.user, "admin"):
            raise PermissionDenied("Changing the fleet settings needs the admin role.")
        for field, save, said in (
            (
                "snapshot_budget_mib",
                save_budget,
                lambda fs: (
                    "Snapshot disk budget: "
                    + (f"{fs.snapshot_budget_mib} MiB per host" if fs.snapshot_budget_mib else "none")
                    + "."
                ),
            ),
            (
                "postcopy_stall_limit_s",
                save_stall_limit,
                lambda fs: (
                    f"A post-copy's page pull is now given up after {fs.postcopy_stall_limit_s} s without progress."
                ),
            ),
        ):
            if field not in request.POST:  # each has its own form on the page
                continue
            try:
                fs = save(request, request.POST.get(field, ""))
            except ValidationError as e:
                messages.error(request, e.messages[0])
                fs = FleetSettings.load()
                return render(
                    request,
                    "settings.html",
                    {"fs": fs, "typed": "\n".join(fs.direct_transfer_networks or [])},
                    status=400,
                )
            messages.success(request, said(fs))
            return redirect("fleet-settings")
        typed = request.POST.get("direct_transfer_networks", "")
        try:
            fs = save_direct_networks(request, typed, text=True)
        except ValidationError as e:
            messages.error(request, e.messages[0])
            status = 400
        else:
            nets = ", ".join(fs.direct_transfer_networks)
            messages.success(
                request,
                f"Direct transfer allowed on {nets}." if nets else "Direct transfer is off: migrations relay over SSH.",
            )
            return redirect("fleet-settings")
    fs = FleetSettings.load()
    if typed is None:
        typed = "\n".join(fs.direct_transfer_networks or [])
    return render(request, "settings.html", {"fs": fs, "typed": typed}, status=status)


# --- the host pages: they show the containers of each host ---------------------------------------


def hosts_with_counts():
    """Hosts by name with their number of containers: a subquery per host, no GROUP BY over the fleet."""
    n = Container.objects.filter(host=OuterRef("pk")).order_by().values("host").annotate(n=Count("*")).values("n")
    return Host.objects.annotate(n_containers=Coalesce(Subquery(n), 0)).order_by("name")


@role_required("viewer")
@require_safe
def host_list(request):
    hosts = hosts_with_counts()
    page = Paginator(hosts, 100).get_page(request.GET.get("page"))
    return render(request, "hosts/list.html", {"page": page, "public_key": ssh.public_key_line()})


@role_required("viewer")
@require_safe
def host_detail(request, name):
    host = get_object_or_404(Host, name=name)
    ops = Operation.objects.filter(host=host).select_related("host", "target_host", "created_by")[:20]
    containers = containers_queryset().filter(host=host)
    return render(
        request,
        "hosts/detail.html",
        {
            "host": host,
            "operations": ops,
            "containers": containers,
            "disagreements": disagreements(host=host),
            "snapshot_budget_bytes": snapshot_budget_bytes(),
        },
    )
