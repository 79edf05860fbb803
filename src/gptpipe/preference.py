"""What the preference stages (DPO ``gptpipe.stages.dpo``, KTO ``gptpipe.stages.kto``) share: their held-out
prompts, the starting policy, the evidence measured before and after, and publishing the policy.

The evidence compares with the RL stages': answer accuracy and KL to the reference of greedy replies to
``prompt_datasets``, with the same code (``gptpipe.rlhf.evaluate``); next to each stage's own preference
figures (``gptpipe.likelihood``).
"""

from __future__ import annotations

from gptpipe import faults
from gptpipe.data.sources import load_mixture
from gptpipe.modeling import apply_lora, build_model, frozen_reference, merge_adapter
from gptpipe.rlhf import before_after, evaluate, prompt_rows, reward_scorer, stop_token_ids
from gptpipe.runs import Run


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


def train_measured(run: Run, trainer, cfg, tokenizer, prompts, own) -> tuple[dict, object]:
    """Train with TRL's ``trainer`` (resuming when the run does), measured before and after: the stage's own
    figures, ``own(policy, reference)``, and with prompts answer accuracy and KL. Every process measures (ZeRO-3
    forwards are collective); the main one writes. Returns (evidence, the trained policy)."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    copies = int(getattr(trainer, "ref_model", None) is not None)  # TRL's second model (none with LoRA)
    reference = frozen_reference(trainer, cfg, tokenizer)
    no_reward = reward_scorer(None, None, tokenizer)  # the answer check is the evidence here, not a reward

    def measure() -> dict:
        found = own(policy, reference)
        if prompts is not None:
            replies = evaluate(policy, reference, tokenizer, prompts, no_reward, cfg.max_new_tokens)
            found |= {k: v for k, v in replies.items() if k != "reward"}
        return found

    baseline = run.baseline(measure)
    if run.resume_from:
        run.say(f"[{cfg.stage}] resuming from {run.resume_from}")
    guard = faults.guard(trainer, cfg)  # preemption, NaN/inf, disk space: gptpipe.faults
    trainer.train(resume_from_checkpoint=run.resume_checkpoint)
    evidence = before_after(baseline, measure()) | guard.summary()
    evidence |= {"reference_copies": copies, "train_steps": trainer.state.global_step}
    return evidence, policy


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
        f"KL to reference {e['kl_after']:.3f}"
    )
