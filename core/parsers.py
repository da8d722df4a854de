"""The API's body parser (its own module: DRF resolves DEFAULT_PARSER_CLASSES while
rest_framework.views is imported, so it must not import the views itself)."""

import codecs

from django.conf import settings
from rest_framework import exceptions, parsers
from rest_framework.utils import json

from .errors import ApiError


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, but reading no more than DATA_UPLOAD_MAX_MEMORY_SIZE (413 past it)
    and answering 400, not 500, to JSON nested deeper than Python's recursion limit."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise ApiError(f"The request body is larger than {limit // 1024} KiB, the most ctweb accepts.", 413)
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = codecs.decode(raw, encoding)
            return json.loads(text, parse_constant=json.strict_constant)
        except RecursionError:
            raise ApiError("The JSON is nested too deeply.", 400) from None
        except (ValueError, LookupError) as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
