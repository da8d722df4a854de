"""API plumbing: every error is `{"error": "<sentence>", "field": <name or null>}`."""

import re

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from .errors import ApiError

__all__ = ["ApiError"]  # where the features take it from


# Request fields that take only their own JSON type: DRF would read 5 as "5", "1" or 0 as a
# boolean and "22" as 22, which the schema does not promise (and schemathesis holds us to).
class StrictCharField(serializers.CharField):
    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


def _first_message(detail) -> tuple[str, str | None]:
    if isinstance(detail, dict):
        for key, value in detail.items():
            msg, inner = _first_message(value)
            field = None if key in ("non_field_errors", "detail") else key
            if field and msg and not msg.lower().startswith(field.lower()):
                msg = f"{field}: {msg}"
            return msg, inner or field
        return "Invalid request.", None
    if isinstance(detail, list):
        return _first_message(detail[0]) if detail else ("Invalid request.", None)
    return str(detail), None


def _not_found(exc, context) -> str:
    """A 404 names what was looked for (the URL's own words), e.g. "There is no container named 'c9'."."""
    kwargs = getattr(context.get("view"), "kwargs", None) or {}
    model = re.match(r"No (\w+) matches", str(exc))
    what = model.group(1).lower() if model else ""
    if what == "snapshot" and "snap" in kwargs:
        return f"Container {kwargs.get('name')!r} has no snapshot named {kwargs['snap']!r}."
    if what == "operation" and "op_id" in kwargs:
        return f"There is no operation {kwargs['op_id']}."
    if what in ("container", "host") and "name" in kwargs:
        return f"There is no {what} named {kwargs['name']!r}."
    return "Not found."


def exception_handler(exc, context):
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.messages)
    if isinstance(exc, Http404):
        return Response({"error": _not_found(exc, context), "field": None}, status=status.HTTP_404_NOT_FOUND)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, ApiError):
        message, field = str(exc.detail), exc.field
    else:
        message, field = _first_message(exc.detail)
        if isinstance(exc, exceptions.ParseError):
            message = "The request body is not valid JSON."
    if not message.endswith((".", "?", "!")):
        message += "."
    response.data = {"error": message, "field": field}
    return response
