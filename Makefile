# Shoal: every set-up step lives here. `make run` and `make test` work on a fresh machine.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
BUF := node_modules/.bin/buf
DATA ?= data
NODES ?= 3
PYTEST_ARGS ?=

.PHONY: help setup run test lint fmt proto proto-check buf-lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==26.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm install --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

setup: $(STAMP) $(NODE_STAMP) ## create .venv and install everything (pinned)

run: $(STAMP) ## start a local cluster on 127.0.0.1..3 (data in ./data); Ctrl-C stops it
	$(BIN)/shoal local up --nodes $(NODES) --data $(DATA)

test: setup lint ## lint, then the whole test suite
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: setup proto-check buf-lint ## ruff, mypy, buf, generated-code drift
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: setup ## format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	cd protos && ../$(BUF) format -w

proto: setup ## regenerate gen/ from protos/
	$(BIN)/python scripts/gen_protos.py

proto-check: setup
	$(BIN)/python scripts/gen_protos.py --check

buf-lint: setup
	cd protos && ../$(BUF) lint && ../$(BUF) format --diff --exit-code

bench: setup ## run the benchmarks (each prints `name value` lines)
	$(BIN)/python bench/storage.py
	$(BIN)/python bench/replication.py

clean: ## remove the virtualenv, node_modules and local data
	rm -rf $(VENV) node_modules $(DATA) .mypy_cache .ruff_cache .pytest_cache .hypothesis
