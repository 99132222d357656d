# Quick start: `make up` (set everything up and run the hub), `make test` (run the test suite),
# `make test-unit` (the fast lane: tests/unit, no hub, kernel env, podman, browser or Slurm needed).
# The environments are built from the system Python, which every user account can run.
PYTHON ?= $(shell if [ -x /usr/bin/python3 ]; then echo /usr/bin/python3; else command -v python3; fi)
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?=
PYTEST_ARGS ?=

.PHONY: up setup check build test test-unit test-integration test-deps bench clean

up: setup
	$(BIN)/spinnaker-jupyter up $(if $(CONFIG),-c $(CONFIG))

setup: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements-hub.txt hub/pyproject.toml extensions/pyproject.toml
	./scripts/system-deps.sh
	@echo "[make] creating the hub environment in $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -q --upgrade pip
	$(BIN)/pip install --progress-bar off -r requirements-hub.txt
	touch $@

node_modules/.installed: package.json
	@echo "[make] installing configurable-http-proxy (pinned)"
	npm install --no-audit --no-fund --loglevel=error
	touch $@

check: setup
	$(BIN)/spinnaker-jupyter check $(if $(CONFIG),-c $(CONFIG))

build: setup
	$(BIN)/spinnaker-jupyter build $(if $(CONFIG),-c $(CONFIG))

# The unit lane needs only pytest (requirements-unit.txt), installed once; the full suite needs the rest.
$(VENV)/.unit-installed: $(VENV)/.installed requirements-unit.txt
	$(BIN)/pip install --progress-bar off -q -r requirements-unit.txt
	touch $@

test-deps: setup requirements-test.txt requirements-unit.txt
	./scripts/system-deps.sh --test
	$(BIN)/pip install --progress-bar off -q -r requirements-test.txt
	$(BIN)/spinnaker-jupyter build -c tests/build-config.yaml

# The suite runs on TEST_WORKERS pytest-xdist workers (most of its time is waiting on hubs, kernels and timeouts);
# tests/conftest.py keeps together what must not run side by side. TEST_WORKERS=0: one process, as before.
TEST_WORKERS ?= 3

test: test-deps
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS)

test-unit: setup $(VENV)/.unit-installed
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: test-deps
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup) tests/integration $(PYTEST_ARGS)

bench: test-deps
	$(BIN)/python benchmarks/bench_hub.py

clean:
	rm -rf $(VENV) node_modules data .cache
