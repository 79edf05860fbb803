"""Pretraining stage end to end: perplexity falls, parameters change, final/ loads, runs are protected."""

import json

import pytest
import torch
from conftest import REPO, needs_shared_data, small_pretrain
from learning import learning_checks
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptpipe.cli import run
from gptpipe.errors import UserError
from gptpipe.modeling import build_model, load_tokenizer
from gptpipe.recipe import load_recipe

PRETRAIN = str(REPO / "recipes/tiny/pretrain.yaml")


@pytest.fixture(scope="module")
def pretrained(tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    args = small_pretrain(tokenizer_dir, out, max_steps=80, learning_rate="3e-3")
    run(["train", PRETRAIN, *args])
    return out, args


@pytest.mark.learning
def test_perplexity_falls_well_below_untrained(pretrained):
    out, _ = pretrained
    evidence = json.loads((out / "eval.json").read_text())
    assert evidence["perplexity_before"] > 300  # untrained: about the vocabulary size
    assert evidence["train_steps"] == 80
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 16
    with learning_checks() as check:
        ratio = evidence["perplexity_before"] / evidence["perplexity_after"]
        check.at_least("perplexity before / after", ratio, 30)  # seeds 0-4, 1-2 threads: 52-69
        check.at_least("first / last logged loss", losses[0] / losses[-1], 2)  # 2.52-2.85
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 15, 30, 45, 60, 75, 80]


def test_final_loads_with_plain_transformers_and_every_parameter_changed(pretrained):
    out, args = pretrained
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    cfg = load_recipe(PRETRAIN, args)
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg.model, load_tokenizer(cfg.model)).state_dict()
    for name, trained in model.state_dict().items():
        assert not torch.equal(trained, initial[name]), f"{name} did not change"
    ids = tok("The age of", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
    saved = load_recipe(out / "config.yaml")  # the saved config runs unchanged
    assert saved.max_steps == 80 and saved.model.hidden_size == 64


def test_finished_run_is_refused_unless_overwrite(pretrained):
    out, args = pretrained
    with pytest.raises(UserError, match="holds a finished run.*overwrite=true"):
        run(["train", PRETRAIN, *args])


def test_missing_tokenizer_is_a_clear_error(tmp_path, tokenizer_dir):
    args = small_pretrain(
        tokenizer_dir, tmp_path / "run", **{"model.tokenizer": tmp_path / "no/such/tokenizer"}
    )
    with pytest.raises(UserError, match="model.tokenizer: .*no/such/tokenizer does not exist"):
        run(["train", PRETRAIN, *args])


def test_wiki_demo_text_pretrains(tmp_path, tokenizer_dir):
    wiki = needs_shared_data("wiki_demo.txt")
    tok_recipe = tmp_path / "tok.yaml"
    tok_recipe.write_text(
        f"stage: tokenizer\noutput_dir: {tmp_path / 'tok'}\nvocab_size: 1000\ndatasets: [{{path: {wiki}}}]\n"
    )
    run(["train", str(tok_recipe)])
    args = small_pretrain(
        tmp_path / "tok" / "final",
        tmp_path / "run",
        max_steps=12,
        eval_steps=6,
        save_steps=100,
        datasets=f"[{{path: {wiki}}}]",
        eval_datasets="[]",
        eval_split_size=0.1,
    )
    run(["train", PRETRAIN, *args])
    evidence = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evidence["perplexity_after"] < evidence["perplexity_before"]
