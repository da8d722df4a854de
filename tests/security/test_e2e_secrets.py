"""Secrets stay secret: the dashboard's private key, SECRET_KEY and API tokens never reach a
log, an API answer or an operation's record, even while the stack works with all of them."""

import pytest

from tests.support.stack import Api

pytestmark = pytest.mark.e2e


def test_no_secret_reaches_logs_or_answers(stack, sshd):
    admin = Api(stack, stack.tokens["alice"])
    admin.post("/api/v1/hosts/", json={"name": "secretive", "address": "127.0.0.1", "port": sshd.port})
    admin.post("/api/v1/hosts/secretive/trust", json={"fingerprint": sshd.fingerprint()})
    op = admin.wait_operation(admin.post("/api/v1/hosts/secretive/probe").json()["id"])
    assert op["status"] == "success"
    Api(stack, "not-a-real-token").get("/api/v1/hosts/")  # a refused token, logged as such

    private_key = (stack.var / "ssh" / "id_ed25519").read_text()
    key_body = "".join(private_key.strip().splitlines()[1:-1])
    secret_key = stack.env["SECRET_KEY"]
    secrets = {
        "SECRET_KEY": secret_key,
        "private key": key_body[:40],
        **{f"token of {u}": t for u, t in stack.tokens.items()},
    }
    secrets["refused token"] = "not-a-real-token"

    logs = "".join(p.read_text(errors="replace") for p in stack.dir.glob("*.log"))
    answers = "".join(
        admin.get(path).text
        for path in ("/api/v1/hosts/", "/api/v1/operations/", f"/api/v1/operations/{op['id']}/", "/api/v1/ssh-key/")
    )
    assert "ssh-ed25519" in answers  # the public key is shown, and only that
    for what, value in secrets.items():
        assert value not in logs, f"{what} is in the logs"
        assert value not in answers, f"{what} is in an API answer"
    assert oct((stack.var / "ssh" / "id_ed25519").stat().st_mode & 0o777) == "0o600"
