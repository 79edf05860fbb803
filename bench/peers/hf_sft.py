"""A plain Hugging Face Trainer SFT script: chat template, assistant-token labels, dynamic padding.

python bench/peers/hf_sft.py SETTINGS_JSON
"""

import json
import sys

from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

from bench.common import StepTimer

s = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(s["model"])
model = AutoModelForCausalLM.from_pretrained(s["model"])


def tokenize(row):
    out = tokenizer.apply_chat_template(
        row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = out["input_ids"][: s["max_length"]]
    mask = out["assistant_masks"][: s["max_length"]]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)],
    }


train = load_dataset("json", data_files=s["data"], split="train").map(tokenize, remove_columns=["messages"])
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
    data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    callbacks=[StepTimer()],
).train()
