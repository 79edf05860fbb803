"""Tool calls in data and templates: converted from every conversational format, rendered inside the
assistant's generation block (trained) with tool results outside it (not trained), and parsed back by
transformers' own ``parse_response`` from the response template the tokenizer saves."""

import json

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from gptpipe.config import SFTConfig
from gptpipe.data import chat_templates, formats
from gptpipe.errors import UserError
from gptpipe.stages.sft import trl_prepare


def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATION = [
    {"role": "user", "content": "What is 123 plus 456?"},
    {"role": "assistant", "content": "", "tool_calls": [call("add", a=123, b=456)]},
    {"role": "tool", "content": "579"},
    {
        "role": "assistant",
        "content": "Two more.",
        "tool_calls": [call("add", a=1, b=2), call("add", a=3, b=4)],
    },
    {"role": "tool", "content": "3"},
    {"role": "tool", "content": "7"},
    {"role": "assistant", "content": "123 plus 456 is 579."},
]


@pytest.fixture(scope="module", params=["gptpipe", "chatml"])
def tokenizer(request, tokenizer_dir, tmp_path_factory):
    """The tiny world's tokenizer with a built-in template installed, saved and loaded back as a user's is."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat_templates.install(tok, request.param, need_assistant_mask=True, tokenizer_name="tiny")
    out = tmp_path_factory.mktemp(request.param)
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def test_each_assistant_turn_parses_back_to_its_calls_and_text(tokenizer):
    assert (
        tokenizer.response_template
        == chat_templates.BUILTIN[
            "gptpipe" if "<|call|>" in tokenizer.get_vocab() else "chatml"
        ].response_template
    )  # saved in tokenizer_config.json
    turns = [i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
    for i in turns:
        prefix = tokenizer.apply_chat_template(
            CONVERSATION[:i], tools=[add], tokenize=False, add_generation_prompt=True
        )
        whole = tokenizer.apply_chat_template(CONVERSATION[: i + 1], tools=[add], tokenize=False)
        assert whole.startswith(prefix)
        parsed = tokenizer.parse_response(whole[len(prefix) :], prefix=prefix, tools=[add])
        expected = CONVERSATION[i]
        assert parsed.get("tool_calls") == expected.get("tool_calls")
        assert parsed.get("content", "") == expected["content"]


def test_calls_are_trained_and_tool_results_are_not(tokenizer):
    out = tokenizer.apply_chat_template(
        CONVERSATION, tools=[add], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    untrained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert '"name": "add", "arguments": {"a": 123, "b": 456}' in trained and "123 plus 456 is 579." in trained
    for result in ("579", "3", "7"):  # each tool result sits in an untrained span
        assert f"tool|>{result}<|end|>" in untrained or f"tool\n{result}<|im_end|>" in untrained


def test_sft_preparation_masks_tool_results_from_the_loss(tokenizer, tmp_path):
    """TRL's own preparation (tools column, assistant_only_loss), as the SFT stage runs it."""
    row = {"messages": CONVERSATION, "tools": json.dumps([{"type": "function", "function": {"name": "add"}}])}
    ds = formats.convert(Dataset.from_list([row]), "messages", "calls.jsonl")
    cfg = SFTConfig(output_dir=str(tmp_path), bf16=False, max_length=512, assistant_only_loss=True)
    [prepared] = trl_prepare(ds, tokenizer, cfg, packing=False, name="train")
    trained = tokenizer.decode([t for t in prepared["labels"] if t != -100])  # the tokens the loss covers
    assert trained.count('"name": "add"') == 3 and trained.endswith(("579.<|end|>", "579.<|im_end|>"))
    assert trained.count("579") == 1  # in the answer, never as the tool's result
    assert "<|tool|>" not in trained and "<|im_start|>" not in trained and "What is" not in trained


def test_sharegpt_function_calls_as_llama_factory_and_glaive_ship_them():
    """LLaMA-Factory's glaive_toolcall set: function_call turns hold the JSON call, observation the result."""
    tools = [{"name": "get_weather", "description": "Weather now", "parameters": {"type": "object"}}]
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": '{"temperature": -3}'},
            {"from": "gpt", "value": "It is -3C in Oslo."},
        ],
        "tools": json.dumps(tools),
    }
    [out] = formats.convert(Dataset.from_list([row]), "sharegpt", "glaive.json")
    assert out["messages"][1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
        ],
    }
    assert out["messages"][2]["role"] == "tool" and json.loads(out["tools"]) == tools


def test_openai_shaped_calls_with_string_arguments_are_read():
    row = {
        "messages": [
            {"role": "user", "content": "1+2?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"name": "add", "arguments": '{"a": 1, "b": 2}'}],
            },
            {"role": "tool", "content": "3"},
            {"role": "assistant", "content": "3."},
        ]
    }
    [out] = formats.convert(Dataset.from_list([row]), "messages", "openai.jsonl")
    [stored] = out["messages"][1]["tool_calls"]  # arguments kept as a JSON string
    assert stored["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert out["messages"][1]["content"] == ""


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": "{a: 1"}]}],
            "row 0: field 'messages.0.tool_calls.0.function.arguments': not valid JSON",
        ),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}],
            "row 0: field 'messages.0.tool_calls.0': expected {name, arguments}",
        ),
        (
            [
                {"role": "user", "content": "1+2?"},
                {"role": "tool", "content": "3"},
                {"role": "assistant", "content": "3."},
            ],
            "row 0: field 'messages.1.role': a tool message .* must follow the assistant's tool call",
        ),
    ],
)
def test_bad_tool_calls_name_the_row_and_field(messages, message):
    with pytest.raises(UserError, match=message):
        formats.convert(Dataset.from_list([{"messages": messages}]), "messages", "calls.jsonl")


TOOL_FILE = '''
import time


def multiply(a: int, b: int) -> int:
    """Multiply two whole numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a * b


def divide(a: float, b: float) -> float:
    """Divide a by b.

    Args:
        a: the dividend
        b: the divisor
    """
    return a / b


def sleepy(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "awake"


def undocumented(a: int) -> int:
    return a


def untyped(a):
    """No hints.

    Args:
        a: something
    """
    return a
'''


@pytest.fixture
def tool_file(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(TOOL_FILE)
    return path


def test_a_tool_from_a_file_gets_its_schema_and_runs(tool_file):
    from gptpipe.tools import ToolBox, load_tools

    box = ToolBox(load_tools([f"{tool_file}:multiply", "test_tool_calls:add"]), timeout=1.0)
    [multiply, plus] = box.schemas
    assert multiply["function"]["parameters"]["required"] == ["a", "b"] and plus["function"]["name"] == "add"
    assert box.run("multiply", {"a": 12, "b": 34}) == ("408", None)


@pytest.mark.parametrize("name", ["undocumented", "untyped"])
def test_a_tool_without_docstring_or_type_hints_is_refused_naming_it(tool_file, name):
    from gptpipe.tools import load_tools

    with pytest.raises(
        UserError, match=rf"tools.1: tool '.*my_tools.py:{name}' cannot be shown to the model"
    ):
        load_tools([f"{tool_file}:multiply", f"{tool_file}:{name}"])


def test_bad_calls_come_back_as_error_text_and_are_counted(tool_file):
    from gptpipe.tools import ToolBox, load_tools

    box = ToolBox(load_tools([f"{tool_file}:{n}" for n in ("multiply", "divide", "sleepy")]), timeout=0.3)
    results = [
        box.run("power", {"a": 2}),
        box.run("multiply", {"a": 2}),
        box.run("multiply", {"a": 2, "b": "3"}),
        box.run("multiply", {"a": 2, "b": 3, "c": 4}),
        box.run("divide", {"a": 1, "b": 0}),
        box.run("sleepy", {"seconds": 5}),
        box.run("divide", {"a": 1, "b": 4}),
    ]
    kinds = [kind for _, kind in results]
    assert kinds == [
        "unknown_tool",
        "bad_arguments",
        "bad_arguments",
        "bad_arguments",
        "raised",
        "timeout",
        None,
    ]
    assert results[0][0].startswith("Error: unknown tool 'power'") and "ZeroDivisionError" in results[4][0]
    assert results[-1][0] == "0.25"
    assert box.stats == {
        "calls": 7,
        "unknown_tool": 1,
        "bad_arguments": 3,
        "raised": 1,
        "timeout": 1,
        "ok": 1,
    }


def test_the_tiny_worlds_calculator_part_holds_out_operand_pairs_and_converts():
    from gptpipe.data import arithmetic, tinyworld

    world = tinyworld.generate(0)
    train, heldout, unseen = (world["tools"][split] for split in ("train", "eval", "unseen"))
    question = lambda row: row["messages"][0]["content"]  # noqa: E731
    assert len(train) == arithmetic.TRAIN_PAIRS == 16000 and len(heldout) == len(unseen) == 100
    assert not {question(r) for r in train} & {question(r) for r in heldout}
    # training asks in three phrasings; the unseen split asks the held-out questions in a fourth
    assert [question(r).split()[0] for r in train[:4]] == ["What", "How", "Work", "What"]
    assert [r["messages"][1:] for r in unseen] == [r["messages"][1:] for r in heldout]
    assert question(unseen[0]).startswith("Say what ") and not any(
        question(r).startswith("Say") for r in train
    )
    for row in heldout[:20]:
        [call] = row["messages"][1]["tool_calls"]
        fn, _ = arithmetic.OPERATIONS[call["function"]["name"]]
        assert row["answer"] == str(fn(**call["function"]["arguments"])) == row["messages"][2]["content"]
        assert row["messages"][3]["content"].endswith(f" is {row['answer']}.")
    converted = formats.convert(Dataset.from_list(heldout), "messages", "tinyworld:tools")
    [stored], [made] = converted[0]["messages"][1]["tool_calls"], heldout[0]["messages"][1]["tool_calls"]
    assert json.loads(stored["function"]["arguments"]) == made["function"]["arguments"]
    # SFT's chats, every other one with the calculator shown and answered without a call
    chats, schemas = world["tools"]["chats"], train[0]["tools"]
    assert [r["messages"] for r in chats] == [r["messages"] for r in world["sft"]["train"]]
    assert [r["tools"] for r in chats[:4]] == [schemas, None, schemas, None]
    converted = formats.convert(Dataset.from_list(chats[:2]), "messages", "tinyworld:tools")
    assert json.loads(converted[0]["tools"]) == json.loads(schemas) and converted[1]["tools"] is None


def test_a_rollouts_tool_step_reads_the_turn_and_appends_what_the_template_would_write(tokenizer):
    """PPO's tool step (gptpipe.tool_use.ToolTurns), under both built-in templates: the model's turn (its own
    tokens), the call run, and the tokens after it equal the template's rendering of the whole conversation."""
    from gptpipe.tool_use import ToolTurns
    from gptpipe.tools import ToolBox, load_tools

    box = ToolBox(load_tools(["gptpipe.data.arithmetic:add"]))
    question = [{"role": "user", "content": "What is 123 plus 456?"}]
    asked = [*question, {"role": "assistant", "content": "", "tool_calls": [call("add", a=123, b=456)]}]

    def ids(messages, **kwargs):
        return tokenizer.apply_chat_template(
            messages, tools=box.schemas, tokenize=True, return_dict=True, **kwargs
        )["input_ids"]

    context = ids(question, add_generation_prompt=True)
    end = tokenizer.convert_tokens_to_ids(chat_templates.end_of_turn_token(tokenizer))
    whole = ids(asked)
    turn = whole[len(context) : max(i for i, t in enumerate(whole) if t == end) + 1]  # up to its end of turn
    step = ToolTurns(tokenizer, box)
    step.reset(1)
    after = step(0, context, turn)
    expected = ids([*asked, {"role": "tool", "name": "add", "content": "579"}], add_generation_prompt=True)
    assert context + turn + after == expected
    assert step.turns[0][1] == {"role": "tool", "content": "579", "name": "add"}
    assert dict(step.counts) == {"calls": 1, "valid_calls": 1}
    assert (
        step(0, context, tokenizer.encode("It is 579.", add_special_tokens=False) + [end]) is None
    )  # an answer
