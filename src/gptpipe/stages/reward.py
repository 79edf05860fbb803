"""Reward-model stage: learn to score replies from comparisons, with ``trl.RewardTrainer``.

    gptpipe train recipes/tiny/reward.yaml

The model is ``AutoModelForSequenceClassification`` with one output, initialized from the SFT model
(or any Hugging Face model); its new ``score`` head reads the last token of a rendered conversation.
Comparisons in any supported format (``gptpipe.data.preferences``) become pairs of conversations,
rendered with the chat template and cut to ``max_length`` on ``truncation_side``.

Evidence (``eval.json``): held-out pairwise accuracy and mean reward margin, before and after; and a
check that the saved ``final/``, reloaded, scores exactly as the trained model did (peers lose the
score head or ``pad_token_id`` on save).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForSequenceClassification, set_seed
from trl import RewardTrainer

from gptpipe import faults
from gptpipe.config import RewardConfig
from gptpipe.data import chat_templates, preferences
from gptpipe.data.sources import describe, load_train_eval
from gptpipe.modeling import (
    apply_lora,
    build_model,
    count_parameters,
    load_for_inference,
    load_tokenizer,
    merge_adapter,
)
from gptpipe.runs import Run
from gptpipe.scoring import pairwise, score_ids
from gptpipe.tracking import MetricsLogger, load_callbacks

HELDOUT_FRACTION = 0.05  # held out for the evidence when the recipe names no eval data
TRAINER_COLUMNS = ["chosen_ids", "rejected_ids", "margin"]


def main(cfg: RewardConfig, run: Run) -> dict:
    say = run.say
    if not cfg.eval_datasets and cfg.eval_split_size == 0:
        cfg.eval_split_size = HELDOUT_FRACTION

    tokenizer = load_tokenizer(cfg.model)
    added = chat_templates.install(
        tokenizer, cfg.chat_template, False, cfg.model.tokenizer or cfg.model.name_or_path
    )
    with cfg.main_process_first(desc="preparing comparisons"):
        train, heldout = load_train_eval(
            cfg,
            [],
            seed=cfg.seed,
            prepare=lambda ds, src: preferences.convert_pairs(
                ds, src.format, describe(src), cfg.invalid_pairs, cfg.dataset_num_proc
            ),
        )
        train, heldout = (
            preferences.tokenize_pairs(
                ds, tokenizer, cfg.max_length, cfg.truncation_side, cfg.dataset_num_proc
            )
            for ds in (train, heldout)
        )
    truncated = sum(train["chosen_truncated"]) + sum(train["rejected_truncated"])
    if truncated:
        say(
            f"[reward] {truncated} training replies were longer than max_length={cfg.max_length}: cut on the {cfg.truncation_side}"
        )
    columns = TRAINER_COLUMNS if any(train["margin"]) else TRAINER_COLUMNS[:2]  # all-zero margins: plain loss

    set_seed(cfg.seed)
    model = build_model(cfg.model, tokenizer, AutoModelForSequenceClassification)
    if added:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id  # saved with the model: scoring batches need it
    new_ids = list(range(len(tokenizer) - added, len(tokenizer))) if added else None
    model = apply_lora(
        model, cfg.model, task_type="SEQ_CLS", new_token_ids=new_ids
    )  # SEQ_CLS trains the head too
    trainable, total = count_parameters(model)
    say(
        f"[reward] {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train; {len(train)} training pairs"
    )
    trainer = RewardTrainer(
        model=model,
        args=cfg,
        train_dataset=train.select_columns(columns),
        eval_dataset=heldout.select_columns(columns),
        processing_class=tokenizer,
        callbacks=[MetricsLogger(run.output_dir), *load_callbacks(cfg.callbacks)],
    )
    pad = tokenizer.pad_token_id
    baseline = run.baseline(lambda: pairwise(trainer.model, heldout, pad))
    if run.resume_from:
        say(f"[reward] resuming from {run.resume_from}")
    guard = faults.guard(trainer, cfg)  # preemption, NaN/inf, disk space: gptpipe.faults
    trainer.train(resume_from_checkpoint=run.resume_checkpoint)
    after = pairwise(trainer.model, heldout, pad)

    tmp = run.final_dir()
    trainer.save_model(str(tmp))  # the full classifier, or the adapter with the score head in modules_to_save
    trainer.accelerator.wait_for_everyone()
    evidence = {f"{k}_before": baseline[k] for k in ("pairwise_accuracy", "mean_margin")}
    evidence |= {f"{k}_after": v for k, v in after.items() if k != "scores_chosen_head"}
    evidence |= guard.summary()  # updates dropped by on_nonfinite: skip
    evidence |= {
        "scores_chosen_head": after["scores_chosen_head"],
        "train_pairs": len(train),
        "train_steps": trainer.state.global_step,
        "truncated_replies": truncated,
        "parameters": total,
        "trainable_parameters": trainable,
    }
    if run.is_main:
        if cfg.model.lora is not None and cfg.model.merge_lora:
            tmp = merge_adapter(tmp, AutoModelForSequenceClassification)
        if cfg.check_reload:
            evidence["reload_max_abs_diff"] = reload_difference(tmp, heldout, after["scores_chosen_head"])
        evidence["seconds"] = run.seconds()
        final = run.publish(tmp, evidence)
        say(
            f"[reward] saved {final}"
            + (" (LoRA adapter + score head)" if cfg.model.lora and not cfg.model.merge_lora else "")
        )
        say(
            f"[reward] held-out pairwise accuracy {evidence['pairwise_accuracy_before']:.3f} -> "
            f"{evidence['pairwise_accuracy_after']:.3f}, mean margin {evidence['mean_margin_before']:.2f} -> "
            f"{evidence['mean_margin_after']:.2f} ({len(heldout)} pairs)"
        )
    trainer.accelerator.wait_for_everyone()
    return evidence


def reload_difference(model_dir: Path, heldout, expected: list[float]) -> float:
    """Reload the saved model as a user would and compare its scores with the trained model's."""
    model, tokenizer = load_for_inference(model_dir, AutoModelForSequenceClassification)
    got = score_ids(model, heldout["chosen_ids"][: len(expected)], tokenizer.pad_token_id)
    worst = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    if worst > 1e-3:
        raise RuntimeError(  # a bug in saving, not a user mistake
            f"the saved reward model in {model_dir} scores differently from the trained one (max difference {worst:.4f}); "
            "its score head or pad_token_id was not saved correctly"
        )
    return worst
