"""DPO stage (trl.DPOTrainer) on the tiny world's comparisons: held-out implicit-reward accuracy rises from
chance while answer accuracy on the RL stages' held-out prompts holds; the policy loads with plain transformers;
with LoRA the reference is the policy with its adapter disabled (no second copy); bad comparisons stop the run
naming file, row and field."""

import json
import subprocess

import pytest
from conftest import REPO, as_overrides, needs_shared_data
from learning import learning_checks
from test_distributed import RUN, TORCHRUN
from transformers import AutoModelForCausalLM

from gptpipe.cli import main, run
from gptpipe.tracking import read_metrics

DPO = str(REPO / "recipes/tiny/dpo.yaml")
STEPS, GAIN = 30, 0.15


def dpo_overrides(tiny_sft, out, **extra) -> list[str]:
    settings = {"output_dir": out, "model.name_or_path": tiny_sft, "save_steps": 1000, "logging_steps": 5}
    # the whole-assistant sets cost two greedy passes each and are RL's tests (test_rl_rewards.py)
    settings |= {"generalization_datasets": "[]", "retained_datasets": "[]"}
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
        # 0.707-0.795 on an Intel Xeon, 0.718-0.799 on an AMD EPYC; answers lost -0.023 to +0.031 on the Xeon,
        # -0.046 to +0.054 on the EPYC (seed 42; one prompt is 0.008; DPO's loss alone: 0.054 on the Xeon's seed 2)
        gain = e["implicit_reward_accuracy_after"] - e["implicit_reward_accuracy_before"]
        check.at_least("held-out implicit-reward accuracy gain", gain, GAIN, evidence)
        drop = e["answer_accuracy_before"] - e["answer_accuracy_after"]
        check.at_most("held-out answer accuracy drop", drop, 0.09, evidence)
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


def test_dpo_trains_on_the_shared_llama_factory_comparisons(tiny_sft, tmp_path):
    """LLaMA-Factory's dpo_en_demo.json (sharegpt_preference: `conversations`, `chosen`, `rejected` turns), as a
    user brings it: read, split for held-out pairs, trained and measured."""
    data = needs_shared_data("dpo_en_demo.json")
    out = tmp_path / "shared"
    sources = {"datasets": f"[{{path: {data}, format: sharegpt_preference, max_samples: 96}}]"}
    sources |= {
        "eval_datasets": "[]",
        "eval_split_size": 0.25,
        "prompt_datasets": "[]",
        "invalid_pairs": "drop",
    }
    extra = {"max_steps": 2, "max_length": 256, "per_device_train_batch_size": 8, "learning_rate": "1e-3"}
    run(["train", DPO, *dpo_overrides(tiny_sft, out, **extra, **sources)])
    e = json.loads((out / "eval.json").read_text())
    assert (e["train_pairs"], e["heldout_pairs"], e["train_steps"]) == (72, 24, 2), e
    # Measured on the pairs whose replies fit max_length: the policy moved away from its reference
    assert e["implicit_reward_margin_before"] == 0.0 and e["implicit_reward_margin_after"] != 0.0


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


@pytest.mark.extended  # ZeRO-3 for a Trainer stage: the SFT test; frozen models under ZeRO-3: PPO's
@pytest.mark.distributed
def test_dpo_under_zero3_with_two_processes_matches_one_process(tiny_sft, tmp_path):
    """DPO on 2 CPU processes with a real DeepSpeed ZeRO-3 engine (policy and TRL's reference both sharded)
    trains what one process does with the same global batch: the same losses and held-out evidence. (Plain DDP,
    the Trainer's own, ran here too and matched; dropped for the suite's time: DDP is tested on SFT and PPO.)"""
    pytest.importorskip("deepspeed", reason="make setup installs deepspeed (DS_BUILD_OPS=0)")
    few = "[{path: tinyworld:comparisons, split: %s, format: preference, max_samples: %d}]"
    # DPO's loss alone: the recipe's NLL term is a token mean per process, which two processes average unweighted
    small = {"max_steps": 2, "logging_steps": 1, "prompt_datasets": "[]", "loss_type": "[sigmoid]"}
    small |= {"datasets": few % ("train", 128), "eval_datasets": few % ("eval", 32)}

    def overrides(out, batch, *extra):
        return [*dpo_overrides(tiny_sft, out, per_device_train_batch_size=batch, **small), *extra]

    run(["train", DPO, *overrides(tmp_path / "one", 32)])
    zero3 = f"deepspeed={REPO / 'deepspeed_configs/zero3.json'}"
    for name, extra in (("zero3", (zero3,)),):
        two = subprocess.run(
            [*TORCHRUN, "train", DPO, *overrides(tmp_path / name, 16, "use_cpu=true", *extra)], **RUN
        )
        assert two.returncode == 0, two.stderr[-3000:]
    one = json.loads((tmp_path / "one/eval.json").read_text())
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r}
    assert sorted(losses) == [1, 2]
    for name, engine in (("zero3", "DEEPSPEED"),):
        layout = json.loads((tmp_path / name / "distributed.json").read_text())
        assert layout["world_size"] == 2 and layout["distributed_type"] == engine, layout
        both = {r["step"]: r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r}
        for step, loss in losses.items():  # summed in another order: not bit for bit
            assert both[step] == pytest.approx(loss, rel=1e-4), (name, step, losses, both)
        e = json.loads((tmp_path / name / "eval.json").read_text())
        for key in (
            "implicit_reward_accuracy_after",
            "implicit_reward_margin_after",
            "preference_accuracy_after",
        ):
            assert e[key] == pytest.approx(one[key], abs=1e-4), (name, key, one[key], e[key])
        AutoModelForCausalLM.from_pretrained(tmp_path / name / "final")
