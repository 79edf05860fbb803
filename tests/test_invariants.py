"""What must not change when only the layout changes (docs/distributed.md, "How the global batch is formed"):

- the same effective batch as 8x1, 4x2 and 2x4 (micro-batch x accumulation) gives the same per-step losses and
  gradient norms, for pretraining and for SFT with packing (the loss is a token mean over the whole batch,
  not a mean of micro-batch means);
- one process and two (DDP here; ZeRO-2 and DDP SFT in test_distributed.py, ZeRO-3 too) with the same
  global batch give the same losses;
- data prepared ahead by `gptpipe prepare` is exactly what TRL's trainer would have built itself, and the
  next training run reads it instead of preprocessing;
- the data order is a pure function of the seed and the step (the basis of exact resume).
"""

import json
import subprocess

import pytest
from conftest import REPO, needs_shared_data, sft_overrides, small_pretrain, tiny_llama_config
from test_distributed import PRETRAIN, RUN, SFT, TORCHRUN, _losses

from gptpipe.cli import main, run
from gptpipe.tracking import read_metrics

LAYOUTS = [(8, 1), (4, 2), (2, 4)]  # per-device micro-batch x gradient accumulation: 8 rows a step


def _trajectory(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r]


def _assert_same(trajectories: dict, rel: float):
    (first, reference), *others = trajectories.items()
    for layout, trajectory in others:
        assert [s for s, *_ in trajectory] == [s for s, *_ in reference]
        for (step, loss, norm), (_, loss0, norm0) in zip(trajectory, reference, strict=True):
            assert loss == pytest.approx(loss0, rel=rel), (layout, first, step, trajectories)
            assert norm == pytest.approx(norm0, rel=rel), (layout, first, step, trajectories)


def _train_each_layout(recipe: str, overrides, tmp_path) -> dict:
    """Train ``recipe`` once per layout of ``LAYOUTS``; each run's (step, loss, grad norm) by layout."""
    trajectories = {}
    for micro, accumulation in LAYOUTS:
        out = tmp_path / f"{micro}x{accumulation}"
        layout = {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation}
        short = {"max_steps": 3, "logging_steps": 1, "eval_steps": 100, "warmup_steps": 0}
        run(["train", recipe, *overrides(out, **short, **layout)])
        trajectories[(micro, accumulation)] = _trajectory(out)
    return trajectories


def test_accumulation_layout_does_not_change_pretraining(tokenizer_dir, tmp_path):
    def overrides(out, **settings):
        return small_pretrain(tokenizer_dir, out, save_steps=100, **settings)

    trajectories = _train_each_layout(PRETRAIN, overrides, tmp_path)
    _assert_same(trajectories, rel=1e-5)  # measured: equal to ~1e-7 (float sums in another order)


def test_accumulation_layout_does_not_change_packed_sft(tiny_base, tmp_path):
    """Packed rows hold different numbers of loss tokens (assistant turns only): a mean of micro-batch
    means would weigh them wrongly; TRL and transformers count the loss tokens of the whole batch."""

    def overrides(out, **settings):
        return sft_overrides(
            tiny_base, out, packing="true", **settings, **{"eval_datasets.0.max_samples": 16}
        )

    trajectories = _train_each_layout(SFT, overrides, tmp_path)
    _assert_same(trajectories, rel=1e-5)


@pytest.mark.extended  # DDP: PPO's 2-process test (our loop); the Trainer's DDP is accelerate's
@pytest.mark.distributed
def test_two_ddp_processes_train_what_one_process_does(tokenizer_dir, tmp_path):
    """Plain DDP (no DeepSpeed): 2 processes x 4 rows = 1 process x 8 rows, step for step. (Before the fix in
    gptpipe.distributed.evaluation_before_training each process trained alone: step 1's gradient norm was
    1.80 against 1.46.)"""

    def args(out, batch):
        return small_pretrain(
            tokenizer_dir, out, max_steps=3, logging_steps=1, eval_steps=3, per_device_train_batch_size=batch
        )

    run(["train", PRETRAIN, *args(tmp_path / "one", 8)])
    done = subprocess.run([*TORCHRUN, "train", PRETRAIN, *args(tmp_path / "two", 4), "use_cpu=true"], **RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "two/distributed.json").read_text())["distributed_type"] == "MULTI_CPU"
    _assert_same({"one": _trajectory(tmp_path / "one"), "two": _trajectory(tmp_path / "two")}, rel=1e-5)
    assert _losses(tmp_path / "two")  # and it logged


def test_prepare_then_train_reads_the_prepared_data(tiny_base, tmp_path, capsys):
    """`gptpipe prepare` on the shared alpaca sample: its summary; then training skips preprocessing, and the
    prepared rows are exactly the ones TRL's SFTTrainer builds itself from the same conversations."""
    from trl import SFTTrainer

    from gptpipe.recipe import load_recipe
    from gptpipe.stages import sft

    data = needs_shared_data("alpaca_en_demo.json")
    settings = {
        "datasets": f"[{{path: {data}, format: alpaca, max_samples: 200}}]",
        "eval_datasets": "[]",
        "eval_split_size": 0.1,
        "packing": "true",
        "max_steps": 2,
    }
    args = sft_overrides(tiny_base, tmp_path / "run", **settings)
    capsys.readouterr()
    run(["prepare", SFT, *args])
    printed = capsys.readouterr().out
    assert "train: 180 rows in" in printed and "in the loss" in printed and "% full" in printed
    assert "eval: 20 rows in" in printed

    run(["prepare", SFT, *args])  # nothing to do the second time
    assert "already prepared" in capsys.readouterr().out

    run(["train", SFT, *args])
    trained = capsys.readouterr().out
    assert "[sft] using prepared data from" in trained and "(no preprocessing)" in trained

    # The same rows as TRL's own preparation inside SFTTrainer.
    cfg = load_recipe(SFT, args)
    tokenizer, _ = sft._tokenizer(cfg)
    ours, _ = sft.prepare_data(cfg, tokenizer)
    conversations, heldout = sft.load_conversations(cfg)
    from transformers import AutoModelForCausalLM

    theirs = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_base),
        args=cfg,
        train_dataset=conversations,
        eval_dataset=heldout,
        processing_class=tokenizer,
    )
    for name, theirs_part in (("train", theirs.train_dataset), ("eval", theirs.eval_dataset)):
        assert theirs_part.column_names == ours[name].column_names, name
        assert theirs_part.to_list() == ours[name].to_list(), name


def test_preparing_a_stage_without_data_preparation_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as ended:
        main(["prepare", str(REPO / "recipes/tiny/rl.yaml"), f"output_dir={tmp_path}"])
    assert ended.value.code == 2
    assert "gptpipe prepare works for pretrain and sft recipes" in capsys.readouterr().err


def test_data_order_is_a_function_of_the_seed_and_the_step(tmp_path):
    """The Trainer's batches: the same for the same seed, another order for another seed and for each epoch;
    and resuming at step k (skipping k batches, as transformers does) continues with batch k."""
    from accelerate import skip_first_batches
    from datasets import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    rows = Dataset.from_dict(
        {"input_ids": [[1, i, i] for i in range(3, 35)], "labels": [[1, i, i] for i in range(3, 35)]}
    )

    def batches(seed: int, epochs: int = 2) -> list[list[int]]:
        args = TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=4, seed=seed, use_cpu=True, report_to=[]
        )
        trainer = Trainer(model=LlamaForCausalLM(tiny_llama_config()), args=args, train_dataset=rows)
        loader = trainer.get_train_dataloader()
        seen = []
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            seen += [batch["input_ids"][:, 1].tolist() for batch in loader]
        return seen

    first, again, other = batches(seed=1), batches(seed=1), batches(seed=2)
    assert first == again and first != other
    assert (
        sorted(sum(first[:8], [])) == list(range(3, 35)) and first[:8] != first[8:]
    )  # each epoch reshuffled
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, seed=1, use_cpu=True, report_to=[]
    )
    trainer = Trainer(model=LlamaForCausalLM(tiny_llama_config()), args=args, train_dataset=rows)
    loader = trainer.get_train_dataloader()
    loader.set_epoch(0)
    resumed = [batch["input_ids"][:, 1].tolist() for batch in skip_first_batches(loader, 5)]
    assert resumed == first[5:8]
