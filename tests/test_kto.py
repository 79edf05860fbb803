"""KTO stage (trl.KTOTrainer) on the tiny world's comparisons split into desirable and undesirable replies: the
implicit reward learns to rank held-out desirable replies above undesirable ones while answer accuracy holds;
unpaired rows train as they are."""

import json

import pytest
from conftest import REPO, as_overrides
from learning import learning_checks
from transformers import AutoModelForCausalLM

from gptpipe.cli import run

KTO = str(REPO / "recipes/tiny/kto.yaml")
STEPS, GAIN = 30, 0.1


def kto_overrides(tiny_sft, out, **extra) -> list[str]:
    settings = {"output_dir": out, "model.name_or_path": tiny_sft, "save_steps": 1000, "logging_steps": 5}
    # the whole-assistant sets cost two greedy passes each and are RL's tests (test_rl_rewards.py)
    settings |= {"generalization_datasets": "[]", "retained_datasets": "[]"}
    return as_overrides(settings, {"disable_tqdm": "true"}, **extra)


@pytest.mark.learning
def test_kto_ranks_held_out_desirable_replies_higher_and_keeps_answers(tiny_sft, tmp_path):
    out = tmp_path / "kto"
    run(["train", KTO, *kto_overrides(tiny_sft, out, max_steps=STEPS)])
    e = json.loads((out / "eval.json").read_text())
    assert e["implicit_reward_ranking_before"] == 0.5 and e["kl_before"] == pytest.approx(0.0, abs=1e-6)
    assert e["train_desirable"] * 2 == e["train_replies"]  # each pair: one of each
    evidence = {k: v for k, v in e.items() if k.endswith(("_before", "_after"))}
    with learning_checks() as check:
        # Seeds 0-2 and 42, 1 thread, 30 steps: ranking 0.5 -> 0.649-0.703 on an Intel Xeon (answer accuracy moved
        # -0.023 to +0.069), 0.641-0.711 on an AMD EPYC, where answers lost were -0.054 to +0.069 (seed 42)
        gain = e["implicit_reward_ranking_after"] - e["implicit_reward_ranking_before"]
        check.at_least("held-out implicit-reward ranking gain", gain, GAIN, evidence)
        drop = e["answer_accuracy_before"] - e["answer_accuracy_after"]
        check.at_most("held-out answer accuracy drop", drop, 0.09, evidence)
    assert e["desirable_reward_after"] > e["undesirable_reward_after"]
    # The held-out comparisons scored pair by pair too, as DPO's are (the same pairs the ranking splits)
    assert e["implicit_reward_accuracy_before"] == 0.5 and e["implicit_reward_accuracy_after"] > 0.5
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_kto_trains_on_unpaired_rows(tiny_sft, tmp_path):
    """Unpaired rows as prompt/completion/label, and conversational as LLaMA-Factory's kto_en_demo.json writes
    them (messages whose last assistant turn is judged, a boolean label)."""
    rows = [
        {"prompt": "Where does Bosu live?", "completion": "Bosu lives in Dublin.", "label": True},
        {"prompt": "Where does Bosu live?", "completion": "Paris!!!", "label": False},
    ] * 8
    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    conversational = tmp_path / "kto_en_demo.json"
    chats = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ],
            "label": r["label"],
        }
        for r in rows
    ]
    conversational.write_text(json.dumps(chats))  # a JSON list, as LLaMA-Factory ships it
    out = tmp_path / "unpaired"
    sources = {
        "datasets": f"[{{path: {conversational}}}]",  # the format is guessed from the label column
        "eval_datasets": f"[{{path: {data}, max_samples: 4}}]",
        "prompt_datasets": "[]",
        "per_device_train_batch_size": 8,
    }
    run(["train", KTO, *kto_overrides(tiny_sft, out, max_steps=2, **sources)])
    e = json.loads((out / "eval.json").read_text())
    assert (e["train_replies"], e["train_desirable"], e["train_steps"]) == (16, 8, 2)
    assert "answer_accuracy_after" not in e  # no prompt_datasets: no answer evidence
