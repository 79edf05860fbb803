"""Replies to a user's prompts: ``gptpipe generate`` (a file of prompts -> jsonl) and ``gptpipe chat`` (the
terminal), each with the tools a recipe names (``--tools``): the model's calls are run and their results shown
to it (``gptpipe.tool_use.converse``), every call and result written or printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptpipe.errors import UserError
from gptpipe.generation import complete, render_chat
from gptpipe.modeling import load_for_inference
from gptpipe.tool_use import converse, shown
from gptpipe.tools import ToolBox


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
    toolbox: ToolBox | None = None,
    max_tool_calls: int = 3,
) -> int:
    """Write ``num_samples`` replies per prompt as jsonl ({id, prompt, sample, completion}, plus the prompt row's
    other fields, e.g. an ``answer`` a labeler can check); returns rows written. With a ``toolbox`` the model's
    calls are run: each row also has ``turns`` (its calls and the tools' results, as messages), ``tool_calls``
    and ``tool_failures``, and ``completion`` is the answer after them."""
    from transformers import set_seed

    model, tokenizer = load_for_inference(model_dir)
    rows = read_prompts(prompts_file)
    set_seed(seed)
    chat = tokenizer.chat_template is not None
    if toolbox is not None and not chat:
        raise UserError(f"{model_dir}: --tools needs a chat model (its tokenizer has no chat template)")
    do_sample = temperature > 0 and (num_samples > 1 or temperature != 1.0 or top_p < 1.0)
    sampling = (do_sample, max(temperature, 1e-5), top_p)
    if toolbox is None:
        prompts = (
            render_chat(tokenizer, [r["messages"] for r in rows])
            if chat
            else [r["messages"][-1]["content"] for r in rows]
        )
        samples = complete(
            model,
            tokenizer,
            prompts,
            max_new_tokens,
            *sampling,
            num_samples,
            batch_size,
            add_special_tokens=not chat,
            progress=True,
        )
        extras = [[{}] * num_samples for _ in rows]
    else:
        conversations = [r["messages"] for r in rows for _ in range(num_samples)]
        episodes = converse(
            model, tokenizer, conversations, toolbox, max_tool_calls, max_new_tokens, batch_size, *sampling
        )
        per_row = [episodes[i : i + num_samples] for i in range(0, len(episodes), num_samples)]
        samples = [[e.reply for e in row] for row in per_row]
        extras = [
            [
                {
                    "turns": e.messages[len(r["messages"]) :],
                    "tool_calls": e.calls,
                    "tool_failures": dict(e.failures),
                }
                for e in row
            ]
            for r, row in zip(rows, per_row, strict=True)
        ]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    with tmp.open("w") as fh:
        for row, completions, tool_fields in zip(rows, samples, extras, strict=True):
            extra = {k: v for k, v in row.items() if k not in ("id", "prompt", "messages")}
            for k, (completion, fields) in enumerate(zip(completions, tool_fields, strict=True)):
                record = {
                    "id": row["id"],
                    "prompt": row["messages"],
                    "sample": k,
                    "completion": completion.strip(),
                    **fields,
                }
                fh.write(json.dumps({**record, **extra}) + "\n")
    tmp.replace(out_file)
    return len(rows) * num_samples


def chat_loop(
    model_dir: str | Path,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    system: str | None = None,
    toolbox: ToolBox | None = None,
    max_tool_calls: int = 3,
) -> None:
    """Interactive multi-turn chat on the terminal; the reply ends at end of turn. Without tools the tokens
    stream; with a ``toolbox`` each call and its result is printed before the answer."""
    model, tokenizer = load_for_inference(model_dir)
    if tokenizer.chat_template is None:
        raise UserError(f"{model_dir}: the tokenizer has no chat template; train it with the sft stage first")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    tools = f" (tools: {', '.join(s['function']['name'] for s in toolbox.schemas)})" if toolbox else ""
    print(f"Chatting with {model_dir}{tools} - empty line or Ctrl-D to quit, /reset to start over.")
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
        if toolbox is None:
            reply = _streamed_reply(model, tokenizer, history, max_new_tokens, temperature)
        else:
            sampling = (True, temperature, 1.0) if temperature > 0 else ()
            (episode,) = converse(
                model, tokenizer, [history], toolbox, max_tool_calls, max_new_tokens, 1, *sampling
            )
            for message in episode.messages[len(history) :]:
                print(f"  [{shown(message)}]")
            history = episode.messages
            reply = episode.reply
            print("assistant>", reply)
        history.append({"role": "assistant", "content": reply})


def _streamed_reply(model, tokenizer, history: list[dict], max_new_tokens: int, temperature: float) -> str:
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids = tokenizer.apply_chat_template(
        history, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    print("assistant> ", end="", flush=True)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(
            **ids.to(model.device),
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
