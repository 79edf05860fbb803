"""DPO stage (trl.DPOTrainer) on the tiny world's comparisons: held-out implicit-reward accuracy rises from
chance while answer accuracy on the RL stages' held-out prompts holds; the policy loads with plain transformers;
with LoRA the reference is the policy with its adapter disabled (no second copy); bad comparisons stop the run
naming file, row and field."""

import json

import pytest
from conftest import REPO, as_overrides
from learning import learning_checks
from transformers import AutoModelForCausalLM

from gptpipe.cli import main, run

DPO = str(REPO / "recipes/tiny/dpo.yaml")
STEPS, GAIN = 30, 0.15


def dpo_overrides(tiny_sft, out, **extra) -> list[str]:
    settings = {"output_dir": out, "model.name_or_path": tiny_sft, "save_steps": 1000, "logging_steps": 5}
    return as_overrides(settings, {"disable_tqdm": "true"}, **extra)


@pytest.mark.learning
def test_dpo_raises_held_out_preference_accuracy_and_keeps_answers(tiny_sft, tmp_path):
    out = tmp_path / "dpo"
    run(["train", DPO, *dpo_overrides(tiny_sft, out, max_steps=STEPS)])
    e = json.loads((out / "eval.json").read_text())
    assert e["implicit_reward_accuracy_before"] == 0.5 and e["kl_before"] == pytest.approx(0.0, abs=1e-6)
    evidence = {k: v for k, v in e.items() if k.endswith(("_before", "_after"))}
    with learning_checks() as check:
        # Seeds 0-2 and 42, 1 thread, 30 steps (the recipe's sigmoid + NLL loss): implicit-reward accuracy 0.5 ->
        # 0.707-0.795; answer accuracy moved -0.023 to +0.031 (DPO's loss alone: down 0.054 on seed 2)
        gain = e["implicit_reward_accuracy_after"] - e["implicit_reward_accuracy_before"]
        check.at_least("held-out implicit-reward accuracy gain", gain, GAIN, evidence)
        drop = e["answer_accuracy_before"] - e["answer_accuracy_after"]
        check.at_most("held-out answer accuracy drop", drop, 0.05, evidence)
    assert e["reference_copies"] == 1 and e["train_steps"] == STEPS
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/accuracies" in r for r in logged)  # TRL's own metrics
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_lora_dpo_takes_the_disabled_adapter_as_its_reference(tiny_sft, tmp_path):
    out = tmp_path / "lora"
    lora = {"model.lora.r": 8, "model.lora.target_modules": "all-linear", "model.merge_lora": "true"}
    few = "[{path: tinyworld:comparisons, split: %s, format: preference, max_samples: %d}]"
    extra = {"max_steps": 2, "eval_prompts": 8, "learning_rate": "1e-3"}
    extra |= {"datasets": few % ("train", 128), "eval_datasets": few % ("eval", 64)}
    run(["train", DPO, *dpo_overrides(tiny_sft, out, **extra, **lora)])
    e = json.loads((out / "eval.json").read_text())
    assert e["reference_copies"] == 0  # TRL kept no second model: the adapter off is the reference
    assert e["implicit_reward_accuracy_before"] == 0.5 and e["kl_before"] == pytest.approx(0.0, abs=1e-6)
    assert e["implicit_reward_accuracy_after"] != 0.5  # the adapter moved the policy away from it
    AutoModelForCausalLM.from_pretrained(out / "final")  # merged: a plain model


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},
            "row 1: field 'chosen': is identical to rejected",
        ),
        (
            {"prompt": "Hi?", "chosen": "Yes.", "rejected": None},
            "row 1: field 'rejected': is missing or empty",
        ),
        ({"prompt": " ", "chosen": "Yes.", "rejected": "No."}, "row 1: field 'prompt': the prompt is empty"),
    ],
)
def test_bad_comparisons_stop_the_run_naming_file_and_row(row, message, tiny_sft, tmp_path, capsys):
    good = {"prompt": "Where does Bosu live?", "chosen": "Bosu lives in Dublin.", "rejected": "Paris."}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (good, row)))
    out = tmp_path / "bad"
    sources = {
        "datasets": f"[{{path: {data}, format: preference}}]",
        "eval_split_size": 0.5,
        "prompt_datasets": "[]",
    }
    with pytest.raises(SystemExit) as stopped:
        main(["train", DPO, *dpo_overrides(tiny_sft, out, max_steps=1, **sources)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and str(data) in err and message in err, err
    assert "Traceback" not in err and not (out / "eval.json").exists()
