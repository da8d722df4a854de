"""Two web nodes against one database and one Redis (the e2e stack's, plus a second daphne):
a session made on one is good on the other, and the login throttle counts attempts on both."""

import re

import pytest
import requests

from tests.support.stack import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def second_web(stack):
    name = "web-second"
    url = stack.start_web(name, free_port())
    yield url
    stack.procs.pop(name).stop()


def _login(url: str, username: str, password: str, session: requests.Session | None = None) -> requests.Response:
    s = session or requests.Session()
    form = s.get(url + "/accounts/login/", timeout=10)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
    return s.post(
        url + "/accounts/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": token},
        allow_redirects=False,
        timeout=10,
    )


def test_a_session_made_on_one_web_node_is_good_on_the_other(stack, second_web):
    s = requests.Session()
    r = _login(stack.url, "carol", "carol-password-1", s)
    assert r.status_code == 302, r.text[:300]
    page = s.get(second_web + "/hosts/", allow_redirects=False, timeout=10)
    assert page.status_code == 200
    assert "carol" in page.text


def test_login_throttling_counts_the_attempts_made_on_every_web_node(stack, second_web):
    name = "throttled-on-two-nodes"
    try:
        for i in range(5):  # the 5th closes the account's gate for 2 s
            r = _login(stack.url if i % 2 else second_web, name, "wrong-password")
            assert r.status_code == 200, (i, r.status_code)
        r = _login(stack.url, name, "wrong-password")
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        # The address 127.0.0.1 is every e2e test's: give back what these attempts counted.
        stack.python(
            "from django.core.cache import cache; from core import login; "
            f"cache.delete_many([f(k) for k in ('user:' + login._h('{name}'), 'addr:127.0.0.1') "
            "for f in (login._count_key, login._gate_key)])"
        )
