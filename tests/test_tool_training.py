"""Training with tools: SFT on the calculator conversations (the loss on the calls and answers, not on the
tools' results) learns to call, PPO-ptx renders a tool conversation with its tools, PPO runs the calls in its
rollouts and resumes bit for bit, GRPO goes through TRL's tool loop, and RLOO, which takes no tools, is refused."""

import json

import pytest
from conftest import REPO, SHORT_RUN, as_overrides
from learning import learning_checks
from scripted_tools import BOX, SCRIPT, TOOLS
from transformers import AutoTokenizer

from gptpipe.data import arithmetic, chat_templates
from gptpipe.tool_use import TOOL_KEYS


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
