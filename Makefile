# Quick start: `make demo`, `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.yaml

.PHONY: demo test test-fast install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/camstudy run $(CONFIG)

# -X faulthandler: a crash (also one at interpreter exit) prints every thread's stack
test: install-test
	$(BIN)/python -X faulthandler -m pytest -q $(PYTEST_ARGS)

# the edit-test loop: the unit tests without the whole-study scenarios (tests/e2e/) and the tests
# marked slow (whole pipelines, Ray Train, DDP, MLflow servers, a browser); under 3 minutes on 2 cores.
# `make test` stays the suite the README and CI run.
test-fast: install-test
	$(BIN)/python -X faulthandler -m pytest -q -m "not slow" --ignore=tests/e2e $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/prepare.py

clean:
	rm -rf studies .pytest_cache
