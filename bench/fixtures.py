"""The model, tokenizer and data every contender of a benchmark starts from, built once per work folder.

A byte-level BPE tokenizer trained on the alpaca sample with gptpipe's tokenizer code, and a new tiny
Llama saved in Hugging Face format: every contender loads the same weights from the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import ROOT

SHARED_DATA = ROOT.parent / "shared" / "data"
ALPACA = SHARED_DATA / "alpaca_en_demo.json"
WIKI = SHARED_DATA / "wiki_demo.txt"

# The reference setting: tiny Llama (hidden 128, 2 layers), batch 8, max_length 256.
MODEL = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4}


def require_data() -> None:
    if not ALPACA.exists():
        raise SystemExit(
            f"benchmarks need the sample data in {SHARED_DATA} (../shared/data beside the checkout); not found"
        )


def base_model(work: Path, vocab_size: int, model: dict | None = None) -> Path:
    """``work/base-<vocab>``: tokenizer (gptpipe chat template) + a new tiny Llama, built once."""
    import torch

    from gptpipe.config import ModelConfig
    from gptpipe.modeling import build_model
    from gptpipe.stages.tokenizer import train_bpe, wrap

    sizes = {**MODEL, **(model or {})}
    name = f"base-v{vocab_size}-h{sizes['hidden_size']}-l{sizes['num_hidden_layers']}"
    path = work / name
    if (path / "config.json").exists():
        return path
    rows = json.loads(ALPACA.read_text())
    texts = [" ".join(r[k] for k in ("instruction", "input", "output") if r.get(k)) for r in rows]
    if WIKI.exists():
        texts += WIKI.read_text().splitlines()
    tokenizer = wrap(train_bpe(texts, len(texts), vocab_size, min_frequency=2))
    torch.manual_seed(0)
    model = build_model(ModelConfig(**sizes, max_position_embeddings=2048), tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def alpaca_messages(work: Path) -> Path:
    """The alpaca sample as ``messages`` jsonl, converted by gptpipe's own alpaca converter, so the peers'
    scripts train on exactly the conversations gptpipe builds from the original file."""
    from gptpipe.data.formats import from_alpaca

    path = work / "alpaca_messages.jsonl"
    if not path.exists():
        rows = json.loads(ALPACA.read_text())
        path.write_text("".join(json.dumps({"messages": from_alpaca(r)["messages"]}) + "\n" for r in rows))
    return path


def reward_model(work: Path, policy: Path) -> Path:
    """``work/reward``: a one-output sequence classifier of the policy's size and tokenizer (untrained: the
    RL benchmarks time the steps, they do not need a good reward)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = work / f"reward-{policy.name}"
    if (path / "config.json").exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(policy)
    config = AutoConfig.from_pretrained(policy, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
