"""Bad input through the real server (Daphne, as deployed): the limits hold there too."""

import json

import pytest
import requests

from tests.support.stack import Api

pytestmark = pytest.mark.e2e


def _post_raw(stack, who: str, path: str, data) -> requests.Response:
    headers = {"Authorization": f"Token {stack.tokens[who]}", "Content-Type": "application/json"}
    return requests.post(stack.url + path, data=data, headers=headers, timeout=30)


def _operations(stack) -> int:
    return len(Api(stack, stack.tokens["carol"]).get("/api/v1/operations/?limit=500").json())


def test_a_multi_megabyte_body_gets_413_with_a_sentence(stack):
    before = _operations(stack)
    body = json.dumps({"name": "big", "host": "nowhere", "command": ["x" * 1000] * 4000})  # 4 MB
    r = _post_raw(stack, "bob", "/api/v1/containers/", body)
    assert r.status_code == 413
    assert r.json() == {"error": "The request body is larger than 256 KiB, the most ctweb accepts.", "field": None}
    assert _operations(stack) == before


def test_a_chunked_body_without_a_length_is_refused(stack):
    """No Content-Length to judge its size by (and Django would see an empty body): 411."""
    before = _operations(stack)

    def chunks():
        yield b'{"name": "big", "host": "nowhere", "command": ["'
        for _ in range(3000):
            yield b"x" * 1000
        yield b'"]}'

    r = _post_raw(stack, "bob", "/api/v1/containers/", chunks())
    assert r.status_code == 411, (r.status_code, r.text[:300])
    assert r.json() == {"error": "Send the body with a Content-Length header, not chunked.", "field": None}
    assert _operations(stack) == before


def test_deeply_nested_json_gets_400_with_a_sentence(stack):
    r = _post_raw(stack, "bob", "/api/v1/containers/", "[" * 50_000 + "]" * 50_000)
    assert r.status_code == 400
    assert r.json() == {"error": "The JSON is nested too deeply.", "field": None}


def test_a_nul_in_a_url_gets_400_on_the_real_server(stack):
    r = Api(stack, stack.tokens["carol"]).get("/api/v1/containers/?host=a%00b")
    assert r.status_code == 400
    assert r.json() == {"error": "The URL may not contain NUL characters.", "field": None}


@pytest.mark.parametrize(
    "body",
    [b"--B--\r\n", b"--B\r\nContent-Disposition: form-data\r\n\r\nx\r\n", b"no boundary at all"],
    ids=["closing-boundary-only", "part-without-name-or-end", "not-multipart"],
)
def test_a_malformed_multipart_body_gets_the_apis_json_error_on_the_real_server(stack, body):
    """Daphne's HTTP layer (Twisted) parsed multipart bodies itself and answered one it could
    not parse with a bare 400, no JSON and no headers, before ctweb saw it (found by the API
    fuzz test on the import route): seen failing before the fix."""
    before = _operations(stack)
    headers = {"Authorization": f"Token {stack.tokens['bob']}", "Content-Type": "multipart/form-data; boundary=B"}
    r = requests.post(stack.url + "/api/v1/imports", data=body, headers=headers, timeout=30)
    assert r.status_code == 400 and r.headers["Content-Type"] == "application/json", (r.headers, r.content)
    assert r.json()["error"].endswith("."), r.json()
    assert r.headers.get("X-Content-Type-Options") == "nosniff"
    assert _operations(stack) == before
