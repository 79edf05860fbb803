"""What the stages that train a policy with one TRL trainer beside a frozen model share (DPO
``gptpipe.stages.dpo`` and KTO ``gptpipe.stages.kto`` beside their reference, distillation
``gptpipe.stages.distill`` beside its teacher): their held-out prompts, the starting policy, the evidence
measured before and after, and publishing the policy.

The evidence compares with the RL stages': answer accuracy and KL (to the reference, or the teacher) of greedy
replies to held-out prompts, with the same code (``gptpipe.rlhf.evaluate``); next to each stage's own figures
(``gptpipe.likelihood``).
"""

from __future__ import annotations

from transformers import TrainerCallback

from gptpipe import faults
from gptpipe.data import preferences
from gptpipe.data.sources import describe, load_mixture
from gptpipe.modeling import apply_lora, build_model, frozen_reference, merge_adapter
from gptpipe.rlhf import (
    before_after,
    evaluate,
    judged_prompts,
    measure_all,
    prompt_rows,
    stop_token_ids,
    whole_assistant_line,
)
from gptpipe.runs import Run


def as_pairs(cfg):
    """A ``prepare`` for comparison sources (any format the reward stage reads): TRL's conversational pairs,
    ``chosen`` and ``rejected`` message lists (the prompt implicit in both: TRL splits it off)."""

    def prepare(ds, src):
        converted = preferences.convert_pairs(
            ds, src.format, describe(src), cfg.invalid_pairs, cfg.dataset_num_proc
        )
        return converted.remove_columns("margin")

    return prepare


def heldout_pairs(cfg):
    """The ``eval_datasets`` as pairs when each names a comparison format (KTO's held-out comparisons, scored
    pair by pair as DPO's are), else None."""
    if not cfg.eval_datasets or any(s.format in (None, "unpaired") for s in cfg.eval_datasets):
        return None
    return load_mixture(cfg.eval_datasets, [], seed=cfg.seed, prepare=as_pairs(cfg))


def heldout_prompts(cfg):
    """``prompt_datasets`` (the first ``eval_prompts``), or None."""
    if not cfg.prompt_datasets:
        return None
    prompts = load_mixture(cfg.prompt_datasets, [], seed=cfg.seed, prepare=prompt_rows)
    return prompts.select(range(min(cfg.eval_prompts, len(prompts))))


def starting_policy(cfg, tokenizer):
    """The policy to train: the recipe's model, generating until the template's end of turn, LoRA if asked."""
    policy = build_model(cfg.model, tokenizer)
    policy.generation_config.eos_token_id = stop_token_ids(tokenizer)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    return apply_lora(policy, cfg.model)


def train_measured(
    run: Run, trainer, cfg, tokenizer, prompts, own, teacher=None, max_new_tokens=None
) -> tuple[dict, object]:
    """Train with TRL's ``trainer`` (resuming when the run does), measured before and after: the stage's own
    figures, ``own(policy, reference)``, and with prompts answer accuracy and KL to the frozen reference (to
    ``teacher`` when given: distillation), on ``generalization_datasets`` and ``retained_datasets`` too. Every process measures (ZeRO-3 forwards are collective); the main one
    writes. Returns (evidence, the trained policy)."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    copies = {"reference_copies": int(getattr(trainer, "ref_model", None) is not None)}  # none with LoRA
    reference = frozen_reference(trainer, cfg, tokenizer) if teacher is None else teacher
    max_new_tokens = max_new_tokens or cfg.max_new_tokens

    judged = judged_prompts(cfg)  # the whole assistant: generalization and retained prompts

    def measure() -> dict:  # the answer check is the evidence here, not a reward
        answered = lambda p: evaluate(policy, reference, tokenizer, p, None, max_new_tokens)  # noqa: E731
        return own(policy, reference) | measure_all(answered, prompts, judged)

    # Measured once training begins: under ZeRO-3 the policy's weights are shards until the Trainer builds its
    # engine (in train()), and only then does a forward gather them. A resumed run reads baseline.json.
    baseline = {}
    trainer.add_callback(_OnTrainBegin(lambda: baseline.update(run.baseline(measure))))
    if run.resume_from:
        run.say(f"[{cfg.stage}] resuming from {run.resume_from}")
    guard = faults.guard(trainer, cfg)  # preemption, NaN/inf, disk space: gptpipe.faults
    trainer.train(resume_from_checkpoint=run.resume_checkpoint)
    evidence = before_after(baseline, measure()) | guard.summary()
    evidence |= (copies if teacher is None else {}) | {"train_steps": trainer.state.global_step}
    return evidence, policy


class _OnTrainBegin(TrainerCallback):
    def __init__(self, call):
        self.call = call

    def on_train_begin(self, args, state, control, **kwargs):
        self.call()


def publish(run: Run, trainer, policy, evidence: dict, line: str) -> None:
    """Every process: the policy saved by the trainer (full, or the LoRA adapter; merged if asked); the main
    process publishes ``final/`` and ``eval.json`` and prints ``line``."""
    cfg = run.cfg
    tmp = run.final_dir()
    trainer.save_model(str(tmp))
    if run.is_main:
        policy.generation_config.save_pretrained(tmp)
        if cfg.model.lora is not None and cfg.model.merge_lora:
            tmp = merge_adapter(tmp)
        final = run.publish(tmp, evidence)
        run.say(f"[{cfg.stage}] saved {final}")
        run.say(line)
    trainer.accelerator.wait_for_everyone()


def answers_line(e: dict) -> str:
    """The evidence line's answer part, when measured."""
    if "answer_accuracy_before" not in e:
        return ""
    return (
        f"; answer accuracy {e['answer_accuracy_before']:.2f} -> {e['answer_accuracy_after']:.2f}, "
        f"KL to reference {e['kl_after']:.3f}" + whole_assistant_line(e)
    )
