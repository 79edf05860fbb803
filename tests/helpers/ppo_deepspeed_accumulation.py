"""Run under torchrun with 2 CPU processes: one PPO iteration of tiny models under DeepSpeed ZeRO-2, once with
gradient_accumulation_steps 1 and once with 2 (the same rollouts, the same minibatch). Prints one JSON line:
for each layout, the engine's optimizer steps and every parameter's sum (ZeRO-2 keeps whole weights)."""

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
from gptpipe.ppo.value import build_value_model

PAD, EOS, ROWS = 0, 2, 4  # rows per process


def one_iteration(accumulation: int, folder: str) -> dict:
    AcceleratorState._reset_state()  # a new engine with its own DeepSpeed config (the process group stays)
    ds = {
        "zero_optimization": {"stage": 2},
        "train_micro_batch_size_per_gpu": ROWS // accumulation,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": ROWS * int(os.environ["WORLD_SIZE"]),
        "gradient_clipping": 1.0,
    }
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds))
    torch.manual_seed(0)
    policy = LlamaForCausalLM.from_pretrained(folder).eval()
    critic = build_value_model(folder, "policy").eval()
    reference = LlamaForCausalLM.from_pretrained(folder).eval().requires_grad_(False)
    groups = [{"params": list(m.parameters()), "lr": 1e-2} for m in (policy, critic)]
    engine, optimizer = accelerator.prepare(PolicyAndCritic(policy, critic), torch.optim.AdamW(groups))
    settings = PPOSettings(
        pad_token_id=PAD,
        eos_token_ids=(EOS,),
        max_new_tokens=4,
        ppo_epochs=1,
        minibatches=1,
        gradient_accumulation_steps=accumulation,
    )
    rank = accelerator.process_index
    prompts = [[1, 3 + (rank + i) % 5, 4 + i % 3] for i in range(ROWS)]
    torch.manual_seed(rank)  # the same samples in both layouts

    def score(rollout):
        return ((rollout.responses == 7) * rollout.response_mask).sum(dim=1).float()

    models = PPOModels(
        engine.module.policy, reference, engine.module.critic, optimizer, None, accelerator, engine
    )
    ppo_iteration(models, score, prompts, FixedKLController(0.05), settings, torch.Generator().manual_seed(0))
    sums = [p.detach().double().sum().item() for p in engine.module.parameters()]
    return {"optimizer_steps": engine.global_steps, "sums": sums}


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
    found = {str(k): one_iteration(k, sys.argv[1]) for k in (1, 2)}
    if PartialState().is_main_process:
        print("RESULT " + json.dumps(found))
