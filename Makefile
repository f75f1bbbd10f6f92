# gpunet-pipeline: `make run` and `make test` are all a newcomer needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/local

export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1

.PHONY: help setup run test lint format clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install the project editable with [dev] (idempotent)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing gpunet-pipeline[dev] into $(VENV) (first time: several minutes; log: $(VENV)/install.log)"
	@$(PY) -m pip install --disable-pip-version-check -e '.[dev]' > $(VENV)/install.log 2>&1 \
		|| { grep -v "^WARNING: Location" $(VENV)/install.log | tail -n 30; echo "pip install failed (full log: $(VENV)/install.log)"; exit 1; }
	@touch $(STAMP)

run: setup ## the main job on the embedded default
	$(VENV)/bin/gpunet models

test: setup ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup ## ruff over the code
	$(VENV)/bin/ruff check gpunet_core components pipelines tests

format: setup ## ruff format + import sort fixes
	$(VENV)/bin/ruff check --fix gpunet_core components pipelines tests
	$(VENV)/bin/ruff format gpunet_core components pipelines tests

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache runs build *.egg-info
