"""The test suite's own layout (docs/ARCHITECTURE.md): tests live by area in tests/<area>/, and
no test module imports another (shared helpers and fixtures are in tests/support/ and the
conftests), so a test module can move or go without breaking others."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _test_modules():
    return sorted(p for p in TESTS.rglob("test_*.py") if "support" not in p.parts)


def test_no_test_module_imports_another():
    offending = []
    for path in _test_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_"):
                    offending.append(f"{path.relative_to(TESTS)} imports {name}")
    assert offending == []


def test_tests_live_in_their_areas():
    loose = [p.name for p in TESTS.glob("test_*.py") if p.name != "test_layout.py"]
    assert loose == [], "put them in tests/<area>/"
    assert len([p for p in _test_modules() if p.parent != TESTS]) > 50
