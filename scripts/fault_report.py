"""Put the latest fault-matrix report (test-artifacts/fault-matrix.json, written by the
last lab test session) into docs/fault-matrix.md, with the date and the commit it ran on.

    .venv/bin/python scripts/fault_report.py [--all | path/to/fault-matrix.json ...]

--all: every session's rows kept in test-artifacts/fault-matrix-runs/ (the full matrix runs
in chunks), a later row of the same test replacing an earlier one.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.faults import merge, render  # noqa: E402

HEAD = """# The fault matrix: the latest report

Written by `scripts/fault_report.py` from `test-artifacts/fault-matrix.json`, which the last
lab test session wrote (`make faults` for the whole table, plain `make test` for the CI
representatives). The cases are the table in `tests/migration/test_e2e_lab_fault_matrix.py`; what each
one checks is in docs/RELIABILITY.md ("The fault matrix per strategy"). Tried / survived /
lost per strategy; lost must be 0.

"""


def main(argv: list[str]) -> int:
    art = ROOT / "test-artifacts"
    if argv[1:] == ["--all"]:
        paths = list((art / "fault-matrix-runs").glob("*.json"))
    else:
        paths = [Path(p) for p in argv[1:]] or [art / "fault-matrix.json"]
    report = merge(paths)
    out = ROOT / "docs" / "fault-matrix.md"
    out.write_text(HEAD + render(report))
    print(f"wrote {out.relative_to(ROOT)}: {len(report['rows'])} rows from {report['date']} ({report['commit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
