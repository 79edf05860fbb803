"""gptpipe export: a LoRA SFT run merged into a plain folder that loads with transformers and gives the adapter
model's logits; the model card names the stages, their recipes and evidence; the generation config stops at the
end of turn; --dtype casts; bad input stops with one line (exit 2) and writes nothing."""

import json

import pytest
import torch
from conftest import REPO, sft_overrides
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

from gptpipe.cli import main, run

SFT = str(REPO / "recipes/tiny/sft.yaml")


def test_merged_lora_export_loads_plainly_with_the_adapters_logits(tiny_base, tmp_path):
    sft = tmp_path / "sft"
    run(["train", SFT, *sft_overrides(tiny_base, sft, **{"model.lora": "{r: 8, dropout: 0.0}"})])
    out = tmp_path / "exported"
    main(["export", str(sft), "--out", str(out), "--merge-lora"])

    exported = AutoModelForCausalLM.from_pretrained(out)  # a plain model: no peft involved
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), sft / "final")
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Where does Bosu live?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        diff = (exported(ids).logits - adapter.eval()(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    assert tokenizer.chat_template  # the template travels with the model
    end_of_turn = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_of_turn in GenerationConfig.from_pretrained(out).eos_token_id

    card = (out / "README.md").read_text()
    assert "pretrain -> sft" in card and str(sft / "config.yaml") in card  # the stages and their recipes
    assert f"gptpipe train {sft / 'config.yaml'}" in card and "eval_loss" in card  # reproduce; evidence
    sft_loss = json.loads((sft / "eval.json").read_text())["eval_loss_after"]
    assert f"{sft_loss:.4g}" in card

    adapter_out = tmp_path / "adapter"  # without --merge-lora: the adapter as it is, with the card
    main(["export", str(sft / "final"), "--out", str(adapter_out)])
    assert (adapter_out / "adapter_config.json").is_file() and (adapter_out / "README.md").is_file()


def test_a_reward_model_exports_as_a_sequence_classifier(tiny_reward, tmp_path):
    out = tmp_path / "reward"
    main(["export", str(tiny_reward.parent), "--out", str(out)])
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and not (out / "generation_config.json").exists()
    assert "pairwise_accuracy" in (out / "README.md").read_text()


def test_dtype_casts_a_full_model(tiny_base, tmp_path):
    out = tmp_path / "bf16"
    main(["export", str(tiny_base), "--out", str(out), "--dtype", "bf16"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert "none (pretrained from scratch by gptpipe)" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such folder"),
        ("no_tokenizer", "no tokenizer"),
        ("not_empty", "exists and is not empty"),
        ("offline_push", "HF_HUB_OFFLINE is set"),
    ],
)
def test_bad_export_input_stops_with_one_line(case, message, tiny_base, tmp_path, capsys):
    source, out, extra = tiny_base, tmp_path / "out", []
    if case == "missing":
        source = tmp_path / "nothing-here"
    elif case == "no_tokenizer":
        source = tmp_path / "model"
        AutoModelForCausalLM.from_pretrained(tiny_base).save_pretrained(source)
    elif case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        extra = ["--push-to-hub", "org/name"]
    with pytest.raises(SystemExit) as stopped:
        main(["export", str(source), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and message in err and "Traceback" not in err, err
    assert case == "not_empty" or not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
