"""gptpipe eval: lm-evaluation-harness through its Python API on a stage's model. The local tinyworld task scores
the SFT model as the SFT stage's own evidence does (same questions, same check); unknown tasks get a
did-you-mean, a Hub task offline one clear line, bad model folders too (exit 2)."""

import json

import pytest
from transformers import AutoModelForCausalLM

from gptpipe.cli import main

pytest.importorskip("lm_eval", reason="make setup installs lm-eval (the eval extra)")


def test_tinyworld_task_scores_the_sft_model_as_its_own_evidence(tiny_sft, capsys):
    """With no flag, the SFT model's requests are rendered with its chat template (its tokenizer has one)."""
    main(["eval", str(tiny_sft), "--tasks", "tinyworld", "--batch-size", "64"])
    found = json.loads((tiny_sft.parent / "eval-tinyworld.json").read_text())
    accuracy = found["results"]["tinyworld"]["answer_accuracy"]
    own = json.loads((tiny_sft.parent / "eval.json").read_text())["answer_accuracy_after"]
    assert abs(accuracy - own) <= 0.05, (accuracy, own)  # 78 questions: one is 0.013
    assert found["chat_template"] is True and found["lm_eval_version"]
    out = capsys.readouterr().out
    assert "| tinyworld | answer_accuracy |" in out and "rendered with the model's chat template" in out


def test_the_chat_template_is_the_default_except_for_a_pretraining_runs_model(tiny_base, tiny_sft):
    from transformers import AutoTokenizer

    from gptpipe.benchmarks import uses_chat_template

    for folder, expected in ((tiny_sft, True), (tiny_base, False)):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template  # the tiny tokenizer carries its template from the start
        assert uses_chat_template(folder, tokenizer) is expected, folder


def _stopped(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err, err
    return err


def test_bad_eval_input_stops_with_one_line(tiny_base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # One process for both: finding a name among lm-eval's ~15,000 tasks indexes them (seconds), once
    err = _stopped(["eval", str(tiny_base), "--tasks", "tinywrld"], capsys)
    assert "--tasks tinywrld: no such lm-evaluation-harness task; did you mean tinyworld" in err, err
    err = _stopped(["eval", str(tiny_base), "--tasks", "hellaswag", "--limit", "2"], capsys)
    assert "--tasks hellaswag: could not read a task's data" in err and "HF_HUB_OFFLINE" in err, err
    err = _stopped(["eval", str(tmp_path / "nothing-here"), "--tasks", "tinyworld"], capsys)
    assert "no such folder" in err, err
    AutoModelForCausalLM.from_pretrained(tiny_base).save_pretrained(tmp_path / "model")
    err = _stopped(["eval", str(tmp_path / "model"), "--tasks", "tinyworld"], capsys)
    assert "no tokenizer" in err, err
