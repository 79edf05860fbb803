"""PPO checkpoints that continue bit for bit: both models, both optimizers (or DeepSpeed's engine state), the
learning-rate schedules, the KL controller, every process's RNG states (CUDA's too: generation samples from it)
and the step; and the data order, a pure function of seed and step."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptpipe.errors import UserError
from gptpipe.ppo.engine import state_dicts


@dataclass
class PPOState:
    """What a checkpoint holds besides the step: the bare models, their optimizers (``critic_optimizer`` None
    under DeepSpeed, where one engine trains both), the schedules, the KL controller and the sampling RNG."""

    policy: torch.nn.Module
    critic: torch.nn.Module
    policy_optimizer: object
    critic_optimizer: object
    kl_controller: object
    generator: torch.Generator
    schedulers: list = field(default_factory=list)
    engine: object = None


def batch_rows(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The prompts of iteration ``step``: a pure function of the seed and the step (exact resume needs it)."""
    rows = []
    first = step * batch_size
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(int(order[offset]))
    return rows


def save_checkpoint(out: Path, step: int, state: PPOState, tokenizer, accelerator) -> Path:
    """Everything needed to continue bit for bit, in ``checkpoint-<step>`` (returned); the caller marks it
    complete once every process is done.

    The main process writes the models, optimizers and schedules (identical on every process under DDP); each
    process writes its own RNG states. Under DeepSpeed every process writes its shard of the optimizer
    states (DeepSpeed's own checkpoint, in ``engine/``).
    """
    folder = out / f"checkpoint-{step}"
    if accelerator.is_main_process and folder.exists():
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    weights = state_dicts(accelerator, state.engine)
    if accelerator.is_main_process:
        state.policy.save_pretrained(folder / "policy", state_dict=weights[0])
        tokenizer.save_pretrained(folder / "policy")
        state.critic.save_pretrained(folder / "critic", state_dict=weights[1])
        optimizers = {}
        if state.engine is None:
            optimizers = {
                "policy": state.policy_optimizer.state_dict(),
                "critic": state.critic_optimizer.state_dict(),
            }
        optimizers["schedulers"] = [s.state_dict() for s in state.schedulers]
        torch.save(optimizers, folder / "optimizers.pt")
    if state.engine is not None:
        state.engine.save_checkpoint(str(folder / "engine"), tag="state", exclude_frozen_parameters=True)
    accelerator.wait_for_everyone()
    torch.save(capture_rng(state.generator), folder / f"rng_state_{accelerator.process_index}.pth")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / "trainer_state.json").write_text(
            json.dumps(
                {
                    "global_step": step,
                    "world_size": accelerator.num_processes,
                    "kl_controller": state.kl_controller.state_dict(),
                }
            )
        )
    return folder


def load_checkpoint(folder: Path, rank: int, state: PPOState) -> int:
    """Restore ``state`` from ``folder`` (as ``save_checkpoint`` wrote it); returns the step."""
    saved = json.loads((folder / "trainer_state.json").read_text())
    optimizers = (
        torch.load(folder / "optimizers.pt", weights_only=False)
        if (folder / "optimizers.pt").is_file()
        else {}
    )
    if state.engine is not None:
        if not (folder / "engine").is_dir():
            raise UserError(f"{folder}: written without DeepSpeed; resume it the way it was launched")
        state.engine.load_checkpoint(str(folder / "engine"), tag="state", load_module_strict=False)
    else:
        if "policy" not in optimizers:
            raise UserError(f"{folder}: written under DeepSpeed; resume it the way it was launched")
        state.policy_optimizer.load_state_dict(optimizers["policy"])
        state.critic_optimizer.load_state_dict(optimizers["critic"])
    for scheduler, scheduler_state in zip(state.schedulers, optimizers.get("schedulers", []), strict=False):
        scheduler.load_state_dict(scheduler_state)
    state.kl_controller.load_state_dict(saved["kl_controller"])
    rng_file = folder / f"rng_state_{rank}.pth"
    if not rng_file.is_file():  # resumed with more processes than saved: the extra ones start fresh streams
        return saved["global_step"]
    restore_rng(torch.load(rng_file, weights_only=False), state.generator)
    return saved["global_step"]


def capture_rng(generator: torch.Generator) -> dict:
    """Every random stream a PPO iteration draws from: torch's (CPU and, on GPUs, CUDA's: ``generate`` samples
    from it), Python's and the minibatch order's ``generator``."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    generator.set_state(rng["generator"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
