"""Text generation from trained models: batched sampling, chat prompts, the `chat` and `generate` commands."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from gptpipe.data.answers import answers_in_first_sentence
from gptpipe.errors import UserError
from gptpipe.modeling import load_for_inference


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


def read_prompts(path: str | Path) -> list[dict]:
    """Prompts from a jsonl/json file: rows with ``prompt`` (string or messages) or ``messages``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts: file not found: {path}")
    text = path.read_text()
    try:
        rows = (
            json.loads(text)
            if path.suffix == ".json"
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            row = {"prompt": row}
        value = row.get("messages", row.get("prompt")) if isinstance(row, dict) else None
        if value is None:
            raise UserError(f"{path}: row {i}: expected a 'prompt' (string or messages) or 'messages' field")
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # a reference reply: answer the question instead
        out.append({**row, "id": row.get("id", i), "messages": messages})
    return out


def generate_file(
    model_dir: str | Path,
    prompts_file: str | Path,
    out_file: str | Path,
    num_samples: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> int:
    """Write ``num_samples`` replies per prompt as jsonl ({id, prompt, sample, completion}, plus the prompt row's
    other fields, e.g. an ``answer`` a labeler can check); returns rows written."""
    from transformers import set_seed

    model, tokenizer = load_for_inference(model_dir)
    rows = read_prompts(prompts_file)
    set_seed(seed)
    chat = tokenizer.chat_template is not None
    prompts = (
        render_chat(tokenizer, [r["messages"] for r in rows])
        if chat
        else [r["messages"][-1]["content"] for r in rows]
    )
    do_sample = temperature > 0 and (num_samples > 1 or temperature != 1.0 or top_p < 1.0)
    samples = complete(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        do_sample,
        max(temperature, 1e-5),
        top_p,
        num_samples,
        batch_size,
        add_special_tokens=not chat,
        progress=True,
    )
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    with tmp.open("w") as fh:
        for row, completions in zip(rows, samples, strict=True):
            extra = {k: v for k, v in row.items() if k not in ("id", "prompt", "messages")}
            for k, completion in enumerate(completions):
                record = {
                    "id": row["id"],
                    "prompt": row["messages"],
                    "sample": k,
                    "completion": completion.strip(),
                }
                fh.write(json.dumps({**record, **extra}) + "\n")
    tmp.replace(out_file)
    return len(rows) * num_samples


def chat_loop(
    model_dir: str | Path, max_new_tokens: int = 256, temperature: float = 0.0, system: str | None = None
) -> None:
    """Interactive multi-turn chat on the terminal, streaming tokens; the reply ends at end of turn."""
    from transformers import TextStreamer

    model, tokenizer = load_for_inference(model_dir)
    if tokenizer.chat_template is None:
        raise UserError(f"{model_dir}: the tokenizer has no chat template; train it with the sft stage first")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print("Chatting with", model_dir, "- empty line or Ctrl-D to quit, /reset to start over.")
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        if user == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": user})
        ids = tokenizer.apply_chat_template(
            history, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        print("assistant> ", end="", flush=True)
        sampling = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        with torch.no_grad():
            out = model.generate(
                **ids.to(model.device),
                max_new_tokens=max_new_tokens,
                streamer=streamer,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
        reply = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})
