.PHONY: setup run test test-fast bench lint format clean

setup:
	bash scripts/setup.sh

run: setup
	bash scripts/run.sh

test: setup
	bash scripts/test.sh

# Everything that needs neither root nor the lab, in about two minutes on 2 cores.
test-fast: setup
	.venv/bin/python -m pytest -m "not e2e and not lab" -n 2 -q

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
