"""Pretraining stage: causal-LM training with ``transformers.Trainer`` on documents packed into blocks.

    gptpipe train recipes/tiny/pretrain.yaml
    accelerate launch -m gptpipe train recipes/tiny/pretrain.yaml   # several processes

Evidence (``eval.json``): held-out loss and perplexity before and after training, and, when the
recipe lists ``probe_datasets`` (prompt -> answer cloze rows such as ``tinyworld:probes``), the share
of facts the model completes correctly by greedy decoding — perplexity falls long before facts stick.
"""

from __future__ import annotations

from transformers import Trainer, default_data_collator, set_seed

from gptpipe import faults
from gptpipe.config import PretrainConfig
from gptpipe.data.packing import pack_documents
from gptpipe.data.prepared import part_summary, prepared
from gptpipe.data.sources import load_mixture, load_train_eval, text_row_check
from gptpipe.distributed import evaluation_before_training
from gptpipe.generation import complete
from gptpipe.modeling import build_model, count_parameters, load_tokenizer
from gptpipe.runs import Run
from gptpipe.tracking import MetricsLogger, load_callbacks, perplexity


def main(cfg: PretrainConfig, run: Run) -> dict:
    say = run.say
    tokenizer = load_tokenizer(cfg.model)
    data, _ = prepare_data(cfg, tokenizer, say)  # tokenized blocks, or read back if prepared before
    train, heldout = data["train"], data.get("eval")
    with cfg.main_process_first(desc="loading probes"):  # small: cloze prompts
        probes = (
            load_mixture(cfg.probe_datasets, ["prompt", "answer"], seed=cfg.seed)
            if cfg.probe_datasets
            else None
        )

    set_seed(cfg.seed)  # the new model's initial weights depend only on the seed
    model = build_model(cfg.model, tokenizer)
    trainable, total = count_parameters(model)
    say(f"[pretrain] {total / 1e6:.2f}M parameters; {len(train)} training blocks of {cfg.block_size} tokens")
    trainer = Trainer(
        model=model,
        args=cfg,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=[MetricsLogger(run.output_dir), *load_callbacks(cfg.callbacks)],
    )

    with evaluation_before_training(trainer):  # DeepSpeed needs help evaluating before train()
        baseline = run.baseline(lambda: measure(trainer, heldout, probes))
    if run.resume_from:
        say(f"[pretrain] resuming from {run.resume_from}")
    guard = faults.guard(trainer, cfg)  # preemption, NaN/inf, disk space: gptpipe.faults
    trainer.train(resume_from_checkpoint=run.resume_checkpoint)
    after = measure(trainer, heldout, probes)

    tmp = run.final_dir()
    trainer.save_model(str(tmp))  # model + tokenizer; every rank takes part (ZeRO-3 gathers weights here)
    trainer.accelerator.wait_for_everyone()
    evidence = {f"{k}_before": v for k, v in baseline.items()} | {f"{k}_after": v for k, v in after.items()}
    evidence |= guard.summary()  # updates dropped by on_nonfinite: skip
    evidence |= {
        "train_steps": trainer.state.global_step,
        "train_tokens": trainer.state.global_step
        * cfg.block_size
        * cfg.per_device_train_batch_size
        * cfg.gradient_accumulation_steps
        * cfg.world_size,
        # The last logged loss: HF's result.training_loss averages only the steps since a resume.
        "last_train_loss": next(
            (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None
        ),
        "parameters": total,
        "trainable_parameters": trainable,
        "seconds": run.seconds(),
    }
    if run.is_main:
        final = run.publish(tmp, evidence)
        say(f"[pretrain] saved {final}")
        say(
            f"[pretrain] held-out perplexity {evidence.get('perplexity_before', float('nan')):.2f} -> "
            f"{evidence.get('perplexity_after', float('nan')):.2f}"
            + (
                f"; fact probes {evidence['probe_accuracy_before']:.2f} -> {evidence['probe_accuracy_after']:.2f}"
                if probes is not None
                else ""
            )
        )
    trainer.accelerator.wait_for_everyone()
    return evidence


DATA_KEYS = ["datasets", "eval_datasets", "eval_split_size", "seed", "block_size"]  # gptpipe.data.prepared


def prepare(cfg: PretrainConfig) -> dict:
    """``gptpipe prepare``: the tokenized blocks alone, kept for training; returns the summary."""
    return prepare_data(cfg, load_tokenizer(cfg.model))[1]


def prepare_data(cfg: PretrainConfig, tokenizer, say=print) -> tuple[dict, dict]:
    """Documents tokenized, each ended with EOS, concatenated and cut into ``block_size`` blocks."""

    def build():
        train_docs, eval_docs = load_train_eval(cfg, ["text"], text_row_check, seed=cfg.seed)
        parts, summary = {}, {"kind": "text", "parts": {}}
        for name, docs in (("train", train_docs), ("eval", eval_docs)):
            if docs is None:
                continue
            what = "training data" if name == "train" else "eval data"
            parts[name] = pack_documents(docs, tokenizer, cfg.block_size, cfg.dataset_num_proc, what)
            summary["parts"][name] = part_summary(parts[name], len(docs), cfg.block_size, True, {})
        return parts, summary

    return prepared(cfg, tokenizer, DATA_KEYS, build, say)


def measure(trainer: Trainer, heldout, probes) -> dict:
    """Held-out loss and perplexity, and probe accuracy when probes are given."""
    found = {}
    if heldout is not None:
        step = trainer.state.global_step
        done = [
            h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == step
        ]
        loss = (
            done[-1] if done and step > 0 else trainer.evaluate()["eval_loss"]
        )  # reuse the Trainer's final eval
        found |= {"eval_loss": loss, "perplexity": perplexity(loss)}
    if probes is not None:
        found["probe_accuracy"] = probe_accuracy(trainer.model, trainer.processing_class, probes)
    return found


def probe_accuracy(model, tokenizer, probes) -> float:
    """Share of cloze prompts whose greedy continuation starts with the expected answer word."""
    answers = [c[0] for c in complete(model, tokenizer, probes["prompt"], max_new_tokens=4)]
    right = 0
    for got, expected in zip(answers, probes["answer"], strict=True):
        words = got.strip().split()
        right += bool(words) and words[0].rstrip(".,;!") == expected
    return right / len(answers)
