"""Host tests on the lab share the bare host lab-z (tests/support/lab.py)."""

from tests.support.lab import bare  # noqa: F401  (fixture)
