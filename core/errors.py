"""The API's expected errors. Apart from core/api.py (the rest of the API plumbing) because the
JSON parser raises it, and DRF imports the parser while core/api.py imports DRF's views."""

from rest_framework import exceptions


class ApiError(exceptions.APIException):
    def __init__(self, message: str, status_code: int = 400, field: str | None = None):
        self.status_code = status_code
        self.field = field
        super().__init__(detail=message)
