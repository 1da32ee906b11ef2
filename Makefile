# The two commands a newcomer needs are `make demo` and `make test`; both set up first.
PY := .venv/bin/python

.PHONY: setup demo test lint bench clean

setup:
	@scripts/setup.sh

demo: setup
	@$(PY) -m walrusfs.demo

lint: setup
	@.venv/bin/ruff check codec backends walrusfs scripts tests
	@.venv/bin/mypy codec backends walrusfs
	@.venv/bin/lint-imports --no-cache

test: lint
	@$(PY) -m pytest

bench: setup
	@$(PY) scripts/bench_codec.py

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache .hypothesis
