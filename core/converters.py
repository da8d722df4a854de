"""Path converters. Ids are whole numbers a database column can hold (<= 18 digits): Django's
`int` takes any length, and a 30-digit id overflows SQLite and PostgreSQL alike (a 500)."""

from django.urls import register_converter


class IdConverter:
    regex = "[0-9]{1,18}"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value) -> str:
        return str(int(value))


register_converter(IdConverter, "id")
