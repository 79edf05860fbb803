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

.PHONY: setup demo test test-gpu test-distributed lint format train clean pretrain sft reward rl tokenizer pipeline sweep bench bench-peers bench-gpu

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "setup: GPU found, installing CUDA torch"; \
		$(BIN)/pip install "torch>=2.6"; \
	else \
		echo "setup: no GPU found, installing CPU-only torch $(TORCH_VERSION)"; \
		$(BIN)/pip install --retries 1 "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install -e ".[dev,quant]"
	DS_BUILD_OPS=0 $(BIN)/pip install --no-build-isolation "deepspeed>=0.19"  # ops compile on first use, not now
	@# DeepSpeed on CPU (the distributed tests) compiles its shared-memory op on first use: once, here.
	-@command -v nvidia-smi >/dev/null 2>&1 || $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1
	@touch $@

# The tiny pipeline on a CPU: tokenizer -> pretraining -> SFT -> reward model -> PPO, then its report card
# (about 6 minutes). Re-running skips finished stages; `rm -rf runs/tiny` (or DEMO_ARGS="--rerun tokenizer") starts over.
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/gptpipe pipeline recipes/tiny/pipeline.yaml $(DEMO_ARGS)
	@echo "demo: models in runs/tiny/{tokenizer,pretrain,sft,reward,rl}/final; evidence in runs/tiny/*/eval.json and runs/tiny/report.md"
	@echo "demo: talk to the assistant with: $(BIN)/gptpipe chat runs/tiny/rl/final"

# One stage, a pipeline or a sweep: make sft RECIPE=recipes/tiny/sft.yaml; make pipeline PIPELINE=...; make sweep SWEEP=...
pretrain sft reward rl tokenizer: setup
	$(BIN)/gptpipe train $(RECIPE) $(ARGS)

pipeline: setup
	$(BIN)/gptpipe pipeline $(PIPELINE) $(ARGS)

sweep: setup
	$(BIN)/gptpipe sweep $(SWEEP) $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-gpu: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m gpu

test-distributed: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m distributed

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
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
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
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

# Any stage: make train RECIPE=recipes/tiny/pretrain.yaml
train: setup
	$(BIN)/gptpipe train $(RECIPE) $(ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
