"""API tokens for scripts (HTTP and websockets) and the role checks of API.md."""

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from .models import ApiToken, hash_token
from .roles import has_role


def user_for_token(key: str):
    try:
        token = ApiToken.objects.select_related("user").get(digest=hash_token(key))
    except ApiToken.DoesNotExist:
        return None
    if not token.user.is_active:
        return None
    # One write per minute at most: the token list shows roughly when it was last used.
    now = timezone.now()
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token.user


class TokenAuthentication(authentication.BaseAuthentication):
    keyword = "Token"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("The Authorization header must be 'Token <key>'.")
        try:
            key = header[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed("The token is not valid.") from None
        user = user_for_token(key)
        if user is None:
            raise exceptions.AuthenticationFailed("The token is not valid or its user is inactive.")
        return (user, key)

    def authenticate_header(self, request):
        # Makes DRF answer 401 (not 403) to requests without credentials.
        return self.keyword


class RolePermission(permissions.BasePermission):
    """Reads need `viewer`; writes need the view's `write_role` (operator by default)."""

    message = "Your role does not allow this."

    def has_permission(self, request, view):
        if not request.user or not request.user.is_authenticated:
            return False
        if request.method in permissions.SAFE_METHODS:
            return has_role(request.user, getattr(view, "read_role", "viewer"))
        return has_role(request.user, getattr(view, "write_role", "operator"))


ViewerOrBetter = RolePermission


class TokenAuthMiddleware:
    """Websocket auth: the session cookie (browsers) or `Authorization: Token <key>` (scripts)."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").split()
        if len(auth) == 2 and auth[0].lower() == b"token":
            try:
                key = auth[1].decode()
            except UnicodeError:
                key = ""
            user = await database_sync_to_async(user_for_token)(key) if key else None
            # The socket remembers which token opened it: revoking that token closes it (access.py).
            scope = dict(scope, user=user or AnonymousUser(), ctweb_token_digest=hash_token(key) if user else None)
        return await self.inner(scope, receive, send)


def TokenAuthMiddlewareStack(inner):
    return AuthMiddlewareStack(TokenAuthMiddleware(inner))


class BrowserOriginValidator(OriginValidator):
    """Browsers always send Origin on a websocket handshake, so a cross-site page is refused;
    a script without an Origin header authenticates with its token instead."""

    def valid_origin(self, parsed_origin):
        return parsed_origin is None or super().valid_origin(parsed_origin)


def browser_origin_validator(inner):
    allowed = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed:
        allowed = ["localhost", "127.0.0.1", "[::1]"]
    return BrowserOriginValidator(inner, allowed)
