"""gptpipe eval: lm-evaluation-harness through its Python API on a stage's model. The local tinyworld task scores
the SFT model as the SFT stage's own evidence does (same questions, same check); unknown tasks get a
did-you-mean, a Hub task offline one clear line, bad model folders too (exit 2)."""

import json

import pytest
from transformers import AutoModelForCausalLM

from gptpipe.cli import main

pytest.importorskip("lm_eval", reason="make setup installs lm-eval (the eval extra)")


def test_tinyworld_task_scores_the_sft_model_as_its_own_evidence(tiny_sft, capsys):
    main(["eval", str(tiny_sft), "--tasks", "tinyworld", "--chat-template", "--batch-size", "64"])
    found = json.loads((tiny_sft.parent / "eval-tinyworld.json").read_text())
    accuracy = found["results"]["tinyworld"]["answer_accuracy"]
    own = json.loads((tiny_sft.parent / "eval.json").read_text())["answer_accuracy_after"]
    assert abs(accuracy - own) <= 0.05, (accuracy, own)  # 78 questions: one is 0.013
    assert found["chat_template"] is True and found["lm_eval_version"]
    assert "| tinyworld | answer_accuracy |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tinywrld", "no such lm-evaluation-harness task; did you mean tinyworld"),
        ("hellaswag", "could not read a task's data"),
        ("missing", "no such folder"),
        ("no_tokenizer", "no tokenizer"),
    ],
)
def test_bad_eval_input_stops_with_one_line(case, message, tiny_base, tmp_path, capsys, monkeypatch):
    model, task = tiny_base, case
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if case == "missing":
        model, task = tmp_path / "nothing-here", "tinyworld"
    elif case == "no_tokenizer":
        model, task = tmp_path / "model", "tinyworld"
        AutoModelForCausalLM.from_pretrained(tiny_base).save_pretrained(model)
    with pytest.raises(SystemExit) as stopped:
        main(["eval", str(model), "--tasks", task, "--limit", "2"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and message in err and "Traceback" not in err, err
