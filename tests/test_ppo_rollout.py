"""Rollouts: the training forward pass recomputes exactly the log-probs generation sampled with (ratio 1 at
the start of PPO), under left padding and temperature; responses are cut after the first stop token."""

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from gptpipe.ppo.rollout import response_logprobs, response_mask_until_eos, sample, sample_with_tools

PAD, EOS = 0, 2


def tiny_policy():
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=40)
    return LlamaForCausalLM(config).eval()


def test_mask_cuts_after_the_first_stop_token():
    responses = torch.tensor([[5, 6, EOS, 7, EOS], [5, 6, 7, 8, 9], [EOS, 5, 5, 5, 5]])
    mask, ended = response_mask_until_eos(responses, [EOS])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_recomputed_logprobs_equal_the_sampling_distribution():
    model = tiny_policy()
    prompts = [[1, 5, 6, 7, 8, 9], [1, 10], [1, 11, 12, 13]]  # different lengths: left padding matters
    temperature = 0.7
    torch.manual_seed(1)
    rollout = sample(model, prompts, PAD, [EOS], max_new_tokens=8, temperature=temperature)
    # Regenerate the same samples with the scores generation used (processed logits = logits / temperature).
    torch.manual_seed(1)
    out = model.generate(
        input_ids=rollout.input_ids[:, : rollout.prompt_length],
        attention_mask=rollout.attention_mask[:, : rollout.prompt_length],
        do_sample=True,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=8,
        eos_token_id=[EOS],
        pad_token_id=PAD,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, rollout.input_ids)
    sampled = torch.stack(out.scores, dim=1).log_softmax(-1)
    expected = sampled.gather(-1, rollout.responses.unsqueeze(-1)).squeeze(-1) * rollout.response_mask
    with torch.no_grad():
        got, _ = response_logprobs(model, rollout, temperature)
    assert torch.allclose(got, expected, atol=1e-5)  # PPO's first ratio is exp(0) = 1
    assert rollout.response_mask.sum() > 0


def test_value_model_from_a_reward_model_starts_at_its_score(tmp_path):
    from transformers import LlamaForSequenceClassification

    from gptpipe.ppo.rollout import left_pad
    from gptpipe.ppo.value import build_value_model, response_values

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=40, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    reward = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    critic = build_value_model(str(tmp_path / "rm"), "reward").eval()
    ids = torch.tensor([[1, 5, 6, 7, EOS]])
    with torch.no_grad():
        assert critic(input_ids=ids).logits[0, -1, 0].item() == pytest.approx(
            reward(input_ids=ids).logits[0, 0].item(), abs=1e-6
        )

    zero = build_value_model(str(tmp_path / "rm"), "policy")
    prompt_ids, prompt_mask = left_pad([[1, 5, 6], [1, 7]], PAD)
    from gptpipe.ppo.rollout import Rollout

    responses = torch.tensor([[8, 9, EOS], [10, EOS, PAD]])
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rollout = Rollout(
        input_ids=torch.cat([prompt_ids, responses], 1),
        attention_mask=torch.cat([prompt_mask, response_mask], 1),
        response_mask=response_mask,
        ended=torch.tensor([True, True]),
        prompt_length=3,
    )
    with torch.no_grad():
        assert response_values(zero, rollout).abs().sum() == 0  # zero-initialized head: every value is 0
        values = response_values(critic, rollout)
        full = critic(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=(rollout.attention_mask.cumsum(1) - 1).clamp(min=0),
        ).logits[..., 0]
    assert values.shape == (2, 3) and values[1, 2] == 0
    assert torch.allclose(values[0], full[0, 2:5]) and torch.allclose(values[1, :2], full[1, 2:4])


def test_responses_decode_from_their_valid_tokens_only():
    """With Llama 3's, Qwen2's or GPT-2's tokenizers id 0 is an ordinary token ("!"): positions after the end
    of turn must not be decoded, or the reward model scores the reply plus one "!" per position."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gptpipe.ppo.rollout import Rollout
    from gptpipe.rlhf import decode_responses

    vocab = {"!": 0, "<|end|>": 1, "<|pad|>": 2, "Paris": 3, "is": 4, "nice": 5}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|end|>", pad_token="<|pad|>")
    prompt = [[4, 4]] * 2
    responses = [[3, 4, 5, 1, 2, 2], [3, 1, 2, 2, 2, 2]]  # generate() pads after the end of turn
    ids = torch.tensor([p + r for p, r in zip(prompt, responses, strict=True)])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    rollout = Rollout(ids, torch.ones_like(ids), mask, torch.tensor([True, True]), prompt_length=2)
    assert decode_responses(tokenizer, rollout) == ["Paris is nice", "Paris"]


def test_sampling_ignores_the_checkpoints_generation_settings():
    """A checkpoint's generation_config (repetition_penalty, min_p, top_k...) must not change what PPO samples
    from: the policy's own distribution, with the recipe's temperature and top_p only."""
    model = tiny_policy()
    prompts = [[1, 5, 6, 7], [1, 10, 11]]
    torch.manual_seed(3)
    plain = sample(model, prompts, PAD, [EOS], max_new_tokens=8)
    model.generation_config.repetition_penalty = 50.0  # shipped by some instruct models (e.g. 1.05)
    model.generation_config.min_p = 0.5
    model.generation_config.top_k = 1
    torch.manual_seed(3)
    assert torch.equal(sample(model, prompts, PAD, [EOS], max_new_tokens=8).input_ids, plain.input_ids)
    assert model.generation_config.repetition_penalty == 50.0  # the model's own config is left as it was
    greedy = sample(model, prompts, PAD, [EOS], max_new_tokens=8, greedy=True)
    model.generation_config = type(model.generation_config)()
    assert torch.equal(
        sample(model, prompts, PAD, [EOS], max_new_tokens=8, greedy=True).input_ids, greedy.input_ids
    )


def test_a_lora_policy_samples_without_its_generation_settings_and_keeps_them():
    from peft import LoraConfig, get_peft_model

    model = tiny_policy()
    model.generation_config.repetition_penalty = 50.0
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=True))
    prompts = [[1, 5, 6, 7]]
    torch.manual_seed(3)
    got = sample(lora, prompts, PAD, [EOS], max_new_tokens=8)
    assert model.generation_config.repetition_penalty == 50.0
    model.generation_config = type(model.generation_config)()
    torch.manual_seed(3)
    assert torch.equal(sample(lora, prompts, PAD, [EOS], max_new_tokens=8).input_ids, got.input_ids)


def test_a_critic_from_a_reward_model_with_another_vocabulary_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from gptpipe.errors import UserError
    from gptpipe.rlhf import check_critic_tokenizer

    def tokenizer(vocab):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<u>")))

    policy, same, other = (tokenizer({"<u>": 0, **v}) for v in ({"a": 1}, {"a": 1}, {"b": 1}))
    check_critic_tokenizer("reward", policy, same, "rm")
    check_critic_tokenizer("policy", policy, other, "rm")  # the critic starts from the policy: fine
    with pytest.raises(
        UserError, match="value_init: reward starts the critic from rm, whose tokenizer differs"
    ):
        check_critic_tokenizer("reward", policy, other, "rm")


def test_a_tool_result_is_appended_attended_to_and_masked_out_of_the_response():
    from gptpipe.ppo.losses import policy_loss

    model = tiny_policy()
    prompts = [[1, 5, 6], [1, 7]]
    result = [30, 31, 32]  # a tool's result (and the next turn's opening), as the tool step gives it
    seen = []

    class ToolStep:  # row 0 calls a tool in its first turn; row 1 answers at once
        def reset(self, rows):
            self.turns = [[] for _ in range(rows)]

        def __call__(self, row, context, turn):
            seen.append((row, context, turn))
            return result if row == 0 and len(context) == len(prompts[0]) else None

    tool_step = ToolStep()

    every_token_stops = list(range(40))  # each turn is one token and ends: the layout is known in advance
    torch.manual_seed(3)
    rollout = sample_with_tools(model, prompts, tool_step, 2, PAD, every_token_stops, 6)
    (call,), (answer,) = seen[0][2], rollout.final_turns[0]
    assert [row for row, _, _ in seen] == [0, 1, 0] and seen[2][1] == [*prompts[0], call, *result]
    assert rollout.responses[0].tolist() == [call, *result, answer]
    assert rollout.response_mask.tolist() == [[1, 0, 0, 0, 1], [1, 0, 0, 0, 0]]  # the model's own tokens
    assert rollout.attention_mask[:, rollout.prompt_length :].tolist() == [[1] * 5, [1, 0, 0, 0, 0]]
    assert (
        rollout.ended.tolist() == [True, True] and rollout.final_turns[1] == rollout.responses[1, :1].tolist()
    )
    # The answer was generated after the result: the recomputed log-prob of it sees the result's tokens.
    logprobs, _ = response_logprobs(model, rollout)
    old = logprobs.detach()
    loss, _ = policy_loss(logprobs, old, torch.ones_like(old), rollout.response_mask.float(), 0.2)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert (grad[rollout.response_mask == 0] == 0).all() and (grad[rollout.response_mask == 1] != 0).all()
