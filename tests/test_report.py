"""The report card's RL verdicts: one plain line per RL stage that checked answers, saying whether answer
accuracy rose and why, read from the stage's eval.json and config.yaml."""

import json

import yaml

from gptpipe.report import rl_verdicts


def _run(folder, evidence: dict, config: dict):
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps(evidence))
    (folder / "config.yaml").write_text(yaml.safe_dump({"stage": "rl", **config}))
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
                    "reward_before": 0.62,
                    "reward_after": 0.74,
                },
                check,
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
        ("ppo-toy", "rl", _run(tmp_path / "toy", {"reward_before": 0.0, "reward_after": 1.0}, rm)),
        ("missing", "rl", tmp_path / "never-ran"),
    ]
    lines = rl_verdicts(stages).splitlines()
    assert lines[0].startswith("Did RL make a better assistant")
    verdicts = {line.split("**")[1]: line for line in lines if line.startswith("- **")}
    assert set(verdicts) == {"rl", "grpo", "rloo"}  # SFT is no RL stage; no accuracy, or no run: no verdict
    assert "did not improve (answer accuracy 0.59 -> 0.47) although its reward rose" in verdicts["rl"]
    assert "reward hacking" in verdicts["rl"] and "the reward model scores" in verdicts["rl"]
    assert "improved (answer accuracy 0.62 -> 0.74): reward functions rewarded" in verdicts["grpo"]
    assert verdicts["rloo"].startswith("- **rloo**: unchanged")  # under one prompt in a hundred
    assert rl_verdicts(stages[:1]) == ""


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
