"""LLaMA-Factory's SFT on the same model, conversations and settings, run in its own virtualenv
(``make bench-peers`` builds it: LLaMA-Factory pins older transformers/TRL). Run by bench/sft.py.

    bench/.venv-llamafactory/bin/python bench/peers/llamafactory_sft.py SETTINGS_JSON
"""

import json
import sys
import types
from pathlib import Path

import transformers

try:
    import torchaudio  # noqa: F401
except (ImportError, OSError):
    # LLaMA-Factory imports torchaudio at the top of its multimodal plugin, for audio inputs only. PyPI has no
    # torchaudio for current torch, so make bench-peers leaves it out; text SFT never calls it. (transformers is
    # imported first so that it sees torchaudio as absent.)
    transformers.PreTrainedModel  # noqa: B018 (resolves transformers' lazy imports now)
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")

from llamafactory.train.tuner import run_exp

from bench.common import StepTimer

s = json.loads(sys.argv[1])
data_dir = Path(s["output_dir"]) / "data"
data_dir.mkdir(parents=True, exist_ok=True)
# The same alpaca file gptpipe reads; LLaMA-Factory's own alpaca reader turns it into a user and an assistant turn.
(data_dir / "dataset_info.json").write_text(json.dumps({"alpaca_demo": {"file_name": s["alpaca"]}}))
run_exp(
    {
        "stage": "sft",
        "do_train": True,
        "model_name_or_path": s["model"],
        "finetuning_type": "full",
        "dataset": "alpaca_demo",
        "dataset_dir": str(data_dir),
        # no template: LLaMA-Factory parses the tokenizer's own chat template (gptpipe's), as gptpipe uses it
        "cutoff_len": s["max_length"],
        "output_dir": s["output_dir"],
        "overwrite_output_dir": True,
        "max_steps": s["steps"],
        "per_device_train_batch_size": s["batch"],
        "learning_rate": s["learning_rate"],
        "seed": s["seed"],
        "logging_steps": s["logging_steps"],
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "dataloader_pin_memory": False,
        "include_num_input_tokens_seen": "non_padding",
        "preprocessing_num_workers": 1,
    },
    callbacks=[StepTimer()],
)
