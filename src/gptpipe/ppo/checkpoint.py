"""PPO checkpoints that continue bit for bit: both models, both optimizers (or DeepSpeed's engine state), the KL
controller, every process's RNG states and the step; and the data order, a pure function of seed and step."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from gptpipe.errors import UserError
from gptpipe.ppo.engine import state_dicts


def batch_rows(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The prompts of iteration ``step``: a pure function of the seed and the step (exact resume needs it)."""
    rows = []
    first = step * batch_size
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(int(order[offset]))
    return rows


def save_checkpoint(
    out, step, models, tokenizer, optimizers, kl_ctl, generator, cfg, accelerator, engine=None
) -> Path:
    """Everything needed to continue bit for bit, in ``checkpoint-<step>`` (returned); the caller marks it
    complete once every process is done.

    The main process writes the models and optimizers (identical on every process under DDP); each
    process writes its own RNG states. Under DeepSpeed every process writes its shard of the optimizer
    states (DeepSpeed's own checkpoint, in ``engine/``).
    """
    folder = out / f"checkpoint-{step}"
    if accelerator.is_main_process and folder.exists():
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    states = state_dicts(accelerator, engine)
    if accelerator.is_main_process:
        policy, critic = models
        policy.save_pretrained(folder / "policy", state_dict=states[0])
        tokenizer.save_pretrained(folder / "policy")
        critic.save_pretrained(folder / "critic", state_dict=states[1])
        if engine is None:
            torch.save(
                {"policy": optimizers[0].state_dict(), "critic": optimizers[1].state_dict()},
                folder / "optimizers.pt",
            )
    if engine is not None:
        engine.save_checkpoint(str(folder / "engine"), tag="state", exclude_frozen_parameters=True)
    accelerator.wait_for_everyone()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": generator.get_state()}
    torch.save(rng, folder / f"rng_state_{accelerator.process_index}.pth")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return folder
    (folder / "trainer_state.json").write_text(
        json.dumps(
            {
                "global_step": step,
                "world_size": accelerator.num_processes,
                "kl_controller": kl_ctl.state_dict(),
            }
        )
    )
    return folder


def load_checkpoint(folder: Path, rank: int, policy_opt, critic_opt, kl_ctl, generator, engine=None) -> int:
    state = json.loads((folder / "trainer_state.json").read_text())
    if engine is not None:
        if not (folder / "engine").is_dir():
            raise UserError(f"{folder}: written without DeepSpeed; resume it the way it was launched")
        engine.load_checkpoint(str(folder / "engine"), tag="state", load_module_strict=False)
    else:
        if not (folder / "optimizers.pt").is_file():
            raise UserError(f"{folder}: written under DeepSpeed; resume it the way it was launched")
        optimizers = torch.load(folder / "optimizers.pt", weights_only=False)
        policy_opt.load_state_dict(optimizers["policy"])
        critic_opt.load_state_dict(optimizers["critic"])
    kl_ctl.load_state_dict(state["kl_controller"])
    rng_file = folder / f"rng_state_{rank}.pth"
    if not rng_file.is_file():  # resumed with more processes than saved: the extra ones start fresh streams
        return state["global_step"]
    rng = torch.load(rng_file, weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    generator.set_state(rng["generator"])
    return state["global_step"]
