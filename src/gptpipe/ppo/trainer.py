"""gptpipe's PPO trainer: the loop around ``ppo_iteration``, shaped like the HF Trainer.

    trainer = PPOTrainer(cfg, policy, reference, critic, scorer, tokenizer, prompts, accelerator)
    before = trainer.evaluate(heldout)
    trainer.train(resume_from)          # iterations, logging, callbacks, checkpoints, preemption
    trainer.save_model(folder)          # every process calls it (ZeRO-3 gathers the weights)

TRL removed its ``PPOTrainer`` (2026-09) and no maintained HF-stack trainer has PPO with a critic and an
exact resume, so this one is ours; it is built from accelerate's pieces (``prepare``, ``backward``, mixed
precision, ``unwrap_model``) and transformers' schedulers and callbacks. The engine is chosen once, here:
DDP (a model and an optimizer each for the policy and the critic) or DeepSpeed (one ``PolicyAndCritic``
engine with one optimizer, a parameter group per model).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import TrainerControl, TrainerState, set_seed

from gptpipe import faults
from gptpipe.errors import UserError
from gptpipe.hacking import RewardHackingWatch
from gptpipe.ppo.checkpoint import PPOState, batch_rows, load_checkpoint, save_checkpoint
from gptpipe.ppo.engine import (
    adam_settings,
    adamw_class,
    build_schedulers,
    fp32_masters,
    in_dtype,
    state_dicts,
)
from gptpipe.ppo.iteration import (
    NonFiniteUpdate,
    PolicyAndCritic,
    PPOModels,
    PPOSettings,
    for_generation,
    ppo_iteration,
)
from gptpipe.ppo.kl import AdaptiveKLController, FixedKLController
from gptpipe.ppo.ptx import collate, encode_examples, ptx_rows
from gptpipe.rlhf import encode_prompts, evaluate, stop_token_ids
from gptpipe.runs import last_checkpoint, mark_complete, rotate_checkpoints
from gptpipe.tracking import StepLogger, load_callbacks, truncate_metrics
from gptpipe.watching import best_saver, load_watch, new_watch, save_watch, watch_step


class PPOTrainer:
    """PPO on ``train_dataset``'s prompts (message lists; its other columns go to the reward functions) against
    ``scorer`` (``gptpipe.rlhf.reward_scorer``), with the keys of ``args`` (an ``RLConfig``) docs/rl.md's PPO
    section lists."""

    def __init__(self, args, policy, reference, critic, scorer, tokenizer, train_dataset, accelerator):
        self.args, self.accelerator, self.tokenizer, self.scorer = args, accelerator, tokenizer, scorer
        self.dataset, self._prompt_ids = train_dataset, None  # encoded at the first iteration (prompt_ids)
        self.ptx = None  # PPO-ptx's rows, tokenized (mix_in)
        self.tool_step = None  # episodes that call tools (use_tools)
        self.output_dir = Path(args.output_dir)
        self.is_main, self.rank, self.world = (
            accelerator.is_main_process,
            accelerator.process_index,
            accelerator.num_processes,
        )
        self.settings = ppo_settings(args, tokenizer)
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.settings.skip_nonfinite and deepspeed:
            raise UserError(
                "on_nonfinite: skip is not available for PPO under DeepSpeed (the engine applies each update "
                "inside backward); use on_nonfinite: stop"
            )
        self.final_dtype = torch.float32
        if not deepspeed:  # DeepSpeed keeps its own fp32 masters
            self.final_dtype = fp32_masters(policy) if args.model.lora is None else torch.float32
            fp32_masters(critic)
        self.models, self.schedulers = self._prepare(policy, reference, critic, deepspeed)
        self.policy = accelerator.unwrap_model(self.models.policy)  # the bare model: generation, saving
        self.kl_controller = (
            AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
            if args.kl_target
            else FixedKLController(args.kl_coef)
        )
        self.generator = torch.Generator().manual_seed(args.seed + self.rank)
        set_seed(args.seed + self.rank)  # each process samples its own responses
        m = self.models
        critic = accelerator.unwrap_model(m.critic)
        self.state = PPOState(
            self.policy,
            critic,
            m.policy_optimizer,
            m.critic_optimizer,
            self.kl_controller,
            self.generator,
            self.schedulers,
            m.engine,
        )
        self.callbacks = load_callbacks(args.callbacks)
        self.logger = StepLogger(args, self.is_main)
        self.step, self.skipped = 0, 0
        self.watched, self.hacking, self.save_best = None, RewardHackingWatch(), None  # set by watch()

    def _prepare(self, policy, reference, critic, deepspeed: bool) -> tuple[PPOModels, list]:
        args, accelerator = self.args, self.accelerator
        trainable = [[p for p in m.parameters() if p.requires_grad] for m in (policy, critic)]
        lrs = [args.learning_rate, args.value_learning_rate or args.learning_rate]
        if deepspeed:  # one engine: one module, one optimizer with a parameter group per model
            groups = [{"params": params, "lr": lr} for params, lr in zip(trainable, lrs, strict=True)]
            optimizer = adamw_class(args)(groups, **adam_settings(args))
            schedulers = build_schedulers(
                args, [optimizer]
            )  # one: each parameter group keeps its own base lr
            engine, optimizer = accelerator.prepare(PolicyAndCritic(policy, critic), optimizer)
            models = PPOModels(
                engine.module.policy, reference, engine.module.critic, optimizer, None, accelerator, engine
            )
            return models, schedulers
        optimizers = [
            adamw_class(args)(params, lr=lr, **adam_settings(args))
            for params, lr in zip(trainable, lrs, strict=True)
        ]
        schedulers = build_schedulers(args, optimizers)
        policy, policy_opt, critic, critic_opt = accelerator.prepare(
            policy, optimizers[0], critic, optimizers[1]
        )
        # One process in full precision needs nothing of accelerate in the update (plain backward and clipping).
        several = self.world > 1 or accelerator.mixed_precision == "fp16"
        return PPOModels(
            policy, reference, critic, policy_opt, critic_opt, accelerator if several else None
        ), schedulers

    def evaluate(self, heldout) -> dict:
        """Greedy responses to ``heldout`` prompts: reward, KL to the reference, answer accuracy (every process
        measures; ZeRO-3 needs them all)."""
        args, tools = self.args, {"tool_step": self.tool_step, "max_tool_calls": self.args.max_tool_calls}
        with self.generating() as policy:
            reference, scorer = self.models.reference, self.scorer
            return evaluate(policy, reference, self.tokenizer, heldout, scorer, args.max_new_tokens, **tools)

    @contextmanager
    def generating(self):
        """The policy, whole, to generate with (ZeRO-3: its weights gathered, hooks off); every process enters."""
        if self.models.engine is None:
            yield self.policy
            return
        with for_generation(self.models.engine, self.accelerator) as whole:
            yield whole.policy

    def watch(self, prompts) -> None:
        """Evaluate on ``prompts`` every ``eval_steps`` iterations, with the reward-hacking alarm when they carry
        an ``answer`` (gptpipe.hacking); ``keep_best_model``: the most accurate policy in ``best/``."""
        self.watched, self.hacking = prompts, new_watch(self.args, prompts)
        if self.args.keep_best_model:
            wait = self.accelerator.wait_for_everyone
            save = lambda folder: self._save_policy(folder, "best/")  # noqa: E731
            self.save_best = best_saver(save, self.output_dir, self.is_main, wait)

    def mix_in(self, ptx_dataset) -> None:
        """PPO-ptx: every update also takes ``ptx_coef`` x the language-model loss on rows of ``ptx_dataset``
        (conversations or ``text``), tokenized once here; each update's rows are chosen by its step."""
        self.ptx = encode_examples(self.tokenizer, list(ptx_dataset), self.args.ptx_max_length)

    def use_tools(self, tool_step) -> None:
        """Episodes call tools: ``tool_step`` (``gptpipe.tool_use.ToolTurns``) runs each turn's calls; every
        prompt shows the tools' schemas; rollouts and evaluations go on through the calls (``max_tool_calls``
        rounds), the loss on the model's own tokens only."""
        self.tool_step = self.settings.tool_step = tool_step

    @property
    def prompt_ids(self) -> list[list[int]]:
        """The training prompts rendered once (with the tools' schemas when episodes call tools)."""
        if self._prompt_ids is None:
            schemas = self.tool_step.toolbox.schemas if self.tool_step is not None else None
            self._prompt_ids = encode_prompts(self.tokenizer, self.dataset["prompt"], schemas)
        return self._prompt_ids

    def _watch_step(self) -> bool:
        """At an evaluation step: evaluate the watched prompts, log eval/*, warn on reward hacking; whether to
        stop (``stop_on_reward_hacking``). Every process evaluates (ZeRO-3 needs them all)."""
        every = int(self.args.eval_steps or 0)
        if self.watched is None or not every or self.step % every:
            return False
        found = self.evaluate(self.watched)
        rang = watch_step(self.hacking, self.step, found, self.logger.log, self.is_main, self.save_best)
        return rang and self.args.stop_on_reward_hacking

    def train(self, resume_from: Path | None = None) -> int:
        """Run the iterations up to ``max_steps`` (from ``resume_from`` when given); returns the last step."""
        if resume_from:
            self.step = load_checkpoint(resume_from, self.rank, self.state)
            load_watch(self.hacking, resume_from)
            if self.is_main:
                truncate_metrics(self.output_dir, self.step)
        stop = faults.StopSignals().install()
        faults.record_batch_shapes(self.policy)
        self.skipped = faults.skipped_steps(self.output_dir, self.step)
        state, control = TrainerState(), TrainerControl()
        try:
            while self.step < self.args.max_steps:
                stats = self._iteration()
                state.global_step = self.step
                for cb in self.callbacks:
                    cb.on_step_end(self.args, state, control)
                self._log(stats)
                if self._watch_step():
                    if self.is_main:
                        print(f"[rl] stopped at step {self.step}: stop_on_reward_hacking", flush=True)
                    break
                preempted = stop.agreed(
                    self.accelerator.device
                )  # every process stops after the same iteration
                save_steps = int(self.args.save_steps or 0)
                if preempted or (
                    save_steps and self.step % save_steps == 0 and self.step < self.args.max_steps
                ):
                    self._save_checkpoint(state, control)
                if preempted:
                    raise faults.preempted(
                        "rl", self.step, self.output_dir, stop.received, self.args.slurm_requeue, self.is_main
                    )
        finally:
            stop.uninstall()
        return self.step

    def _iteration(self) -> dict:
        size = self.args.per_device_train_batch_size
        rows = batch_rows(len(self.prompt_ids), size * self.world, self.step, self.args.seed)
        rows = rows[self.rank * size : (self.rank + 1) * size]
        score = self.scorer(self.dataset[rows])  # the rows' prompts and columns
        try:
            stats = ppo_iteration(
                self.models,
                score,
                [self.prompt_ids[i] for i in rows],
                self.kl_controller,
                self.settings,
                self.generator,
                self._ptx_batches(self.step),
            )
        except NonFiniteUpdate as e:
            raise faults.nonfinite_error("rl", self.step + 1, e.what, self.output_dir) from None
        stats["learning_rate"] = self.schedulers[0].get_last_lr()[0]  # the policy's, this iteration
        if self.args.reward_funcs:
            stats |= {f"rewards/{name}": mean for name, mean in self.scorer.means.items()}
        for scheduler in self.schedulers:
            scheduler.step()
        self.step += 1
        return stats

    def _ptx_batches(self, step: int):
        """PPO-ptx: ``update -> PTXBatch`` for iteration ``step`` (None without ptx data)."""
        if self.ptx is None:
            return None
        args = self.args
        size = args.ptx_batch_size or max(args.per_device_train_batch_size // args.num_minibatches, 1)
        updates = args.ppo_epochs * args.num_minibatches
        pad = self.tokenizer.pad_token_id

        def batch(update: int):
            rows = ptx_rows(len(self.ptx), size, step, updates, update, self.rank, self.world, args.seed)
            return collate([self.ptx[i] for i in rows], pad)

        return batch

    def _log(self, stats: dict) -> None:
        step, args = self.step, self.args
        if "skipped_nonfinite" in stats:
            self.skipped += 1
            print(
                f"[rl] step {step}: NaN/inf, {stats['skipped_nonfinite']:.0f} update(s) skipped",
                file=sys.stderr,
            )
            self.logger.log({"step": step, **stats})
            if self.skipped > args.max_skipped_steps:
                raise faults.nonfinite_error("rl", step, "an update", self.output_dir, skipping=True)
        elif step % args.logging_steps == 0 or step == args.max_steps:
            self.logger.log({"step": step, **stats})
            if self.is_main:
                print(
                    f"[rl] step {step}: reward {stats['reward']:.3f}, kl {stats['kl']:.3f}, entropy {stats['entropy']:.3f}"
                )

    def _save_checkpoint(self, state, control) -> None:
        """A checkpoint, complete or invisible: disk space checked first, the marker written last, older
        checkpoints rotated only then."""
        out, step, accelerator = self.output_dir, self.step, self.accelerator
        previous = last_checkpoint(out)
        pairs = (
            (self.state.policy, self.state.policy_optimizer),
            (self.state.critic, self.state.critic_optimizer),
        )
        needed = (
            faults.folder_bytes(previous)
            if previous
            else sum(faults.tensors_bytes(m, o, self.world) for m, o in pairs)
        )
        faults.ensure_disk_space("rl", out, needed, f"checkpoint-{step}", out, accelerator.device)
        folder = save_checkpoint(out, step, self.state, self.tokenizer, accelerator)
        for cb in self.callbacks:
            cb.on_save(self.args, state, control)
        accelerator.wait_for_everyone()
        if self.is_main:
            save_watch(self.hacking, folder)
            mark_complete(folder, step, self.world)
            rotate_checkpoints(out, self.args.save_total_limit)
        accelerator.wait_for_everyone()  # no process moves on (or exits) before the checkpoint counts

    def save_model(self, folder: Path) -> None:
        """The policy (a full model in the dtype it was loaded in, or the LoRA adapter), its tokenizer and
        generation config; collective (ZeRO-3 gathers the weights), the main process writes."""
        self._save_policy(folder)
        self.logger.finish()

    def _save_policy(self, folder: Path, what: str = "final/") -> None:
        out, accelerator = self.output_dir, self.accelerator
        faults.ensure_disk_space("rl", out, faults.tensors_bytes(self.policy), what, out, accelerator.device)
        weights, _ = state_dicts(accelerator, self.models.engine)  # collective under ZeRO-3
        if self.models.engine is None:  # trained on fp32 masters: saved in the dtype the policy was loaded in
            weights = in_dtype(self.policy, self.final_dtype)
        if self.is_main:
            self.policy.save_pretrained(folder, state_dict=weights)
            self.tokenizer.save_pretrained(folder)
            self.policy.generation_config.save_pretrained(folder)


def ppo_settings(args, tokenizer) -> PPOSettings:
    """The iteration's settings from the recipe."""
    return PPOSettings(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=tuple(stop_token_ids(tokenizer)),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        ppo_epochs=args.ppo_epochs,
        minibatches=args.num_minibatches,
        clip=args.cliprange,
        value_clip=args.cliprange_value,
        gamma=args.gamma,
        lam=args.lam,
        kl_estimator=args.kl_estimator,
        missing_eos_score=args.missing_eos_score,
        missing_eos_penalty=args.missing_eos_penalty,
        reward_clip=args.reward_clip,
        whiten_rewards=args.whiten_rewards,
        vf_coef=args.vf_coef,
        max_grad_norm=args.max_grad_norm,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        forward_batch_size=args.forward_batch_size,
        skip_nonfinite=args.on_nonfinite == "skip",
        ptx_coef=args.ptx_coef,
        max_tool_calls=args.max_tool_calls,
    )
