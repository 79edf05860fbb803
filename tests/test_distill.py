"""Distillation stage (trl.DistillationTrainer): a pretrained student that has never seen a demonstration learns
to answer the tiny world's held-out questions from the SFT model's next-token distributions on its own samples;
its KL to the teacher falls; the teacher's accuracy in the evidence is the SFT stage's own; a teacher with
another vocabulary is refused before any weights load."""

import json

import pytest
from conftest import REPO, as_overrides
from learning import learning_checks
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from gptpipe.cli import main, run

DISTILL = str(REPO / "recipes/tiny/distill.yaml")
STEPS, CLOSED = 200, 0.25


def distill_overrides(student, teacher, out, **extra) -> list[str]:
    settings = {"output_dir": out, "model.name_or_path": student, "teacher_model_name_or_path": teacher}
    settings |= {
        "save_steps": 1000,
        "logging_steps": 10,
        "disable_tqdm": "true",
        "generalization_datasets": "[]",
    }
    return as_overrides(settings, **extra)


@pytest.mark.extended  # make test-all: 200 steps (61 s on 2 cores); make test keeps only the refusal test
@pytest.mark.learning
def test_distillation_moves_the_student_toward_the_teacher(tiny_base, tiny_sft, tmp_path):
    out = tmp_path / "distill"
    run(
        [
            "train",
            DISTILL,
            *distill_overrides(tiny_base, tiny_sft, out, max_steps=STEPS, per_device_train_batch_size=16),
        ]
    )
    e = json.loads((out / "eval.json").read_text())
    sft = json.loads((tiny_sft.parent / "eval.json").read_text())
    # The same 78 held-out questions, the same answer check: the teacher scores what the SFT stage measured
    assert e["teacher_answer_accuracy"] == pytest.approx(sft["answer_accuracy_after"], abs=1.5 / 78)
    evidence = {k: v for k, v in e.items() if k.endswith(("_before", "_after")) or k.startswith("teacher")}
    with learning_checks() as check:
        # Seeds 0-2 and 42, 1 thread, 200 steps of 16 prompts: answer accuracy 0.00-0.05 -> 0.13-0.37, teachers
        # 0.28-0.76: 0.36-0.49 of the gap closed (100 steps of 32: seed 42 gained nothing, seeds 0-2 0.15-0.21);
        # KL to the teacher 57-70 -> 1.3-2.8 (after / before 0.02-0.04)
        gap = e["teacher_answer_accuracy"] - e["answer_accuracy_before"]
        closed = (e["answer_accuracy_after"] - e["answer_accuracy_before"]) / max(gap, 1e-9)
        check.at_least("share of the answer-accuracy gap to the teacher closed", closed, CLOSED, evidence)
        check.at_most("KL to the teacher, after over before", e["kl_after"] / e["kl_before"], 0.2, evidence)
    assert e["train_steps"] == STEPS and "reference_copies" not in e
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("completions/mean_length" in r for r in logged)  # TRL's own metrics
    AutoModelForCausalLM.from_pretrained(out / "final")


def _teacher(tokenizer_dir, folder, extra_tokens=0, padding=0):
    """A teacher folder: the tiny tokenizer (with ``extra_tokens`` added) and a random model whose output layer
    is ``padding`` rows longer than the tokenizer."""
    from conftest import tiny_llama_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer) + padding)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("extra_tokens", "padding", "message"),
    [
        (1, 0, "has another tokenizer than the student's"),
        (0, 64, "has an output layer of"),
        (None, None, "does not exist"),
    ],
)
def test_a_teacher_without_the_students_vocabulary_is_refused(
    extra_tokens, padding, message, tokenizer_dir, tmp_path, capsys
):
    teacher = tmp_path / "teacher"
    if extra_tokens is not None:
        _teacher(tokenizer_dir, teacher, extra_tokens, padding)
    out = tmp_path / "distill"
    student = {"model.name_or_path": "null", "model.tokenizer": tokenizer_dir, "model.hidden_size": 32}
    with pytest.raises(SystemExit) as stopped:
        main(["train", DISTILL, *distill_overrides("null", teacher, out, max_steps=1, **student)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "teacher_model_name_or_path" in err and message in err, err
    assert str(teacher) in err and "Traceback" not in err and not (out / "eval.json").exists()
