.PHONY: setup run test test-fast faults fault-report bench lint format clean

setup:
	bash scripts/setup.sh

run: setup
	bash scripts/run.sh

test: setup
	bash scripts/test.sh

# Everything that needs neither root nor the lab, in about two minutes on 2 cores.
test-fast: setup
	.venv/bin/python -m pytest -m "not e2e and not lab" -n 2 -q

# The whole fault matrix (every strategy x fault x phase x cut length) on the lab, FAULT_JOBS cases
# at a time (each xdist worker has a lab instance of its own); dominated by the 5-minute cuts.
# Pick a chunk with ARGS='-k "post-copy and 10s"'.
FAULT_JOBS ?= 6
faults: setup
	CTWEB_FAULTS=all bash scripts/test.sh tests/migration/test_e2e_lab_fault_matrix.py -n $(FAULT_JOBS) --dist worksteal $(ARGS)

# docs/fault-matrix.md from the latest test-artifacts/fault-matrix.json (ARGS=--all: every session kept).
fault-report:
	.venv/bin/python scripts/fault_report.py $(ARGS)

bench: setup
	.venv/bin/python bench/run.py

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports --no-logo --cache-dir var/import-linter

format:
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

clean:
	rm -rf var/static .pytest_cache
