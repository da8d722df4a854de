"""Open websockets follow the access that opened them.

A socket is authorised when it connects, but it may stay open for days. Whenever something
that grants access changes -- a user's role, their account being deactivated or their
password reset, one of their tokens revoked, a logout -- their open sockets are told to look
again (`auth.changed` to the group `user.<id>`), and each closes itself if what opened it no
longer would, or if the user's password, role or active flag is not what it was when the
socket opened (`access_stamp`): a token socket too, though the token itself stays valid,
so a script reconnects under what its user may do now. Sockets also look again at least every RECHECK_S seconds (sessions expire
without any signal).
"""

from __future__ import annotations

import hashlib
from importlib import import_module

from django.conf import settings
from django.contrib.auth import get_user_model, user_logged_out
from django.db import transaction
from django.db.models.signals import m2m_changed, post_delete, post_save

from .live import send
from .models import ApiToken
from .roles import has_role, role_of

RECHECK_S = 60


def user_group(user_id: int) -> str:
    return f"user.{int(user_id)}"


def notify(user_ids) -> None:
    """Tell the sockets of these users to check their access again, once the change is committed."""
    ids = sorted({int(i) for i in user_ids if i is not None})
    if ids:
        transaction.on_commit(lambda: send([user_group(i) for i in ids], {"type": "auth.changed"}))


def still_allowed(scope, role: str = "viewer") -> bool:
    """Would this socket's credentials open it now? (Runs in a thread: it reads the database.)"""
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        return False
    digest = scope.get("ctweb_token_digest")
    if digest:
        token = ApiToken.objects.select_related("user").filter(digest=digest).first()
        current = token.user if token and token.user_id == user.pk else None
    else:
        current = _session_user(scope)
    if current is None or current.pk != user.pk or not current.is_active:
        return False
    stamp = scope.get("ctweb_access_stamp")
    if stamp is not None and stamp != access_stamp(current):
        return False
    return has_role(current, role)


def access_stamp(user) -> str:
    """What a socket's access rests on besides its token or session: the user's password
    (its hash), active flag, superuser flag and role. Any change closes the socket."""
    user._ctweb_role = False  # read the groups again, not a cached role
    text = "\0".join([user.password or "", str(user.is_active), str(user.is_superuser), role_of(user) or ""])
    return hashlib.sha256(text.encode()).hexdigest()


def _session_user(scope):
    """The user the socket's session belongs to now (None once it is logged out, expired or
    invalidated by a password change), as Django's own session check decides."""
    from types import SimpleNamespace

    from django.contrib.auth import get_user

    session = scope.get("session")
    key = getattr(session, "session_key", None)
    if not key:
        return None
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key=key)
    user = get_user(SimpleNamespace(session=store))
    return user if user.is_authenticated else None


# --- what counts as a change of access -------------------------------------------------------


def _groups_changed(sender, instance, action, reverse, pk_set, **kwargs):
    if reverse:  # group.user_set changed: pk_set holds users; on a clear, look before it empties
        if action == "pre_clear":
            notify(instance.user_set.values_list("pk", flat=True))
        elif action in ("post_add", "post_remove"):
            notify(pk_set or [])
    elif action in ("post_add", "post_remove", "post_clear"):
        notify([instance.pk])


def _user_saved(sender, instance, created, update_fields=None, **kwargs):
    if created or (update_fields is not None and not set(update_fields) & {"is_active", "is_superuser", "password"}):
        return  # a login only writes last_login
    notify([instance.pk])


def _user_deleted(sender, instance, **kwargs):
    notify([instance.pk])


def _token_deleted(sender, instance, **kwargs):
    notify([instance.user_id])


def _logged_out(sender, request, user, **kwargs):
    if user is not None:
        notify([user.pk])


def connect_signals() -> None:
    User = get_user_model()
    m2m_changed.connect(_groups_changed, sender=User.groups.through, dispatch_uid="ctweb-access-groups")
    post_save.connect(_user_saved, sender=User, dispatch_uid="ctweb-access-user-saved")
    post_delete.connect(_user_deleted, sender=User, dispatch_uid="ctweb-access-user-deleted")
    post_delete.connect(_token_deleted, sender=ApiToken, dispatch_uid="ctweb-access-token")
    user_logged_out.connect(_logged_out, dispatch_uid="ctweb-access-logout")
