"""A plain TRL SFTTrainer script: what a user of TRL would write. Run by bench/sft.py.

python bench/peers/trl_sft.py SETTINGS_JSON
"""

import json
import sys

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from bench.common import StepTimer

s = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(s["model"])
model = AutoModelForCausalLM.from_pretrained(s["model"])
train = load_dataset("json", data_files=s["data"], split="train")
args = SFTConfig(
    output_dir=s["output_dir"],
    max_steps=s["steps"],
    per_device_train_batch_size=s["batch"],
    max_length=s["max_length"],
    learning_rate=s["learning_rate"],
    seed=s["seed"],
    assistant_only_loss=True,
    bf16=False,
    gradient_checkpointing=False,
    logging_steps=s["logging_steps"],
    save_strategy="no",
    report_to="none",
    dataloader_pin_memory=False,
    include_num_input_tokens_seen="non_padding",
)
SFTTrainer(
    model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[StepTimer()]
).train()
