"""Lab tests: real namespaces, LXC and CRIU (root only). They use no Django; the shared
`lab` fixture lives in tests/conftest.py so every lab test in a run shares one lab."""
