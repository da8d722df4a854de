"""Login with a brake that slows guessing down without locking anyone out for good.

Every login attempt is counted against two keys: the account name tried and the client's
address (core/clientip.py: behind TRUSTED_PROXIES, the address X-Forwarded-For gives; an
IPv6 client by its /64). For each key the first FREE attempts pass at once; from the
FREE-th on, the n-th attempt closes the key's gate for 2**(n-FREE+1) s (2, 4, 8 ... s, at
most MAX_DELAY_S) and the next attempt needs the gate open again.
An attempt that finds a gate closed is refused (429) without its password being checked,
and is not counted: hammering does not extend anyone's wait. A successful login clears its
account's count; counts fade RESET_S after the last attempt.

So a correct password from an address that is not itself throttled always succeeds once the
account's delay has passed: at most MAX_DELAY_S after the last counted failure. And a
browser that has logged in to the account before carries a signed cookie (KNOWN_COOKIE)
naming the account: its attempts for that account are counted against the cookie instead
of the account, so nobody can keep a user out of a browser they have used (the address
still counts). State lives in Django's cache: atomic `add`/`incr`, so it works across
processes with a shared cache (Redis).
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import time

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.core import signing
from django.core.cache import cache

from .audit import audit
from .clientip import client_ip

FREE = 5  # attempts per key before the backoff starts
MAX_DELAY_S = 300  # the longest a key ever waits between two attempts
RESET_S = 900  # a key's count is forgotten this long after its last attempt
KNOWN_COOKIE = "ctweb_known"
KNOWN_MAX_AGE_S = 90 * 86400
_SALT = "ctweb.login.known-browser"  # kept: browsers already remembered stay remembered


def delay_after(n: int) -> int:
    """How long the gate of a key closes when its n-th attempt (1-based) takes it."""
    return 0 if n < FREE else min(2 ** (n - FREE + 1), MAX_DELAY_S)


def _h(text: str) -> str:
    # A user name may hold anything, a cache key may not (spaces, control characters).
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def account_name(request) -> str:
    return (request.POST.get("username") or "").strip().lower()[:150]


def _address_key(request) -> str:
    ip = client_ip(request) or ""
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return "addr:?"
    if a.version == 6:  # one host gets a /64: counting single addresses would count nothing
        return "addr:" + str(ipaddress.ip_network(f"{a}/64", strict=False))
    return f"addr:{a}"


def _known_browser(request, name: str) -> str | None:
    """The id of this browser's known-browser cookie if it names this account."""
    raw = request.COOKIES.get(KNOWN_COOKIE)
    if not raw or not name:
        return None
    try:
        data = signing.loads(raw, salt=_SALT, max_age=KNOWN_MAX_AGE_S)
    except signing.BadSignature:
        return None
    if not isinstance(data, dict) or data.get("u") != _h(name) or not isinstance(data.get("b"), str):
        return None
    return data["b"]


def keys(request) -> list[str]:
    """The keys this attempt counts against: the account (or this browser's pass for it), the address."""
    name = account_name(request)
    known = _known_browser(request, name)
    first = f"known:{_h(known)}" if known else f"user:{_h(name)}"
    return [first, _address_key(request)]


def _count_key(key: str) -> str:
    return f"ctweb:login:n:{key}"


def _gate_key(key: str) -> str:
    return f"ctweb:login:gate:{key}"


def _take(key: str) -> tuple[bool, bool]:
    """Count an attempt against this key. (allowed, closed_a_gate)."""
    ck = _count_key(key)
    cache.add(ck, 0, RESET_S)
    try:
        n = cache.incr(ck)
    except ValueError:  # expired between add and incr
        cache.add(ck, 1, RESET_S)
        n = 1
    cache.touch(ck, RESET_S)
    delay = delay_after(n)
    if delay == 0:
        return True, False
    # The gate: whoever adds it may try; everyone else waits until it expires.
    if cache.add(_gate_key(key), time.time() + delay, delay):
        return True, True
    _untake(key)
    return False, False


def _untake(key: str) -> None:
    try:
        cache.decr(_count_key(key))
    except ValueError:
        pass


def wait_s(request) -> int:
    """Seconds until every key of this attempt has its gate open (0: open now)."""
    until = max((cache.get(_gate_key(k)) or 0) for k in keys(request))
    return max(0, int(until - time.time() + 0.999))


def try_attempt(request) -> bool:
    """Count this attempt against all its keys, or against none if any refuses."""
    taken = []
    for key in keys(request):
        ok, gated = _take(key)
        if not ok:
            for k, g in taken:  # give back what this refused attempt took
                _untake(k)
                if g:
                    cache.delete(_gate_key(k))
            return False
        taken.append((key, gated))
    return True


def succeeded(request) -> None:
    """A right password: the account (and this browser's pass) start again from zero; the
    address keeps its count minus this attempt (logging in to one's own account does not
    clear an address that was guessing at others)."""
    account, address = keys(request)
    for key in {account, f"user:{_h(account_name(request))}"}:
        cache.delete_many([_count_key(key), _gate_key(key)])
    _untake(address)


class LoginView(auth_views.LoginView):
    http_method_names = ["get", "head", "post"]  # FormView would take PUT as a POST

    def post(self, request, *args, **kwargs):
        if not try_attempt(request):
            wait = max(wait_s(request), 1)
            # One audit entry per closed gate and address, however often it is knocked on.
            gate = max((cache.get(_gate_key(k)) or 0) for k in keys(request))
            if cache.add(f"ctweb:login:audited:{_h(':'.join(keys(request)))}:{gate}", 1, MAX_DELAY_S + 1):
                audit(
                    request,
                    "login",
                    object_type="user",
                    object_name=request.POST.get("username", "")[:150],
                    outcome="throttled",
                    detail=f"refused without checking the password: try again in {wait} s",
                )
            # An unbound form: a bound one checks the password as soon as its errors are read.
            form = self.get_form_class()(request=request)
            response = self.render_to_response(self.get_context_data(form=form, throttled=True, wait=wait))
            response.status_code = 429
            response["Retry-After"] = str(wait)
            return response
        return super().post(request, *args, **kwargs)

    def form_valid(self, form):
        succeeded(self.request)
        response = super().form_valid(form)
        audit(self.request, "login", object_type="user", object_name=form.get_user().get_username())
        name = account_name(self.request)
        browser = _known_browser(self.request, name) or secrets.token_urlsafe(16)
        response.set_cookie(
            KNOWN_COOKIE,
            signing.dumps({"u": _h(name), "b": browser}, salt=_SALT),
            max_age=KNOWN_MAX_AGE_S,
            httponly=True,
            samesite="Lax",
            secure=settings.SESSION_COOKIE_SECURE,
        )
        return response

    def form_invalid(self, form):
        name = self.request.POST.get("username", "")[:150]
        audit(self.request, "login", object_type="user", object_name=name, outcome="failed")
        return super().form_invalid(form)


class LogoutView(auth_views.LogoutView):
    def post(self, request, *args, **kwargs):
        user = request.user if request.user.is_authenticated else None
        response = super().post(request, *args, **kwargs)
        if user is not None:
            audit(request, "logout", object_type="user", object_name=user.get_username(), user=user)
        return response
