"""Pipelines: stages wired to the previous stage's final/, finished stages skipped, interrupted ones resumed,
changed settings refused unless rerun; every run folder gets report.md and plots, the pipeline a report card."""

import json
import shutil

import pytest
import yaml
from conftest import REPO
from transformers import AutoModelForCausalLM

from gptpipe.cli import run
from gptpipe.errors import UserError
from gptpipe.pipeline import load_pipeline

TINY = REPO / "recipes/tiny"
SMALL_PRETRAIN = {
    "model.hidden_size": 64,
    "model.intermediate_size": 128,
    "model.num_attention_heads": 4,
    "block_size": 64,
    "max_steps": 30,
    "eval_steps": 30,
    "save_steps": 100,
    "logging_steps": 5,
    "probe_datasets": [],
    "disable_tqdm": True,
}
SHORT_RUN = {"max_steps": 4, "eval_steps": 4, "save_steps": 100, "logging_steps": 2, "disable_tqdm": True}
SMALL_RL = {
    "max_steps": 1,
    "per_device_train_batch_size": 4,
    "eval_prompts": 4,
    "max_new_tokens": 8,
    "ppo_epochs": 1,
}
SMALL_SFT = {
    "max_steps": 10,
    "save_steps": 5,
    "eval_steps": 10,
    "logging_steps": 5,
    "answer_datasets": [],
    "disable_tqdm": True,
}


def write_pipeline(tmp_path, stages, **extra):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "runs"), "stages": stages, **extra}))
    return path


def small_pipeline(tmp_path, benchmarks: dict | None = None, **extra):
    """tokenizer -> pretrain -> sft, shrunk; ``benchmarks``: settings both models add (eval_tasks...)."""
    return write_pipeline(
        tmp_path,
        [
            {"recipe": str(TINY / "tokenizer.yaml")},
            {"recipe": str(TINY / "pretrain.yaml"), "overrides": {**SMALL_PRETRAIN, **(benchmarks or {})}},
            {"recipe": str(TINY / "sft.yaml"), "overrides": {**SMALL_SFT, **(benchmarks or {})}},
        ],
        compare={
            "prompts": {"path": "tinyworld:rl_prompts", "split": "eval"},
            "num_prompts": 2,
            "diversity_prompts": 2,
            "samples": 2,
            "max_new_tokens": 8,
        },
        **extra,
    )


def test_stages_are_wired_to_the_previous_final(tmp_path):
    stages = [{"recipe": str(TINY / f"{s}.yaml")} for s in ("tokenizer", "pretrain", "sft", "reward", "rl")]
    stages[3]["overrides"] = {"model.name_or_path": "my/reward-base"}  # set explicitly: never rewired
    _, planned = load_pipeline(write_pipeline(tmp_path, stages), ["rl.kl_coef=0.2"])
    cfg = {p.name: p.cfg for p in planned}
    runs = tmp_path / "runs"
    assert cfg["tokenizer"].output_dir == str(runs / "tokenizer")
    assert cfg["pretrain"].model.tokenizer == str(runs / "tokenizer/final")
    assert cfg["sft"].model.name_or_path == str(runs / "pretrain/final")
    assert cfg["reward"].model.name_or_path == "my/reward-base"
    assert cfg["rl"].model.name_or_path == str(runs / "sft/final")
    assert cfg["rl"].reward_model == str(runs / "reward/final") and cfg["rl"].kl_coef == 0.2
    with pytest.raises(UserError, match="expected STAGE.key=value with STAGE one of"):
        load_pipeline(write_pipeline(tmp_path, stages), ["dpo.beta=0.1"])
    preference = [{"recipe": str(TINY / f"{s}.yaml")} for s in ("sft", "dpo", "kto")]
    _, planned = load_pipeline(write_pipeline(tmp_path, preference), ["dpo.beta=0.3"])
    cfg = {p.name: p.cfg for p in planned}
    assert cfg["dpo"].model.name_or_path == cfg["kto"].model.name_or_path == str(runs / "sft/final")
    assert cfg["dpo"].beta == 0.3


def test_output_dir_moves_the_paths_a_stage_names_in_the_pipelines_folder():
    """--output-dir runs/try: a stage that names a model or file in the pipeline's own folder reads it from runs/try
    (it read the original folder's, silently: pipeline-tools' sft-tools started from another run's SFT model)."""
    _, planned = load_pipeline(TINY / "pipeline-tools.yaml", output_dir="runs/try")
    cfg = {p.name: p.cfg for p in planned}
    assert cfg["sft-tools"].model.name_or_path == "runs/try/sft/final"
    assert cfg["rl-tools"].model.name_or_path == "runs/try/sft-tools/final"
    _, planned = load_pipeline(TINY / "pipeline-rejection.yaml", output_dir="runs/try")
    assert planned[-1].cfg.datasets[1].path == "runs/try/rank-best/final/best.jsonl"
    _, planned = load_pipeline(TINY / "pipeline-tools.yaml")
    assert planned[3].cfg.model.name_or_path == "runs/tiny-tools/sft/final"


def test_rank_stage_feeds_the_reward_stage_its_comparisons(tmp_path):
    stages = [{"recipe": str(TINY / f"{s}.yaml")} for s in ("sft", "rank", "reward")]
    _, planned = load_pipeline(write_pipeline(tmp_path, stages))
    cfg = {p.name: p.cfg for p in planned}
    runs = tmp_path / "runs"
    assert cfg["rank"].model.name_or_path == str(runs / "sft/final")
    [source] = cfg["reward"].datasets
    assert (source.path, source.format) == (str(runs / "rank/final/comparisons.jsonl"), "ranked")
    assert cfg["reward"].model.name_or_path == str(runs / "sft/final")
    # `gptpipe validate` accepts the comparisons file that the rank stage has not written yet
    load_pipeline(write_pipeline(tmp_path, stages), check=True)


def test_pipeline_skips_resumes_refuses_and_reruns(tmp_path, capsys):
    benchmarks = {"eval_tasks": ["tinyworld"], "eval_tasks_limit": 8}  # lm-eval on both models, 8 questions
    pipeline = small_pipeline(tmp_path, benchmarks, export={"out": str(tmp_path / "exported")})
    runs = tmp_path / "runs"
    run(["pipeline", str(pipeline)])
    out = capsys.readouterr().out
    # The pipeline ends in an export of its last model: the SFT model, with its card and lm-eval scores
    exported_card = (tmp_path / "exported/README.md").read_text()
    assert f"exported {runs / 'sft'}" in out and "tokenizer -> pretrain -> sft" in exported_card
    assert "| tinyworld | answer_accuracy |" in exported_card
    AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    card = (runs / "report.md").read_text()
    for stage in ("pretrain", "sft"):  # the base model as plain text, the SFT model through its chat template
        found = json.loads((runs / stage / "eval-tinyworld.json").read_text())
        assert found["chat_template"] is (stage == "sft") and found["limit"] == 8
    assert card.count("| lm-eval tinyworld answer_accuracy |") == 2, card
    for stage, metric in [("tokenizer", "bytes_per_token"), ("pretrain", "perplexity"), ("sft", "eval_loss")]:
        assert f"| {stage} | {metric} |" in card, card
        assert (runs / stage / "report.md").is_file()
    assert "| perplexity |" in (runs / "pretrain/report.md").read_text()
    assert (runs / "pretrain/plots/loss.png").stat().st_size > 1000
    # The same prompts to the base and the SFT model, side by side, with their diversity figures.
    assert "| prompt | pretrain | sft |" in card and "\n| sft |" in card
    assert (runs / "compare.json").is_file() and (runs / "plots/diversity.png").stat().st_size > 1000
    assert "report card" in out

    finished = {s: (runs / s / "eval.json").stat().st_mtime_ns for s in ("tokenizer", "pretrain", "sft")}
    # A run of an older gptpipe: its config.yaml lacks the settings added since, which are at their defaults
    saved_path = runs / "sft/config.yaml"
    saved = yaml.safe_load(saved_path.read_text())
    older = {k: v for k, v in saved.items() if not k.startswith("ptx_")}
    older["datasets"] = [{k: v for k, v in d.items() if k != "show_tools"} for d in saved["datasets"]]
    older["model"] = {k: v for k, v in saved["model"].items() if k != "merge_lora"}  # nested settings too
    saved_path.write_text(yaml.safe_dump(older))
    run(["pipeline", str(pipeline)])  # everything finished with the same settings: nothing retrains
    assert capsys.readouterr().out.count("skipped") == 3
    with pytest.raises(UserError, match=r"stage sft: .* different settings \(ptx_coef, ptx_datasets\)"):
        run(["pipeline", str(pipeline), "sft.ptx_coef=0.5", "sft.ptx_datasets=[{path: tinyworld:pretrain}]"])
    assert finished == {s: (runs / s / "eval.json").stat().st_mtime_ns for s in finished}

    with pytest.raises(UserError, match=r"stage sft: .* different settings \(learning_rate\).*--rerun sft"):
        run(["pipeline", str(pipeline), "sft.learning_rate=1e-4"])
    # The folder copied elsewhere (to branch an experiment off it): its stages are still finished there
    shutil.copytree(runs, tmp_path / "copy")
    run(["pipeline", str(pipeline), "--output-dir", str(tmp_path / "copy")])
    assert capsys.readouterr().out.count("skipped") == 3

    # An interrupted SFT (a checkpoint, no final/) resumes; the stages before it are skipped.
    (runs / "sft/eval.json").unlink()
    run(["pipeline", str(pipeline)])
    out = capsys.readouterr().out
    assert f"resuming from {runs / 'sft/checkpoint-10'}" in out and out.count("skipped") == 2

    # overrides after an option too
    run(["pipeline", str(pipeline), "--rerun", "sft", "sft.learning_rate=1e-4"])
    assert "[pipeline] sft: rerun" in capsys.readouterr().out
    saved = yaml.safe_load((runs / "sft/config.yaml").read_text())
    assert saved["learning_rate"] == 1e-4
    assert (runs / "pretrain/eval.json").stat().st_mtime_ns == finished["pretrain"]
    assert json.loads((runs / "sft/eval.json").read_text())["train_steps"] == 10


def test_shipped_pipeline_validates(capsys, monkeypatch):
    """make demo's pipeline: the reward model learns from the SFT model's ranked samples beside the pre-written
    pairs (comparisons: add), held out on the SFT model's samples of the held-out prompts."""
    monkeypatch.chdir(REPO)
    run(["validate", "recipes/tiny/pipeline.yaml"])
    assert "tokenizer -> pretrain -> sft -> rank -> reward -> rl" in capsys.readouterr().out
    _, planned = load_pipeline(REPO / "recipes/tiny/pipeline.yaml")
    pretrain = next(p.cfg for p in planned if p.name == "pretrain")  # the corpus plus Q/A in the RL phrasing
    assert [(d.path, d.split) for d in pretrain.datasets] == [
        ("tinyworld:pretrain", "train"),
        ("tinyworld:pretrain", "asked"),
    ]
    reward = next(p.cfg for p in planned if p.name == "reward")
    assert [(d.path, d.format) for d in reward.datasets] == [
        ("runs/tiny/rank/final/comparisons.jsonl", "ranked"),
        ("tinyworld:comparisons", "preference"),  # reward.yaml's own
        ("tinyworld:comparisons", "preference"),  # split asked: the RL prompts' replies about someone else
    ]
    assert reward.datasets[2].split == "asked"
    assert [d.path for d in reward.eval_datasets] == ["runs/tiny/rank/final/heldout_comparisons.jsonl"]
    rl = next(p.cfg for p in planned if p.name == "rl")
    assert rl.reward_model == "runs/tiny/reward/final" and rl.ptx_coef > 0


def test_comparisons_add_keeps_the_entrys_datasets_beside_the_ranked_ones(tmp_path):
    """A reward stage's `datasets` override is what `comparisons: add` adds the rank stage's pairs to; with no rank
    stage before it, the override stands as any other."""
    own = [{"path": "tinyworld:comparisons", "split": "asked", "format": "preference"}]
    entry = {"recipe": str(TINY / "reward.yaml"), "comparisons": "add", "overrides": {"datasets": own}}
    for stages in ([entry], [{"recipe": str(TINY / "rank.yaml")}, entry]):
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "runs"), "stages": stages}))
        _, planned = load_pipeline(path)
        found = [(d.path, d.split) for d in planned[-1].cfg.datasets]
        ranked = [(str(tmp_path / "runs/rank/final/comparisons.jsonl"), "train")] if len(stages) == 2 else []
        assert found == ranked + [("tinyworld:comparisons", "asked")]


def _small_recipe(tmp_path, name: str, policy, **settings) -> str:
    """A copy of a tiny recipe that starts from ``policy``, shrunk to seconds."""
    tree = yaml.safe_load((TINY / f"{name}.yaml").read_text())
    tree["model"]["name_or_path"] = str(policy)
    tree.update(settings)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path.name


def test_rounds_repeat_rank_reward_rl_each_from_the_last_policy(tiny_sft, tmp_path):
    """Iterated on-policy RLHF, 2 tiny rounds: round 2 samples and continues round 1's RL policy, its reward model
    learns from both rounds' comparisons and is held out on the current policy's samples; a report card row per
    stage and round, and a verdict per RL round."""
    prompts = {
        "path": "tinyworld:rl_prompts",
        "max_samples": 32,
    }  # 8 left no held-out pair on seed 42's model
    heldout = {**prompts, "split": "eval"}
    block = [
        {
            "recipe": _small_recipe(
                tmp_path, "rank", tiny_sft, datasets=[prompts], eval_datasets=[heldout], num_samples=4
            )
        },
        {"recipe": _small_recipe(tmp_path, "reward", tiny_sft, **SHORT_RUN)},
        {"recipe": _small_recipe(tmp_path, "rl", tiny_sft, **SMALL_RL)},
    ]
    pipeline = write_pipeline(tmp_path, [{"rounds": 2, "stages": block}])
    _, planned = load_pipeline(pipeline)
    cfg = {p.name: p.cfg for p in planned}
    runs = tmp_path / "runs"
    assert list(cfg) == ["rank-1", "reward-1", "rl-1", "rank-2", "reward-2", "rl-2"]
    assert cfg["rank-1"].model.name_or_path == cfg["rl-1"].model.name_or_path == str(tiny_sft)
    assert cfg["rank-2"].model.name_or_path == cfg["rl-2"].model.name_or_path == str(runs / "rl-1/final")
    assert [d.path for d in cfg["reward-2"].datasets] == [
        str(runs / f"rank-{r}/final/comparisons.jsonl") for r in (1, 2)
    ]
    assert cfg["reward-2"].eval_datasets[0].path == str(runs / "rank-2/final/heldout_comparisons.jsonl")
    assert cfg["reward-2"].model.name_or_path == str(tiny_sft)  # each round's reward model from the SFT model
    assert cfg["rl-2"].reward_model == str(runs / "reward-2/final")

    run(["pipeline", str(pipeline)])
    card = (runs / "report.md").read_text()
    for r in (1, 2):
        assert f"| rank-{r} | pairs |" in card and f"| reward-{r} | pairwise_accuracy |" in card, card
        assert f"| rl-{r} | reward |" in card and f"- **rl-{r}**: " in card
    with pytest.raises(UserError, match="a rounds block is `rounds: N`"):
        load_pipeline(write_pipeline(tmp_path, [{"rounds": 0, "stages": block}]))
