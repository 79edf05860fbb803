"""Chat templates that mark assistant turns with ``{% generation %}`` (TRL's assistant-only loss needs it).

Each template puts the assistant's end-of-turn token *inside* the generation block, so the model is
trained to emit it, and names that token so generation can stop there.

Tool use is rendered the way transformers' tool-use templates do it: ``tools`` (JSON schemas, as
``transformers.utils.get_json_schema`` builds them from a typed, documented function) in a system turn;
an assistant message's ``tool_calls`` ({type: function, function: {name, arguments}}) inside its generation
block, so the loss covers the calls; ``tool`` messages (the results) outside it, so it never covers them.
Each built-in template carries a ``response_template`` (transformers' parser spec, saved in the tokenizer's
config), so ``tokenizer.parse_response`` and TRL read a generated call back with their own code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptpipe.errors import UserError

ROLES = ("system", "user", "assistant", "tool")

_ROLE_CHECK = (
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown chat role ' + message['role'] + '; expected system, user, assistant or tool') }}"
    "{% endif %}"
)
# Tools (a JSON list of function schemas) are shown to the model in a system turn.
_TOOLS = "{% if tools %}{% set tools_text = tools | tojson %}{% else %}{% set tools_text = '' %}{% endif %}"
# Each tool as a signature, "add(a: integer, b: integer)": what a call needs, short enough for a tiny model's
# context (the full schemas of two tools are ~200 of its tokens).
_SIGNATURES = (
    "{% set ns = namespace(text='') %}{% for tool in tools or [] %}"
    "{% set f = tool.function if tool.function is defined else tool %}{% set ps = namespace(text='') %}"
    "{% for name, p in (f.parameters.properties if f.parameters is defined else {}) | dictsort %}"
    "{% set ps.text = ps.text ~ (', ' if ps.text else '') ~ name ~ ': ' ~ (p.type if p.type is defined else 'any') %}"
    "{% endfor %}{% set ns.text = ns.text ~ ('; ' if ns.text else '') ~ f.name ~ '(' ~ ps.text ~ ')' %}{% endfor %}"
)


def _calls(open_: str, close: str) -> str:
    """An assistant message's tool calls, each ``{"name": ..., "arguments": {...}}`` between two markers
    (arguments given as a JSON string are written as they are)."""
    return (
        "{% for call in message.tool_calls or [] %}"
        "{% set f = call.function if call.function is defined else call %}"
        + open_
        + '{"name": {{ f.name | tojson }}, "arguments": '
        "{% if f.arguments is not defined %}{}{% elif f.arguments is string %}{{ f.arguments }}"
        "{% else %}{{ f.arguments | tojson }}{% endif %}}" + close + "{% endfor %}"
    )


def _response_template(anchor: str, open_: str, close_pattern: str, end_pattern: str) -> dict:
    """transformers' ``response_template`` for a reply that is text, tool calls between markers, or both."""
    return {
        "defaults": {"role": "assistant"},
        "start_anchor": anchor,
        "fields": {
            "tool_calls": {
                "open": open_,
                "close_pattern": close_pattern,
                "repeats": True,
                "content": "json",
                "transform": {"type": "function", "function": "{content}"},
            },
            "content": {"close_pattern": end_pattern, "content": "text"},
        },
    }


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    template: str
    end_of_turn: str  # the token that closes an assistant turn: generation stops there
    special_tokens: tuple[str, ...]  # tokens the template needs in the vocabulary
    tool_tokens: tuple[
        str, ...
    ] = ()  # the tool-call markers, added with the template (not by the tokenizer stage)
    response_template: dict | None = None  # how transformers' parse_response reads a generated reply


# gptpipe's own: <|bos|><|user|>question<|end|><|assistant|>answer<|end|> — compact for tiny models.
# A call: <|assistant|><|call|>{"name": "add", "arguments": {"a": 1, "b": 2}}<|/call|><|end|><|tool|>3<|end|>
GPTPIPE = ChatTemplate(
    name="gptpipe",
    template=(
        "{{ bos_token }}" + _SIGNATURES + "{% if ns.text %}<|system|>Tools: {{ ns.text }}<|end|>"
        "{% endif %}{% for message in messages %}" + _ROLE_CHECK + "{% if message['role'] == 'assistant' %}"
        "<|assistant|>{% generation %}{{ message['content'] or '' }}"
        + _calls("<|call|>", "<|/call|>")
        + "<|end|>"
        "{% endgeneration %}"
        "{% else %}"
        "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    ),
    end_of_turn="<|end|>",
    special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"),
    tool_tokens=("<|call|>", "<|/call|>"),
    response_template=_response_template("<|assistant|>", "<|call|>", r"<\|/call\|>", r"<\|end\|>\s*"),
)

# ChatML (Qwen, SmolLM2-Instruct and many more), with generation markers; tool calls as Qwen2.5 writes them.
CHATML = ChatTemplate(
    name="chatml",
    template=(
        _TOOLS + "{% if tools_text %}<|im_start|>system\nTools: {{ tools_text }}<|im_end|>\n{% endif %}"
        "{% for message in messages %}" + _ROLE_CHECK + "{% if message['role'] == 'assistant' %}"
        # transformers renders with trim_blocks: a newline right after a tag is dropped, so print it.
        "<|im_start|>assistant\n{% generation %}{{ message['content'] or '' }}"
        + _calls("{{ '\\n' if loop.first and message['content'] else '' }}<tool_call>\n", "\n</tool_call>")
        + "<|im_end|>{% endgeneration %}{{ '\\n' }}"
        "{% else %}"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    end_of_turn="<|im_end|>",
    special_tokens=("<|im_start|>", "<|im_end|>"),
    response_template=_response_template(
        "<|im_start|>assistant\n", "<tool_call>", r"</tool_call>\s*", r"\s*<\|im_end\|>\s*"
    ),
)

BUILTIN = {t.name: t for t in (GPTPIPE, CHATML)}


def resolve(name_or_path: str) -> str:
    """The Jinja text of a built-in template name or a template file."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path].template
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.read_text()
    raise UserError(
        f"chat_template: {name_or_path!r} is neither a built-in template ({', '.join(BUILTIN)}) nor a file"
    )


SAMPLE_CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]


def install(tokenizer, name_or_path: str | None, need_assistant_mask: bool, tokenizer_name: str) -> int:
    """Give the tokenizer the recipe's chat template (adding its special tokens); returns how many were added.

    With ``name_or_path`` None the tokenizer's own template stays; having none is an error. With
    ``need_assistant_mask`` (assistant-only loss) a template that cannot mark assistant tokens is refused
    here, before any training.
    """
    added = 0
    if name_or_path:
        tokenizer.chat_template = resolve(name_or_path)
        builtin = BUILTIN.get(name_or_path)
        if builtin:
            needed = (*builtin.special_tokens, *builtin.tool_tokens)
            missing = [t for t in needed if t not in tokenizer.get_vocab()]
            added = tokenizer.add_tokens(missing, special_tokens=True) if missing else 0
            tokenizer.response_template = builtin.response_template
    elif tokenizer.chat_template is None:
        raise UserError(
            f"model.tokenizer {tokenizer_name}: the tokenizer has no chat template; "
            "set chat_template: chatml (or gptpipe, or a .jinja file)"
        )
    if need_assistant_mask and not _marks_assistant(tokenizer):
        raise UserError(
            "assistant_only_loss is on, but the chat template cannot mark assistant tokens (it has no "
            "{% generation %} block); set chat_template: chatml, or assistant_only_loss: false to train on every token"
        )
    return added


def _marks_assistant(tokenizer) -> bool:
    out = tokenizer.apply_chat_template(
        SAMPLE_CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return 1 in out["assistant_masks"]


def end_of_turn_token(tokenizer) -> str:
    """The special token that closes an assistant turn in the template (falls back to EOS)."""
    out = tokenizer.apply_chat_template(
        SAMPLE_CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    # The named special tokens and those added as special (install's, e.g. chatml's <|im_end|> on a tokenizer
    # that had none): all_special_ids holds only the first.
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    if marked and marked[-1] in special:
        return tokenizer.convert_ids_to_tokens(marked[-1])
    ids = out["input_ids"]
    reply = tokenizer.encode("Hello there", add_special_tokens=False)
    for i in range(len(ids) - len(reply) + 1):  # no markers: the first special token after the reply
        if ids[i : i + len(reply)] == reply:
            after = [t for t in ids[i + len(reply) :] if t in special]
            if after:
                return tokenizer.convert_ids_to_tokens(after[0])
    return tokenizer.eos_token


def split_reply(
    tokenizer, conversation: list[dict], tools: list[dict] | None = None
) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of a conversation whose last message is the reply: the reply starts where the
    rendered prompt (with the assistant's turn opened) and the whole rendered conversation part. ``tools``: the
    schemas shown with it (a tool conversation)."""
    prompt = tokenizer.apply_chat_template(
        conversation[:-1], tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    whole = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    shared = 0
    while shared < min(len(prompt), len(whole)) and prompt[shared] == whole[shared]:
        shared += 1
    return whole[:shared], whole[shared:]
