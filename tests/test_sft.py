"""SFT stage end to end on the tiny world: accuracy rises, generation stops at end of turn, LoRA/QLoRA,
alpaca files, and clear errors before training."""

import io
import json

import pytest
import torch
from conftest import REPO, needs_shared_data, sft_overrides
from learning import learning_checks
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptpipe.cli import run
from gptpipe.errors import UserError

SFT = str(REPO / "recipes/tiny/sft.yaml")


def evidence(run_dir):
    return json.loads((run_dir / "eval.json").read_text())


@pytest.fixture(scope="module")
def sft_run(tiny_sft):
    return tiny_sft.parent


@pytest.mark.learning
def test_sft_raises_heldout_answer_accuracy(sft_run):
    e = evidence(sft_run)
    # Held-out questions ask about facts seen only in pretraining: the base model cannot answer in chat form.
    assert e["exact_match_before"] == 0.0
    with learning_checks() as check:
        gain = e["answer_accuracy_after"] - e["answer_accuracy_before"]
        # Seeds 0-4, 1-2 threads: gain 0.27-0.80, exact match 0.22-0.78, loss ratio 5.7-13.2 (docs/testing.md).
        check.at_least("answer accuracy gain", gain, 0.15, e["examples_after"])
        check.at_least("exact match after", e["exact_match_after"], 0.1)
        check.at_least("eval loss before / after", e["eval_loss_before"] / e["eval_loss_after"], 3)
    records = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    fractions = [r["nonpad_fraction"] for r in records if "nonpad_fraction" in r]
    assert fractions and all(0.5 < f < 1.0 for f in fractions)  # padded batches: some padding, mostly tokens


def test_final_stops_at_end_of_turn(sft_run):
    final = sft_run / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end in (
        model.generation_config.eos_token_id
        if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id]
    )
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1] :].tolist()
    assert new[-1] == end and len(new) < 40  # stopped by itself, at the end-of-turn token


def test_chat_command_holds_a_conversation(sft_run, monkeypatch, capsys):
    """`gptpipe chat` in-process (its terminal is stdin and stdout; a subprocess would add ~15 s of imports)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 plus 3?\nHow old is Anna?\n\n"))
    run(["chat", str(sft_run / "final")])
    replies = [line for line in capsys.readouterr().out.splitlines() if "assistant>" in line]
    assert len(replies) == 2 and "plus" in replies[0]  # two turns, each ended by the model itself


def test_generate_command_writes_samples(sft_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "What is 1 plus 1?", "answer": "2"}\n'
        '{"messages": [{"role": "user", "content": "What is 2 plus 2?"}]}\n'
    )

    def generate(out, seed):
        args = [
            "--out",
            str(tmp_path / out),
            "--num-samples",
            "3",
            "--max-new-tokens",
            "16",
            "--seed",
            str(seed),
        ]
        run(["generate", str(sft_run / "final"), "--prompts", str(prompts), *args])
        return (tmp_path / out).read_text()

    first = generate("a.jsonl", 0)
    rows = [json.loads(line) for line in first.splitlines()]
    assert len(rows) == 6 and {r["id"] for r in rows} == {0, 1} and {r["sample"] for r in rows} == {0, 1, 2}
    assert rows[0]["answer"] == "2"  # the prompt row's other fields travel with each sample (for labelers)
    assert generate("b.jsonl", 0) == first  # a fixed seed samples the same completions


def test_lora_adapter_and_merged_model(tiny_base, tmp_path):
    from peft import AutoPeftModelForCausalLM

    lora = "{r: 8, alpha: 16, dropout: 0.0}"
    run(
        [
            "train",
            SFT,
            *sft_overrides(tiny_base, tmp_path / "adapter", **{"model.lora": lora, "learning_rate": "3e-3"}),
        ]
    )
    run(
        [
            "train",
            SFT,
            *sft_overrides(
                tiny_base,
                tmp_path / "merged",
                **{"model.lora": lora, "learning_rate": "3e-3", "model.merge_lora": "true"},
            ),
        ]
    )
    e = evidence(tmp_path / "adapter")
    assert e["trainable_parameters"] < e["parameters"] / 5
    assert e["eval_loss_after"] < e["eval_loss_before"]
    assert (tmp_path / "adapter/final/adapter_config.json").exists()
    assert not (tmp_path / "merged/final/adapter_config.json").exists()
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter/final")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged/final")
    ids = torch.tensor([[1, 5, 40, 41, 42]])
    with torch.no_grad():
        # Both runs are the same training: the merged model computes what base + adapter computes.
        assert torch.allclose(adapter(ids).logits, merged(ids).logits, atol=1e-4)


def test_qlora_4bit_runs_on_cpu(tiny_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    run(
        [
            "train",
            SFT,
            *sft_overrides(
                tiny_base,
                tmp_path / "q",
                **{
                    "model.lora": "{r: 8, alpha: 16}",
                    "model.quantization": "{bits: 4, compute_dtype: float32}",
                    "learning_rate": "3e-3",
                },
            ),
        ]
    )
    e = evidence(tmp_path / "q")
    assert e["quantized_layers"] == 4 * 7  # every linear layer of the 4 blocks is 4-bit (lm_head stays full)
    assert e["eval_loss_after"] < e["eval_loss_before"]
    assert (tmp_path / "q/final/adapter_config.json").exists()


def test_loss_modes_completion_only_and_all_tokens(tiny_base, tmp_path):
    run(
        [
            "train",
            SFT,
            *sft_overrides(
                tiny_base,
                tmp_path / "c",
                max_steps=5,
                assistant_only_loss="false",
                completion_only_loss="true",
            ),
        ]
    )
    run(["train", SFT, *sft_overrides(tiny_base, tmp_path / "a", max_steps=5, assistant_only_loss="false")])
    # Training on every token includes the questions: its held-out loss is over more (and harder) tokens.
    assert evidence(tmp_path / "a")["eval_loss_before"] > evidence(tmp_path / "c")["eval_loss_before"]


def test_template_without_generation_markers_fails_before_training(tiny_base, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError, match="cannot mark assistant tokens"):
        run(["train", SFT, *sft_overrides(tiny_base, tmp_path / "x", chat_template=template)])
    assert not (tmp_path / "x" / "checkpoint-10").exists()


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "identity.json"])
def test_alpaca_files_train(tiny_base, tmp_path, name):
    data = needs_shared_data(name)
    run(
        [
            "train",
            SFT,
            *sft_overrides(
                tiny_base,
                tmp_path / "run",
                max_steps=4,
                eval_steps=4,
                max_length=256,
                datasets=f"[{{path: {data}, format: alpaca, max_samples: 64}}]",
                eval_datasets="[]",
                eval_split_size=0.2,
            ),
        ]
    )
    e = evidence(tmp_path / "run")
    assert e["train_steps"] == 4 and e["eval_loss_after"] < e["eval_loss_before"]


def test_packing_fills_batches(tiny_base, tmp_path):
    run(
        [
            "train",
            SFT,
            # 4 packed rows of 128 tokens a step: padding-free attention is one row of them all, its cost
            # quadratic in its length (the recipe's 32 rows made this test 40 s on 2 cores).
            *sft_overrides(
                tiny_base,
                tmp_path / "p",
                max_steps=4,
                logging_steps=2,
                packing="true",
                per_device_train_batch_size=4,
            ),
        ]
    )
    records = [json.loads(line) for line in (tmp_path / "p/metrics.jsonl").read_text().splitlines()]
    assert [r["nonpad_fraction"] for r in records if "nonpad_fraction" in r] == [
        1.0,
        1.0,
    ]  # padding-free: no pad at all
    assert evidence(tmp_path / "p")["eval_loss_after"] < evidence(tmp_path / "p")["eval_loss_before"]


@pytest.mark.parametrize(
    ("setting", "vocab", "fused"),
    [(None, 4096, False), (None, 49152, True), (True, 4096, True), (False, 151_000, False)],
)
def test_fused_lm_head_is_chosen_by_vocabulary_size_unless_set(tmp_path, setting, vocab, fused):
    """TRL's chunked LM head saves memory only with large vocabularies and made tiny-vocabulary SFT ~2x slower
    (bench/sft.py): unset, it is used from 32k tokens up; a recipe's true/false always wins."""
    from gptpipe.config import SFTConfig
    from gptpipe.sft_trainer import uses_fused_lm_head

    cfg = SFTConfig(output_dir=str(tmp_path), fused_lm_head=setting, bf16=False)
    assert uses_fused_lm_head(cfg, vocab) is fused
