"""The same prompts across stages: what pretraining, SFT and RL each did to the model's answers.

A pipeline with a ``compare:`` section ends by asking every model it trained (pretrain, sft, rl/grpo/rloo) the
same held-out prompts. The base model gets each question as the start of a document (it completes documents;
it is not an assistant); the others get it through the chat template. The report card then shows:

- the greedy answers side by side, and per stage the share of answers that hold the right answer in their
  first sentence (rows with an ``answer``) and that stop at the end of a turn within ``max_new_tokens``;
- diversity of ``samples`` sampled answers per prompt: distinct-1 / distinct-2 (unique n-grams over all
  n-grams among one prompt's samples, averaged over prompts), the mean per-token entropy of the sampling
  distribution, and the mean length in tokens. RLHF is known to narrow a model's outputs (mode collapse):
  here it shows as falling entropy and distinct-n next to the reward gain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gptpipe.config import DataSource
from gptpipe.data.answers import answers_in_first_sentence
from gptpipe.data.sources import load_mixture
from gptpipe.generation import render_chat
from gptpipe.modeling import load_for_inference
from gptpipe.rlhf import prompt_rows
from gptpipe.runs import is_finished
from gptpipe.scoring import score_pairs_file

MODEL_STAGES = ("pretrain", "sft", "rl", "dpo", "kto", "distill")  # stage kinds whose final/ is a causal LM


@dataclass
class CompareSettings:
    prompts: DataSource  # rows with `prompt` (text or messages); an `answer` column adds the answered share
    num_prompts: int = 5  # answered side by side (greedy)
    diversity_prompts: int = 16  # prompts sampled for the diversity figures (and the answered/stopped shares)
    samples: int = 8  # sampled answers per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0


def load_prompts(settings: CompareSettings) -> list[dict]:
    """The first ``max(num_prompts, diversity_prompts)`` rows as {prompt: messages, answer?}."""
    ds = load_mixture([settings.prompts], [], seed=settings.seed, prepare=prompt_rows)
    return list(ds.select(range(min(len(ds), max(settings.num_prompts, settings.diversity_prompts)))))


def compare_models(models: list[tuple[str, str, Path]], settings: CompareSettings) -> dict:
    """{stage name: {answers, answered, stopped, distinct_1, distinct_2, entropy, length}} for each
    (name, stage kind, model folder); ``prompts`` holds the questions shown side by side."""
    rows = load_prompts(settings)
    found = {"prompts": [r["prompt"][-1]["content"] for r in rows[: settings.num_prompts]], "stages": {}}
    for name, kind, folder in models:
        model, tokenizer = load_for_inference(folder)
        as_document = kind == "pretrain"
        texts = (
            [r["prompt"][-1]["content"] for r in rows]
            if as_document
            else render_chat(tokenizer, [r["prompt"] for r in rows])
        )
        greedy = [_generate(model, tokenizer, t, settings, as_document, sample=False)[0] for t in texts]
        replies = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in greedy]
        answered = [
            (answers_in_first_sentence(reply, r["answer"]), stopped)
            for reply, (_, stopped), r in zip(replies, greedy, rows, strict=True)
            if r.get("answer") is not None
        ]
        torch.manual_seed(settings.seed)
        stats = sample_diversity(model, tokenizer, texts[: settings.diversity_prompts], settings, as_document)
        found["stages"][name] = {
            "kind": kind,
            "answers": replies[: settings.num_prompts],
            "answered": _share(right for right, _ in answered),
            # the assistant's job: the right answer, then the end of its turn (a document just goes on)
            "answered_and_stopped": _share(right and stopped for right, stopped in answered),
            **stats,
        }
    return found


def _share(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def sample_diversity(
    model, tokenizer, texts: list[str], settings: CompareSettings, as_document: bool
) -> dict:
    """Sample ``settings.samples`` answers per prompt; distinct-1/2, entropy, length and the stopped share."""
    per_prompt, entropies, lengths, stops = [], [], [], []
    for text in texts:
        samples = _generate(model, tokenizer, text, settings, as_document, sample=True)
        per_prompt.append([ids for ids, _, _ in samples])
        for ids, stopped, entropy in samples:
            entropies.append(entropy)
            lengths.append(len(ids) + stopped)  # the stop token is sampled too
            stops.append(stopped)
    tokens = max(sum(lengths), 1)
    return {
        "distinct_1": distinct_n(per_prompt, 1),
        "distinct_2": distinct_n(per_prompt, 2),
        "entropy": sum(entropies) / tokens,  # mean over every sampled token
        "length": sum(lengths) / max(len(lengths), 1),
        "stopped": _share(stops),
    }


@torch.no_grad()
def _generate(model, tokenizer, text: str, settings: CompareSettings, as_document: bool, sample: bool):
    """Greedy: [(reply ids, stopped)]; sampled: ``samples`` x (reply ids, stopped, summed entropy of the
    sampling distribution over the reply's tokens and its stop token). Reply ids end before the stop token."""
    stop_ids = model.generation_config.eos_token_id
    stop_ids = set(stop_ids if isinstance(stop_ids, list) else [stop_ids])
    model.eval()
    batch = tokenizer([text], return_tensors="pt", add_special_tokens=as_document).to(model.device)
    how = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": 1.0}
        if sample
        else {"do_sample": False}
    )
    out = model.generate(
        **batch,
        **how,
        max_new_tokens=settings.max_new_tokens,
        num_return_sequences=settings.samples if sample else 1,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=sample,
        return_dict_in_generate=True,
    )
    new = out.sequences[:, batch["input_ids"].shape[1] :].tolist()
    if sample:
        logp = torch.log_softmax(torch.stack(out.logits, dim=1).float() / settings.temperature, dim=-1)
        step_entropy = -(logp.exp() * logp).sum(-1)  # [samples, steps]
    found = []
    for i, ids in enumerate(new):
        end = next((j for j, t in enumerate(ids) if t in stop_ids), None)
        reply, stopped = (ids, False) if end is None else (ids[:end], True)
        if sample:
            found.append((reply, stopped, step_entropy[i, : len(reply) + stopped].sum().item()))
        else:
            found.append((reply, stopped))
    return found


def distinct_n(per_prompt: list[list[list[int]]], n: int) -> float | None:
    """Unique n-grams over all n-grams among each prompt's samples, averaged over prompts (Li et al. 2016's
    distinct-n, taken per prompt so that different prompts' different words do not count as diversity)."""
    scores = []
    for samples in per_prompt:
        grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
        if grams:
            scores.append(len(set(grams)) / len(grams))
    return sum(scores) / len(scores) if scores else None


def markdown(found: dict) -> str:
    """The report card's section: answers side by side, then the per-stage figures."""
    stages = list(found["stages"])
    lines = ["## The same prompts, stage by stage", ""]
    lines += ["Greedy answers (the base model continues the question as a document):", ""]
    lines += ["| prompt | " + " | ".join(stages) + " |", "|" + " --- |" * (len(stages) + 1)]
    for i, prompt in enumerate(found["prompts"]):
        cells = [_cell(found["stages"][s]["answers"][i]) for s in stages]
        lines.append(f"| {_cell(prompt)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| stage | answered | answered, then stopped | distinct-1 | distinct-2 | entropy (nats/token) | mean length |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in stages:
        r = found["stages"][s]
        keys = ("answered", "answered_and_stopped", "distinct_1", "distinct_2", "entropy", "length")
        figures = [r[k] for k in keys]
        lines.append(f"| {s} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in figures) + " |")
    lines += [
        "",
        "answered: the right answer in the first sentence of the greedy reply; answered, then stopped: and the "
        "reply ended its turn (an assistant's answer; a base model continues the document). The rest over sampled "
        "replies (distinct-n per prompt among its samples). RLHF typically lowers entropy and distinct-n (less "
        "diverse outputs) while it raises the reward.",
    ]
    return "\n".join(lines)


def _cell(text: str, width: int = 70) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def plot(found: dict, folder: Path) -> Path | None:
    """plots/diversity.png: entropy, distinct-2 and answered share per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(found["stages"])
    if not stages:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    keys = [("entropy", "entropy (nats/token)"), ("distinct_2", "distinct-2"), ("answered", "answered")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, (key, title) in zip(axes, keys, strict=True):
        ax.bar(stages, [found["stages"][s][key] or 0 for s in stages], color="tab:blue")
        ax.set_title(title)
    fig.tight_layout()
    path = folder / "diversity.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write(found: dict, out: Path) -> str:
    """compare.json, plots/diversity.png; returns the Markdown section for the report card."""
    (out / "compare.json").write_text(json.dumps(found, indent=2))
    path = plot(found, out / "plots")
    section = markdown(found)
    return section + (f"\n\n![diversity per stage](plots/{path.name})" if path else "")


def reward_models_on_own_samples(out: Path, heldout: Path) -> str:
    """The report card's section for on-policy comparisons: every finished reward run in ``out`` scored on
    ``heldout`` (held-out prompts' samples of the policy, ranked like the training comparisons), next to
    the held-out accuracy of its own evaluation set."""
    import yaml

    lines = [
        "## Reward models on the SFT model's own samples",
        "",
        f"Held-out comparisons among the policy's samples ({heldout}), ranked as the rank stage's training data; "
        "each reward model's accuracy on them next to the accuracy on its own held-out set (eval.json).",
        "",
        "| reward run | trained on | own held-out set | the SFT model's own samples |",
        "| --- | --- | --- | --- |",
    ]
    for run in sorted(p for p in out.iterdir() if p.is_dir() and is_finished(p)):
        config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        if (config or {}).get("stage") != "reward":
            continue
        evidence = json.loads((run / "eval.json").read_text())
        own = evidence.get("pairwise_accuracy_after")
        sampled = score_pairs_file(run / "final", heldout, "ranked")["pairwise_accuracy"]
        sources = ", ".join(str(d.get("path")) for d in config.get("datasets", []))
        lines.append(
            f"| {run.name} | {_cell(sources, 50)} | {'-' if own is None else f'{own:.3f}'} | {sampled:.3f} |"
        )
    return "\n".join(lines)
