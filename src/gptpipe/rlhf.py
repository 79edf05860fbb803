"""What every RL algorithm shares: prompts, reward-model scoring and the before/after evidence.

PPO (``gptpipe.stages.rl``) and GRPO/RLOO (``gptpipe.stages.rl_trl``) read the same prompt files, are
judged by the same frozen reward model and report the same evidence, so their numbers compare directly:
on held-out prompts, the reward model's mean score of greedy responses, their KL to the reference
(summed over response tokens, averaged over prompts) and, when rows carry an ``answer``, answer accuracy.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from gptpipe.data import chat_templates
from gptpipe.data.answers import answers_in_first_sentence
from gptpipe.data.formats import RowError
from gptpipe.data.formats import _messages as messages
from gptpipe.data.sources import load_mixture
from gptpipe.errors import UserError
from gptpipe.modeling import is_adapter, merge_adapter, merged_copy
from gptpipe.ppo.rollout import Rollout, reference_context, response_logprobs, sample, sample_with_tools
from gptpipe.rewards import load_reward_functions, weighted_sum
from gptpipe.runs import Run
from gptpipe.scoring import rank_agreement, score_ids


def prompt_rows(ds, src):
    """Prompts as message lists (a string prompt becomes one user message; without a ``prompt`` column, a
    ``messages`` conversation's turns before its first assistant turn, e.g. the tool questions of
    ``tinyworld:tools``); every other column is kept (the ``answer`` of the evidence, and whatever a reward
    function or labeler reads)."""
    column = "prompt" if "prompt" in ds.column_names else "messages"
    if column not in ds.column_names:
        raise UserError(
            f"{src.path}: no 'prompt' (or 'messages') column (columns are {ds.column_names}); map yours with "
            "`columns:`"
        )

    def to_messages(row, index):  # message lists as the conversational formats read them (content parts too)
        p = row[column]
        try:
            if isinstance(p, str):
                return {"prompt": [{"role": "user", "content": p}]}
            turns = messages(p, column)
            if column == "messages":
                turns = turns[
                    : next((i for i, m in enumerate(turns) if m["role"] == "assistant"), len(turns))
                ]
            return {"prompt": turns}
        except RowError as e:
            raise UserError(f"{src.path}: row {index}: {e}") from None

    return ds.map(to_messages, with_indices=True, desc="reading prompts")


def judged_prompts(cfg) -> dict:
    """The whole assistant's other held-out prompts, each set its first ``eval_prompts``: ``generalization``
    (``generalization_datasets``: the skill in a phrasing no training data has) and ``retained``
    (``retained_datasets``: what the starting model could already do); only the sets the recipe names."""
    sets = {}
    for name, sources in (
        ("generalization", cfg.generalization_datasets),
        ("retained", cfg.retained_datasets),
    ):
        if sources:
            prompts = load_mixture(sources, [], seed=cfg.seed, prepare=prompt_rows)
            sets[name] = prompts.select(range(min(cfg.eval_prompts, len(prompts))))
    return sets


def measure_all(measure, heldout, judged: dict) -> dict:
    """``measure(prompts)`` on the held-out prompts (the skill trained), and on each of ``judged_prompts`` with
    its keys prefixed (``generalization_answer_accuracy``, ``retained_answer_accuracy``...)."""
    found = measure(heldout) if heldout is not None else {}
    for name, prompts in judged.items():
        found |= {f"{name}_{k}": v for k, v in measure(prompts).items()}
    return found


def reward_functions(cfg) -> list:
    """The recipe's reward functions, imported and checked before any model loads (``gptpipe.rewards``); an RL
    recipe needs them or a reward model."""
    if not cfg.reward_model and not cfg.reward_funcs:
        raise UserError(
            "reward_model is required: the reward stage's final/ folder (e.g. runs/tiny/reward/final), "
            "or reward_funcs: Python reward functions (module:function or file.py:function)"
        )
    return load_reward_functions(cfg.reward_funcs)


def merge_adapters(cfg, main_process_first, is_main: bool) -> None:
    """RL starts from plain models: a policy or reward model given as a LoRA adapter folder (an SFT or reward
    run with ``merge_lora: false``) is merged into its base once, into ``<output_dir>/merged/``, and ``cfg``
    points there. Loaded as it is, the SFT adapter was replaced by the policy's new LoRA (policy and reference
    both the bare base model) or left frozen (nothing to train), and a critic from an adapter reward model
    trained 1 of its 52 tensors."""
    for key, auto_class in (
        ("model", AutoModelForCausalLM),
        ("reward_model", AutoModelForSequenceClassification),
    ):
        path = cfg.model.name_or_path if key == "model" else cfg.reward_model
        if not path or not is_adapter(path):
            continue
        out = Path(cfg.output_dir) / "merged" / key
        with main_process_first():
            if is_main and not (out / "config.json").is_file():
                print(f"[{cfg.stage}] merging the adapter {path} into its base model: {out}")
                tmp = out.with_name(f".{out.name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                os.replace(merged_copy(path, tmp, auto_class), out)
        if key == "model":
            cfg.model = dataclasses.replace(cfg.model, name_or_path=str(out))
        else:
            cfg.reward_model = str(out)


def check_critic_tokenizer(value_init: str, tokenizer, reward_tokenizer, reward_model: str) -> None:
    """``value_init: reward`` makes the critic a copy of the reward model that reads the *policy's* token ids:
    with another vocabulary it would read nonsense. (The reward model itself reads re-rendered text.)"""
    if value_init == "reward" and tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        raise UserError(
            f"value_init: reward starts the critic from {reward_model}, whose tokenizer differs from the "
            "policy's, but the critic reads the policy's token ids. Use value_init: policy (the critic starts "
            "from the policy, head at zero), or a reward model trained from the same base"
        )


def encode_prompts(tokenizer, prompts: list[list[dict]], tools: list[dict] | None = None) -> list[list[int]]:
    """Each prompt rendered with the chat template (and the ``tools`` schemas it shows the model), ending with
    the assistant's turn opened."""
    return [
        tokenizer.apply_chat_template(
            p, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for p in prompts
    ]


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at the template's end of turn or at EOS."""
    end = tokenizer.convert_tokens_to_ids(chat_templates.end_of_turn_token(tokenizer))
    return sorted({end, tokenizer.eos_token_id})


def response_ids(rollout: Rollout) -> list[list[int]]:
    """Each response's valid tokens (up to and including its end of turn; with tools, the model's own turns)."""
    return [
        ids[mask.bool()].tolist() for ids, mask in zip(rollout.responses, rollout.response_mask, strict=True)
    ]


def decode_responses(tokenizer, rollout: Rollout, ids: list[list[int]] | None = None) -> list[str]:
    """Each reply's text from its valid tokens only (with tools, the last turn's: the answer). Filling the
    positions after the end of turn with id 0 instead, and decoding those, adds a "!" per position with
    Llama 3's, Qwen2's or GPT-2's tokenizers, where id 0 is an ordinary token."""
    if ids is None:
        ids = rollout.final_turns if rollout.final_turns is not None else response_ids(rollout)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def reward_scorer(reward_model, reward_tokenizer, tokenizer, functions=(), weights=None):
    """``scorer(batch)(rollout)``: each response's reward, from a batch of dataset rows (``{"prompt": [...],
    column: [...]}``): the reward model's score and each reward function's (``gptpipe.rewards``), weighted.

    For the reward model the response is decoded and the conversation re-rendered with its own chat template,
    so a reward model with a different tokenizer or template scores what it was trained on. ``scorer.values``
    holds each reward's values from the last call (the reward model's as ``reward_model``), ``scorer.means``
    their batch means (logged as ``rewards/<name>``).
    """

    def for_batch(batch: dict):
        messages = batch["prompt"]

        def score(rollout: Rollout) -> torch.Tensor:
            completion_ids = response_ids(rollout)
            replies = [r.strip() for r in decode_responses(tokenizer, rollout)]
            per, names = [], []
            if reward_model is not None:  # with tools: the calls and results, then the answer
                turns = rollout.turns or [[] for _ in replies]
                convs = [
                    m + t + [{"role": "assistant", "content": r}]
                    for m, t, r in zip(messages, turns, replies, strict=True)
                ]
                ids = [
                    reward_tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
                    for c in convs
                ]
                per.append(score_ids(reward_model, ids, reward_tokenizer.pad_token_id))
                names.append("reward_model")
            columns = {k: v for k, v in batch.items() if k not in ("prompt", "completion", "completion_ids")}
            completions = [[{"role": "assistant", "content": r}] for r in replies]
            for fn in functions:
                per.append(
                    fn(prompts=messages, completions=completions, completion_ids=completion_ids, **columns)
                )
                names.append(fn.__name__)
            scorer.values = dict(zip(names, per, strict=True))
            scorer.means = {
                name: sum(v for v in values if v is not None) / max(sum(v is not None for v in values), 1)
                for name, values in scorer.values.items()
            }
            return torch.tensor(weighted_sum(per, weights))

        return score

    scorer = for_batch
    scorer.means, scorer.values = {}, {}
    return scorer


@torch.no_grad()
def evaluate(
    policy,
    reference,
    tokenizer,
    heldout,
    scorer,
    max_new_tokens: int,
    batch_size: int = 64,
    tool_step=None,
    max_tool_calls: int = 3,
) -> dict:
    """Greedy responses to held-out prompts: reward-model score, KL to the reference, answer accuracy, and with
    both a reward model and answers, the reward model's agreement with the answer check (``rank_agreement``).

    ``reference=None`` means the policy is a LoRA model whose reference is the same weights, adapter off;
    ``scorer=None``: no reward (stages whose evidence is the answer check alone). ``tool_step``
    (``gptpipe.tool_use.ToolTurns``): the tools are shown and run, and the answer is the last turn.
    """
    was_training = policy.training
    policy.eval()
    tools = tool_step.toolbox.schemas if tool_step is not None else None
    prompts = encode_prompts(tokenizer, heldout["prompt"], tools)
    stop_ids = stop_token_ids(tokenizer)
    found: dict[str, float] = {"reward": 0.0, "kl": 0.0} if scorer is not None else {"kl": 0.0}
    answers, right = heldout["answer"] if "answer" in heldout.column_names else None, 0
    judged: list[tuple[float, bool]] = []  # (reward-model score, right) per reply
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        if tool_step is None:
            rollout = sample(policy, batch, tokenizer.pad_token_id, stop_ids, max_new_tokens, greedy=True)
        else:
            pad = tokenizer.pad_token_id
            rollout = sample_with_tools(
                policy, batch, tool_step, max_tool_calls, pad, stop_ids, max_new_tokens, greedy=True
            )
        if scorer is not None:
            found["reward"] += scorer(heldout[i : i + batch_size])(rollout).sum().item()
        logp, _ = response_logprobs(policy, rollout)
        with reference_context(policy, reference) as ref_model:
            ref, _ = response_logprobs(ref_model, rollout)
        found["kl"] += (logp - ref).sum().item()  # summed over tokens; averaged over prompts below
        if answers is not None:
            replies = decode_responses(tokenizer, rollout)
            ok = [
                answers_in_first_sentence(r, a)
                for r, a in zip(replies, answers[i : i + batch_size], strict=True)
            ]
            right += sum(ok)
            scores = getattr(scorer, "values", {}).get("reward_model")
            judged += zip(scores, ok, strict=True) if scores is not None else []
    policy.train(was_training)
    found = {k: v / len(prompts) for k, v in found.items()}
    if answers is not None:
        found["answer_accuracy"] = right / len(prompts)
        found["answer_prompts"] = len(prompts)  # how far the accuracy moves by chance (the card's verdict)
    agreement = rank_agreement(judged)
    return found | ({"rm_agreement": agreement} if agreement is not None else {})


def before_after(before: dict, after: dict) -> dict:
    """``{reward_before, ..., reward_after, ...}`` from the two measurements."""
    return {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()}


def publish_policy(run: Run, tmp: Path, evidence: dict, stage: str) -> None:
    """Main process, once the policy is written to ``tmp``: merge LoRA if asked, publish ``final/`` and
    ``eval.json``, print where it went and the evidence line."""
    cfg = run.cfg
    if cfg.model.lora is not None and cfg.model.merge_lora:
        tmp = merge_adapter(tmp)
    final = run.publish(tmp, evidence)
    adapter = cfg.model.lora is not None and not cfg.model.merge_lora
    print(f"[{stage}] saved {final}" + (" (LoRA adapter)" if adapter else ""))
    print(evidence_line(stage, evidence))


def evidence_line(stage: str, evidence: dict) -> str:
    """The one line a stage prints at the end: reward, KL and (when measured) accuracy before -> after."""
    line = (
        f"[{stage}] held-out reward {evidence['reward_before']:.3f} -> {evidence['reward_after']:.3f}, "
        f"KL to reference {evidence['kl_before']:.3f} -> {evidence['kl_after']:.3f}"
    )
    if "answer_accuracy_before" in evidence:
        line += f"; answer accuracy {evidence['answer_accuracy_before']:.2f} -> {evidence['answer_accuracy_after']:.2f}"
    return line + whole_assistant_line(evidence)


def whole_assistant_line(e: dict) -> str:
    """The evidence line's retained and unseen-phrasing parts, when measured."""
    parts = [
        f"{label} {e[f'{key}_before']:.2f} -> {e[f'{key}_after']:.2f}"
        for key, label in (
            ("retained_answer_accuracy", "retained"),
            ("generalization_answer_accuracy", "unseen phrasing"),
        )
        if f"{key}_before" in e
    ]
    return f" ({', '.join(parts)})" if parts else ""
