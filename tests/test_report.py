"""The report card's verdicts: one plain line per stage after SFT that checked answers, saying whether it made a
better assistant as a whole (the new skill rose, the retained skills stayed) and why, read from the stage's
eval.json and config.yaml."""

import json

import yaml

from gptpipe.report import assistant_verdicts


def _run(folder, evidence: dict, config: dict, stage: str = "rl"):
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps(evidence))
    (folder / "config.yaml").write_text(yaml.safe_dump({"stage": stage, **config}))
    return folder


def test_each_rl_stage_gets_a_verdict_with_its_reason(tmp_path):
    rm = {"reward_model": "runs/tiny/reward/final", "reward_funcs": []}
    check = {"reward_model": None, "reward_funcs": ["gptpipe.data.tinyworld:answer_reward"]}
    stages = [
        (
            "sft",
            "sft",
            _run(tmp_path / "sft", {"answer_accuracy_before": 0.1, "answer_accuracy_after": 0.6}, {}),
        ),
        (
            "rl",
            "rl",
            _run(
                tmp_path / "rl",
                {
                    "answer_accuracy_before": 0.59,
                    "answer_accuracy_after": 0.47,
                    "reward_before": -2.96,
                    "reward_after": -2.91,
                },
                rm,
            ),
        ),
        (
            "grpo",
            "rl",
            _run(
                tmp_path / "grpo",
                {
                    "answer_accuracy_before": 0.62,
                    "answer_accuracy_after": 0.74,
                    "retained_answer_accuracy_before": 0.885,
                    "retained_answer_accuracy_after": 0.87,
                    "reward_before": 0.62,
                    "reward_after": 0.74,
                },
                check,
            ),
        ),
        (
            "ppo-taxed",
            "rl",
            _run(
                tmp_path / "taxed",
                {
                    "answer_accuracy_before": 0.185,
                    "answer_accuracy_after": 0.631,
                    "retained_answer_accuracy_before": 0.885,
                    "retained_answer_accuracy_after": 0.705,
                    "retained_answer_prompts_after": 78,
                    "generalization_answer_accuracy_before": 0.177,
                    "generalization_answer_accuracy_after": 0.3,
                    "reward_before": 0.185,
                    "reward_after": 0.631,
                },
                check,
            ),
        ),
        (
            "dpo",
            "dpo",
            _run(
                tmp_path / "dpo",
                {
                    "answer_accuracy_before": 0.185,
                    "answer_accuracy_after": 0.162,
                    "retained_answer_accuracy_before": 0.885,
                    "retained_answer_accuracy_after": 0.936,
                },
                {},
                "dpo",
            ),
        ),
        (
            "rloo",
            "rl",
            _run(
                tmp_path / "rloo",
                {
                    "answer_accuracy_before": 0.6,
                    "answer_accuracy_after": 0.605,
                    "reward_before": 0.6,
                    "reward_after": 0.605,
                },
                check,
            ),
        ),
        (
            "sft-tools",  # an SFT after SFT that teaches tool use: judged on the tools, what SFT taught kept
            "sft",
            _run(
                tmp_path / "sft-tools",
                {
                    "answer_accuracy_before": 0.59,
                    "answer_accuracy_after": 0.51,
                    "tool_answer_accuracy_before": 0.0,
                    "tool_answer_accuracy_after": 1.0,
                    "generalization_answer_accuracy_before": 0.0,
                    "generalization_answer_accuracy_after": 0.9,
                },
                {"ptx_coef": 0.5},
            ),
        ),
        (
            "ppo-ceiling",  # 2 of 100 questions lost at the ceiling: within chance, not a failed update
            "rl",
            _run(
                tmp_path / "ceiling",
                {
                    "answer_accuracy_before": 0.98,
                    "answer_accuracy_after": 0.96,
                    "answer_prompts_after": 100,
                    "reward_before": 0.98,
                    "reward_after": 0.96,
                },
                check,
            ),
        ),
        (
            "ppo-broken",  # the same fall in reward, beyond chance on 100 questions
            "rl",
            _run(
                tmp_path / "broken",
                {
                    "answer_accuracy_before": 0.98,
                    "answer_accuracy_after": 0.88,
                    "answer_prompts_after": 100,
                    "reward_before": 0.98,
                    "reward_after": 0.88,
                },
                check,
            ),
        ),
        ("ppo-toy", "rl", _run(tmp_path / "toy", {"reward_before": 0.0, "reward_after": 1.0}, rm)),
        ("missing", "rl", tmp_path / "never-ran"),
    ]
    lines = assistant_verdicts(stages).splitlines()
    assert lines[0].startswith("Did each stage make a better assistant")
    verdicts = {line.split("**")[1]: line for line in lines if line.startswith("- **")}
    # The first SFT is judged on its own; no accuracy, or no run: no verdict
    assert set(verdicts) == {
        "rl",
        "grpo",
        "ppo-taxed",
        "dpo",
        "rloo",
        "sft-tools",
        "ppo-ceiling",
        "ppo-broken",
    }
    assert (
        "gained the new skill (new skill 0 -> 1; retained 0.59 -> 0.51; unseen phrasing 0 -> 0.9)."
        in verdicts["sft-tools"]
    )
    assert "alignment tax" in verdicts["sft-tools"] and "raise ptx_coef (now 0.5)" in verdicts["sft-tools"]
    assert "did not improve (new skill 0.59 -> 0.47) although its reward rose" in verdicts["rl"]
    assert "reward hacking" in verdicts["rl"] and "the reward model scores" in verdicts["rl"]
    # within 0.03 of the retained accuracy it started with: a better assistant
    assert "improved, a better assistant (new skill 0.62 -> 0.74; retained 0.885 -> 0.87)" in verdicts["grpo"]
    taxed = verdicts["ppo-taxed"]
    assert (
        "improved the new skill (new skill 0.185 -> 0.631; retained 0.885 -> 0.705; unseen phrasing" in taxed
    )
    assert "alignment tax" in taxed and "fell 0.18 (14 of 78 questions; more than 0.03)" in taxed
    assert "better assistant" not in taxed
    assert "set ptx_coef and ptx_datasets" in taxed  # its config has none
    assert "no new skill (new skill 0.185 -> 0.162; retained 0.885 -> 0.936)" in verdicts["dpo"]
    assert "alignment tax" not in verdicts["dpo"] + verdicts["grpo"]
    assert verdicts["rloo"].startswith("- **rloo**: unchanged")  # under one prompt in a hundred
    # with the count of prompts recorded, a move within two standard errors is chance (0.048 on 100 at 0.97)
    assert verdicts["ppo-ceiling"].startswith("- **ppo-ceiling**: unchanged (new skill 0.98 -> 0.96")
    assert "within 0.05, the noise of 100 prompts" in verdicts["ppo-ceiling"]
    assert "the update went wrong; lower the learning rate" in verdicts["ppo-broken"]
    assert assistant_verdicts(stages[:1]) == ""


def test_the_run_report_plots_reward_against_accuracy_with_the_alarms(tmp_path):
    """The watched evaluations (eval/*) on one plot, two scales; the generalization figure a row of its own."""
    from gptpipe.report import write_run_report

    folder = _run(
        tmp_path / "rl",
        {
            "answer_accuracy_before": 0.6,
            "answer_accuracy_after": 0.5,
            "generalization_answer_accuracy_before": 0.2,
            "generalization_answer_accuracy_after": 0.3,
        },
        {},
    )
    records = [
        {"step": s, "eval/reward": r, "eval/answer_accuracy": a, "eval/rm_agreement": 0.7}
        for s, r, a in ((5, 0.1, 0.6), (10, 0.4, 0.5), (15, 0.9, 0.4))
    ]
    records[-1]["reward_hacking"] = 1.0
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = write_run_report(folder).read_text()
    assert (folder / "plots" / "reward_vs_accuracy.png").stat().st_size > 1000
    assert "plots/reward_vs_accuracy.png" in report
    assert "| generalization_answer_accuracy | 0.2 | 0.3 |" in report


def test_the_card_shows_the_tool_rows_of_a_stage_that_measured_them(tmp_path):
    from gptpipe.report import report_card

    tools = {"tool_answer_accuracy_before": 0.0, "tool_answer_accuracy_after": 0.91}
    tools |= {"no_tool_answer_accuracy_before": 0.02, "no_tool_answer_accuracy_after": 0.03}
    tools |= {"tool_call_validity_before": None, "tool_call_validity_after": 0.99}
    sft = _run(
        tmp_path / "sft-tools", {"answer_accuracy_before": 0.6, "answer_accuracy_after": 0.58, **tools}, {}
    )
    card = report_card([("sft-tools", "sft", sft)])
    assert "| sft-tools | answer_accuracy | 0.6 | 0.58 |" in card
    assert "|  | tool_answer_accuracy | 0 | 0.91 |" in card and "|  | tool_call_validity |  | 0.99 |" in card
    assert "tool_calls_per_answer" not in card  # only what the stage measured
