# Quick start: `make demo`, `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.yaml
# test processes of `make test` (pytest-xdist): 2 fits the 2-core machine CI runs on; more cores, more
# processes (each whole-study scenario starts its own local Ray: budget ~3 GiB of memory per process)
TEST_WORKERS ?= 2

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

# PYTHONFAULTHANDLER: a crash (also one at interpreter exit) prints every thread's stack, in each
# test process. --dist loadfile: a file's tests share one process, so its module fixtures (the
# scenarios' studies) are built once; tests/conftest.py hands out the whole-study scenarios first.
test: install-test
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# the edit-test loop: the unit tests without the whole-study scenarios (tests/e2e/) and the tests
# marked slow (whole pipelines, Ray Train, DDP, MLflow servers, a browser); under 3 minutes on 2 cores.
# `make test` stays the suite the README and CI run.
test-fast: install-test
	$(BIN)/python -X faulthandler -m pytest -q -m "not slow" --ignore=tests/e2e $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/prepare.py

clean:
	rm -rf studies .pytest_cache
