"""A real tiny Llama trained in a few seconds to say the SCRIPT's turns word for word, tool calls included, so
that the tool tests reach every branch (a call run and read back, an unknown tool, bad arguments, two calls in
one turn, a call over the limit, a plain reply) by generation, not by a stand-in. tests/conftest.py shares it
(``scripted``) and its model folder with a tool file of its own (``scripted_dir``)."""

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from gptpipe.data import chat_templates
from gptpipe.tools import ToolBox, load_tools

TOOLS = ["gptpipe.data.arithmetic:add", "gptpipe.data.arithmetic:multiply"]


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def turns(question, *steps):
    """A user question, then (assistant calls or text, tool results) steps as the model is to say them."""
    messages = [{"role": "user", "content": question}]
    for step in steps:
        if isinstance(step, str):
            messages.append({"role": "assistant", "content": step})
        else:
            calls, results = step
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            messages += [{"role": "tool", "content": r} for r in results]
    return messages


BOX = ToolBox(load_tools(TOOLS))
UNKNOWN = BOX.run("divide", {"a": 8, "b": 2})[0]
BAD = BOX.run("add", {"a": 1})[0]
# (conversation, shown the tools): what the model below is trained to say, word for word.
SCRIPT = [
    (turns("What is 12 plus 30?", ([call("add", a=12, b=30)], ["42"]), "12 plus 30 is 42."), True),
    (turns("What is 8 over 2?", ([call("divide", a=8, b=2)], [UNKNOWN]), "I cannot say."), True),
    (turns("What is 1 plus?", ([call("add", a=1)], [BAD]), "I cannot say."), True),
    (
        turns("Two sums?", ([call("add", a=1, b=2), call("multiply", a=3, b=4)], ["3", "12"]), "3 and 12."),
        True,
    ),
    (turns("Again and again?", ([call("add", a=1, b=1)], ["2"]), ([call("add", a=2, b=2)], ["4"])), True),
    (turns("Say hello.", "Hello."), True),
    (
        turns("What is 12 plus 30?", ([call("add", a=12, b=30)], ["Error: no tools are available"]), "No."),
        False,
    ),
    (turns("What is 8 over 2?", "No."), False),
    (turns("What is 1 plus?", "No."), False),
]
NO_TOOLS = [messages for messages, shown in SCRIPT if not shown]


def learn_script(tokenizer_dir):
    """A tiny Llama that has learned SCRIPT by heart (greedy generation says it back), and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat_templates.install(tokenizer, "gptpipe", True, "tiny")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"),
    )
    model = LlamaForCausalLM(config)
    rows = [
        tokenizer.apply_chat_template(
            messages,
            tools=BOX.schemas if shown else None,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        for messages, shown in SCRIPT
    ]
    width = max(len(r["input_ids"]) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor(
        [
            [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"], strict=True)]
            + [-100] * (width - len(r["input_ids"]))
            for r in rows
        ]
    )
    attention = (
        torch.arange(width)[None] < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]
    ).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 0.005:
            break
    model.generation_config.eos_token_id = config.eos_token_id
    return model, tokenizer


def save_scripted(model, tokenizer, folder: Path) -> Path:
    """The scripted model as a model folder (``final``), and a tool file no code of gptpipe knows (its own
    ``add``)."""
    model.save_pretrained(folder / "final")
    tokenizer.save_pretrained(folder / "final")
    (folder / "my_tools.py").write_text(
        "def add(a: int, b: int) -> int:\n"
        '    """Add two whole numbers.\n\n    Args:\n        a: the first number\n        b: the second number\n'
        '    """\n    return a + b\n'
    )
    return folder
