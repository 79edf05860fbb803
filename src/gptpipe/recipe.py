"""Recipes: read a YAML recipe, apply overrides, build and check its config class, save it back.

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
import inspect
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

from gptpipe.config import RL_CONFIGS, STAGE_CONFIGS, DataSource, SFTConfig, plain
from gptpipe.data.chat_templates import resolve
from gptpipe.data.sources import check_sources_exist
from gptpipe.errors import UserError
from gptpipe.files import redact
from gptpipe.tools import load_tools

TRAINING_ARGUMENT_KEYS = frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)

# ---------------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Read a recipe, apply ``key=value`` overrides and return the validated stage config."""
    return _from_file(path, overrides, build_stage_config)


def validate_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Check a recipe as ``train`` would, without training or network access (see ``check_tree``)."""
    return _from_file(path, overrides, check_tree)


def _from_file(path: str | Path, overrides, build) -> Any:
    """Read ``path``, apply the overrides, ``build`` the config; errors name the file."""
    path = Path(path)
    tree = read_yaml(path)
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return build(tree)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def check_tree(tree: dict, produced: set[str] = frozenset()) -> Any:
    """Build a recipe tree's config and check it further, without training or network access.

    Data files must exist, except ``produced`` ones (an earlier pipeline stage writes them); model paths are
    not checked (an earlier stage may not have made them yet).
    On a machine without a GPU, GPU-only settings (bf16, tf32) are not held against a GPU recipe.
    """
    import torch

    cls = config_class(tree)
    tree = dict(tree)
    if issubclass(cls, TrainingArguments) and not torch.cuda.is_available():
        tree["use_cpu"] = True  # lets bf16 pass the hardware check; the recipe itself is unchanged
        tree.pop("tf32", None)
    cfg = build_stage_config(tree)
    check_sources_exist(cfg, produced)
    if getattr(cfg, "chat_template", None):
        resolve(cfg.chat_template)
    if getattr(cfg, "tools", None):
        load_tools(cfg.tools)  # each importable, typed and documented: refused here, naming it
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
    refuse_unread_keys(cls, tree, cfg)
    refuse_misplaced_show_tools(cfg)
    refuse_foreign_scheduler_kwargs(cfg)
    return cfg


def refuse_foreign_scheduler_kwargs(cfg: Any) -> None:
    """``lr_scheduler_kwargs`` that the chosen schedule does not take (``num_decay_steps`` left behind when
    ``lr_scheduler_type`` is overridden): transformers would raise a TypeError at the first step."""
    kwargs = getattr(cfg, "lr_scheduler_kwargs", None) or {}
    schedule = TYPE_TO_SCHEDULER_FUNCTION.get(getattr(cfg, "lr_scheduler_type", None))
    if not kwargs or schedule is None:
        return
    params = inspect.signature(schedule).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    taken = set(params) - {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    foreign = sorted(set(kwargs) - taken)
    if foreign:
        name = getattr(cfg.lr_scheduler_type, "value", cfg.lr_scheduler_type)
        raise UserError(
            f"lr_scheduler_kwargs: lr_scheduler_type {name} takes no {', '.join(foreign)} "
            f"(it takes: {', '.join(sorted(taken)) or 'none'}); remove them, e.g. lr_scheduler_kwargs={{}}"
        )


def refuse_misplaced_show_tools(cfg: Any) -> None:
    """A source's ``show_tools`` is read by SFT alone, in its training and held-out data, on conversations, and
    shows the recipe's ``tools:``; on any other source list (``ptx_datasets``...) it would be ignored."""
    lists = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name.endswith("datasets")]
    for key, sources in lists:
        for i, src in enumerate(sources if isinstance(sources, list) else []):
            if not isinstance(src, DataSource) or not src.show_tools:
                continue
            where = f"{key}.{i} ({src.path}): show_tools {src.show_tools}"
            if not isinstance(cfg, SFTConfig) or key not in ("datasets", "eval_datasets"):
                raise UserError(
                    f"{where}: only SFT's datasets and eval_datasets read it (RL shows the tools with every "
                    "prompt; other data is read as it is); remove it"
                )
            if not 0 < src.show_tools <= 1:
                raise UserError(
                    f"{where}: a share of the conversations, above 0 and at most 1 (0.5: half of them)"
                )
            if not cfg.tools:
                raise UserError(
                    f"{where}: shows the recipe's tools, but tools: is empty; name them, e.g. "
                    "tools: [gptpipe.data.arithmetic:add, gptpipe.data.arithmetic:multiply]"
                )
            if src.format == "text":
                raise UserError(f"{where}: format text has no conversations to show tools with; remove it")


def refuse_unread_keys(cls: type, tree: dict, cfg: Any) -> None:
    """A trainer config key the stage does not read (``cls.training_keys_read``), set to a value of its own.

    Compared with a config built from nothing but ``output_dir``, so a run's saved ``config.yaml`` (every key,
    the unread ones at their defaults) still reads back."""
    read = getattr(cls, "training_keys_read", None)
    if read is None:
        return
    candidates = [k for k in tree if k in TRAINING_ARGUMENT_KEYS and k not in read]
    if not candidates:
        return
    reference = build_dataclass(cls, {"output_dir": cfg.output_dir})
    for key in candidates:
        if plain(getattr(cfg, key)) != plain(getattr(reference, key)):
            raise UserError(
                f"{key}: {cls.trainer} does not read this key, so setting it would change nothing; remove it. "
                f"{cls.unread_hint} The trainer keys it reads: {', '.join(sorted(read))}."
            )


def override_value(value: Any) -> str:
    """A value written as the ``key=value`` override that reads back as the same value."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


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
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
        hint_text = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"{where}: expected one of {', '.join(map(str, args))}, got {value!r}{hint_text}")
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
    return {"stage": cfg.stage, **plain(cfg)}


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(redact(yaml.safe_dump(config_to_dict(cfg), sort_keys=False)))


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
