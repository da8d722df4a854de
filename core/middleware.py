class SecurityHeadersMiddleware:
    """A CSP that forbids inline script: every page's JavaScript lives in static/."""

    CSP = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
    )

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", self.CSP)
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response


def _is_api(request) -> bool:
    return request.path.startswith("/api/")


def error_response(request, message: str, status: int, field: str | None = None):
    """The API's error format for API paths, a plain sentence for pages."""
    from django.http import HttpResponse, JsonResponse

    if _is_api(request):
        return JsonResponse({"error": message, "field": field}, status=status)
    return HttpResponse(message, status=status, content_type="text/plain; charset=utf-8")


# The routes that take a large body: an export archive uploaded for an import, by the API or by
# the import page (multipart, spooled to disk by Django past FILE_UPLOAD_MAX_MEMORY_SIZE), up to
# EXPORT_MAX_BYTES.
UPLOAD_PATHS = ("/api/v1/imports", "/containers/import/")
UPLOAD_OVERHEAD = 64 * 1024  # the form's other fields and its boundaries


def _is_upload(request) -> bool:
    return (
        request.method == "POST"
        and request.path in UPLOAD_PATHS
        and request.META.get("CONTENT_TYPE", "").startswith("multipart/form-data")
    )


class RequestLimitsMiddleware:
    """Refuses, before any view runs, what no view could take:
    - a body larger than DATA_UPLOAD_MAX_MEMORY_SIZE (413; nothing of ctweb's needs more but an
      archive uploaded for an import, UPLOAD_PATHS: EXPORT_MAX_BYTES), judged by its
      Content-Length so it is never read; a chunked body without one (411);
    - a NUL character in the URL, the query string or a form field (400): no name can hold
      one, and PostgreSQL refuses them in text, which would otherwise be a 500."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        from django.conf import settings

        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if _is_upload(request):
            limit = settings.EXPORT_MAX_BYTES + UPLOAD_OVERHEAD
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return error_response(request, "The Content-Length header is not a number.", 400)
        if not length and "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
            # Django would see an empty body; say so rather than answer as if nothing was sent.
            return error_response(request, "Send the body with a Content-Length header, not chunked.", 411)
        if limit is not None and length > limit:
            return error_response(
                request, f"The request body is larger than {limit // 1024} KiB, the most ctweb accepts.", 413
            )
        query = request.META.get("QUERY_STRING", "")
        if "\x00" in request.path or "%00" in query or "\x00" in query:
            return error_response(request, "The URL may not contain NUL characters.", 400)
        if request.method == "POST" and not _is_api(request):
            try:
                fields = request.POST
            except Exception:  # a malformed or oversized form: Django's own 400 follows
                fields = {}
            for name in fields:
                if "\x00" in name or any("\x00" in v for v in fields.getlist(name)):
                    return error_response(request, "Form fields may not contain NUL characters.", 400, name)
        return self.get_response(request)
