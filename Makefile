# Quick start: `make demo`, `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.yaml

.PHONY: demo test install install-test bench clean

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

bench: install
	$(BIN)/python bench/prepare.py

clean:
	rm -rf studies .pytest_cache
