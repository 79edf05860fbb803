"""RL stage: PPO against a frozen reward model (gptpipe's own trainer, see ``gptpipe.ppo``).

    gptpipe train recipes/tiny/rl.yaml

The policy starts from the SFT model; the reference is the same SFT model, frozen; the critic starts
from the reward model (``value_init: reward``). Each iteration samples responses for a batch of prompts,
scores prompt + response with the reward model (re-rendered with the reward model's own chat template),
and runs PPO epochs. Checkpoints hold everything a run needs to continue bit for bit: both models, both
optimizers, the KL controller, the RNG states and the step (the data order is a function of seed and step).

Evidence (``eval.json``): on held-out prompts, the reward model's mean score of greedy responses, their
KL to the reference and (with an ``answer`` column) answer accuracy, before and after.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, TrainerControl, TrainerState, set_seed

from gptpipe.config import RLConfig
from gptpipe.data import chat_templates
from gptpipe.data.sources import load_train_eval
from gptpipe.errors import UserError
from gptpipe.generation import answers_in_first_sentence
from gptpipe.modeling import build_model, load_for_inference, load_tokenizer
from gptpipe.ppo.iteration import PPOSettings, ppo_iteration
from gptpipe.ppo.kl import AdaptiveKLController, FixedKLController
from gptpipe.ppo.rollout import response_logprobs, sample
from gptpipe.ppo.value import build_value_model
from gptpipe.runs import final_tmp_dir, measured_once, prepare_run_dir, publish_final, write_json_atomic
from gptpipe.scoring import score_ids
from gptpipe.tracking import append_metrics, load_callbacks, truncate_metrics


def main(cfg: RLConfig) -> dict:
    start = time.time()
    out = Path(cfg.output_dir)
    if cfg.algorithm != "ppo":
        raise UserError(f"algorithm: {cfg.algorithm!r} is not available yet; use ppo")
    if not cfg.reward_model:
        raise UserError(
            "reward_model is required: the reward stage's final/ folder (e.g. runs/tiny/reward/final)"
        )
    if cfg.max_steps <= 0:
        raise UserError("max_steps: set the number of PPO iterations (e.g. max_steps: 60)")
    if cfg.world_size > 1:
        raise UserError("the PPO stage runs in one process for now; launch it without accelerate/torchrun")
    resume_from = prepare_run_dir(cfg)

    tokenizer = load_tokenizer(cfg.model)
    chat_templates.install(tokenizer, cfg.chat_template, False, cfg.model.tokenizer or cfg.model.name_or_path)
    train, heldout = load_train_eval(cfg, [], seed=cfg.seed, prepare=_prompt_rows)
    if heldout is None:
        raise UserError("eval_datasets: PPO needs held-out prompts for its evidence (or set eval_split_size)")
    heldout = heldout.select(range(min(cfg.eval_prompts, len(heldout))))
    train_prompts = _encode(tokenizer, train["prompt"])
    stop_ids = sorted(
        {tokenizer.convert_tokens_to_ids(chat_templates.end_of_turn_token(tokenizer)), tokenizer.eos_token_id}
    )

    set_seed(cfg.seed)
    reference = build_model(cfg.model, tokenizer).eval().requires_grad_(False)
    if resume_from:  # the policy and critic continue from the checkpoint; the reference stays the SFT model
        policy = build_model(
            dataclasses.replace(cfg.model, name_or_path=str(resume_from / "policy")), tokenizer
        )
        critic = build_value_model(str(resume_from / "critic"), "checkpoint")
    else:
        policy = build_model(cfg.model, tokenizer)
        source = cfg.reward_model if cfg.value_init == "reward" else cfg.model.name_or_path
        critic = build_value_model(
            str(Path(source).resolve()) if Path(source).exists() else source, cfg.value_init
        )
    reward_model, reward_tokenizer = load_for_inference(cfg.reward_model, AutoModelForSequenceClassification)
    reward_model.requires_grad_(False)
    for model in (policy, reference, critic, reward_model):  # dropout off: the first PPO ratio must be 1
        model.eval()

    def scorer(messages: list[list[dict]]):
        def score(rollout) -> torch.Tensor:
            replies = tokenizer.batch_decode(
                rollout.responses * rollout.response_mask, skip_special_tokens=True
            )
            # Re-render with the reward model's own template: its tokenizer may differ from the policy's.
            convs = [
                m + [{"role": "assistant", "content": r.strip()}]
                for m, r in zip(messages, replies, strict=True)
            ]
            ids = [
                reward_tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
                for c in convs
            ]
            return torch.tensor(score_ids(reward_model, ids, reward_tokenizer.pad_token_id))

        return score

    policy_opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    critic_opt = torch.optim.AdamW(
        critic.parameters(), lr=cfg.value_learning_rate or cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.kl_target
        else FixedKLController(cfg.kl_coef)
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    settings = PPOSettings(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        ppo_epochs=cfg.ppo_epochs,
        minibatches=cfg.num_minibatches,
        clip=cfg.cliprange,
        value_clip=cfg.cliprange_value,
        gamma=cfg.gamma,
        lam=cfg.lam,
        kl_estimator=cfg.kl_estimator,
        missing_eos_penalty=cfg.missing_eos_penalty,
        max_grad_norm=cfg.max_grad_norm,
    )

    def measure() -> dict:
        return evaluate(policy, reference, tokenizer, heldout, scorer, stop_ids, cfg)

    baseline = measured_once(out / "baseline.json", measure)
    step = 0
    if resume_from:
        step = _load_checkpoint(resume_from, policy_opt, critic_opt, kl_ctl, generator)
        truncate_metrics(out, step)
        print(f"[rl] resuming from {resume_from}")
    print(
        f"[rl] PPO: {len(train_prompts)} prompts, {cfg.per_device_train_batch_size} per iteration, {cfg.max_steps} iterations"
    )

    callbacks = load_callbacks(cfg.callbacks)
    state, control = TrainerState(), TrainerControl()
    batch_size = cfg.per_device_train_batch_size
    while step < cfg.max_steps:
        rows = batch_rows(len(train_prompts), batch_size, step, cfg.seed)
        stats = ppo_iteration(
            policy,
            reference,
            critic,
            scorer([train["prompt"][i] for i in rows]),
            [train_prompts[i] for i in rows],
            tokenizer.pad_token_id,
            stop_ids,
            policy_opt,
            critic_opt,
            kl_ctl,
            settings,
            generator,
        )
        step += 1
        state.global_step = step
        for cb in callbacks:
            cb.on_step_end(cfg, state, control)
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            append_metrics(out, {"step": step, **stats})
            print(
                f"[rl] step {step}: reward {stats['reward']:.3f}, kl {stats['kl']:.3f}, entropy {stats['entropy']:.3f}"
            )
        if cfg.save_steps and step % int(cfg.save_steps) == 0 and step < cfg.max_steps:
            _save_checkpoint(
                out,
                step,
                policy,
                critic,
                tokenizer,
                policy_opt,
                critic_opt,
                kl_ctl,
                generator,
                cfg.save_total_limit,
            )

    after = measure()
    evidence = {f"{k}_before": v for k, v in baseline.items()} | {f"{k}_after": v for k, v in after.items()}
    evidence |= {"train_steps": step, "kl_coef_final": kl_ctl.beta, "seconds": round(time.time() - start, 1)}
    tmp = final_tmp_dir(out)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    policy.generation_config.save_pretrained(tmp)
    final = publish_final(tmp, out)
    write_json_atomic(out / "eval.json", evidence)
    print(f"[rl] saved {final}")
    line = f"[rl] held-out reward {evidence['reward_before']:.3f} -> {evidence['reward_after']:.3f}, KL to reference {evidence['kl_before']:.3f} -> {evidence['kl_after']:.3f}"
    if "answer_accuracy_before" in evidence:
        line += f"; answer accuracy {evidence['answer_accuracy_before']:.2f} -> {evidence['answer_accuracy_after']:.2f}"
    print(line)
    return evidence


def batch_rows(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The prompts of iteration ``step``: a pure function of the seed and the step (exact resume needs it)."""
    rows = []
    first = step * batch_size
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(int(order[offset]))
    return rows


@torch.no_grad()
def evaluate(policy, reference, tokenizer, heldout, scorer, stop_ids, cfg: RLConfig) -> dict:
    """Greedy responses to held-out prompts: reward-model score, KL to the reference, answer accuracy."""
    prompts = _encode(tokenizer, heldout["prompt"])
    found: dict[str, float] = {"reward": 0.0, "kl": 0.0}
    answers, right = heldout["answer"] if "answer" in heldout.column_names else None, 0
    for i in range(0, len(prompts), 64):
        rollout = sample(
            policy, prompts[i : i + 64], tokenizer.pad_token_id, stop_ids, cfg.max_new_tokens, greedy=True
        )
        found["reward"] += scorer(heldout["prompt"][i : i + 64])(rollout).sum().item()
        logp, _ = response_logprobs(policy, rollout)
        ref, _ = response_logprobs(reference, rollout)
        found["kl"] += (logp - ref).sum().item()  # sum over tokens, then mean over samples below
        if answers is not None:
            replies = tokenizer.batch_decode(
                rollout.responses * rollout.response_mask, skip_special_tokens=True
            )
            right += sum(
                answers_in_first_sentence(r, a) for r, a in zip(replies, answers[i : i + 64], strict=True)
            )
    found = {k: v / len(prompts) for k, v in found.items()}
    if answers is not None:
        found["answer_accuracy"] = right / len(prompts)
    return found


def _prompt_rows(ds, src):
    """Prompts as message lists (a string prompt becomes one user message); keep ``answer`` when present."""
    if "prompt" not in ds.column_names:
        raise UserError(
            f"{src.path}: no 'prompt' column (columns are {ds.column_names}); map yours with `columns:`"
        )

    def to_messages(row):
        p = row["prompt"]
        return {"prompt": [{"role": "user", "content": p}] if isinstance(p, str) else p}

    keep = [c for c in ("prompt", "answer") if c in ds.column_names]
    return ds.select_columns(keep).map(to_messages, desc="reading prompts")


def _encode(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        for p in prompts
    ]


def _save_checkpoint(
    out, step, policy, critic, tokenizer, policy_opt, critic_opt, kl_ctl, generator, limit
) -> None:
    """Everything needed to continue bit for bit; ``trainer_state.json`` goes last and marks it complete."""
    folder = out / f"checkpoint-{step}"
    if folder.exists():
        shutil.rmtree(folder)
    policy.save_pretrained(folder / "policy")
    tokenizer.save_pretrained(folder / "policy")
    critic.save_pretrained(folder / "critic")
    torch.save(
        {"policy": policy_opt.state_dict(), "critic": critic_opt.state_dict()}, folder / "optimizers.pt"
    )
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": generator.get_state()}
    torch.save(rng, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(
        json.dumps({"global_step": step, "kl_controller": kl_ctl.state_dict()})
    )
    if limit:
        older = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p != folder)
        for _, path in older[: max(0, len(older) - (limit - 1))]:
            shutil.rmtree(path)


def _load_checkpoint(folder: Path, policy_opt, critic_opt, kl_ctl, generator) -> int:
    state = json.loads((folder / "trainer_state.json").read_text())
    optimizers = torch.load(folder / "optimizers.pt", weights_only=False)
    policy_opt.load_state_dict(optimizers["policy"])
    critic_opt.load_state_dict(optimizers["critic"])
    kl_ctl.load_state_dict(state["kl_controller"])
    rng = torch.load(folder / "rng_state.pth", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    generator.set_state(rng["generator"])
    return state["global_step"]
