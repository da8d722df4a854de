from drf_spectacular.extensions import OpenApiAuthenticationExtension


class TokenScheme(OpenApiAuthenticationExtension):
    target_class = "core.auth.TokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Token <key>`; create keys on the API tokens page or with `manage.py issue_token`.",
        }


# Every answer that is not a success is {"error", "field"} (core/api.py); the schema says
# which statuses each operation can give, so clients and schemathesis can check them.
ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "A sentence saying what is wrong."},
        "field": {"type": "string", "nullable": True, "description": "The input field at fault, if one is."},
    },
    "required": ["error", "field"],
}
ERRORS = {
    "400": "Bad input (or a NUL in the URL).",
    "401": "No valid token or session.",
    "403": "Your role does not allow this.",
    "404": "No such object.",
}
WRITE_ERRORS = {
    "409": "Refused in this state: an operation is running, the name is taken, the host key changed.",
    "411": "A chunked body without a Content-Length.",
    "413": "The body is larger than 256 KiB.",
    "415": "The body is not JSON.",
}


def add_error_responses(result, generator, request, public):
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for operations in result.get("paths", {}).values():
        for method, operation in operations.items():
            codes = dict(ERRORS)
            if method in ("post", "put", "patch", "delete"):
                codes.update(WRITE_ERRORS)
            responses = operation.setdefault("responses", {})
            for code, description in codes.items():
                responses.setdefault(code, {"description": description, **ref})
    return result
