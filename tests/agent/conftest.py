"""The agent's pure parts in a temporary root (tests/support/agent.py)."""

from tests.support.agent import agent  # noqa: F401  (fixture)
