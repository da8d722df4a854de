from .roles import has_role, role_of


def ctweb(request):
    user = getattr(request, "user", None)
    path = getattr(request, "path", "") or ""
    return {
        "role": role_of(user),
        "can_operate": has_role(user, "operator"),
        "is_admin": has_role(user, "admin"),
        # The first part of the path, so the header can mark where the user is.
        "section": path.strip("/").split("/", 1)[0],
    }
