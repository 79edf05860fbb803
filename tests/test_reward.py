"""Reward stage end to end: held-out pairwise accuracy rises, final/ reloads with the same scores (with and
without LoRA), the score command, shared sharegpt preference data."""

import json

import pytest
from conftest import REPO, needs_shared_data, reward_overrides
from learning import learning_checks
from transformers import AutoModelForSequenceClassification

from gptpipe.cli import run
from gptpipe.modeling import load_for_inference
from gptpipe.scoring import score_ids

REWARD = str(REPO / "recipes/tiny/reward.yaml")


def evidence(run_dir):
    return json.loads((run_dir / "eval.json").read_text())


@pytest.fixture(scope="module")
def reward_run(tiny_reward):
    return tiny_reward.parent


def reloaded_scores(final, n=8):
    """Score the first held-out chosen replies with final/ loaded the way a user loads it."""
    from datasets import Dataset

    from gptpipe.data.preferences import convert_pairs, tokenize_pairs
    from gptpipe.data.tinyworld import ensure_tinyworld

    rows = [
        json.loads(line) for line in (ensure_tinyworld() / "comparisons/eval.jsonl").read_text().splitlines()
    ][:n]
    model, tok = load_for_inference(final, AutoModelForSequenceClassification)
    assert model.config.pad_token_id == tok.pad_token_id
    pairs = tokenize_pairs(convert_pairs(Dataset.from_list(rows), "preference", "eval"), tok, 128)
    return score_ids(model, pairs["chosen_ids"], tok.pad_token_id)


@pytest.mark.learning
def test_reward_model_learns_to_rank_heldout_pairs(reward_run):
    e = evidence(reward_run)
    assert 0.3 < e["pairwise_accuracy_before"] < 0.7  # an untrained score head guesses
    with learning_checks() as check:
        # tiny_reward's 100 steps at 1e-3, seeds 42 and 0-2, 1 thread (2026-12-07): accuracy 0.70-0.75 (chance
        # 0.5), margin gain 2.41-3.21 (250 steps at 3e-4, seeds 0-4, 1-2 threads: 0.73-0.85 and 2.35-3.59).
        check.at_least("held-out pairwise accuracy", e["pairwise_accuracy_after"], 0.65)
        check.at_least("mean margin gain", e["mean_margin_after"] - e["mean_margin_before"], 1.5)
    assert e["reload_max_abs_diff"] < 1e-4


def test_final_reloads_with_identical_scores(reward_run):
    assert reloaded_scores(reward_run / "final") == pytest.approx(
        evidence(reward_run)["scores_chosen_head"], abs=1e-5
    )


@pytest.mark.parametrize("merge", [False, True])
def test_lora_reward_model_saves_its_score_head(tiny_sft, tmp_path, merge):
    out = tmp_path / "lora"
    run(
        [
            "train",
            REWARD,
            *reward_overrides(
                tiny_sft,
                out,
                **{
                    "model.lora": "{r: 8, alpha: 16}",
                    "model.merge_lora": str(merge).lower(),
                    "learning_rate": "1e-3",
                },
            ),
        ]
    )
    e = evidence(out)
    assert (out / "final/adapter_config.json").exists() is not merge
    # The score head trains (modules_to_save) and is saved with the adapter: reloaded scores match.
    assert reloaded_scores(out / "final") == pytest.approx(e["scores_chosen_head"], abs=1e-4)
    assert e["trainable_parameters"] < e["parameters"] / 5


def test_score_command_on_pairs_and_texts(reward_run, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "hmm, 5 i think"})
        + "\n"
        + json.dumps(
            {"prompt": "What is 4 plus 4?", "chosen": "4 plus 4 is 8.", "rejected": "4 plus 4 is 9."}
        )
        + "\n"
    )
    run(["score", str(reward_run / "final"), "--pairs", str(pairs)])
    assert "pairwise accuracy" in capsys.readouterr().out
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
        )
        + "\n"
        + json.dumps({"text": "plain"})
        + "\n"
    )
    run(["score", str(reward_run / "final"), "--texts", str(texts)])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["row"] for r in lines] == [0, 1] and all(isinstance(r["score"], float) for r in lines)


def test_shared_dpo_demo_trains_and_reports_accuracy(tiny_sft, tmp_path):
    data = needs_shared_data("dpo_en_demo.json")
    out = tmp_path / "dpo"
    run(
        [
            "train",
            REWARD,
            *reward_overrides(
                tiny_sft,
                out,
                max_steps=6,
                max_length=256,
                per_device_train_batch_size=4,  # English at 256 tokens: the recipe's 32 pairs took 12 s a step
                invalid_pairs="drop",
                datasets=f"[{{path: {data}, format: sharegpt_preference}}]",
                eval_datasets="[]",
                eval_split_size=0.1,
            ),
        ]
    )
    e = evidence(out)
    assert e["pairs_after"] == 30 and 0.0 <= e["pairwise_accuracy_after"] <= 1.0
