from .roles import has_role, role_of


def ctweb(request):
    user = getattr(request, "user", None)
    return {
        "role": role_of(user),
        "can_operate": has_role(user, "operator"),
        "is_admin": has_role(user, "admin"),
    }
