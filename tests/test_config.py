"""Recipes: overrides, validation messages and the saved config's round trip."""

import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from gptpipe.errors import UserError
from gptpipe.recipe import apply_override, build_stage_config, config_to_dict, load_recipe, validate_recipe

PRETRAIN = REPO / "recipes/tiny/pretrain.yaml"


def test_overrides_are_dotted_and_yaml_typed():
    tree = {"stage": "pretrain", "datasets": [{"path": "a.jsonl"}]}
    for assignment in [
        "max_steps=20",
        "learning_rate=3e-4",
        "model.hidden_size=64",
        "datasets.0.path=b.jsonl",
        "datasets.1.path=c.txt",
        "bf16=false",
        "output_dir=/tmp/x",
    ]:
        apply_override(tree, assignment)
    cfg = build_stage_config(tree)
    assert cfg.max_steps == 20 and isinstance(cfg.max_steps, int)
    assert cfg.learning_rate == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string: converted
    assert cfg.model.hidden_size == 64
    assert [d.path for d in cfg.datasets] == ["b.jsonl", "c.txt"]
    assert cfg.bf16 is False


def test_precedence_defaults_recipe_command_line():
    cfg = load_recipe(PRETRAIN, ["learning_rate=1e-3"])
    assert cfg.learning_rate == pytest.approx(1e-3)  # command line beats the recipe's 3e-3
    assert cfg.max_steps == 600  # from the recipe
    assert cfg.adam_beta1 == 0.9  # TrainingArguments default


@pytest.mark.parametrize(
    "override, expected",
    [
        ("max_stepz=5", "unknown key 'max_stepz'; did you mean 'max_steps'?"),
        ("model.hiden_size=8", "unknown key 'model.hiden_size'; did you mean 'model.hidden_size'?"),
        ("datasets.0.colums={}", "did you mean 'datasets.0.columns'?"),
        ("max_steps=many", "max_steps: expected an integer, got 'many'"),
        ("learning_rate=fast", "learning_rate: expected a number, got 'fast'"),
        ("model.tie_word_embeddings=3", "model.tie_word_embeddings: expected true or false, got 3"),
        ("datasets=oops", "datasets: expected a list, got 'oops'"),
        ("lr_scheduler_type=cosin", "cosin is not a valid SchedulerType"),
        (
            "lr_scheduler_kwargs={num_decay_steps: 10}",
            "lr_scheduler_kwargs: lr_scheduler_type cosine takes no num_decay_steps",
        ),
        ("max_steps", "expected key=value"),
    ],
)
def test_bad_settings_name_the_key(override, expected):
    with pytest.raises(UserError) as err:
        load_recipe(PRETRAIN, [override])
    assert expected in str(err.value)
    assert str(PRETRAIN) in str(err.value) or "key=value" in str(err.value)  # names the recipe file


def test_missing_recipe_and_missing_stage(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\n")
    with pytest.raises(UserError, match="no `stage:` key; a recipe must name one of: tokenizer, pretrain"):
        load_recipe(bad)
    bad.write_text("stage: pretrain\nmax_steps: [1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize("recipe", ["tiny/pretrain.yaml", "tiny/sft.yaml", "qwen2.5-7b/sft-qlora.yaml"])
def test_saved_config_round_trips(tmp_path, recipe):
    overrides = ["max_steps=7", "model.hidden_size=32", f"output_dir={tmp_path}"]
    if "qwen" in recipe:
        overrides += ["bf16=false", "optim=adamw_torch"]  # this machine has no GPU
    cfg = load_recipe(REPO / "recipes" / recipe, overrides)
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    again = load_recipe(saved)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again.max_steps == 7 and again.model.hidden_size == 32


def test_secrets_stay_out_of_saved_config():
    cfg = load_recipe(PRETRAIN, ["hub_token=hf_secret123"])
    assert "hf_secret123" not in yaml.safe_dump(config_to_dict(cfg))


def test_cli_user_error_exits_2_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "gptpipe", "train", str(PRETRAIN), "max_stepz=5", "output_dir=/tmp/never"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "did you mean 'max_steps'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_yaml_no_means_the_strategy_no():
    """`eval_strategy: no` is YAML false; for a strategy it can only mean "no"."""
    cfg = load_recipe(REPO / "recipes/tiny/pretrain.yaml", ["eval_strategy=no", "save_strategy=no"])
    assert (cfg.eval_strategy.value, cfg.save_strategy.value) == ("no", "no")


@pytest.mark.parametrize(
    "recipe, override, expected",
    [
        ("rl.yaml", "kl_estimator=k2", "kl_estimator: expected one of k1, k3, got 'k2'"),
        (
            "rl.yaml",
            "value_init=polic",
            "value_init: expected one of reward, policy, got 'polic'; did you mean",
        ),
        ("reward.yaml", "invalid_pairs=skip", "invalid_pairs: expected one of error, drop, got 'skip'"),
        (
            "reward.yaml",
            "truncation_side=middle",
            "truncation_side: expected one of left, right, got 'middle'",
        ),
    ],
)
def test_choice_fields_are_refused_by_validate(recipe, override, expected, tmp_path):
    """A choice field with a value it does not know fails `gptpipe validate`, before any model loads."""
    key, value = override.split("=")
    tree = yaml.safe_load((REPO / "recipes/tiny" / recipe).read_text())
    bad = tmp_path / recipe
    bad.write_text(yaml.safe_dump({**tree, key: value}))
    with pytest.raises(UserError) as err:  # the CLI prints it and exits 2 (test_cli_user_error_exits_2...)
        validate_recipe(bad)
    assert expected in str(err.value) and str(bad) in str(err.value)


@pytest.mark.parametrize(
    "override", ["gradient_checkpointing=true", "torch_compile=true", "label_smoothing_factor=0.1"]
)
def test_a_key_ppo_does_not_read_is_refused(override, tmp_path, capsys):
    """Accepted and ignored, a TrainingArguments key PPO does not read would change nothing and say nothing."""
    from gptpipe.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(REPO / "recipes/tiny/rl.yaml"), "--set", override])
    message = capsys.readouterr().err
    assert exit_.value.code == 2 and f"{override.split('=')[0]}: gptpipe's PPO trainer" in message
    assert "algorithm: grpo or rloo" in message
    validate_recipe(REPO / "recipes/tiny/grpo.yaml", [override])  # TRL's trainers read it
    validate_recipe(REPO / "recipes/tiny/rl.yaml", ["learning_rate=1e-5", "lr_scheduler_type=cosine"])  # read


def test_a_saved_ppo_config_reads_back(tmp_path):
    """config.yaml holds every key, the unread ones at their defaults: it must still load."""
    from gptpipe.recipe import save_config

    cfg = load_recipe(REPO / "recipes/tiny/rl.yaml", [f"output_dir={tmp_path / 'rl'}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_recipe(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_a_flag_the_command_lacks_is_refused_naming_it(capsys):
    """key=value after an option is an override (tests/test_pipeline.py: `--rerun sft sft.learning_rate=1e-4`);
    anything else argparse does not know still exits 2, naming it."""
    from gptpipe.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", str(REPO / "recipes/tiny/rl.yaml"), "--no-such-flag", "max_steps=1"])
    assert exit_.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
