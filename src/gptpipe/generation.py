"""Text generation from trained models: batched sampling, chat prompts, answers checked."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from gptpipe.data.answers import answers_in_first_sentence


@torch.no_grad()
def complete(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 64,
    add_special_tokens: bool = True,
    progress: bool = False,
    skip_special_tokens: bool = True,
) -> list[list[str]]:
    """``num_samples`` continuations of each prompt (decoded, special tokens dropped unless
    ``skip_special_tokens`` is false), batched with left padding.

    Generation stops at the model's ``generation_config.eos_token_id`` (for chat models: end of turn).
    Rendered chat prompts already hold their special tokens: pass ``add_special_tokens=False``.
    """
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    )
    outputs: list[list[str]] = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generating", unit="batch")
    try:
        for i in starts:
            batch = tokenizer(
                prompts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            ).to(model.device)
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            texts = tokenizer.batch_decode(
                generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=skip_special_tokens
            )
            outputs += [texts[j : j + num_samples] for j in range(0, len(texts), num_samples)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def render_chat(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]]) -> list[str]:
    """Chat prompts ending with the assistant's turn opener, as the model saw them in training."""
    return [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations
    ]


def answer_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 48) -> dict:
    """Greedy replies to held-out chats (``messages`` ending in the reference reply, plus ``answer``).

    ``exact_match``: the reply equals the reference word for word (right answer, assistant style);
    ``answer_accuracy``: the right answer appears as a whole word in the reply's first sentence (a model
    that rambles on through many facts does not get credit for hitting the right one by chance).
    """
    prompts = render_chat(tokenizer, [r["messages"][:-1] for r in rows])
    replies = [
        r[0].strip() for r in complete(model, tokenizer, prompts, max_new_tokens, add_special_tokens=False)
    ]
    exact = sum(reply == r["messages"][-1]["content"].strip() for reply, r in zip(replies, rows, strict=True))
    right = sum(answers_in_first_sentence(reply, r["answer"]) for reply, r in zip(replies, rows, strict=True))
    return {
        "exact_match": exact / len(rows),
        "answer_accuracy": right / len(rows),
        "examples": [
            {"prompt": r["messages"][-2]["content"], "reply": reply}
            for reply, r in zip(replies[:5], rows, strict=False)
        ],
    }
