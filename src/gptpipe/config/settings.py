"""The settings groups every stage's config shares: the model (``model:``: LoRA, quantization), the data
(``datasets:``, ``eval_datasets:``) and a run's own switches (resume, faults, callbacks); and ``plain``, a
config as plain data; ``with_new_defaults``, a saved config read with the settings added since. The stage
classes are ``gptpipe.config.stages``."""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal

import yaml

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
    # SFT with tools: the share of this source's conversations (those without tools of their own) shown the
    # recipe's tools and answered as they are, with no call: a tool user still answers what needs no tool
    show_tools: float = 0.0


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
    # A NaN/inf gradient: stop (naming the step and the last good checkpoint) or skip that update (counted in
    # eval.json; not under DeepSpeed, which applies updates inside backward). docs/fault-tolerance.md
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 20  # with on_nonfinite: skip, stop anyway after this many skipped updates
    slurm_requeue: bool = True  # on SIGUSR1 under Slurm: save a checkpoint, then `scontrol requeue` the job
    # pretrain and sft: where prepared (tokenized, packed) data is kept; None: $GPTPIPE_CACHE/prepared
    prepared_data_dir: str | None = None
    # lm-evaluation-harness tasks run on final/ once the stage finished (gptpipe eval; eval-<tasks>.json in the
    # run folder, rows in the report cards): e.g. [tinyworld] or [mmlu, gsm8k]. Chat template for every stage
    # but pretraining; eval_tasks_limit: examples per task (below 1: a fraction)
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_num_fewshot: int | None = None
    eval_tasks_limit: float | None = None

    def to_dict(self) -> dict:
        """What HF integrations log (TensorBoard, wandb): the trainer's dict with our nested settings as plain
        data, so ``to_json_string`` works."""
        return {k: plain(v) for k, v in super().to_dict().items()}


def plain(obj: Any) -> Any:
    """A config (nested dataclasses, enums, paths) as plain YAML/JSON-able data, secrets left out."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f for f in dataclasses.fields(obj) if f.init and f.name not in SECRET_FIELDS]
        return {f.name: plain(getattr(obj, f.name)) for f in fields}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def with_new_defaults(saved: Any, cls: type) -> Any:
    """``saved`` (a config as config.yaml wrote it) with the fields ``cls`` has gained since, at their defaults,
    at every level (a source in ``datasets:``, the ``model:`` settings): a setting newer than a finished run
    changes nothing it did."""
    if not isinstance(saved, dict) or not dataclasses.is_dataclass(cls):
        return saved
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # a library's annotation that does not resolve: the top level alone
        hints = {}
    out = dict(saved)
    for f in dataclasses.fields(cls):
        inner = _dataclass_in(hints.get(f.name))
        if f.name not in out:
            default = yaml_default(f)
            if default is not MISSING:
                out[f.name] = default
        elif inner is not None and isinstance(out[f.name], list):
            out[f.name] = [with_new_defaults(v, inner) for v in out[f.name]]
        elif inner is not None:
            out[f.name] = with_new_defaults(out[f.name], inner)
    return out


def yaml_default(f: dataclasses.Field) -> Any:
    """A field's default as config.yaml writes it (MISSING when it has none or YAML cannot write it)."""
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    try:
        return yaml.safe_load(yaml.safe_dump(plain(value)))
    except yaml.YAMLError:
        return MISSING


def _dataclass_in(hint) -> type | None:
    """The settings class a field holds (``DataSource`` in ``list[DataSource]``, ``LoraSettings | None``)."""
    if dataclasses.is_dataclass(hint):
        return hint
    return next((c for c in map(_dataclass_in, typing.get_args(hint)) if c is not None), None)
