"""Names and addresses that may reach a host. Checked before anything is saved or sent."""

import ipaddress
import re

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


NAME_MESSAGE = "Names start with a lowercase letter and contain only lowercase letters, digits and hyphens (at most 63 characters)."
# For API serializers: the same rule as a RegexValidator, so the OpenAPI schema shows it as the
# field's `pattern` (validate_name still runs: its fullmatch also refuses a trailing newline).
NAME_PATTERN = RegexValidator(NAME_RE, NAME_MESSAGE, code="invalid_name")
USER_PATTERN = RegexValidator(USER_RE, "The SSH user must be a plain Unix user name.", code="invalid_username")


def validate_name(value: str) -> None:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValidationError(NAME_MESSAGE, code="invalid_name")


def validate_address(value: str) -> None:
    if not isinstance(value, str):
        raise ValidationError("The address must be a string.", code="invalid_address")
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if not HOSTNAME_RE.fullmatch(value):
        raise ValidationError(
            "The address must be an IPv4 or IPv6 address or a DNS name (letters, digits, dots and hyphens).",
            code="invalid_address",
        )


def validate_username(value: str) -> None:
    if not isinstance(value, str) or not USER_RE.fullmatch(value):
        raise ValidationError("The SSH user must be a plain Unix user name.", code="invalid_username")
