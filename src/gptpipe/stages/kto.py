"""KTO stage: preference optimization from unpaired replies labeled desirable or not, with ``trl.KTOTrainer``.

    gptpipe train recipes/tiny/kto.yaml

Data: rows of format ``unpaired`` (``prompt``, ``completion``, ``label``), or comparisons in any format the reward
stage reads, each pair split into its chosen (desirable) and rejected (undesirable) reply (TRL's
``unpair_preference_dataset``; ``gptpipe.data.preferences.convert_unpaired``). The policy starts from the SFT
model and the frozen reference is the SFT model (with ``model.lora``, the adapter disabled). The recipe is a
``trl.KTOConfig`` (``beta``, ``desirable_weight``, ``undesirable_weight``...).

Evidence (``eval.json``, ``gptpipe.likelihood``), before and after: on held-out labeled replies, how often the
implicit reward ranks a desirable reply above an undesirable one (over all such pairs; 0.5 before) and the mean
reward of desirable and undesirable replies; when the held-out data are comparisons, also DPO's figures on
them (the implicit reward ranking each pair's chosen reply first); with ``prompt_datasets``, answer accuracy and KL to the reference as the RL and DPO stages measure them.
"""

from __future__ import annotations

from transformers import set_seed
from trl import KTOTrainer

from gptpipe.config import KTOConfig
from gptpipe.data import chat_templates, preferences
from gptpipe.data.sources import describe, load_train_eval
from gptpipe.likelihood import label_accuracy, preference_accuracy
from gptpipe.modeling import count_parameters, load_tokenizer
from gptpipe.preference import (
    answers_line,
    heldout_pairs,
    heldout_prompts,
    publish,
    starting_policy,
    train_measured,
)
from gptpipe.runs import Run
from gptpipe.tracking import MetricsLogger, load_callbacks

HELDOUT_FRACTION = 0.05  # held out for the evidence when the recipe names no eval data (as the reward stage)


def main(cfg: KTOConfig, run: Run) -> dict:
    if not cfg.eval_datasets and cfg.eval_split_size == 0:
        cfg.eval_split_size = HELDOUT_FRACTION
    tokenizer = load_tokenizer(cfg.model)
    chat_templates.install(tokenizer, cfg.chat_template, False, cfg.model.tokenizer or cfg.model.name_or_path)

    def unpaired(ds, src):
        return preferences.convert_unpaired(
            ds, src.format, describe(src), cfg.invalid_pairs, cfg.dataset_num_proc
        )

    with cfg.main_process_first(desc="preparing labeled replies"):
        train, heldout = load_train_eval(cfg, [], seed=cfg.seed, prepare=unpaired)
        pairs = heldout_pairs(cfg)  # held-out comparisons: also DPO's pair accuracy, to set KTO beside DPO
        prompts = heldout_prompts(cfg)
    # KTO's sampler is sequential (each reply's KL completion is its batch neighbour's), so the data order is
    # the training order: shuffled here, or comparisons split in two train on every chosen reply first.
    train = train.shuffle(seed=cfg.seed)
    desirable = sum(train["label"])

    set_seed(cfg.seed)
    policy = starting_policy(cfg, tokenizer)
    trainable, total = count_parameters(policy)
    run.say(
        f"[kto] {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train; {len(train)} replies, "
        f"{desirable} desirable"
    )
    trainer = KTOTrainer(
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
        lambda m, ref: (
            label_accuracy(m, ref, tokenizer, heldout, cfg.beta, cfg.max_length)
            | (
                preference_accuracy(m, ref, tokenizer, pairs, cfg.beta, cfg.max_length)
                if pairs is not None
                else {}
            )
        ),
    )
    evidence |= {
        "train_replies": len(train),
        "train_desirable": desirable,
        "heldout_replies": len(heldout),
        "parameters": total,
        "trainable_parameters": trainable,
        "seconds": run.seconds(),
    }
    line = (
        f"[kto] held-out replies: desirable ranked above undesirable by the implicit reward "
        f"{evidence['implicit_reward_ranking_before']:.3f} -> {evidence['implicit_reward_ranking_after']:.3f}"
        + (
            f", chosen over rejected {evidence['implicit_reward_accuracy_before']:.3f} -> "
            f"{evidence['implicit_reward_accuracy_after']:.3f}"
            if pairs is not None
            else ""
        )
        + answers_line(evidence)
    )
    publish(run, trainer, policy, evidence, line)
    return evidence
