"""Lab tests: real namespaces, LXC and CRIU (root only). They use no Django; the shared
`lab` fixture lives in tests/conftest.py so every lab test in a run shares one lab."""

from tests.support.criu import hosts  # noqa: E402,F401  (fixture: the agent's zipapp on each lab host)
