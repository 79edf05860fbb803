"""Run under torchrun with 2 CPU processes: one PPO iteration of tiny models (the same rollouts, the same
minibatch, the same PPO-ptx rows) in several layouts: DeepSpeed ZeRO-2 with gradient_accumulation_steps 1 and 2
(AdamW), and ZeRO-2 against plain DDP with a gradient norm clipped hard (SGD, where clipping shows in one step). Prints one JSON
line: for each layout, the optimizer steps and every parameter's sum (ZeRO-2 keeps whole weights)."""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DeepSpeedPlugin
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny model
from conftest import tiny_llama_config  # noqa: E402

from gptpipe.ppo.iteration import PolicyAndCritic, PPOModels, PPOSettings, ppo_iteration
from gptpipe.ppo.kl import FixedKLController
from gptpipe.ppo.ptx import IGNORE, collate
from gptpipe.ppo.value import build_value_model

PAD, EOS, ROWS = 0, 2, 4  # rows per process


def one_iteration(folder: str, deepspeed: bool = True, accumulation: int = 1, sgd: bool = False) -> dict:
    # A new engine with its own DeepSpeed config, or none (the process group stays)
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = str(deepspeed).lower()  # as gptpipe.distributed sets it on CPU
    PartialState(cpu=not deepspeed, backend="gloo", timeout=timedelta(seconds=300))
    clip = 0.05 if sgd else 1.0
    ds = {
        "zero_optimization": {"stage": 2},
        "train_micro_batch_size_per_gpu": ROWS // accumulation,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": ROWS * int(os.environ["WORLD_SIZE"]),
        "gradient_clipping": clip,
        "zero_allow_untested_optimizer": True,  # SGD
    }
    if deepspeed:
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds))
    else:  # DDP over gloo, as `use_cpu: true` launches it
        accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    policy = LlamaForCausalLM.from_pretrained(folder).eval()
    critic = build_value_model(folder, "policy").eval()
    reference = LlamaForCausalLM.from_pretrained(folder).eval().requires_grad_(False)

    def optimizer(groups):
        return torch.optim.SGD(groups, lr=0.5) if sgd else torch.optim.AdamW(groups)

    groups = [{"params": list(m.parameters()), "lr": 0.5 if sgd else 1e-2} for m in (policy, critic)]
    if deepspeed:
        engine, opt = accelerator.prepare(PolicyAndCritic(policy, critic), optimizer(groups))
        models = PPOModels(
            engine.module.policy, reference, engine.module.critic, opt, None, accelerator, engine
        )
    else:
        policy, critic, *opts = accelerator.prepare(
            policy, critic, optimizer(groups[:1]), optimizer(groups[1:])
        )
        models = PPOModels(policy, reference, critic, *opts, accelerator)
    settings = PPOSettings(
        pad_token_id=PAD,
        eos_token_ids=(EOS,),
        max_new_tokens=4,
        ppo_epochs=1,
        minibatches=1,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=clip,
        ptx_coef=0.5,  # PPO-ptx in every layout: its term must be split and averaged as PPO's loss is
    )
    rank = accelerator.process_index
    prompts = [[1, 3 + (rank + i) % 5, 4 + i % 3] for i in range(ROWS)]
    torch.manual_seed(rank)  # the same samples in every layout

    def score(rollout):
        return ((rollout.responses == 7) * rollout.response_mask).sum(dim=1).float()

    # Each process its own ptx rows, of different lengths (a prompt unlabeled, as a conversation's)
    ptx = [([1, 5 + rank, 6, 7, 2], [IGNORE, IGNORE, 6, 7, 2]), ([1, 8, 9 + rank, 2], [1, 8, 9 + rank, 2])]
    generator = torch.Generator().manual_seed(0)
    ppo_iteration(
        models, score, prompts, FixedKLController(0.05), settings, generator, lambda u: collate(ptx, PAD)
    )
    modules = [engine.module] if deepspeed else [accelerator.unwrap_model(m) for m in (policy, critic)]
    sums = [p.detach().double().sum().item() for m in modules for p in m.parameters()]
    return {"optimizer_steps": engine.global_steps if deepspeed else 1, "sums": sums}


if __name__ == "__main__":
    # As gptpipe.distributed sets DeepSpeed up on CPU: accelerate alone would never pick it there.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    os.environ.pop("ACCELERATE_USE_CPU", None)
    PartialState(backend="gloo", timeout=timedelta(seconds=300))
    if PartialState().is_main_process:
        torch.manual_seed(0)
        config = tiny_llama_config(vocab_size=24, num_key_value_heads=4)
        LlamaForCausalLM(config).save_pretrained(sys.argv[1])
    PartialState().wait_for_everyone()
    found = {f"zero2 accumulation {k}": one_iteration(sys.argv[1], accumulation=k) for k in (1, 2)}
    found |= {
        f"{name} clipped": one_iteration(sys.argv[1], name == "zero2", sgd=True) for name in ("zero2", "ddp")
    }
    if PartialState().is_main_process:
        print("RESULT " + json.dumps(found))
