"""The authorisation matrix's world (tests/support/authz.py)."""

from tests.support.authz import world  # noqa: F401  (fixture)
