"""Token and session details of authentication. The full role matrix (every URL, every
kind of user) is tests/security/test_authz_matrix.py."""

from django.test import Client

from operations.models import Operation


def test_it_answers_401_to_a_wrong_token(db):
    r = Client().get("/api/v1/hosts/", HTTP_AUTHORIZATION="Token nope")
    assert r.status_code == 401
    assert "not valid" in r.json()["error"]


def test_a_deactivated_users_token_stops_working(users, tokens):
    users["carol"].is_active = False
    users["carol"].save()
    assert Client().get("/api/v1/hosts/", HTTP_AUTHORIZATION=f"Token {tokens['carol']}").status_code == 401


def test_session_api_calls_need_csrf(users, trusted_host):
    c = Client(enforce_csrf_checks=True)
    c.force_login(users["bob"])
    r = c.post("/api/v1/hosts/h1/probe")
    assert r.status_code == 403
    assert "CSRF" in r.json()["error"]
    assert not Operation.objects.exists()


def test_the_schema_is_public_and_lists_the_api(db):
    r = Client().get("/api/schema/", HTTP_ACCEPT="application/json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert "/api/v1/hosts/{name}/trust" in paths and "/api/v1/operations/{op_id}/cancel" in paths
