"""A plain Hugging Face Trainer pretraining script (the run_clm recipe): tokenize, concatenate, cut blocks.

python bench/peers/hf_pretrain.py SETTINGS_JSON
"""

import json
import sys
from itertools import chain

from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from bench.common import StepTimer

s = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(s["model"])
model = AutoModelForCausalLM.from_pretrained(s["model"])
block = s["block_size"]


def tokenize(batch):
    return tokenizer([t + tokenizer.eos_token for t in batch["text"]])


def group(batch):
    ids = list(chain(*batch["input_ids"]))
    n = len(ids) // block * block
    return {"input_ids": [ids[i : i + block] for i in range(0, n, block)]}


raw = load_dataset("text", data_files=s["data"], split="train").filter(lambda r: r["text"].strip())
train = raw.map(tokenize, batched=True, remove_columns=["text"]).map(
    group, batched=True, remove_columns=["attention_mask"]
)
args = TrainingArguments(
    output_dir=s["output_dir"],
    max_steps=s["steps"],
    per_device_train_batch_size=s["batch"],
    learning_rate=s["learning_rate"],
    seed=s["seed"],
    logging_steps=s["logging_steps"],
    save_strategy="no",
    report_to="none",
    dataloader_pin_memory=False,
    include_num_input_tokens_seen="non_padding",
)
Trainer(
    model=model,
    args=args,
    train_dataset=train,
    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    callbacks=[StepTimer()],
).train()
