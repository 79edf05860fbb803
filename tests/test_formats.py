"""Every SFT format converts to the same conversation; rendering and loss masks are checked token by token."""

import json

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from gptpipe.data import chat_templates, formats
from gptpipe.errors import UserError


def convert_one(fmt, row):
    """One converted row, its messages without the empty ``tool_calls`` every message of a mixture carries."""
    out = formats.convert(Dataset.from_list([row]), fmt, "sample.json")[0]
    out["messages"] = [
        {k: v for k, v in m.items() if not (k == "tool_calls" and v is None)} for m in out["messages"]
    ]
    return out


def test_alpaca_with_system_input_and_history():
    row = {
        "instruction": "Add them.",
        "input": "2 and 3",
        "output": "5",
        "system": "Be brief.",
        "history": [["Hi", "Hello!"]],
    }
    assert convert_one("alpaca", row)["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Add them.\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]


def test_sharegpt_with_tools_function_call_and_observation():
    tools = [{"name": "weather", "parameters": {"city": "string"}}]
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": "-3C"},
            {"from": "gpt", "value": "It is -3C in Oslo."},
        ],
        "system": "You are helpful.",
        "tools": json.dumps(tools),
    }
    out = convert_one("sharegpt", row)
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert json.loads(out["tools"]) == tools


def test_prompt_completion_strings_and_messages():
    assert convert_one("prompt_completion", {"prompt": "Q?", "completion": "A."})["messages"] == [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
    ]
    msgs = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "completion": [{"role": "assistant", "content": "A."}],
    }
    assert convert_one("prompt_completion", msgs)["messages"] == [*msgs["prompt"], *msgs["completion"]]


def test_content_given_as_text_parts_is_joined(tmp_path):
    """The OpenAI / HF multimodal chat shape: content as a list of parts (next to plain strings in the same file);
    text parts joined with newlines, in SFT and in comparisons alike; any other part names its row."""
    from gptpipe.config import DataSource
    from gptpipe.data.preferences import convert_pairs
    from gptpipe.data.sources import load_source

    parts = [{"type": "text", "text": "Where does Bosu live?"}, {"type": "text", "text": "One city."}]
    rows = [
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Dublin."}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                {"role": "assistant", "content": "A cat."},
            ]
        },
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chats = load_source(DataSource(path=str(path)))
    converted = formats.convert(chats.select([0]), "messages", str(path))[0]["messages"]
    assert (
        converted[0]["content"] == "Where does Bosu live?\nOne city." and converted[1]["content"] == "Dublin."
    )
    with pytest.raises(
        UserError, match="row 1: field 'messages.0.content.0': a image_url part; gptpipe trains"
    ):
        formats.convert(chats, "messages", str(path))
    pair = {"prompt": [{"role": "user", "content": parts}], "chosen": "Dublin.", "rejected": "Paris."}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    pairs = load_source(DataSource(path=str(tmp_path / "pairs.jsonl")))
    assert (
        convert_pairs(pairs, "preference", "pairs.jsonl")[0]["chosen"][0]["content"]
        == converted[0]["content"]
    )
    from gptpipe.rlhf import prompt_rows  # RL, rank and compare prompts read the same way

    prompts = DataSource(path=str(tmp_path / "pairs.jsonl"))
    assert prompt_rows(load_source(prompts), prompts)[0]["prompt"] == [
        {"role": "user", "content": converted[0]["content"]}
    ]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": [{"role": "bot", "content": "x"}]}) + "\n")
    bad = DataSource(path=str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="bad.jsonl: row 0: field 'prompt.0.role': unknown role 'bot'"):
        prompt_rows(load_source(bad), bad)


@pytest.mark.parametrize(
    "fmt, row, message",
    [
        (
            "messages",
            {"messages": [{"role": "bot", "content": "hi"}]},
            "row 0: field 'messages.0.role': unknown role 'bot'",
        ),
        ("messages", {"messages": []}, "row 0: field 'messages': the conversation is empty"),
        (
            "messages",
            {"messages": [{"role": "user", "content": "hi"}]},
            "row 0: field 'messages.0.role': the conversation ends on a user turn",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "alien", "value": "x"}]},
            "field 'conversations.0.from': unknown speaker 'alien'",
        ),
        ("alpaca", {"instruction": "x", "output": None}, "field 'output': expected a string, got NoneType"),
        (
            "alpaca",
            {"prompt": "x", "output": "y"},
            "format alpaca needs field 'instruction', but the columns are ['prompt', 'output']",
        ),
    ],
)
def test_bad_rows_name_file_row_and_field(fmt, row, message):
    with pytest.raises(UserError) as err:
        convert_one(fmt, row)
    assert str(err.value).startswith("sample.json")
    assert message in str(err.value)


@pytest.fixture(scope="module")
def chatml_tokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = chat_templates.CHATML.template
    tok.add_tokens(list(chat_templates.CHATML.special_tokens), special_tokens=True)
    return tok


def rendered_and_trained(tok, messages, tools=None):
    out = tok.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    text = tok.decode(out["input_ids"])
    trained = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m])
    return text, trained


MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "call weather()"},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."},
]


def test_gptpipe_template_renders_and_masks_only_assistant_turns(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text, trained = rendered_and_trained(tok, MULTI_TURN)
    assert text == (
        "<|bos|><|system|>Be brief.<|end|><|user|>2+2?<|end|><|assistant|>4.<|end|><|user|>Weather?<|end|>"
        "<|assistant|>call weather()<|end|><|tool|>sunny<|end|><|assistant|>Sunny.<|end|>"
    )
    assert trained == "4.<|end|>call weather()<|end|>Sunny.<|end|>"  # each reply with its end-of-turn token


def test_chatml_template_renders_tools_and_masks(chatml_tokenizer):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    text, trained = rendered_and_trained(chatml_tokenizer, MULTI_TURN, tools=tools)
    assert text.startswith('<|im_start|>system\nTools: [{"type": "function"')
    assert "<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\nSunny.<|im_end|>\n" in text
    assert trained == "4.<|im_end|>call weather()<|im_end|>Sunny.<|im_end|>"


def test_completion_only_split_keeps_history_in_prompt():
    row = {"messages": MULTI_TURN}
    split = formats.split_last_turn(row)
    assert split["prompt"] == MULTI_TURN[:-1] and split["completion"] == MULTI_TURN[-1:]
