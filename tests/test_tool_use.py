"""Conversations in which the model calls tools (gptpipe.tool_use): each call is parsed by transformers' own
``parse_response``, run by the tool box, its result appended as a ``tool`` message, and the model goes on;
bad calls are counted by kind, never raised; ``gptpipe generate`` and ``gptpipe chat`` run the tools a recipe or
flag names. The model is the scripted tiny Llama of tests/helpers/scripted_tools.py. Training with tools (SFT,
PPO, GRPO): test_tool_training.py."""

import json

import pytest
from conftest import REPO
from scripted_tools import NO_TOOLS, SCRIPT, TOOLS

from gptpipe.data import arithmetic
from gptpipe.tool_use import converse, tool_evidence
from gptpipe.tools import ToolBox, load_tools


def test_each_call_is_run_and_its_result_read_back_or_counted(scripted):
    model, tokenizer = scripted
    questions = [messages[:1] for messages, shown in SCRIPT if shown]
    box = ToolBox(load_tools(TOOLS))
    episodes = converse(model, tokenizer, questions, box, max_tool_calls=1, max_new_tokens=128)
    expected = [messages for messages, shown in SCRIPT if shown]
    for episode, messages in zip(episodes[:4], expected, strict=False):
        assert episode.messages == messages[:-1]  # the calls as parsed, the tool box's results
        assert episode.reply == messages[-1]["content"] and episode.answered
    sums, unknown, bad, two, again, hello = episodes
    assert (sums.calls, sums.valid_calls, dict(sums.failures)) == (1, 1, {})
    assert (unknown.calls, unknown.valid_calls, dict(unknown.failures)) == (1, 0, {"unknown_tool": 1})
    assert (bad.calls, bad.valid_calls, dict(bad.failures)) == (1, 0, {"bad_arguments": 1})
    assert (two.calls, two.valid_calls) == (2, 2)
    # A second round of calls with max_tool_calls 1: counted, not run, and no answer.
    assert again.messages == expected[4][:3] and not again.answered and again.reply == ""
    assert (again.calls, dict(again.failures)) == (2, {"over_max_tool_calls": 1})
    assert hello.messages == expected[5][:1] and hello.reply == "Hello." and hello.calls == 0
    assert box.stats == {"calls": 6, "ok": 4, "unknown_tool": 1, "bad_arguments": 1}


def test_a_turn_cut_off_mid_call_is_an_unreadable_call_and_the_end(scripted):
    model, tokenizer = scripted
    two_calls = SCRIPT[3][0][:1]  # its turn is ~100 tokens: cut at 48, inside the second call's JSON
    (episode,) = converse(model, tokenizer, [two_calls], ToolBox(load_tools(TOOLS)), max_new_tokens=48)
    assert episode.messages == two_calls and not episode.answered
    assert (episode.calls, episode.valid_calls, dict(episode.failures)) == (1, 0, {"unreadable": 1})
    assert episode.reply.startswith('{"name": "add"')  # the text as generated, markers dropped


def test_without_tools_none_are_shown_and_a_call_gets_an_error(scripted):
    model, tokenizer = scripted
    (episode,) = converse(model, tokenizer, [NO_TOOLS[0][:1]], None, max_tool_calls=1, max_new_tokens=128)
    assert episode.messages == NO_TOOLS[0][:-1] and episode.reply == "No."
    assert dict(episode.failures) == {"unknown_tool": 1}


def test_tool_evidence_scores_answers_both_ways_and_the_valid_calls(scripted):
    model, tokenizer = scripted
    rows = [
        {"messages": SCRIPT[0][0], "answer": "42"},
        {"messages": SCRIPT[1][0], "answer": "4"},
        {"messages": SCRIPT[2][0], "answer": "1"},
    ]
    found = tool_evidence(
        model, tokenizer, rows, ToolBox(load_tools(TOOLS)), max_tool_calls=1, max_new_tokens=128
    )
    assert found["tool_answer_accuracy"] == pytest.approx(1 / 3)  # 42 right; the other two cannot say
    assert found["no_tool_answer_accuracy"] == 0.0  # without tools each is answered "No."
    assert found["tool_call_validity"] == pytest.approx(1 / 3)
    assert found["tool_calls_per_answer"] == 1.0
    assert found["tool_failures"] == {"unknown_tool": 1, "bad_arguments": 1}
    assert found["tool_examples"][0]["turns"] == ["call add({'a': 12, 'b': 30})", "tool -> 42"]


def tool_flags(folder):
    return ["--tools", f"{folder / 'my_tools.py'}:add", TOOLS[1], "--max-tool-calls", "1"]


def test_generate_runs_the_tools_a_file_names_and_writes_each_call(scripted_dir, tmp_path):
    from gptpipe.cli import run

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m[:1], "answer": "42"}) + "\n" for m, _ in SCRIPT[:2]))
    out = tmp_path / "out.jsonl"
    flags = ["--prompts", str(prompts), "--out", str(out), "--temperature", "0", "--max-new-tokens", "128"]
    run(["generate", str(scripted_dir / "final"), *flags, *tool_flags(scripted_dir)])
    sums, unknown = (json.loads(line) for line in out.read_text().splitlines())
    assert sums["turns"] == SCRIPT[0][0][1:3]  # the call as parsed, the file's add's result
    assert (sums["completion"], sums["tool_calls"], sums["tool_failures"]) == ("12 plus 30 is 42.", 1, {})
    assert sums["answer"] == "42" and sums["prompt"] == SCRIPT[0][0][:1]
    assert unknown["tool_failures"] == {"unknown_tool": 1} and unknown["completion"] == "I cannot say."


def test_chat_shows_each_call_and_result_before_the_answer(scripted_dir, monkeypatch, capsys):
    import io

    from gptpipe.cli import run

    # /reset between the questions: the scripted model knows each question alone, not after the other
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 12 plus 30?\n/reset\nSay hello.\n\n"))
    run(["chat", str(scripted_dir / "final"), "--max-new-tokens", "128", *tool_flags(scripted_dir)])
    out = capsys.readouterr().out
    assert "(tools: add, multiply)" in out
    lines = [line.removeprefix("you>").strip() for line in out.splitlines()]  # input() echoes no newline
    shown = [line for line in lines if line.startswith("[")]
    assert shown == ["[call add({'a': 12, 'b': 30})]", "[tool -> 42]"], out
    replies = [line.split("assistant>")[1].strip() for line in out.splitlines() if "assistant>" in line]
    assert replies == ["12 plus 30 is 42.", "Hello."]


def test_tool_flags_refuse_an_undocumented_tool(tmp_path, capsys):
    from gptpipe.cli import main

    (tmp_path / "my_tools.py").write_text("def shout(text):\n    return text.upper()\n")
    with pytest.raises(SystemExit) as exit_:
        main(["chat", str(tmp_path), "--tools", f"{tmp_path / 'my_tools.py'}:shout"])
    assert exit_.value.code == 2 and "--tools.0: tool" in capsys.readouterr().err


def test_the_tiny_worlds_calculator_answers_through_the_same_functions():
    box = ToolBox(load_tools(TOOLS))
    assert box.schemas == arithmetic.tool_schemas()
    assert box.run("multiply", {"a": 123, "b": 45}) == ("5535", None)


def test_validate_refuses_an_undocumented_tool_and_tool_questions_without_tools(tmp_path, capsys):
    from gptpipe.cli import main

    (tmp_path / "my_tools.py").write_text("def shout(text):\n    return text.upper()\n")
    recipe = str(REPO / "recipes/tiny/sft-tools.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["validate", recipe, "--set", f"tools.1={tmp_path / 'my_tools.py'}:shout"])
    assert exit_.value.code == 2
    assert (
        f"tools.1: tool '{tmp_path / 'my_tools.py'}:shout' cannot be shown to the model"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exit_:
        main(["validate", recipe, "--set", "tools=[]"])
    assert (
        exit_.value.code == 2
        and "tool_datasets: the held-out tool questions need the tools" in capsys.readouterr().err
    )
