# gptpipe make targets. `make demo` and `make test` each work alone on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without a GPU, install the CPU build of torch (a plain `pip install torch` pulls several GB of CUDA).
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
RECIPE ?= recipes/tiny/pretrain.yaml
PIPELINE ?= recipes/tiny/pipeline.yaml
SWEEP ?= recipes/tiny/sweep.yaml

export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup lock demo test test-all test-fast test-spread test-gpu test-distributed lint format train clean pretrain sft reward rl tokenizer pipeline sweep bench bench-peers bench-gpu

# Installs from a lock (requirements/*.txt, written by `make lock`): exactly the versions the suite last passed
# with. `make setup LOCK=` installs the newest releases pyproject.toml's ranges allow instead (see README, Testing).
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
LOCK ?= requirements/$(if $(GPU),cuda,cpu).txt
PIP_LOCK := $(if $(LOCK),-c $(LOCK))
# --compile-bytecode: each package's .pyc written at install, as pip does. Python writes none at import where
# PYTHONDONTWRITEBYTECODE is set (many containers, this workplace's machines), and then compiled every module from
# source in every process: `gptpipe validate` took 30 s on a 2-core EPYC, 11.5 s with the bytecode (docs/testing.md).
UV_PIP = $(BIN)/uv pip install --python $(BIN)/python --compile-bytecode

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	@# uv (in the dev extra, pinned by the lock) installs what pip would, in parallel: ~25 s on 2 cores where pip
	@# took ~3 minutes. pip stays for CUDA torch and for the newest CPU torch (LOCK=), from PyTorch's index.
	$(BIN)/pip install $(PIP_LOCK) "uv>=0.9"
	@if [ -n "$(GPU)" ]; then \
		echo "setup: GPU found, installing CUDA torch $(if $(LOCK),from $(LOCK))"; \
		$(BIN)/pip install $(PIP_LOCK) "torch>=2.6"; \
	elif [ -n "$(LOCK)" ]; then \
		echo "setup: no GPU found, installing CPU-only torch from $(LOCK)"; \
		$(UV_PIP) $(PIP_LOCK) --find-links $(TORCH_WHEELS) torch; \
	else \
		echo "setup: no GPU found, installing CPU-only torch $(TORCH_VERSION)"; \
		$(BIN)/pip install --retries 1 "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(UV_PIP) $(PIP_LOCK) -e ".[dev,quant,eval]"  # torch, installed above, stays
	DS_BUILD_OPS=0 $(UV_PIP) $(PIP_LOCK) --no-build-isolation "deepspeed>=0.19"  # ops compile on first use, not now
	@# DeepSpeed on CPU (the distributed tests) compiles its shared-memory op on first use: once, here.
	-@command -v nvidia-smi >/dev/null 2>&1 || $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1
	@touch $@

requirements/cpu.txt requirements/cuda.txt:
	@echo "setup: $@ is missing; write it from pyproject.toml's ranges with: make lock LOCK=" >&2; exit 1

# Regenerate both locks from pyproject.toml's ranges (newest releases), then `make test` to prove them.
# The torch pin (requirements/torch-*.in) is moved by hand; the CUDA lock is resolved for Linux x86_64.
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml --extra dev --extra quant --extra eval --extra deepspeed --python $(BIN)/python \
	--python-version 3.11 --no-build-isolation-package deepspeed --upgrade --quiet
# Where the CPU build of torch is found: this workplace's wheel folder, else the PyTorch CPU index's torch page.
TORCH_WHEELS ?= $(if $(wildcard /opt/wheels/torch-*),/opt/wheels,$(TORCH_CPU_INDEX)/torch/)
lock: setup
	$(UV_COMPILE) requirements/torch-cpu.in --find-links $(TORCH_WHEELS) -o requirements/cpu.txt
	$(UV_COMPILE) requirements/torch-cuda.in --python-platform x86_64-manylinux_2_28 -o requirements/cuda.txt

# The tiny pipeline on a CPU: tokenizer -> pretraining -> SFT -> ranked SFT samples -> reward model -> PPO, then its report card
# (about 6 minutes). Re-running skips finished stages; `rm -rf runs/tiny` (or DEMO_ARGS="--rerun tokenizer") starts over.
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/gptpipe pipeline recipes/tiny/pipeline.yaml $(DEMO_ARGS)
	@echo "demo: models in runs/tiny/{tokenizer,pretrain,sft,reward,rl}/final, ranked samples in runs/tiny/rank/final; evidence in runs/tiny/*/eval.json and runs/tiny/report.md"
	@echo "demo: talk to the assistant with: $(BIN)/gptpipe chat runs/tiny/rl/final"

# One stage, a pipeline or a sweep: make sft RECIPE=recipes/tiny/sft.yaml; make pipeline PIPELINE=...; make sweep SWEEP=...
pretrain sft reward rl tokenizer: setup
	$(BIN)/gptpipe train $(RECIPE) $(ARGS)

pipeline: setup
	$(BIN)/gptpipe pipeline $(PIPELINE) $(ARGS)

sweep: setup
	$(BIN)/gptpipe sweep $(SWEEP) $(ARGS)

# The suite (under 15 minutes on 2 cores), its 15 slowest tests printed, a hung test failing after its timeout
# (pytest-timeout), the `extended` tests left out (test-all runs them too). test-fast: the edit-run loop, leaving
# out the `slow` end-to-end tests.
# Two pytest-xdist workers; tests/conftest.py orders the tests so that both stay busy and shares the trained tiny
# models between them (XDIST= runs in one process).
PYTEST := HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15 --durations-min=1
XDIST ?= -n 2
test: setup
	$(PYTEST) $(XDIST) -m "not extended and not gpu"

# make test and the `extended` tests: second checks of what another test covers (docs/testing.md lists them).
test-all: setup
	$(PYTEST) $(XDIST)

test-fast: setup
	$(PYTEST) $(XDIST) -m "not slow and not gpu and not extended"

test-gpu: setup
	$(PYTEST) -m gpu

test-distributed: setup
	$(PYTEST) -m distributed

# The learning tests over seeds 42 (the recipes', which make test trains with) and 0-3, 2 vs 1 threads; writes the
# table in docs/testing.md (~40 min on 2 cores).
test-spread: setup
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/learning_spread.py --seeds 42 0 1 2 3 --threads 2 1

# Benchmarks (bench/, docs/benchmarks.md): gptpipe against plain TRL / HF Trainer scripts run side by side,
# ratios of medians. About 9 minutes on 2 CPU cores; needs ../shared/data. Results in runs/bench/*/summary.json.
BENCH_ENV := HF_HUB_OFFLINE=1 PYTHONPATH=$(CURDIR)
bench: setup
	$(BENCH_ENV) $(BIN)/python -m bench.sft
	$(BENCH_ENV) $(BIN)/python -m bench.pretrain
	$(BENCH_ENV) $(BIN)/python -m bench.data
	$(BENCH_ENV) $(BIN)/python -m bench.rl
	$(BENCH_ENV) $(BIN)/python -m bench.resume

# + LLaMA-Factory in its own virtualenv (it pins older transformers/TRL). PyPI's torchvision/torchaudio wheels
# are built for other torch versions and break imports; LLaMA-Factory's text SFT needs neither.
LF_VENV := bench/.venv-llamafactory
bench-peers: setup $(LF_VENV)/.installed
	$(BENCH_ENV) $(BIN)/python -m bench.sft --peers

$(LF_VENV)/.installed:
	$(PYTHON) -m venv $(LF_VENV)
	@if [ -n "$(GPU)" ]; then \
		$(LF_VENV)/bin/pip install "torch>=2.6"; \
	else \
		$(LF_VENV)/bin/pip install --retries 1 "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(LF_VENV)/bin/pip install "llamafactory==0.9.5" "torch==$$($(LF_VENV)/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
	$(LF_VENV)/bin/pip uninstall -y torchvision torchaudio
	@touch $@

# On a CUDA machine: pretraining MFU (~125M and ~350M Llama, bf16; sdpa / flash-attention / torch.compile /
# Liger) and SFT tokens/s against the peers. Skipped with a message without CUDA.
bench-gpu: setup
	$(BENCH_ENV) $(BIN)/python -m bench.gpu

lint: setup
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

format: setup
	$(BIN)/ruff format src tests bench scripts
	$(BIN)/ruff check --fix src tests bench scripts

# Any stage: make train RECIPE=recipes/tiny/pretrain.yaml
train: setup
	$(BIN)/gptpipe train $(RECIPE) $(ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
