"""DPO stage: preference optimization straight from comparisons, with ``trl.DPOTrainer`` (no reward model, no
sampling).

    gptpipe train recipes/tiny/dpo.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml -m gptpipe train recipes/smollm2/dpo.yaml

The policy starts from the SFT model and the frozen reference is the SFT model too (TRL's copy; with
``model.lora``, the policy's own weights with the adapter disabled: no second copy). Comparisons in any format
the reward stage reads (``gptpipe.data.preferences``: ``preference``, ``sharegpt_preference``, ``ranked``
expanded to pairs, ``columns:`` mapping) become TRL's conversational pairs; TRL renders them with the chat
template and takes the loss on the replies. The recipe is a ``trl.DPOConfig`` (``beta``, ``loss_type``...).
Interrupted runs resume from the newest checkpoint.

Evidence (``eval.json``, ``gptpipe.likelihood``), before and after, on held-out comparisons: how often DPO's
implicit reward ranks the chosen reply first (0.5 before: the policy is its reference) and its mean margin, and
how often the policy finds the chosen reply more likely; with ``prompt_datasets``, answer accuracy and KL to the
reference of greedy replies, measured as the RL stages measure them (``gptpipe.rlhf``), so the report card sets
DPO beside RM + PPO.
"""

from __future__ import annotations

from transformers import set_seed
from trl import DPOTrainer

from gptpipe.config import DPOConfig
from gptpipe.data import chat_templates
from gptpipe.data.sources import load_train_eval
from gptpipe.likelihood import preference_accuracy
from gptpipe.modeling import count_parameters, load_tokenizer
from gptpipe.preference import (
    answers_line,
    as_pairs,
    heldout_prompts,
    publish,
    starting_policy,
    train_measured,
)
from gptpipe.runs import Run
from gptpipe.tracking import MetricsLogger, load_callbacks

HELDOUT_FRACTION = 0.05  # held out for the evidence when the recipe names no eval data (as the reward stage)


def main(cfg: DPOConfig, run: Run) -> dict:
    if not cfg.eval_datasets and cfg.eval_split_size == 0:
        cfg.eval_split_size = HELDOUT_FRACTION
    tokenizer = load_tokenizer(cfg.model)
    chat_templates.install(tokenizer, cfg.chat_template, False, cfg.model.tokenizer or cfg.model.name_or_path)

    with cfg.main_process_first(desc="preparing comparisons"):
        train, heldout = load_train_eval(cfg, [], seed=cfg.seed, prepare=as_pairs(cfg))
        prompts = heldout_prompts(cfg)

    set_seed(cfg.seed)
    policy = starting_policy(cfg, tokenizer)
    trainable, total = count_parameters(policy)
    run.say(
        f"[dpo] {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train; {len(train)} training pairs"
    )
    trainer = DPOTrainer(
        model=policy,
        args=cfg,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        callbacks=[MetricsLogger(run.output_dir), *load_callbacks(cfg.callbacks)],
    )
    evidence, policy = train_measured(
        run,
        trainer,
        cfg,
        tokenizer,
        prompts,
        lambda m, ref: preference_accuracy(m, ref, tokenizer, heldout, cfg.beta, cfg.max_length),
    )
    evidence |= {
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "parameters": total,
        "trainable_parameters": trainable,
        "seconds": run.seconds(),
    }
    publish(run, trainer, policy, evidence, evidence_line(evidence))
    return evidence


def evidence_line(e: dict) -> str:
    return (
        f"[dpo] held-out pairs: implicit-reward accuracy {e['implicit_reward_accuracy_before']:.3f} -> "
        f"{e['implicit_reward_accuracy_after']:.3f}, likelihood preference {e['preference_accuracy_before']:.3f} -> "
        f"{e['preference_accuracy_after']:.3f}" + answers_line(e)
    )
