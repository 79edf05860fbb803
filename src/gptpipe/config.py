"""Recipes: YAML files that configure one stage, and the per-stage config classes.

A recipe names its ``stage:``; its other keys are the fields of that stage's config dataclass. Stages
that train with a Hugging Face trainer extend that trainer's config class (``PretrainConfig`` extends
``transformers.TrainingArguments``) instead of re-declaring its fields, and add grouped settings for
the model (``model:``) and the data (``datasets:``, ``eval_datasets:``).

Precedence: dataclass defaults < recipe YAML < command-line ``key=value`` overrides, where keys are
dotted paths into nested settings (``model.hidden_size=64``, ``datasets.0.path=data.jsonl``) and
values are read as YAML (``max_steps=20`` is an int, ``bf16=true`` a bool). Unknown keys and values
of the wrong type are errors that name the key; the resolved config is saved as ``config.yaml`` in
the run folder and runs unchanged when fed back.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import trl
import yaml
from transformers import TrainingArguments

from gptpipe.errors import UserError

# Config fields that may hold credentials: never written to config.yaml (tokens belong in the environment).
SECRET_FIELDS = {"hub_token"}


@dataclass
class LoraSettings:
    """LoRA adapters (peft): only these small matrices train; the base weights stay frozen."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None  # fully trained extra modules, e.g. [score] for a reward head


@dataclass
class QuantizationSettings:
    """Load the base model in 4 or 8 bits with bitsandbytes (QLoRA when combined with LoRA)."""

    bits: int = 4  # 4 | 8
    quant_type: str = "nf4"  # 4-bit: nf4 | fp4
    double_quant: bool = True  # 4-bit: quantize the quantization constants too (saves ~0.4 bit/parameter)
    compute_dtype: str = "bfloat16"  # dtype of the matmuls on dequantized weights
    quant_storage: str | None = None  # 4-bit storage dtype; set to the model dtype for FSDP (e.g. bfloat16)


@dataclass
class ModelConfig:
    """Which model to train: a Hugging Face id or local path, or a new Llama built from the sizes below."""

    name_or_path: str | None = None  # HF Hub id or local folder; None builds a new model from the sizes below
    tokenizer: str | None = None  # tokenizer id or folder; defaults to name_or_path
    revision: str | None = None
    dtype: str = (
        "auto"  # auto | float32 | bfloat16 | float16 (auto: the checkpoint's dtype; float32 from scratch)
    )
    attn_implementation: str | None = None  # sdpa | eager | flash_attention_2; None lets transformers pick
    trust_remote_code: bool = False
    # From-scratch Llama sizes (used only when name_or_path is None); the vocabulary comes from the tokenizer.
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no grouped-query attention)
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True  # tiny models spend most parameters on embeddings: share them
    # Memory switches.
    lora: LoraSettings | None = None  # e.g. lora: {r: 16, alpha: 32}
    quantization: QuantizationSettings | None = None  # e.g. quantization: {bits: 4}
    merge_lora: bool = (
        False  # save final/ as a plain model with the adapter merged in (else final/ is the adapter)
    )


@dataclass
class DataSource:
    """One dataset in a mixture: a local file or folder, a Hub dataset id, or ``tinyworld:<part>``."""

    path: str
    name: str | None = None  # Hub dataset config name
    split: str = "train"
    revision: str | None = None
    data_files: str | list[str] | None = None  # for Hub repos / folders with several files
    columns: dict[str, str] = field(
        default_factory=dict
    )  # our field -> the source's column, e.g. {text: content}
    weight: float = 1.0  # sampling multiplier in a mixture: 2.0 repeats the source twice, 0.5 takes half
    max_samples: int | None = None  # keep only the first N rows (quick experiments)
    sample_by: str = "line"  # .txt files: one row per line | paragraph | document
    format: str | None = None  # data format; stages that accept several formats read it (pretraining: text)


@dataclass
class DataSettings:
    """Training and held-out data shared by every stage."""

    datasets: list[DataSource] = field(default_factory=list)
    eval_datasets: list[DataSource] = field(default_factory=list)
    eval_split_size: float = 0.0  # with no eval_datasets: fraction of the training mixture held out
    dataset_num_proc: int | None = None  # processes for tokenization (datasets.map num_proc)


@dataclass
class RunSettings(DataSettings):
    """Settings every trainer-based stage adds to its Hugging Face config class."""

    model: ModelConfig = field(default_factory=ModelConfig)
    resume: bool = True  # continue from the newest checkpoint in output_dir; false starts over
    overwrite: bool = False  # replace a finished run in output_dir (otherwise refused)
    callbacks: list[str] = field(
        default_factory=list
    )  # extra transformers.TrainerCallback classes, "module:Class"

    def to_dict(self) -> dict:
        """What HF integrations log (TensorBoard, wandb): the trainer's dict with our nested settings as plain
        data, so ``to_json_string`` works."""
        return {k: _plain(v) for k, v in super().to_dict().items()}


@dataclass
class TokenizerConfig(DataSettings):
    """Train a byte-level BPE tokenizer with chat special tokens and a chat template."""

    stage: ClassVar[str] = "tokenizer"
    module: ClassVar[str] = "gptpipe.stages.tokenizer"  # where the stage's main(cfg) lives
    output_dir: str | None = None
    vocab_size: int = 4096  # an upper bound: BPE stops early when no pair reaches min_frequency
    min_frequency: int = 2
    max_train_documents: int | None = None  # cap on documents read for training (large corpora)
    seed: int = 42
    overwrite: bool = False


@dataclass
class PretrainConfig(RunSettings, TrainingArguments):
    """Causal-LM pretraining with ``transformers.Trainer`` on EOS-delimited documents packed into blocks."""

    stage: ClassVar[str] = "pretrain"
    module: ClassVar[str] = "gptpipe.stages.pretrain"
    block_size: int = 256  # tokens per training sequence; documents are concatenated and cut into blocks
    probe_datasets: list[DataSource] = field(
        default_factory=list
    )  # cloze rows {prompt, answer} checked before/after


@dataclass
class SFTConfig(RunSettings, trl.SFTConfig):
    """Supervised finetuning with ``trl.SFTTrainer`` on conversations (see ``gptpipe.data.formats``).

    Loss masks are TRL's switches: ``assistant_only_loss`` (our default: train on what the assistant
    wrote), ``completion_only_loss`` (the final assistant turn only), or both false (every token).
    """

    stage: ClassVar[str] = "sft"
    module: ClassVar[str] = "gptpipe.stages.sft"
    assistant_only_loss: bool = True
    chat_template: str | None = None  # None: the tokenizer's own; or chatml | gptpipe | a .jinja file
    answer_datasets: list[DataSource] = field(default_factory=list)  # held-out chats with an `answer` field
    answer_max_new_tokens: int = 48


@dataclass
class RewardConfig(RunSettings, trl.RewardConfig):
    """Reward modeling with ``trl.RewardTrainer``: a one-output sequence classifier trained on comparisons."""

    stage: ClassVar[str] = "reward"
    module: ClassVar[str] = "gptpipe.stages.reward"
    chat_template: str | None = None  # None: the tokenizer's own; or chatml | gptpipe | a .jinja file
    truncation_side: str = "left"  # over max_length, cut the start (left) and keep the replies being judged
    invalid_pairs: str = "error"  # error | drop: identical chosen/rejected, missing reply, empty prompt
    check_reload: bool = (
        True  # reload final/ after saving and check it scores exactly as the trained model did
    )


@dataclass
class RLSettings(RunSettings):
    """What every RL algorithm's recipe adds: the frozen reward model, the template and the evidence size."""

    algorithm: str = "ppo"  # ppo (gptpipe's own trainer) | grpo | rloo (TRL's trainers)
    reward_model: str | None = None  # the reward stage's final/ (or any one-output sequence classifier)
    reward_quantization: QuantizationSettings | None = None  # frozen reward model in 8 or 4 bits: {bits: 8}
    chat_template: str | None = None
    eval_prompts: int = 128  # held-out prompts scored before and after (greedy)


@dataclass
class RLConfig(RLSettings, TrainingArguments):
    """RLHF against a frozen reward model. ``algorithm: ppo`` is gptpipe's own trainer (``gptpipe.ppo``);
    it reads the familiar ``TrainingArguments`` keys (learning_rate, max_steps, per_device_train_batch_size as
    prompts per iteration and process, gradient_accumulation_steps, logging_steps, save_steps, seed) plus
    the PPO settings below."""

    stage: ClassVar[str] = "rl"
    module: ClassVar[str] = "gptpipe.stages.rl"
    value_init: str = "reward"  # critic from the reward model (InstructGPT) or from the policy (zero head)
    value_learning_rate: float | None = None  # None: learning_rate
    value_lora: LoraSettings | None = None  # train the critic as LoRA adapters (its score head in full)
    reward_clip: float | None = None  # clip reward-model scores to [-c, c] before the KL penalty
    whiten_rewards: bool = False  # standardize each batch's scores (mean 0, std 1): a stable reward scale
    max_new_tokens: int = 32
    temperature: float = 1.0  # sampling temperature; log-probs use the same one
    top_p: float = 1.0
    ppo_epochs: int = 4
    num_minibatches: int = 1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0  # RLHF practice: no discount within a response
    lam: float = 0.95
    kl_coef: float = 0.05  # β: the per-token KL penalty against the reference (the SFT model)
    kl_estimator: str = "k1"  # k1 | k3
    kl_target: float | None = None  # set: adaptive β (Ziegler et al.) steering the per-sample KL to this
    kl_horizon: int = 10000
    missing_eos_penalty: float | None = None  # score for responses that never stop (e.g. -1.0)


@dataclass
class GRPOConfig(RLSettings, trl.GRPOConfig):
    """GRPO with ``trl.GRPOTrainer``: groups of ``num_generations`` samples per prompt, each scored by the
    reward model and compared with its group's mean (no critic). Every ``trl.GRPOConfig`` key applies
    (``beta`` is the KL coefficient, ``max_completion_length`` the response length)."""

    stage: ClassVar[str] = "rl"
    module: ClassVar[str] = "gptpipe.stages.rl_trl"
    algorithm: str = "grpo"


@dataclass
class RLOOConfig(RLSettings, trl.RLOOConfig):
    """RLOO with ``trl.RLOOTrainer``: REINFORCE with the other samples of the same prompt as the baseline.
    Every ``trl.RLOOConfig`` key applies."""

    stage: ClassVar[str] = "rl"
    module: ClassVar[str] = "gptpipe.stages.rl_trl"
    algorithm: str = "rloo"


STAGE_CONFIGS: dict[str, type] = {
    "tokenizer": TokenizerConfig,
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "reward": RewardConfig,
    "rl": RLConfig,
}
# `stage: rl` recipes pick their class by `algorithm:`.
RL_CONFIGS: dict[str, type] = {"ppo": RLConfig, "grpo": GRPOConfig, "rloo": RLOOConfig}


# ---------------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Read a recipe, apply ``key=value`` overrides and return the validated stage config."""
    path = Path(path)
    tree = read_yaml(path)
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return build_stage_config(tree)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def validate_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Check a recipe as ``train`` would, without training or network access (see ``check_tree``)."""
    path = Path(path)
    tree = read_yaml(path)
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return check_tree(tree)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def check_tree(tree: dict) -> Any:
    """Build a recipe tree's config and check it further, without training or network access.

    Data files must exist; model paths are not checked (an earlier stage may not have made them yet).
    On a machine without a GPU, GPU-only settings (bf16, tf32) are not held against a GPU recipe.
    """
    import torch

    from gptpipe.data.sources import check_sources_exist

    cls = config_class(tree)
    tree = dict(tree)
    if issubclass(cls, TrainingArguments) and not torch.cuda.is_available():
        tree["use_cpu"] = True  # lets bf16 pass the hardware check; the recipe itself is unchanged
        tree.pop("tf32", None)
    cfg = build_stage_config(tree)
    check_sources_exist(cfg)
    if getattr(cfg, "chat_template", None):
        from gptpipe.data.chat_templates import resolve

        resolve(cfg.chat_template)
    return cfg


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"recipe not found: {path} (expected a YAML file such as recipes/tiny/pretrain.yaml)")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise UserError(
            f"{path}: expected a mapping of settings with a `stage:` key, got {type(tree).__name__}"
        )
    return tree


def config_class(tree: dict) -> type:
    """The config class a recipe tree asks for: by ``stage:``, and for ``stage: rl`` by ``algorithm:``."""
    stage = tree.get("stage")
    if stage not in STAGE_CONFIGS:
        choices = ", ".join(STAGE_CONFIGS)
        got = "no `stage:` key" if stage is None else f"stage {stage!r}"
        raise UserError(f"{got}; a recipe must name one of: {choices}")
    if stage != "rl":
        return STAGE_CONFIGS[stage]
    algorithm = tree.get("algorithm", "ppo")
    if algorithm not in RL_CONFIGS:
        raise UserError(f"algorithm: expected one of {', '.join(RL_CONFIGS)}, got {algorithm!r}")
    return RL_CONFIGS[algorithm]


def build_stage_config(tree: dict) -> Any:
    """Pick the stage's config class from ``stage:`` and build it from the rest of ``tree``."""
    cls = config_class(tree)
    tree = {k: v for k, v in tree.items() if k != "stage"}
    cfg = build_dataclass(cls, tree)
    if not cfg.output_dir:
        raise UserError(
            "output_dir is required (where the run folder goes, e.g. output_dir: runs/tiny/pretrain)"
        )
    return cfg


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override (value parsed as YAML) to a recipe tree in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UserError(
            f"override {assignment!r}: expected key=value, e.g. max_steps=20 or model.hidden_size=64"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text as a string
    parts = key.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise UserError(f"override {key}: {where!r} must be a list index from 0 to {len(node)}")
            index = int(part)
            if index == len(node):  # one past the end appends, e.g. datasets.1.path=... adds a source
                node.append(value if last else {})
            elif last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = [] if parts[depth + 1].isdigit() else {}
                node = node[part]
        else:
            parent = ".".join(parts[:depth])
            raise UserError(f"override {key}: {parent!r} is a {type(node).__name__}, not a group of settings")


def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """Construct ``cls`` from a mapping, checking every key and the type of every value."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping of settings, got {data!r}")
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise UserError(_unknown_key_message(where, str(key), names))
        kwargs[key] = convert_value(value, hints[key], where)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs and _is_required(f)]
    if missing:
        raise UserError(f"{prefix}{missing[0]} is required (in {cls.__name__})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # the HF config classes check value combinations in __post_init__
        raise UserError(f"{prefix.rstrip('.') or 'invalid settings'}: {e}") from None


def convert_value(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint, converting where YAML is ambiguous (``3e-4`` reads as a string)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return convert_value(value, option, where)
            except UserError:
                continue
        raise UserError(f"{where}: expected {_describe(hint)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise UserError(f"{where}: expected one of {list(args)}, got {value!r}")
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [convert_value(v, item, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        if len(args) == 2:
            return {k: convert_value(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return value
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, f"{where}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = [m.value for m in hint]
        if isinstance(value, bool) and ("no" if not value else "yes") in choices:
            return "no" if not value else "yes"  # YAML 1.1 reads `eval_strategy: no` as false
        if value in choices or isinstance(value, hint):
            return value
        raise UserError(f"{where}: expected one of {choices}, got {value!r}")
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        return value  # a hint we do not interpret: leave checking to the config class
    raise UserError(f"{where}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})")


# ---------------------------------------------------------------------------------------------------
# Saving


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as plain YAML-able data, ``stage`` first, secrets left out."""
    return {"stage": cfg.stage, **_plain(cfg)}


def save_config(cfg: Any, path: str | Path) -> None:
    from gptpipe.tracking import redact

    Path(path).write_text(redact(yaml.safe_dump(config_to_dict(cfg), sort_keys=False)))


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f for f in dataclasses.fields(obj) if f.init and f.name not in SECRET_FIELDS]
        return {f.name: _plain(getattr(obj, f.name)) for f in fields}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# ---------------------------------------------------------------------------------------------------
# Helpers


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a library annotation we cannot resolve: fall back to the raw field types
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _unknown_key_message(where: str, key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    group = where.rpartition(".")[0]
    prefix = f"{group}." if group else ""
    hint = (
        f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(sorted(names))}"
    )
    return f"unknown key '{where}'{hint}"


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}.get(
            hint.__name__, hint.__name__
        )
    return str(hint)
