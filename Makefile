# gptpipe make targets. `make demo` and `make test` each work alone on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without a GPU, install the CPU build of torch (a plain `pip install torch` pulls several GB of CUDA).
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
RECIPE ?= recipes/tiny/pretrain.yaml

export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup demo test test-gpu test-distributed lint format train clean

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
	@touch $@

# The tiny pipeline on a CPU: tokenizer -> pretraining -> SFT -> reward model -> PPO (about 6 minutes). Re-running starts over.
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/gptpipe train recipes/tiny/tokenizer.yaml overwrite=true
	HF_HUB_OFFLINE=1 $(BIN)/gptpipe train recipes/tiny/pretrain.yaml overwrite=true resume=false
	HF_HUB_OFFLINE=1 $(BIN)/gptpipe train recipes/tiny/sft.yaml overwrite=true resume=false
	HF_HUB_OFFLINE=1 $(BIN)/gptpipe train recipes/tiny/reward.yaml overwrite=true resume=false
	HF_HUB_OFFLINE=1 $(BIN)/gptpipe train recipes/tiny/rl.yaml overwrite=true resume=false
	@echo "demo: models in runs/tiny/{tokenizer,pretrain,sft,reward,rl}/final; evidence in runs/tiny/*/eval.json"
	@echo "demo: talk to the assistant with: $(BIN)/gptpipe chat runs/tiny/rl/final"

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-gpu: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m gpu

test-distributed: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m distributed

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: setup
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

# Any stage: make train RECIPE=recipes/tiny/pretrain.yaml
train: setup
	$(BIN)/gptpipe train $(RECIPE)

clean:
	rm -rf runs .pytest_cache .ruff_cache
