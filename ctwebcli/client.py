"""The dashboard's HTTP API, with its errors turned into the sentences it sent."""

from __future__ import annotations

from urllib.parse import quote

import requests

from . import __version__

TIMEOUT = 30


class ApiError(Exception):
    """The dashboard said no (or could not be reached): `str()` is a sentence for the user."""

    def __init__(self, sentence: str, status: int | None = None, field: str | None = None):
        super().__init__(sentence)
        self.status, self.field = status, field


def q(part: str) -> str:
    """One path segment, quoted: a name never changes which URL is asked."""
    return quote(str(part), safe="")


class Client:
    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.token = token
        self.session = requests.Session()
        self.session.headers.update(
            {"Authorization": f"Token {token}", "User-Agent": f"ctweb-cli/{__version__}", "Accept": "application/json"}
        )

    def request(
        self, method: str, path: str, *, json=None, params=None, stream: bool = False, data=None, files=None
    ) -> requests.Response:
        try:
            r = self.session.request(
                method, self.url + path, json=json, params=params, timeout=TIMEOUT, stream=stream,
                allow_redirects=False, data=data, files=files,
            )  # fmt: skip
        except requests.exceptions.SSLError as e:
            raise ApiError(f"The TLS connection to {self.url} failed: {e}.") from None
        except requests.exceptions.Timeout:
            raise ApiError(f"{self.url} did not answer within {TIMEOUT} s.") from None
        except requests.exceptions.RequestException as e:
            raise ApiError(f"Cannot reach the dashboard at {self.url} ({type(e).__name__}).") from None
        if r.status_code >= 400:
            raise ApiError(self._sentence(r), r.status_code, self._field(r))
        if 300 <= r.status_code < 400:
            raise ApiError(
                f"{self.url} redirected to {r.headers.get('Location')!r}: is this a ctweb dashboard's address?"
            )
        return r

    @staticmethod
    def _body(r: requests.Response) -> dict:
        try:
            body = r.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _sentence(self, r: requests.Response) -> str:
        body = self._body(r)
        said = body.get("error") or body.get("detail")
        if r.status_code == 401:
            return f"{self.url} does not accept this token ({said or 'not authenticated'}): add the remote again with a valid one."
        if isinstance(said, str) and said:
            return said
        if r.status_code == 404:
            return f"{self.url} has no {r.request.path_url.split('?')[0]} (is it a ctweb dashboard?)."
        return f"{self.url} answered {r.status_code} {r.reason}."

    def _field(self, r: requests.Response) -> str | None:
        field = self._body(r).get("field")
        return field if isinstance(field, str) else None

    def get(self, path: str, **params) -> dict | list:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, body: dict | None = None) -> dict:
        r = self.request("POST", path, json=body or {})
        return r.json() if r.content else {}

    def delete(self, path: str) -> dict:
        r = self.request("DELETE", path)
        return r.json() if r.content else {}

    def all(self, path: str, limit: int = 500, **params) -> list:
        """Every row of a paged list (limit/offset)."""
        out: list = []
        while True:
            rows = self.get(path, limit=limit, offset=len(out), **params)
            out.extend(rows)
            if len(rows) < limit:
                return out

    def operation(self, op_id: int) -> dict:
        return self.get(f"/api/v1/operations/{int(op_id)}/")

    def ws_url(self, path: str) -> str:
        if self.url.startswith("https://"):
            return "wss://" + self.url[len("https://") :] + path
        return "ws://" + self.url[len("http://") :] + path
