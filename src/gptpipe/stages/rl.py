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

With ``ptx_coef`` and ``ptx_datasets``, every update also takes the language-model loss on SFT or pretraining rows
(PPO-ptx, InstructGPT's cure for the alignment tax: ``gptpipe.ppo.ptx``).

Evidence (``eval.json``, see ``gptpipe.rlhf``): on held-out prompts (and ``generalization_datasets``,
``retained_datasets``), the
reward model's mean score of greedy responses, their KL to the reference and (with an ``answer`` column) answer
accuracy, before and after; with ``eval_steps``, the reward-hacking alarm's watch (``gptpipe.hacking``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from accelerate.utils import DistributedType
from transformers import AutoModelForSequenceClassification, set_seed
from trl.models.utils import prepare_deepspeed

from gptpipe.config import ModelConfig, RLConfig
from gptpipe.data import chat_templates
from gptpipe.data.sources import load_train_eval
from gptpipe.errors import UserError
from gptpipe.modeling import apply_lora, build_model, load_for_inference, load_tokenizer
from gptpipe.ppo.engine import (
    build_accelerator,
    fill_deepspeed_config,
)
from gptpipe.ppo.trainer import PPOTrainer
from gptpipe.ppo.value import build_value_model
from gptpipe.ptx_term import ptx_data
from gptpipe.rlhf import (
    before_after,
    check_critic_tokenizer,
    judged_prompts,
    measure_all,
    merge_adapters,
    prompt_rows,
    publish_policy,
    reward_functions,
    reward_scorer,
)
from gptpipe.runs import Run
from gptpipe.tool_use import recipe_tools, tool_evidence, tool_line


def main(cfg: RLConfig, run: Run) -> dict:
    functions = reward_functions(cfg)
    if not cfg.reward_model and cfg.value_init == "reward":
        raise UserError(
            "value_init: reward starts the critic from the reward model, and there is none: set value_init: policy"
        )
    if cfg.max_steps <= 0:
        raise UserError("max_steps: set the number of PPO iterations (e.g. max_steps: 60)")
    if cfg.top_p < 1:
        run.say(
            f"[rl] warning: top_p {cfg.top_p} samples from a truncated distribution while PPO's log-probs are "
            "the whole policy's: the updates are off-policy (the first ratio is not 1). top_p: 1.0 avoids it."
        )
    accelerator = build_accelerator(cfg)
    zero3 = (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fill_deepspeed_config(accelerator, cfg)
    merge_adapters(cfg, accelerator.main_process_first, run.is_main)

    tokenizer = load_tokenizer(cfg.model)
    chat_templates.install(tokenizer, cfg.chat_template, False, cfg.model.tokenizer or cfg.model.name_or_path)
    with accelerator.main_process_first():
        train, heldout = load_train_eval(cfg, [], seed=cfg.seed, prepare=prompt_rows)
        judged = judged_prompts(cfg)  # the whole assistant: generalization and retained prompts
        ptx = ptx_data(cfg) if cfg.ptx_coef else None
        toolbox, tool_step, tool_rows = recipe_tools(cfg, tokenizer)
    if heldout is None:
        raise UserError("eval_datasets: PPO needs held-out prompts for its evidence (or set eval_split_size)")
    heldout = heldout.select(range(min(cfg.eval_prompts, len(heldout))))

    set_seed(cfg.seed)
    policy, reference = _policy_and_reference(cfg, tokenizer, run.resume_from)
    reward_model, reward_tokenizer = None, None
    if cfg.reward_model:
        reward_model, reward_tokenizer = load_for_inference(
            cfg.reward_model, AutoModelForSequenceClassification, cfg.reward_quantization
        )
        check_critic_tokenizer(cfg.value_init, tokenizer, reward_tokenizer, cfg.reward_model)
        reward_model.requires_grad_(False)
    critic = _critic(cfg, run.resume_from)
    for model in (policy, reference, critic, reward_model):  # dropout off: the first PPO ratio must be 1
        if model is not None:
            model.eval()
    if zero3:  # ZeRO-3 loaded the frozen models sharded: they run as DeepSpeed inference engines
        reward_model = prepare_deepspeed(reward_model, accelerator) if reward_model is not None else None
        reference = prepare_deepspeed(reference, accelerator) if reference is not None else None
    if reward_model is not None:
        reward_model.to(accelerator.device)
    scorer = reward_scorer(reward_model, reward_tokenizer, tokenizer, functions, cfg.reward_weights)
    if reference is not None:
        reference.to(accelerator.device)

    trainer = PPOTrainer(cfg, policy, reference, critic, scorer, tokenizer, train, accelerator)
    if tool_step is not None:
        trainer.use_tools(tool_step)
    if ptx is not None:
        trainer.mix_in(ptx)

    def measure() -> dict:  # the whole assistant; with tool_datasets, its tool use with tools and without
        found = measure_all(trainer.evaluate, heldout, judged)
        if tool_rows:
            with trainer.generating() as model:
                found |= tool_evidence(
                    model, tokenizer, tool_rows, toolbox, cfg.max_tool_calls, cfg.tool_eval_max_new_tokens
                )
        return found

    baseline = run.baseline(measure)
    if run.resume_from:
        run.say(f"[rl] resuming from {run.resume_from}")
    world = accelerator.num_processes
    run.say(
        f"[rl] PPO: {len(train)} prompts, {cfg.per_device_train_batch_size * world} per iteration "
        f"({world} process{'es' if world > 1 else ''}), {cfg.max_steps} iterations"
        + (", LoRA policy (reference = adapter disabled)" if reference is None else "")
        + (f", PPO-ptx on {len(ptx)} rows (ptx_coef {cfg.ptx_coef})" if ptx is not None else "")
    )
    trainer.watch(heldout.select(range(min(cfg.watch_prompts, len(heldout)))))
    step = trainer.train(run.resume_from)

    evidence = before_after(baseline, measure())
    evidence |= {"skipped_nonfinite_steps": trainer.skipped} if trainer.settings.skip_nonfinite else {}
    evidence |= {
        "train_steps": step,
        "world_size": world,
        "kl_coef_final": trainer.kl_controller.beta,
        **trainer.hacking.evidence(),
        "seconds": run.seconds(),
    }
    tmp = run.final_dir()
    trainer.save_model(tmp)
    if run.is_main:
        publish_policy(run, tmp, evidence, "rl")
        if tool_rows:
            run.say("[rl] tools: " + tool_line(evidence))
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
