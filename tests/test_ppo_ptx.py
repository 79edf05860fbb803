"""PPO-ptx (InstructGPT eq. 2): the update's gradient is PPO's plus ptx_coef times the gradient of the ptx rows'
token-mean language-model loss, whatever the gradient accumulation; the ptx rows of an update are a function of
seed, iteration, update and process (exact resume)."""

import copy

import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from gptpipe.ppo.iteration import PPOModels, PPOSettings, accumulate_gradients, generate, make_experience
from gptpipe.ppo.ptx import IGNORE, collate, ptx_loss_sum, ptx_rows
from gptpipe.ppo.value import build_value_model

PAD, EOS = 0, 2


def _models(tmp_path):
    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_llama_config(vocab_size=24)).eval()
    policy.save_pretrained(tmp_path / "policy")
    reference = copy.deepcopy(policy).requires_grad_(False)
    critic = build_value_model(str(tmp_path / "policy"), init="reward").eval()
    sgd = [torch.optim.SGD(m.parameters(), lr=0.0) for m in (policy, critic)]
    return PPOModels(policy, reference, critic, *sgd)


def _gradient(models, experience, settings, ptx) -> torch.Tensor:
    for p in [*models.policy.parameters(), *models.critic.parameters()]:
        p.grad = None
    rows = torch.arange(len(experience.rollout.input_ids))
    accumulate_gradients(models, experience, rows, settings, {}, ptx)
    return torch.cat([p.grad.flatten() for p in models.policy.parameters()])


def test_the_ptx_term_adds_its_coefficient_times_the_language_model_gradient(tmp_path):
    models = _models(tmp_path)
    settings = PPOSettings(pad_token_id=PAD, eos_token_ids=(EOS,), max_new_tokens=6)
    rollout = generate(models, [[1, 3 + i % 5, 4 + i % 3] for i in range(6)], settings)
    experience = make_experience(models, rollout, lambda r: r.response_mask.sum(dim=1).float(), 0.1, settings)
    # Two conversations of different lengths, the prompt unlabeled (as encode_examples writes them)
    ptx = collate(
        [
            ([1, 5, 6, 7, 8, 2], [IGNORE, IGNORE, 6, 7, 8, 2]),
            ([1, 9, 10, 2], [IGNORE, 9, 10, 2]),
            ([3, 4], [3, 4]),
        ],
        PAD,
    )
    coef = 0.7
    plain = _gradient(models, experience, settings, None)
    mixed = _gradient(models, experience, PPOSettings(**{**vars(settings), "ptx_coef": coef}), ptx)

    models.policy.zero_grad()  # the language-model loss alone, as a direct token mean
    logits = models.policy(input_ids=ptx.input_ids, attention_mask=ptx.attention_mask).logits
    targets = ptx.labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 24), targets.reshape(-1), reduction="none"
    )
    keep = (targets != IGNORE).flatten()
    (nll[keep].sum() / keep.sum()).backward()
    lm = torch.cat([p.grad.flatten() for p in models.policy.parameters()])
    assert keep.sum() == 8 and ptx.tokens == 8  # 4 + 3 + 1 labeled next tokens; padding never counts
    assert lm.norm() > 0.1 * plain.norm()  # the term is not negligible here: the check below can fail
    torch.testing.assert_close(mixed, plain + coef * lm, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ptx_loss_sum(models.policy, ptx) / 8, nll[keep].mean(), atol=1e-6, rtol=1e-5)

    # Gradient accumulation splits the ptx rows over the micro-batches too: the same update
    accumulated = PPOSettings(**{**vars(settings), "ptx_coef": coef, "gradient_accumulation_steps": 3})
    torch.testing.assert_close(_gradient(models, experience, accumulated, ptx), mixed, atol=1e-6, rtol=1e-4)


def test_ptx_rows_are_a_function_of_step_update_and_process():
    a = ptx_rows(50, 4, step=3, updates=8, update=5, rank=1, world=2, seed=42)
    assert a == ptx_rows(50, 4, step=3, updates=8, update=5, rank=1, world=2, seed=42)  # a resumed run
    others = [
        ptx_rows(50, 4, 3, 8, 5, 0, 2, 42),
        ptx_rows(50, 4, 3, 8, 6, 1, 2, 42),
        ptx_rows(50, 4, 4, 8, 5, 1, 2, 42),
    ]
    assert all(o != a for o in others)  # another process, update or iteration: other rows
    seen = [r for position in range(12) for r in ptx_rows(48, 4, 0, 12, position, 0, 1, 42)]
    assert sorted(seen) == list(range(48))  # one pass over the data before any row repeats
