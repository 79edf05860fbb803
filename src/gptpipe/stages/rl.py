"""RL stage: PPO against a frozen reward model (gptpipe's own trainer, see ``gptpipe.ppo``).

    gptpipe train recipes/tiny/rl.yaml
    accelerate launch --multi_gpu --num_processes 8 -m gptpipe train recipes/smollm2/rl.yaml   # DDP

(``algorithm: grpo | rloo`` recipes run TRL's trainers instead: ``gptpipe.stages.rl_trl``.)

The policy starts from the SFT model; the reference is the same SFT model, frozen (with ``model.lora``,
the policy's own weights with the adapter disabled: no second copy); the critic starts from the reward
model (``value_init: reward``). Each iteration samples responses for a batch of prompts, scores
prompt + response with the reward model (re-rendered with the reward model's own chat template), and runs
PPO epochs. Under several processes each one rolls out ``per_device_train_batch_size`` prompts and DDP
averages the gradients. Under DeepSpeed (ZeRO-2/3) the policy and the critic train as one engine
(``gptpipe.ppo.iteration.PolicyAndCritic``); the frozen reference and reward model stay whole on every
process (no gradients or optimizer states: 2 bytes/parameter in bf16). Checkpoints hold everything a run needs to continue bit for bit: both models,
both optimizers, the KL controller, every process's RNG states and the step (the data order is a
function of seed and step).

Evidence (``eval.json``, see ``gptpipe.rlhf``): on held-out prompts, the reward model's mean score of
greedy responses, their KL to the reference and (with an ``answer`` column) answer accuracy, before and after.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import AutoModelForSequenceClassification, TrainerControl, TrainerState, set_seed

from gptpipe import faults
from gptpipe.config import ModelConfig, RLConfig
from gptpipe.data import chat_templates
from gptpipe.data.sources import load_train_eval
from gptpipe.errors import UserError
from gptpipe.modeling import apply_lora, build_model, load_for_inference, load_tokenizer
from gptpipe.ppo.checkpoint import PPOState, batch_rows, load_checkpoint, save_checkpoint
from gptpipe.ppo.engine import (
    adam_settings,
    adamw_class,
    build_accelerator,
    build_schedulers,
    fill_deepspeed_config,
    fp32_masters,
    in_dtype,
    state_dicts,
)
from gptpipe.ppo.iteration import NonFiniteUpdate, PolicyAndCritic, PPOSettings, for_generation, ppo_iteration
from gptpipe.ppo.kl import AdaptiveKLController, FixedKLController
from gptpipe.ppo.value import build_value_model
from gptpipe.rlhf import (
    before_after,
    encode_prompts,
    evaluate,
    merge_adapters,
    prompt_rows,
    publish_policy,
    reward_scorer,
    stop_token_ids,
)
from gptpipe.runs import Run, last_checkpoint, mark_complete, rotate_checkpoints
from gptpipe.tracking import StepLogger, load_callbacks, truncate_metrics


def main(cfg: RLConfig, run: Run) -> dict:
    out, resume_from = run.output_dir, run.resume_from
    if not cfg.reward_model:
        raise UserError(
            "reward_model is required: the reward stage's final/ folder (e.g. runs/tiny/reward/final)"
        )
    if cfg.max_steps <= 0:
        raise UserError("max_steps: set the number of PPO iterations (e.g. max_steps: 60)")
    if cfg.top_p < 1:
        run.say(
            f"[rl] warning: top_p {cfg.top_p} samples from a truncated distribution while PPO's log-probs are "
            "the whole policy's: the updates are off-policy (the first ratio is not 1). top_p: 1.0 avoids it."
        )
    accelerator = build_accelerator(cfg)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    zero3 = deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3
    if deepspeed:
        fill_deepspeed_config(accelerator, cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    say = run.say
    merge_adapters(cfg, accelerator.main_process_first, is_main)

    tokenizer = load_tokenizer(cfg.model)
    chat_templates.install(tokenizer, cfg.chat_template, False, cfg.model.tokenizer or cfg.model.name_or_path)
    with accelerator.main_process_first():
        train, heldout = load_train_eval(cfg, [], seed=cfg.seed, prepare=prompt_rows)
    if heldout is None:
        raise UserError("eval_datasets: PPO needs held-out prompts for its evidence (or set eval_split_size)")
    heldout = heldout.select(range(min(cfg.eval_prompts, len(heldout))))
    train_prompts = encode_prompts(tokenizer, train["prompt"])
    stop_ids = stop_token_ids(tokenizer)

    set_seed(cfg.seed)
    policy, reference = _policy_and_reference(cfg, tokenizer, resume_from)
    critic = _critic(cfg, resume_from)
    reward_model, reward_tokenizer = load_for_inference(
        cfg.reward_model, AutoModelForSequenceClassification, cfg.reward_quantization
    )
    reward_model.requires_grad_(False)
    for model in (policy, reference, critic, reward_model):  # dropout off: the first PPO ratio must be 1
        if model is not None:
            model.eval()
    if zero3:  # ZeRO-3 loaded the frozen models sharded: they run as DeepSpeed inference engines
        from trl.models.utils import prepare_deepspeed

        reward_model = prepare_deepspeed(reward_model, accelerator)
        reference = prepare_deepspeed(reference, accelerator) if reference is not None else None
    scorer = reward_scorer(reward_model.to(accelerator.device), reward_tokenizer, tokenizer)
    if reference is not None:
        reference.to(accelerator.device)

    final_dtype = torch.float32
    if not deepspeed:  # DeepSpeed keeps its own fp32 masters
        final_dtype = fp32_masters(policy) if cfg.model.lora is None else torch.float32
        fp32_masters(critic)
    trainable = {
        "policy": [p for p in policy.parameters() if p.requires_grad],
        "critic": [p for p in critic.parameters() if p.requires_grad],
    }
    lrs = {"policy": cfg.learning_rate, "critic": cfg.value_learning_rate or cfg.learning_rate}
    engine = None
    if deepspeed:  # one engine: one module, one optimizer with a parameter group per model
        groups = [{"params": trainable[k], "lr": lrs[k]} for k in ("policy", "critic")]
        optimizer = adamw_class(cfg)(groups, **adam_settings(cfg))
        schedulers = build_schedulers(cfg, [optimizer])  # one: each parameter group keeps its own base lr
        engine, policy_opt = accelerator.prepare(PolicyAndCritic(policy, critic), optimizer)
        policy, critic, critic_opt = engine.module.policy, engine.module.critic, None
    else:
        policy_opt, critic_opt = (
            adamw_class(cfg)(trainable[k], lr=lrs[k], **adam_settings(cfg)) for k in ("policy", "critic")
        )
        schedulers = build_schedulers(cfg, [policy_opt, critic_opt])
        policy, policy_opt, critic, critic_opt = accelerator.prepare(policy, policy_opt, critic, critic_opt)
    bare_policy = accelerator.unwrap_model(policy)
    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.kl_target
        else FixedKLController(cfg.kl_coef)
    )
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    set_seed(cfg.seed + rank)  # each process samples its own responses
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
        missing_eos_score=cfg.missing_eos_score,
        missing_eos_penalty=cfg.missing_eos_penalty,
        reward_clip=cfg.reward_clip,
        whiten_rewards=cfg.whiten_rewards,
        max_grad_norm=cfg.max_grad_norm,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        skip_nonfinite=cfg.on_nonfinite == "skip",
    )
    if settings.skip_nonfinite and engine is not None:
        raise UserError(
            "on_nonfinite: skip is not available for PPO under DeepSpeed (the engine applies each update "
            "inside backward); use on_nonfinite: stop"
        )

    def measure() -> dict:  # every process measures; the main one writes
        if engine is None:
            return evaluate(bare_policy, reference, tokenizer, heldout, scorer, cfg.max_new_tokens)
        with for_generation(engine, accelerator) as whole:  # ZeRO-3: the weights gathered, hooks off
            return evaluate(whole.policy, reference, tokenizer, heldout, scorer, cfg.max_new_tokens)

    baseline = run.baseline(measure)
    step = 0
    ppo_state = PPOState(
        bare_policy,
        accelerator.unwrap_model(critic),
        policy_opt,
        critic_opt,
        kl_ctl,
        generator,
        schedulers,
        engine,
    )
    if resume_from:
        step = load_checkpoint(resume_from, rank, ppo_state)
        if is_main:
            truncate_metrics(out, step)
        say(f"[rl] resuming from {resume_from}")
    batch_size = cfg.per_device_train_batch_size
    say(
        f"[rl] PPO: {len(train_prompts)} prompts, {batch_size * world} per iteration "
        f"({world} process{'es' if world > 1 else ''}), {cfg.max_steps} iterations"
        + (", LoRA policy (reference = adapter disabled)" if reference is None else "")
    )

    callbacks = load_callbacks(cfg.callbacks)
    logger = StepLogger(cfg, is_main)
    state, control = TrainerState(), TrainerControl()
    models = (bare_policy, accelerator.unwrap_model(critic))
    optimizers = (policy_opt, critic_opt)

    def save(step: int) -> None:
        """A checkpoint, complete or invisible: disk space checked first, the marker written last, older
        checkpoints rotated only then."""
        previous = last_checkpoint(out)
        needed = (
            faults.folder_bytes(previous)
            if previous
            else sum(faults.tensors_bytes(m, o, world) for m, o in zip(models, optimizers, strict=True))
        )
        faults.ensure_disk_space("rl", out, needed, f"checkpoint-{step}", out, accelerator.device)
        folder = save_checkpoint(out, step, ppo_state, tokenizer, accelerator)
        for cb in callbacks:
            cb.on_save(cfg, state, control)
        accelerator.wait_for_everyone()
        if is_main:
            mark_complete(folder, step, world)
            rotate_checkpoints(out, cfg.save_total_limit)
        accelerator.wait_for_everyone()  # no process moves on (or exits) before the checkpoint counts

    stop = faults.StopSignals().install()
    faults.record_batch_shapes(bare_policy)
    skipped = faults.skipped_steps(out, step)
    try:
        while step < cfg.max_steps:
            rows = batch_rows(len(train_prompts), batch_size * world, step, cfg.seed)
            rows = rows[rank * batch_size : (rank + 1) * batch_size]
            try:
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
                    accelerator=accelerator if world > 1 or engine is not None else None,
                    engine=engine,
                )
            except NonFiniteUpdate as e:
                raise faults.nonfinite_error("rl", step + 1, e.what, out) from None
            stats["learning_rate"] = schedulers[0].get_last_lr()[0]  # the policy's, this iteration
            for scheduler in schedulers:
                scheduler.step()
            step += 1
            state.global_step = step
            for cb in callbacks:
                cb.on_step_end(cfg, state, control)
            if "skipped_nonfinite" in stats:
                skipped += 1
                print(
                    f"[rl] step {step}: NaN/inf, {stats['skipped_nonfinite']:.0f} update(s) skipped",
                    file=sys.stderr,
                )
                if is_main:
                    logger.log({"step": step, **stats})
                if skipped > cfg.max_skipped_steps:
                    raise faults.nonfinite_error("rl", step, "an update", out, skipping=True)
            elif (step % cfg.logging_steps == 0 or step == cfg.max_steps) and is_main:
                logger.log({"step": step, **stats})
                print(
                    f"[rl] step {step}: reward {stats['reward']:.3f}, kl {stats['kl']:.3f}, entropy {stats['entropy']:.3f}"
                )
            preempted = stop.agreed(accelerator.device)  # every process stops after the same iteration
            if preempted or (cfg.save_steps and step % int(cfg.save_steps) == 0 and step < cfg.max_steps):
                save(step)
            if preempted:
                raise faults.preempted("rl", step, out, stop.received, cfg.slurm_requeue, is_main)
    finally:
        stop.uninstall()

    after = measure()
    evidence = before_after(baseline, after)
    evidence |= {"skipped_nonfinite_steps": skipped} if settings.skip_nonfinite else {}
    evidence |= {
        "train_steps": step,
        "world_size": world,
        "kl_coef_final": kl_ctl.beta,
        "seconds": run.seconds(),
    }
    faults.ensure_disk_space("rl", out, faults.tensors_bytes(bare_policy), "final/", out, accelerator.device)
    tmp = run.final_dir()
    policy_state, _ = state_dicts(accelerator, engine)  # collective under ZeRO-3
    if engine is None:  # trained on fp32 masters: final/ in the dtype the policy was loaded in
        policy_state = in_dtype(bare_policy, final_dtype)
    if is_main:
        bare_policy.save_pretrained(tmp, state_dict=policy_state)  # a full model, or the LoRA adapter
        tokenizer.save_pretrained(tmp)
        bare_policy.generation_config.save_pretrained(tmp)
        publish_policy(run, tmp, evidence, "rl")
    logger.finish()
    accelerator.wait_for_everyone()
    return evidence


def _critic(cfg: RLConfig, resume_from: Path | None):
    """The value model: from the reward model or the policy (``value_init``), optionally as LoRA adapters
    with the score head trained in full; on resume, the checkpoint's weights (or adapters)."""
    source = cfg.reward_model if cfg.value_init == "reward" else cfg.model.name_or_path
    source = str(Path(source).resolve()) if Path(source).exists() else source
    if resume_from and cfg.value_lora is None:
        return build_value_model(str(resume_from / "critic"), "checkpoint")
    critic = build_value_model(source, cfg.value_init)
    if cfg.value_lora is None:
        return critic
    if resume_from:
        from peft import PeftModel

        return PeftModel.from_pretrained(critic, resume_from / "critic", is_trainable=True)
    head = "score" if hasattr(critic, "score") else "classifier"
    lora = dataclasses.replace(cfg.value_lora, modules_to_save=[head])
    return apply_lora(critic, ModelConfig(lora=lora), task_type="TOKEN_CLS")


def _policy_and_reference(cfg: RLConfig, tokenizer, resume_from: Path | None):
    """(policy, reference). With LoRA the reference is None: the policy with its adapter disabled."""
    if cfg.model.lora is None:
        reference = build_model(cfg.model, tokenizer).requires_grad_(False)
        source = (
            cfg.model
            if resume_from is None
            else dataclasses.replace(cfg.model, name_or_path=str(resume_from / "policy"))
        )
        return build_model(source, tokenizer), reference
    if resume_from is None:
        return apply_lora(build_model(cfg.model, tokenizer), cfg.model), None
    from peft import PeftModel

    base = build_model(dataclasses.replace(cfg.model, lora=None), tokenizer)
    return PeftModel.from_pretrained(base, resume_from / "policy", is_trainable=True), None
