"""SFT stage: supervised finetuning of a base model into an assistant with ``trl.SFTTrainer``.

    gptpipe train recipes/tiny/sft.yaml
    accelerate launch -m gptpipe train recipes/tiny/sft.yaml   # several processes

Every source is converted to conversations (``gptpipe.data.formats``) and rendered with the chat
template: the tokenizer's own, or ``chat_template:`` (chatml, gptpipe or a .jinja file). The loss covers
the assistant's tokens by default (TRL's ``assistant_only_loss``), so the template must mark them;
the template's end-of-turn token is written into ``generation_config`` so generation stops there.

Evidence (``eval.json``): held-out loss before and after, and — with ``answer_datasets`` (held-out
chats with an ``answer`` field, e.g. ``tinyworld:sft`` eval) — the share of questions answered
correctly by greedy generation, before and after; with ``tools`` and ``tool_datasets`` (e.g.
``tinyworld:tools`` eval), the same questions answered with the tools offered and run and with none
(``gptpipe.tool_use``): answer accuracy both ways, the share of valid calls, calls per answer.

With ``ptx_coef`` and ``ptx_datasets``, every step also takes ``ptx_coef`` x the language-model loss on pretraining
or SFT rows (InstructGPT's ptx term, ``gptpipe.ptx_term``): a second SFT that teaches a new skill (tool calls)
keeps what the model knew (the tiny tool pipeline, seed 42: SFT's held-out questions 0.62 right -> 0.19 without it,
-> 0.68 with it).
"""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

from transformers import set_seed
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from gptpipe import faults
from gptpipe.config import SFTConfig
from gptpipe.data import chat_templates, formats
from gptpipe.data.prepared import part_summary, prepared
from gptpipe.data.sources import describe, load_mixture, load_train_eval
from gptpipe.distributed import evaluation_before_training
from gptpipe.errors import UserError
from gptpipe.generation import answer_accuracy
from gptpipe.internals import sft_prepare_dataset
from gptpipe.modeling import (
    apply_lora,
    build_model,
    count_parameters,
    load_tokenizer,
    merge_adapter,
    quantized_layers,
)
from gptpipe.ptx_term import PTXLog, ptx_data, with_ptx
from gptpipe.runs import Run
from gptpipe.sft_trainer import PadStatsSFTTrainer
from gptpipe.tool_use import TOOL_KEYS, tool_evidence, tool_line, tool_questions
from gptpipe.tools import ToolBox, load_tools
from gptpipe.tracking import MetricsLogger, eval_loss, load_callbacks, perplexity


def main(cfg: SFTConfig, run: Run) -> dict:
    say = run.say
    tokenizer, added_tokens = _tokenizer(cfg)
    data, summary = prepare_data(cfg, tokenizer, say)  # tokenized and packed, or read back if prepared before
    train, heldout = data["train"], data.get("eval")
    with cfg.main_process_first(desc="loading answer data"):  # small: held-out questions
        answers = _answers(cfg)
        tool_rows = tool_questions(cfg)
        unseen = _answers(cfg, cfg.generalization_datasets)
    toolbox = ToolBox(load_tools(cfg.tools), cfg.tool_timeout) if cfg.tools else None
    end_of_turn = (
        chat_templates.end_of_turn_token(tokenizer) if summary["kind"] != "text" else tokenizer.eos_token
    )

    set_seed(cfg.seed)
    model = build_model(cfg.model, tokenizer)
    if added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    # Generation must stop where the template ends an assistant turn (a frequent bug when they disagree).
    stop_ids = {tokenizer.convert_tokens_to_ids(end_of_turn), tokenizer.eos_token_id}
    model.generation_config.eos_token_id = sorted(stop_ids)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    new_ids = list(range(len(tokenizer) - added_tokens, len(tokenizer))) if added_tokens else None
    model = apply_lora(
        model, cfg.model, new_token_ids=new_ids
    )  # LoRA starts as a no-op (B = 0): "before" numbers are the base model's
    trainable, total = count_parameters(model)
    say(
        f"[sft] {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train; "
        f"{summary['parts']['train']['rows_in']} training {summary['kind']} rows -> {len(train)} sequences"
    )
    ptx_log: list[float] = []  # the ptx term's values since the last log (PTXLog adds their mean to the logs)
    trainer_class = PadStatsSFTTrainer
    if cfg.ptx_coef:  # what pretraining or an earlier SFT taught, kept while this one teaches something new
        size = cfg.ptx_batch_size or cfg.per_device_train_batch_size
        trainer_class = with_ptx(trainer_class, cfg, tokenizer, ptx_data(cfg), size, ptx_log)
        say(
            f"[sft] ptx term: ptx_coef {cfg.ptx_coef} on {len(trainer_class.ptx_examples)} rows, {size} per step"
        )
    with _data_prepared(cfg):
        trainer = trainer_class(
            model=model,
            args=cfg,
            train_dataset=train,
            eval_dataset=heldout,
            processing_class=tokenizer,
            callbacks=[PTXLog(ptx_log), MetricsLogger(run.output_dir), *load_callbacks(cfg.callbacks)],
        )
    with evaluation_before_training(trainer):  # DeepSpeed needs help evaluating before train()
        baseline = run.baseline(lambda: _measure(trainer, heldout, answers, tool_rows, toolbox, unseen, cfg))
    if run.resume_from:
        say(f"[sft] resuming from {run.resume_from}")
    guard = faults.guard(trainer, cfg)  # preemption, NaN/inf, disk space: gptpipe.faults
    trainer.train(resume_from_checkpoint=run.resume_checkpoint)

    after = _measure(trainer, heldout, answers, tool_rows, toolbox, unseen, cfg)
    tmp = run.final_dir()
    trainer.save_model(str(tmp))  # a full model, or the LoRA adapter; with the tokenizer
    if run.is_main:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        unwrapped.generation_config.save_pretrained(tmp)  # adapters too: chat must stop at end of turn
        if cfg.model.lora is not None and cfg.model.merge_lora:
            tmp = merge_adapter(tmp)
    trainer.accelerator.wait_for_everyone()

    evidence = _evidence(baseline, after)
    evidence |= guard.summary()  # updates dropped by on_nonfinite: skip
    evidence |= {
        "train_steps": trainer.state.global_step,
        "parameters": total,
        "trainable_parameters": trainable,
        "quantized_layers": quantized_layers(trainer.model),
        "end_of_turn_token": end_of_turn,
        "seconds": run.seconds(),
    }
    if run.is_main:
        final = run.publish(tmp, evidence)
        say(
            f"[sft] saved {final}"
            + (" (LoRA adapter)" if cfg.model.lora and not cfg.model.merge_lora else "")
        )
        line = f"[sft] held-out loss {evidence.get('eval_loss_before', float('nan')):.3f} -> {evidence.get('eval_loss_after', float('nan')):.3f}"
        if answers is not None:
            line += (
                f"; exact answers {evidence['exact_match_before']:.2f} -> {evidence['exact_match_after']:.2f}"
                f", right answer {evidence['answer_accuracy_before']:.2f} -> {evidence['answer_accuracy_after']:.2f}"
            )
        say(line)
        for example in after.get("examples", [])[:3]:
            say(f"    Q: {example['prompt']}\n    A: {example['reply']}")
        if tool_rows is not None:
            say("[sft] tools: " + tool_line(evidence))
            for example in after["tool_examples"][:2]:
                say(
                    f"    Q: {example['prompt']}\n    "
                    + "\n    ".join(example["turns"] + [f"A: {example['reply']}"])
                )
        if unseen is not None:
            say(
                "[sft] unseen phrasing, right answer: "
                f"{evidence['generalization_answer_accuracy_before']:.2f} -> "
                f"{evidence['generalization_answer_accuracy_after']:.2f}"
            )
    trainer.accelerator.wait_for_everyone()
    return evidence


# What the prepared data depends on besides the tokenizer and the source files (gptpipe.data.prepared).
DATA_KEYS = [
    "datasets",
    "eval_datasets",
    "eval_split_size",
    "seed",
    "max_length",
    "packing",
    "packing_strategy",
    "eval_packing",
    "padding_free",
    "completion_only_loss",
    "assistant_only_loss",
    "chat_template",
    "truncation_mode",
    "shuffle_dataset",
    "dataset_text_field",
    "tools",  # shown on a source's share of chats (show_tools)
]


def prepare(cfg: SFTConfig) -> dict:
    """``gptpipe prepare``: the tokenized (and packed) data alone, kept for training; returns the summary."""
    tokenizer, _ = _tokenizer(cfg)
    return prepare_data(cfg, tokenizer)[1]


def prepare_data(cfg: SFTConfig, tokenizer, say=print) -> tuple[dict, dict]:
    """Training and held-out data rendered with the chat template, tokenized with loss labels and packed,
    exactly as ``SFTTrainer`` would do it: prepared before (``gptpipe prepare``), or built now and kept."""

    def build():
        train, heldout = load_conversations(cfg)
        parts, summary = {}, {"kind": "text" if "text" in train.column_names else "messages", "parts": {}}
        packing = {
            "train": cfg.packing,
            "eval": cfg.packing if cfg.eval_packing is None else cfg.eval_packing,
        }
        for name, ds in (("train", train), ("eval", heldout)):
            if ds is None:
                continue
            parts[name] = trl_prepare(ds, tokenizer, cfg, packing[name], name)
            dropped = (
                {}
                if packing[name]
                else {"left without loss tokens by max_length": len(ds) - len(parts[name])}
            )
            summary["parts"][name] = part_summary(
                parts[name], len(ds), cfg.max_length, packing[name], dropped
            )
        return parts, summary

    return prepared(cfg, tokenizer, DATA_KEYS, build, say)


def trl_prepare(ds, tokenizer, cfg: SFTConfig, packing: bool, name: str):
    """TRL's own preparation (template, tokenization, loss labels, truncation, packing), outside the trainer.

    TRL only offers it as ``SFTTrainer._prepare_dataset``, which needs no model: it reads three attributes
    of the trainer, set here the way ``SFTTrainer.__init__`` sets them, so the rows are exactly TRL's
    (tests/test_invariants.py compares them with a trainer's own).
    """
    sample = ds[0]
    shim = SimpleNamespace(
        _tokenizer=tokenizer,
        chat_template=get_training_chat_template(tokenizer)
        if cfg.assistant_only_loss and not has_generation_markers(tokenizer.chat_template)
        else None,
        completion_only_loss=cfg.completion_only_loss
        if cfg.completion_only_loss is not None
        else "prompt" in sample and "completion" in sample,
    )
    return sft_prepare_dataset(shim, ds, tokenizer, cfg, packing, name)


@contextlib.contextmanager
def _data_prepared(cfg: SFTConfig):
    """While the trainer is built: the data is tokenized already (``prepare_data``), so it must neither prepare
    it again nor check it for the conversations it no longer holds (both read only in ``__init__``)."""
    changes = {
        "dataset_kwargs": {**(cfg.dataset_kwargs or {}), "skip_prepare_dataset": True},
        "assistant_only_loss": False,
    }
    saved = {key: getattr(cfg, key) for key in changes}
    for key, value in changes.items():
        setattr(cfg, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(cfg, key, value)


def load_conversations(cfg: SFTConfig):
    """Training and held-out data as conversations (or text) in the shape the loss needs."""
    train, heldout = load_train_eval(cfg, [], seed=cfg.seed, prepare=lambda ds, src: _convert(ds, src, cfg))
    return tuple(_shape_for_loss(ds, cfg) if ds is not None else None for ds in (train, heldout))


def _answers(cfg: SFTConfig, sources=None):
    """Held-out chats with an ``answer`` (``answer_datasets``, or the ``sources`` given), or None without them."""
    sources = cfg.answer_datasets if sources is None else sources
    if not sources:
        return None
    return load_mixture(sources, ["messages", "answer"], seed=cfg.seed)


def _tokenizer(cfg: SFTConfig):
    """The tokenizer with the recipe's chat template installed; and how many tokens that added."""
    tokenizer = load_tokenizer(cfg.model)
    added = chat_templates.install(
        tokenizer, cfg.chat_template, cfg.assistant_only_loss, _tokenizer_name(cfg)
    )
    return tokenizer, added


def _tokenizer_name(cfg: SFTConfig) -> str:
    return cfg.model.tokenizer or cfg.model.name_or_path or "(none)"


def _convert(ds, src, cfg: SFTConfig):
    fmt = src.format or ("messages" if "messages" in ds.column_names else None)
    if fmt is None:
        raise UserError(
            f"{describe(src)}: set format: to one of {', '.join(formats.FIELDS)} (columns are {ds.column_names})"
        )
    if fmt == "text" and cfg.assistant_only_loss:
        raise UserError(
            f"{describe(src)}: format text has no assistant turns; set assistant_only_loss: false to train on every token"
        )
    ds = formats.convert(ds, fmt, describe(src), cfg.dataset_num_proc)
    if src.show_tools:  # recipe.refuse_misplaced_show_tools: a conversational SFT source with tools: named
        schemas = json.dumps(ToolBox(load_tools(cfg.tools), cfg.tool_timeout).schemas)
        ds = formats.show_tools(ds, schemas, src.show_tools, cfg.seed)
    return ds


def _shape_for_loss(ds, cfg: SFTConfig):
    """Text stays text; conversations get the shape TRL's loss switch needs."""
    if "text" in ds.column_names and "messages" in ds.column_names:
        raise UserError("datasets: cannot mix format text with conversational sources in one SFT run")
    if "messages" in ds.column_names and cfg.completion_only_loss:
        return ds.map(
            formats.split_last_turn, remove_columns=["messages"], desc="splitting off the final reply"
        )
    return ds


def _measure(trainer, heldout, answers, tool_rows, toolbox, unseen, cfg: SFTConfig) -> dict:
    """Held-out loss and, with answer_datasets, greedy answer accuracy; with tool_datasets, tool use; with
    generalization_datasets, the answers in the unseen phrasing (the tools offered when the recipe has them)."""
    model, tokenizer = trainer.model, trainer.processing_class
    found = {"eval_loss": eval_loss(trainer)} if heldout is not None else {}
    if answers is not None:
        found |= answer_accuracy(model, tokenizer, list(answers), cfg.answer_max_new_tokens)
    tool_args = (toolbox, cfg.max_tool_calls, cfg.tool_eval_max_new_tokens)
    if tool_rows is not None:
        found |= tool_evidence(model, tokenizer, tool_rows, *tool_args)
    # what SFT taught, asked again with the tools shown, as RL asks it
    if answers is not None and toolbox is not None:
        shown = tool_evidence(model, tokenizer, list(answers), *tool_args, without_tools=False)
        found["tools_shown_answer_accuracy"] = shown["tool_answer_accuracy"]
        found["tools_shown_calls_per_answer"] = shown["tool_calls_per_answer"]  # a call here is a wrong turn
    if unseen is not None and toolbox is not None:  # and whether the model calls a tool when so asked
        use = tool_evidence(model, tokenizer, list(unseen), *tool_args, without_tools=False)
        found["generalization_answer_accuracy"] = use["tool_answer_accuracy"]
        found["generalization_tool_calls_per_answer"] = use["tool_calls_per_answer"]
    elif unseen is not None:
        found["generalization_answer_accuracy"] = answer_accuracy(
            model, tokenizer, list(unseen), cfg.answer_max_new_tokens
        )["answer_accuracy"]
    return found


def _evidence(before: dict, after: dict) -> dict:
    evidence = {}
    keys = ("eval_loss", "exact_match", "answer_accuracy", *TOOL_KEYS)
    keys += ("generalization_answer_accuracy", "generalization_tool_calls_per_answer")
    keys += ("tools_shown_answer_accuracy", "tools_shown_calls_per_answer", "tool_questions")
    for key in keys:
        if key in before:
            evidence[f"{key}_before"] = before[key]
        if key in after:
            evidence[f"{key}_after"] = after[key]
    if "eval_loss_after" in evidence:
        evidence["perplexity_after"] = perplexity(evidence["eval_loss_after"])
    for key in ("examples", "tool_failures", "tool_examples"):
        if key in after:
            evidence[f"{key}_after"] = after[key]
    return evidence
