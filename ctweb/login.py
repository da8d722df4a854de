"""Login with a brake: after repeated failures for one user name or one address, the form
refuses further tries for a while (and says so) instead of checking more passwords."""

import hashlib

from django.contrib.auth import views as auth_views
from django.core.cache import cache

from .audit import audit

MAX_FAILURES = 5
WINDOW_S = 300


def _keys(request) -> list[str]:
    name = (request.POST.get("username") or "").strip().lower()[:150]
    addr = request.META.get("REMOTE_ADDR", "")
    # Hashed: a user name may hold anything, a cache key may not (spaces, control characters).
    name_key = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return [f"ctweb:login-fail:user:{name_key}", f"ctweb:login-fail:addr:{addr}"]


def _blocked(request) -> bool:
    return any((cache.get(k) or 0) >= MAX_FAILURES for k in _keys(request))


class LoginView(auth_views.LoginView):
    http_method_names = ["get", "head", "post"]  # FormView would take PUT as a POST

    def post(self, request, *args, **kwargs):
        if _blocked(request):
            form = self.get_form()
            form.errors.clear()
            response = self.render_to_response(self.get_context_data(form=form, throttled=True))
            response.status_code = 429
            return response
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        for key in _keys(self.request):
            if cache.add(key, 1, WINDOW_S) is False:
                try:
                    cache.incr(key)
                except ValueError:
                    cache.set(key, 1, WINDOW_S)
        name = self.request.POST.get("username", "")[:150]
        audit(self.request, "login", object_type="user", object_name=name, outcome="failed")
        return super().form_invalid(form)
