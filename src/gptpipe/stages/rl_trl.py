"""RL stage with TRL's trainers: ``algorithm: grpo`` (``trl.GRPOTrainer``) or ``rloo`` (``trl.RLOOTrainer``).

    gptpipe train recipes/tiny/grpo.yaml
    accelerate launch --config_file accelerate_configs/zero2.yaml -m gptpipe train recipes/smollm2/grpo.yaml

Both sample several responses per prompt, score each with the frozen reward model (TRL renders prompt +
response with the reward model's own chat template) and push up the responses that beat the others of
their group: no critic. The recipe is a ``trl.GRPOConfig`` / ``trl.RLOOConfig`` (``beta`` is the KL
coefficient against the reference, the SFT model; ``num_generations`` the group size) plus gptpipe's
``model:``, ``datasets:`` and ``reward_model``. With ``model.lora`` the reference is the policy with its
adapter disabled. Interrupted runs resume from the newest checkpoint (TRL/Trainer checkpoints).

Evidence (``eval.json``) is PPO's, from ``gptpipe.rlhf``, so the algorithms compare directly: on held-out
prompts (and ``generalization_datasets``, ``retained_datasets``), the reward model's mean score of greedy responses, their KL to the
reference and (with an ``answer`` column) answer accuracy, before and after; with ``eval_steps``, the same
reward-hacking alarm (a callback). With ``ptx_coef`` and ``ptx_datasets``, InstructGPT's ptx term joins TRL's loss
(as in gptpipe's PPO: the cure for the alignment tax).
"""

from __future__ import annotations

from transformers import AutoModelForSequenceClassification, set_seed
from trl import GRPOTrainer, RLOOTrainer

from gptpipe import faults
from gptpipe.data import chat_templates
from gptpipe.data.sources import load_train_eval
from gptpipe.errors import UserError
from gptpipe.modeling import (
    apply_lora,
    build_model,
    count_parameters,
    frozen_reference,
    load_for_inference,
    load_tokenizer,
)
from gptpipe.ptx_term import PTXLog, ptx_data, with_ptx
from gptpipe.rlhf import (
    before_after,
    evaluate,
    judged_prompts,
    measure_all,
    merge_adapters,
    prompt_rows,
    publish_policy,
    reward_functions,
    reward_scorer,
    stop_token_ids,
)
from gptpipe.runs import Run
from gptpipe.tool_use import recipe_tools, tool_evidence, tool_line
from gptpipe.tracking import MetricsLogger, append_metrics, load_callbacks
from gptpipe.watching import WatchCallback, best_saver, load_watch, new_watch, watch_step

TRAINERS = {"grpo": GRPOTrainer, "rloo": RLOOTrainer}


def main(cfg, run: Run) -> dict:
    name, say = cfg.algorithm, run.say
    functions = reward_functions(cfg)  # import errors before any model loads

    merge_adapters(cfg, cfg.main_process_first, run.is_main)
    tokenizer = load_tokenizer(cfg.model)
    chat_templates.install(tokenizer, cfg.chat_template, False, cfg.model.tokenizer or cfg.model.name_or_path)
    with cfg.main_process_first(desc="reading prompts"):
        train, heldout = load_train_eval(cfg, [], seed=cfg.seed, prepare=prompt_rows)
        judged = judged_prompts(cfg)  # the whole assistant: generalization and retained prompts
    if heldout is None:
        raise UserError(
            f"eval_datasets: {name} needs held-out prompts for its evidence (or set eval_split_size)"
        )
    heldout = heldout.select(range(min(cfg.eval_prompts, len(heldout))))
    toolbox, tool_step, tool_rows = recipe_tools(cfg, tokenizer)
    if toolbox is not None:  # GRPO rolls out through TRL's tool loop (results masked from the loss)
        cfg.max_tool_calling_iterations = cfg.max_tool_calls

    set_seed(cfg.seed)
    policy = build_model(cfg.model, tokenizer)
    policy.generation_config.eos_token_id = stop_token_ids(tokenizer)  # TRL stops at these
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy = apply_lora(policy, cfg.model)
    reward_model, reward_tokenizer = None, None
    if cfg.reward_model:
        reward_model, reward_tokenizer = load_for_inference(
            cfg.reward_model, AutoModelForSequenceClassification
        )
    trainable, total = count_parameters(policy)
    say(
        f"[{name}] {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train; {len(train)} prompts, "
        f"{cfg.num_generations} samples each"
    )
    ptx_log: list[float] = []  # the ptx term's values since the last log (PTXLog adds their mean to the logs)
    trainer_class = TRAINERS[name]
    if cfg.ptx_coef:
        size = cfg.ptx_batch_size or max(cfg.per_device_train_batch_size // cfg.num_generations, 1)
        trainer_class = with_ptx(trainer_class, cfg, tokenizer, ptx_data(cfg), size, ptx_log)
        say(f"[{name}] PPO-ptx: ptx_coef {cfg.ptx_coef} on {len(trainer_class.ptx_examples)} rows")
    trainer = trainer_class(
        model=policy,
        reward_funcs=[reward_model, *functions] if reward_model is not None else functions,
        args=cfg,
        train_dataset=train,
        processing_class=tokenizer,
        reward_processing_classes=[reward_tokenizer] + [None] * len(functions)
        if reward_model is not None
        else None,
        callbacks=[PTXLog(ptx_log), MetricsLogger(run.output_dir), *load_callbacks(cfg.callbacks)],
        **({"tools": toolbox.as_functions()} if toolbox is not None else {}),  # TRL runs the calls
    )
    policy = trainer.accelerator.unwrap_model(trainer.model)
    reference = frozen_reference(trainer, cfg, tokenizer)
    scorer = reward_scorer(reward_model, reward_tokenizer, tokenizer, functions, cfg.reward_weights)

    def measure(
        prompts,
    ) -> dict:  # every process measures (ZeRO-3 forwards are collective); the main one writes
        tools = {"tool_step": tool_step, "max_tool_calls": cfg.max_tool_calls}
        return evaluate(policy, reference, tokenizer, prompts, scorer, cfg.max_completion_length, **tools)

    def measure_whole() -> (
        dict
    ):  # the whole assistant; with tool_datasets, its tool use with tools and without
        found = measure_all(measure, heldout, judged)
        if tool_rows:
            found |= tool_evidence(
                policy, tokenizer, tool_rows, toolbox, cfg.max_tool_calls, cfg.tool_eval_max_new_tokens
            )
        return found

    baseline = run.baseline(measure_whole)
    if run.resume_from:
        say(f"[{name}] resuming from {run.resume_from}")
    watch = _watch(cfg, run, trainer, heldout, measure)
    guard = faults.guard(trainer, cfg)  # preemption, NaN/inf, disk space: gptpipe.faults
    trainer.train(resume_from_checkpoint=run.resume_checkpoint)

    evidence = before_after(baseline, measure_whole()) | watch.evidence()
    evidence |= guard.summary()  # updates dropped by on_nonfinite: skip
    evidence |= {
        "algorithm": name,
        "train_steps": trainer.state.global_step,
        "world_size": cfg.world_size,
        "parameters": total,
        "trainable_parameters": trainable,
        "seconds": run.seconds(),
    }
    tmp = run.final_dir()
    trainer.save_model(str(tmp))  # a full model, or the LoRA adapter; with the tokenizer
    if run.is_main:
        policy.generation_config.save_pretrained(tmp)
        publish_policy(run, tmp, evidence, name)
        if tool_rows:
            say(f"[{name}] tools: " + tool_line(evidence))
    trainer.accelerator.wait_for_everyone()
    return evidence


def _watch(cfg, run: Run, trainer, heldout, measure):
    """The reward-hacking alarm (``eval_steps``; ``gptpipe.hacking``) as a callback: the first ``watch_prompts``
    held-out prompts measured every ``eval_steps`` steps, logged to metrics.jsonl as ``eval/*``."""
    watched = heldout.select(range(min(cfg.watch_prompts, len(heldout))))
    watch = new_watch(cfg, watched)
    load_watch(watch, run.resume_from)
    save_best = None
    if cfg.keep_best_model:
        save = lambda folder: trainer.save_model(str(folder))  # noqa: E731
        save_best = best_saver(save, cfg.output_dir, run.is_main, trainer.accelerator.wait_for_everyone)

    def log(record: dict) -> None:
        if run.is_main:
            append_metrics(run.output_dir, record)

    def check(step: int) -> bool:
        return watch_step(watch, step, measure(watched), log, run.is_main, save_best)

    trainer.add_callback(WatchCallback(cfg, watch, check))
    return watch
