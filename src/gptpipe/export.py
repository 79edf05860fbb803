"""Export a finished model as a plain Hugging Face folder, with a model card written from its runs.

    gptpipe export runs/tiny/rl --out exported/tiny-assistant
    gptpipe export runs/qwen/sft-qlora/final --out exported/qwen-sft --merge-lora --dtype bf16
    gptpipe export runs/tiny/rl --out exported/tiny --push-to-hub my-org/tiny-assistant --private

The source is a run folder or its ``final/`` (or any model folder). The export holds safetensors weights
(a LoRA adapter merged into its base with ``--merge-lora``: the base loaded in full precision, never merged
into quantized weights), the tokenizer with its chat template, a ``generation_config.json`` that stops at the
end-of-turn token, and ``README.md``: a model card naming the base model, every stage that led here (walked
back through each run's ``config.yaml``), their data, their evidence (``eval.json``) and benchmark scores
(``eval-*.json``), and the commands that reproduce them. The folder appears complete or not at all.
``--push-to-hub`` uploads it with ``HF_TOKEN`` from the environment (never written anywhere).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import yaml
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

from gptpipe.errors import UserError
from gptpipe.modeling import DTYPES, adapter_base, is_adapter, merged_copy
from gptpipe.report import benchmark_scores, fmt, headline
from gptpipe.rlhf import stop_token_ids

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def model_folder(source: str | Path) -> tuple[Path, Path | None]:
    """(the model folder, its run folder or None) for a run folder, a run's ``final/`` or a model folder."""
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"{source}: no such folder (expected a run folder, its final/, or a model folder)")
    folder = source / "final" if (source / "final").is_dir() else source
    run = folder.parent if (folder.parent / "config.yaml").is_file() else None
    if not (folder / "config.json").is_file() and not is_adapter(folder):
        raise UserError(
            f"{folder}: not a model folder (no config.json or adapter_config.json); is the run finished?"
        )
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(
            f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json); save the tokenizer with the model, "
            "or copy the one it was trained with into the folder"
        )
    return folder, run


def stage_chain(run: Path | None) -> list[dict]:
    """The runs that led to ``run``, each after the runs it read (``model.name_or_path``, ``model.tokenizer``,
    the reward model, the teacher, when they are run folders' ``final/``): ``{run, stage, config, evidence,
    inputs}`` each."""
    chain: list[dict] = []
    seen: set[Path] = set()

    def visit(current: Path) -> None:
        if current in seen:
            return
        seen.add(current)
        config = yaml.safe_load((current / "config.yaml").read_text()) or {}
        model = config.get("model") or {}
        inputs = {
            "model": model.get("name_or_path"),
            "tokenizer": model.get("tokenizer"),
            "reward model": config.get("reward_model"),
            "teacher": config.get("teacher_model_name_or_path"),
        }
        inputs = {k: str(v) for k, v in inputs.items() if v}
        for value in inputs.values():
            parent = Path(value).parent
            if (parent / "config.yaml").is_file():
                visit(parent.resolve())
        path = current / "eval.json"
        evidence = json.loads(path.read_text()) if path.is_file() else {}
        chain.append(
            {"run": _shown(current), "stage": config.get("stage"), "config": config, "inputs": inputs}
        )
        chain[-1]["evidence"] = evidence

    if run is not None:
        visit(run.resolve())
    return chain


def _shown(path: Path) -> Path:
    """``path`` relative to the working folder when inside it (the card's commands run from there)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def base_model(chain: list[dict], folder: Path) -> str:
    """The Hub model the chain started from, or how it started."""
    for link in chain:
        name = link["inputs"].get("model")
        if name and not (Path(str(name)).parent / "config.yaml").is_file():
            return str(name)
    if chain and chain[0]["stage"] in ("tokenizer", "pretrain"):
        return "none (pretrained from scratch by gptpipe)"
    if is_adapter(folder):
        return adapter_base(folder)
    return "unknown"


def model_card(name: str, folder: Path, chain: list[dict], merged: bool, scores: dict) -> str:
    base = base_model(chain, folder)
    stages = " -> ".join(str(link["stage"]) for link in chain) or "unknown (no run folder)"
    hub_base = base if "/" in base and not Path(base).exists() and " " not in base else None
    front = {"library_name": "transformers", "tags": ["gptpipe", *(str(link["stage"]) for link in chain)]}
    if hub_base:
        front["base_model"] = hub_base
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines += [
        f"Trained with [gptpipe](https://github.com/gptpipe/gptpipe), stage by stage: {stages}. Base model: {base}.",
        *(["LoRA adapters merged into the base."] if merged else []),
        "",
        "## Stages",
        "",
        "| stage | run | data | evidence (held out: before -> after) |",
        "| --- | --- | --- | --- |",
    ]
    for link in chain:
        data = ", ".join(
            f"{d.get('path')}" + (f" ({d['split']})" if d.get("split", "train") != "train" else "")
            for d in link["config"].get("datasets") or []
        )
        rows = headline(str(link["stage"]), link["evidence"])
        evidence = "; ".join(
            f"{metric} {fmt(before)} -> {fmt(after)}" if before is not None else f"{metric} {fmt(after)}"
            for metric, before, after in rows
        )
        lines.append(f"| {link['stage']} | `{link['run']}` | {data} | {evidence or 'no eval.json'} |")
    if scores:
        lines += [
            "",
            "## Benchmarks (lm-evaluation-harness)",
            "",
            "| task | metric | value |",
            "| --- | --- | --- |",
        ]
        for task, metrics in scores.items():
            lines += [f"| {task} | {metric} | {fmt(value)} |" for metric, value in metrics.items()]
    lines += ["", "## Reproduce", "", "```bash"]
    lines += [f"gptpipe train {link['run'] / 'config.yaml'}" for link in chain] or ["# (no run folder)"]
    lines += ["```", "", "Each stage's resolved recipe is its run folder's `config.yaml`.", ""]
    return "\n".join(lines)


def _auto_class(folder: Path):
    config_dir = folder
    if is_adapter(folder):
        config_dir = adapter_base(folder)
    architectures = AutoConfig.from_pretrained(config_dir).architectures or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    return AutoModelForSequenceClassification if classifier else AutoModelForCausalLM


def export(
    source, out, merge_lora=False, dtype=None, push_to_hub=None, private=False, overwrite=False
) -> Path:
    """Write ``source``'s model into ``out`` (see the module's docstring); returns ``out``."""
    folder, run = model_folder(source)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: exists and is not empty; pick another folder or pass --overwrite")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype: expected one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if push_to_hub:
        _check_hub(push_to_hub)
    chain = stage_chain(run)
    adapter = is_adapter(folder)
    if adapter and dtype is not None and not merge_lora:
        raise UserError(
            f"--dtype: {folder} is a LoRA adapter, exported as it is; add --merge-lora to cast the model"
        )
    auto_class = _auto_class(folder)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter and merge_lora:
        quantized = [link for link in chain if (link["config"].get("model") or {}).get("quantization")]
        if quantized:
            bits = quantized[-1]["config"]["model"]["quantization"].get("bits")
            print(
                f"warning: the adapter was trained on a {bits}-bit base; merged into the full-precision base it "
                "gives a model slightly different from the one trained (the quantization error the adapter "
                "learned around): compare its benchmark scores with the adapter's",
                file=sys.stderr,
            )
        merged_copy(folder, tmp, auto_class)
        source_dir = tmp
    elif adapter:
        shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("README.md"))
        source_dir = None  # an adapter is copied as it is
    else:
        source_dir = folder
    if source_dir is folder or (source_dir is tmp and dtype is not None):  # (merged: saved in fp32 already)
        model = auto_class.from_pretrained(source_dir, dtype="auto")  # the stored dtype, unless --dtype
        if dtype is not None:
            model = model.to(DTYPES[DTYPE_NAMES[dtype]])
        for name in WEIGHTS if source_dir is tmp else ():
            (tmp / name).unlink(missing_ok=True)
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(tmp)
    if auto_class is AutoModelForCausalLM:
        _generation_config(folder, tokenizer).save_pretrained(tmp)
    scores = benchmark_scores(run) if run is not None else benchmark_scores(folder)
    card = model_card(out.name, folder, chain, adapter and merge_lora, scores)
    (tmp / "README.md").write_text(card)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    if push_to_hub:
        _push(out, push_to_hub, private)
    return out


def _generation_config(folder: Path, tokenizer) -> GenerationConfig:
    """The folder's generation config (or the model's defaults), stopping at the end of turn and at EOS."""
    if (folder / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(folder)
    else:
        config = GenerationConfig()
    stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    config.eos_token_id = sorted({*[s for s in stops if s is not None], *stop_token_ids(tokenizer)})
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def _check_hub(repo: str) -> None:
    if repo.count("/") != 1:
        raise UserError(f"--push-to-hub {repo}: expected ORG/NAME")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise UserError("--push-to-hub: HF_HUB_OFFLINE is set; unset it (and reach the Hub) to upload")
    if not os.environ.get("HF_TOKEN"):
        raise UserError("--push-to-hub: set HF_TOKEN in the environment (a write token; it is never saved)")


def _push(out: Path, repo: str, private: bool) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ["HF_TOKEN"])
    api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(out), repo_id=repo, commit_message="Upload from gptpipe export")
    print(f"pushed {out} to https://huggingface.co/{repo}")
