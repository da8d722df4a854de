"""Roles are Django groups: viewer < operator < admin. A superuser is an admin."""

ROLES = ("viewer", "operator", "admin")
_LEVEL = {name: i + 1 for i, name in enumerate(ROLES)}


def role_of(user) -> str | None:
    if not user or not user.is_authenticated or not user.is_active:
        return None
    if user.is_superuser:
        return "admin"
    cached = getattr(user, "_ctweb_role", False)
    if cached is not False:
        return cached
    names = set(user.groups.values_list("name", flat=True))
    role = None
    for name in ROLES:
        if name in names:
            role = name
    user._ctweb_role = role
    return role


def has_role(user, needed: str) -> bool:
    role = role_of(user)
    return role is not None and _LEVEL[role] >= _LEVEL[needed]


def set_role(user, role: str | None) -> None:
    from django.contrib.auth.models import Group

    if role is not None and role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    user.groups.remove(*Group.objects.filter(name__in=ROLES))
    if role:
        user.groups.add(Group.objects.get(name=role))
    user._ctweb_role = False
