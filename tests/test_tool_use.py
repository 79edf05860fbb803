"""Conversations in which the model calls tools (gptpipe.tool_use): each call is parsed by transformers' own
``parse_response``, run by the tool box, its result appended as a ``tool`` message, and the model goes on;
bad calls are counted by kind, never raised. The model is a real tiny Llama trained here (a few seconds) to
say exactly the turns below, so every branch is reached by generation, not by a stand-in."""

import json

import pytest
import torch
from conftest import REPO, SHORT_RUN, as_overrides
from learning import learning_checks
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from gptpipe.data import arithmetic, chat_templates
from gptpipe.tool_use import TOOL_KEYS, converse, tool_evidence
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


@pytest.fixture(scope="module")
def scripted(tokenizer_dir):
    return learn_script(tokenizer_dir)


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


@pytest.fixture(scope="module")
def scripted_dir(scripted, tmp_path_factory):
    """The scripted model as a model folder, and a tool file no code of gptpipe knows (its own ``add``)."""
    model, tokenizer = scripted
    folder = tmp_path_factory.mktemp("scripted")
    model.save_pretrained(folder / "final")
    tokenizer.save_pretrained(folder / "final")
    (folder / "my_tools.py").write_text(
        "def add(a: int, b: int) -> int:\n"
        '    """Add two whole numbers.\n\n    Args:\n        a: the first number\n        b: the second number\n'
        '    """\n    return a + b\n'
    )
    return folder


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


def test_a_ptx_row_with_tools_is_rendered_with_them_and_trained_on_its_answer(tokenizer_dir):
    """PPO-ptx on tool conversations (the rows of a tool SFT, in the ``tools`` column's JSON) shows the model the
    schemas it was shown in SFT; rendered without them the term would teach calls to tools never offered."""
    from gptpipe.ppo.ptx import encode_examples

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat_templates.install(tokenizer, "gptpipe", True, "tiny")
    messages = SCRIPT[0][0]
    row = {"messages": messages, "tools": json.dumps(BOX.schemas)}
    (ids, labels), (bare, _) = encode_examples(tokenizer, [row, {"messages": messages, "tools": None}], 512)
    shown = tokenizer.apply_chat_template(messages, tools=BOX.schemas, tokenize=True, return_dict=True)
    assert ids == shown["input_ids"] and len(bare) < len(ids)
    trained = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
    assert "12 plus 30 is 42." in trained and '"add"' not in trained  # the final answer alone


def test_show_tools_shows_the_recipes_tools_on_a_share_of_chats_and_is_refused_where_unread(capsys):
    """``show_tools: 0.5`` on a chat source: half its conversations carry the recipe's tools (as a ``tools``
    column, which TRL renders) with their replies unchanged; validate refuses it without tools, outside SFT and
    outside (0, 1], naming the source."""
    from gptpipe.cli import main
    from gptpipe.recipe import load_recipe
    from gptpipe.stages import sft

    recipe = str(REPO / "recipes/tiny/sft-tools.yaml")
    chats = "datasets=[{path: tinyworld:sft, show_tools: 0.5}]"
    train, _ = sft.load_conversations(load_recipe(recipe, [chats]))
    plain, _ = sft.load_conversations(load_recipe(recipe, ["datasets=[{path: tinyworld:sft}]"]))
    shown = [t for t in train["tools"] if t is not None]
    assert len(shown) == round(len(train) / 2) and set(shown) == {json.dumps(arithmetic.tool_schemas())}
    assert train["messages"] == plain["messages"] and set(plain["tools"]) == {None}
    for override, expected in (
        (
            "tools=[]",
            "datasets.0 (tinyworld:sft): show_tools 0.5: shows the recipe's tools, but tools: is empty",
        ),
        ("datasets.0.show_tools=1.5", "above 0 and at most 1"),
    ):
        extra = ["tool_datasets=[]", "generalization_datasets=[]"] if override == "tools=[]" else []
        with pytest.raises(SystemExit) as exit_:
            main(["validate", recipe, "--set", chats, override, *extra])
        assert exit_.value.code == 2 and expected in capsys.readouterr().err
    for where, key in (("grpo-tools", "datasets"), ("sft-tools", "ptx_datasets")):  # read elsewhere as it is
        with pytest.raises(SystemExit) as exit_:
            main(["validate", str(REPO / f"recipes/tiny/{where}.yaml"), "--set", f"{key}.0.show_tools=0.5"])
        assert exit_.value.code == 2 and f"{key}.0 " in (err := capsys.readouterr().err)
        assert "only SFT's datasets and eval_datasets read it" in err


# Valid calls after 80 constant-rate steps of 16 conversations, seeds 42 / 0 / 1 / 2 (each seed's own chain, 1
# thread, AMD EPYC Zen 3, 2026-12-07): 0.94 / 0.91 / 1.00 / 0.62; calls per question 1.00 on each. Before: no
# call at all. Batches of 32, the recipe's, take twice the time: seed 2 0.75 (recorded before: 0.81 / 0.56 on
# seeds 0 / 1).
STEPS, BATCH, VALID, CALLS = 80, 16, 0.4, 0.9


@pytest.mark.learning
def test_sft_on_tool_calls_learns_to_call_the_calculator(tiny_sft, tmp_path):
    """SFT on the calculator conversations teaches the SFT model, which has never seen a call, to answer a
    held-out sum by calling a tool: a readable call of a known tool with arguments that fit its schema, one per
    question. (Copying every operand digit right takes ~500 steps: recipes/tiny/sft-tools.yaml.) eval.json, the
    stage's line and report carry the tool evidence, and the call markers travel with the model."""
    from gptpipe.cli import run

    out = tmp_path / "sft-tools"
    settings = {"output_dir": out, "model.name_or_path": tiny_sft, "answer_datasets.0.max_samples": 8}
    settings |= {"tool_datasets.0.max_samples": 32, "eval_datasets.0.max_samples": 8}
    settings |= {"generalization_datasets.0.max_samples": 32}
    # Learning to call, at the recipe's rate held constant: its decay and the ptx term (what keeps SFT's
    # answers, measured in the recipe's header) only slow it in a short run
    settings |= {"lr_scheduler_type": "constant_with_warmup", "lr_scheduler_kwargs": "{}"}
    settings |= {"ptx_coef": 0, "ptx_datasets": "[]"}
    settings |= {"per_device_train_batch_size": BATCH}
    # 80 steps read 1,280 rows: the first 2,000 conversations and the chats once (the mix the figures above had)
    settings |= {"datasets.0.max_samples": 2000, "datasets.1.weight": 1}
    run(
        [
            "train",
            str(REPO / "recipes/tiny/sft-tools.yaml"),
            *as_overrides(SHORT_RUN, settings, max_steps=STEPS),
        ]
    )
    evidence = json.loads((out / "eval.json").read_text())
    for key in TOOL_KEYS:
        assert f"{key}_before" in evidence and f"{key}_after" in evidence
    assert evidence["tool_calls_per_answer_before"] == 0 and evidence["tool_call_validity_before"] is None
    assert evidence["tool_answer_accuracy_before"] <= 0.25 and len(evidence["tool_examples_after"]) == 3
    # the unseen phrasing ("Say what 812 plus 677 is."), asked with the tools offered
    assert evidence["generalization_tool_calls_per_answer_before"] == 0
    assert "generalization_answer_accuracy_after" in evidence
    # what SFT taught, asked without the tools and with them shown (as RL asks it): no call is the right turn
    assert {
        "answer_accuracy_after",
        "tools_shown_answer_accuracy_after",
        "tools_shown_calls_per_answer_after",
    } <= set(evidence)
    with learning_checks() as check:
        check.at_least("valid calls after tool SFT", evidence["tool_call_validity_after"] or 0, VALID)
        check.at_least("calls per held-out question", evidence["tool_calls_per_answer_after"], CALLS)
    assert "| tool_answer_accuracy |" in (out / "report.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert {"<|call|>", "<|/call|>"} <= set(tokenizer.get_vocab())  # the call markers travel with the model
    assert tokenizer.response_template == chat_templates.GPTPIPE.response_template


def ppo_tool_args(scripted_dir, tmp_path):
    """gptpipe's PPO on the scripted model with the tools of a file, the answer check as the reward."""
    rows = [(SCRIPT[0][0][:1], "42"), (SCRIPT[3][0][:1], "3"), (SCRIPT[5][0][:1], "Hello")]
    prompts = tmp_path / "tool_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m, "answer": a}) + "\n" for m, a in rows))
    data = f"[{{path: {prompts}}}]"
    settings = {
        "model.name_or_path": scripted_dir / "final",
        "tools": f"[{scripted_dir / 'my_tools.py'}:add, {TOOLS[1]}]",
        "datasets": data,
        "eval_datasets": data,
        "tool_datasets": data,
        "generalization_datasets": "[]",
        "retained_datasets": "[]",
        "ptx_coef": 0.0,
        "ptx_datasets": "[]",
        "max_tool_calls": 2,
        "max_new_tokens": 112,  # the two-call turn is ~100 tokens
        "tool_eval_max_new_tokens": 112,
        "max_steps": 4,
        "save_steps": 2,
        "per_device_train_batch_size": 3,
        "num_minibatches": 1,
        "ppo_epochs": 2,
        "eval_prompts": 3,
        "logging_steps": 1,
        "learning_rate": 1e-3,  # the updates must move the weights the resumed run has to match
    }
    return lambda out: as_overrides(settings, output_dir=out)


def test_ppo_with_tools_runs_the_calls_masks_their_results_and_resumes_bit_for_bit(scripted_dir, tmp_path):
    from test_resume import check_kill_and_resume

    args = ppo_tool_args(scripted_dir, tmp_path)
    recipe = str(REPO / "recipes/tiny/rl-verifiable.yaml")
    compared = ("reward", "kl", "policy_loss", "value_loss", "tool_calls_per_episode")
    check_kill_and_resume(tmp_path, recipe, args, 4, 2, 3, compared)
    e = json.loads((tmp_path / "reference/eval.json").read_text())
    # The scripted model answers by calling the file's add (and multiply): the answers are the tools' results.
    assert e["answer_accuracy_before"] == pytest.approx(1.0) and e[
        "tool_answer_accuracy_before"
    ] == pytest.approx(1.0)
    assert e["tool_call_validity_before"] == 1.0 and e["tool_calls_per_answer_before"] == pytest.approx(1.0)
    records = [json.loads(line) for line in (tmp_path / "reference/metrics.jsonl").read_text().splitlines()]
    trained = [
        r for r in records if "reward" in r
    ]  # sampled episodes: the calls made and how many were valid
    assert all(r["tool_calls_per_episode"] > 0 and 0 <= r["tool_call_validity"] <= 1 for r in trained)
    assert {
        "tool_answer_accuracy_after",
        "tool_call_validity_after",
        "no_tool_answer_accuracy_after",
    } <= e.keys()


def test_grpo_with_tools_rolls_out_through_trls_tool_loop(scripted_dir, tmp_path):
    from gptpipe.cli import run

    ppo = ppo_tool_args(scripted_dir, tmp_path)(tmp_path / "grpo")
    kept = [a for a in ppo if a.split("=")[0] not in ("max_new_tokens", "num_minibatches", "ppo_epochs")]
    grpo = {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 128,
    }
    run(
        [
            "train",
            str(REPO / "recipes/tiny/grpo-verifiable.yaml"),
            *kept,
            *as_overrides(grpo),
            "save_steps=10",
        ]
    )
    e = json.loads((tmp_path / "grpo/eval.json").read_text())
    assert e["tool_answer_accuracy_before"] == pytest.approx(1.0) and e[
        "answer_accuracy_before"
    ] == pytest.approx(1.0)
    records = [json.loads(line) for line in (tmp_path / "grpo/metrics.jsonl").read_text().splitlines()]
    calls = [r["tools/call_frequency"] for r in records if "tools/call_frequency" in r]
    assert calls and all(c > 0 for c in calls)  # TRL ran the file's tools in its rollouts


def test_rloo_with_tools_is_refused_at_validate_naming_the_way_out(capsys):
    from gptpipe.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(REPO / "recipes/tiny/rloo.yaml"), "--set", f"tools=[{TOOLS[0]}]"])
    assert (
        exit_.value.code == 2 and "RLOOTrainer takes no tools; use algorithm: grpo" in capsys.readouterr().err
    )
