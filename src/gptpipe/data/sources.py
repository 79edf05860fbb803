"""Load the datasets a recipe names: local files, Hub datasets or the tiny world; rename, mix and split.

Everything goes through ``datasets.load_dataset``, so loading and preprocessing are cached by
``datasets`` (fingerprints of the files and of each ``map`` function).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
from datasets import Dataset

from gptpipe.config import DataSettings, DataSource
from gptpipe.data.tinyworld import PARTS, ensure_tinyworld
from gptpipe.errors import UserError

# Local file extensions and the `datasets` builder that reads them.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
TINYWORLD_SCHEME = "tinyworld:"

# Every config key that holds data sources (checked before any model loads).
DATA_GROUPS = (
    "datasets",
    "eval_datasets",
    "generalization_datasets",
    "retained_datasets",
    "prompt_datasets",
    "ptx_datasets",
    "answer_datasets",
    "tool_datasets",
)
# A row check: returns None for a good row, or a message naming the bad field.
RowCheck = Callable[[dict], "str | None"]
# A per-source conversion (e.g. a chat format to messages), applied before the fields are checked.
Prepare = Callable[[Dataset, DataSource], Dataset]


def describe(src: DataSource) -> str:
    """How error messages name a source."""
    return src.path if src.split == "train" else f"{src.path} (split {src.split})"


def is_local(src: DataSource) -> bool:
    """A path that must exist on this machine (rather than a Hub dataset id)."""
    p = src.path
    return (
        p.startswith(TINYWORLD_SCHEME)
        or Path(p).suffix in BUILDERS
        or p.startswith(("/", "./", "../", "~"))
        or Path(p).expanduser().exists()
    )


def check_sources_exist(settings: DataSettings, produced: set[str] = frozenset()) -> None:
    """Fail early, naming the key, when a local data file is missing (no network is touched); ``produced``:
    files an earlier pipeline stage will write."""
    for group in DATA_GROUPS:
        for i, src in enumerate(getattr(settings, group, [])):
            if src.path in produced:
                continue
            if src.path.startswith(TINYWORLD_SCHEME):
                part = src.path[len(TINYWORLD_SCHEME) :]
                if part not in PARTS:
                    raise UserError(
                        f"{group}.{i}.path: unknown tiny-world part {part!r}; choose one of {list(PARTS)}"
                    )
            elif is_local(src) and not Path(src.path).expanduser().exists():
                raise UserError(
                    f"{group}.{i}.path: file not found: {src.path} (relative paths are from the current "
                    f"directory, {Path.cwd()}; a Hub dataset id has no file extension)"
                )


def load_source(src: DataSource, seed: int = 42) -> Dataset:
    """Load one source as a ``datasets.Dataset`` with its columns renamed to ours."""
    try:
        if src.path.startswith(TINYWORLD_SCHEME):
            part = src.path[len(TINYWORLD_SCHEME) :]
            folder = ensure_tinyworld()  # the world itself is fixed; `seed` shuffles the training data
            ds = _load_local(folder / part / f"{src.split}.jsonl", src)
        elif is_local(src):
            ds = _load_local(Path(src.path).expanduser(), src)
        else:
            ds = datasets.load_dataset(
                src.path, src.name, split=src.split, revision=src.revision, data_files=src.data_files
            )
    except UserError:
        raise
    except FileNotFoundError as e:
        raise UserError(f"{describe(src)}: {e}") from None
    except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise UserError(f"{describe(src)}: could not be read as a dataset: {e}") from None
    if src.max_samples is not None:
        ds = ds.select(range(min(src.max_samples, len(ds))))
    return rename_columns(ds, src)


def _load_local(path: Path, src: DataSource) -> Dataset:
    if not path.exists():
        raise UserError(f"{describe(src)}: file not found: {path}")
    if path.is_dir():
        return datasets.load_dataset(str(path), split=src.split, data_files=src.data_files)
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (0 rows); fill it or remove it from the recipe")
    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(BUILDERS)}")
    kwargs = {"sample_by": src.sample_by} if builder == "text" else {}
    # Local files are one split; `datasets` names it "train" whatever the recipe's split says.
    return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)


def rename_columns(ds: Dataset, src: DataSource) -> Dataset:
    """Apply the ``columns:`` mapping (our field -> the source's column)."""
    for ours, theirs in src.columns.items():
        if theirs not in ds.column_names:
            raise UserError(
                f"{describe(src)}: columns.{ours} names column {theirs!r}, which the data does not have; "
                f"its columns are {ds.column_names}"
            )
        if ours != theirs:
            if ours in ds.column_names:
                ds = ds.remove_columns(ours)
            ds = ds.rename_column(theirs, ours)
    return ds


def check_rows(ds: Dataset, src: DataSource, fields: list[str], check: RowCheck | None = None) -> None:
    """Fail with the file, row and field when the data is empty, lacks a field, or has a bad row."""
    if len(ds) == 0:
        raise UserError(f"{describe(src)}: the dataset is empty (0 rows); check the file or the split name")
    for name in fields:
        if name not in ds.column_names:
            hint = f"map yours with `columns: {{{name}: <your column>}}`"
            raise UserError(f"{describe(src)}: no field {name!r} (columns are {ds.column_names}); {hint}")
    if check is None:
        return
    row_number = 0
    for batch in ds.select_columns(fields).iter(batch_size=4096):
        for i in range(len(batch[fields[0]])):
            problem = check({name: batch[name][i] for name in fields})
            if problem:
                raise UserError(f"{describe(src)}: row {row_number}: {problem}")
            row_number += 1


def load_mixture(
    sources: list[DataSource],
    fields: list[str],
    check: RowCheck | None = None,
    seed: int = 42,
    prepare: Prepare | None = None,
) -> Dataset:
    """Load, convert, check and mix several sources; ``weight`` scales how many rows each contributes."""
    parts = []
    for src in sources:
        ds = load_source(src, seed=seed)
        if prepare is not None:
            if len(ds) == 0:
                raise UserError(
                    f"{describe(src)}: the dataset is empty (0 rows); check the file or the split name"
                )
            ds = prepare(ds, src)
        check_rows(ds, src, fields, check)
        if fields:  # drop the columns nobody reads (an empty list keeps what `prepare` produced)
            ds = ds.select_columns(fields)
        if src.weight <= 0:
            raise UserError(f"{describe(src)}: weight must be positive, got {src.weight}")
        parts.append(_reweight(ds, src.weight, seed))
    mixed = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return mixed.shuffle(seed=seed) if len(parts) > 1 else mixed


def _reweight(ds: Dataset, weight: float, seed: int) -> Dataset:
    if weight == 1.0:
        return ds
    whole, fraction = int(weight), weight - int(weight)
    pieces = [ds] * whole
    if fraction > 0:
        pieces.append(ds.shuffle(seed=seed).select(range(int(round(fraction * len(ds))))))
    return datasets.concatenate_datasets(pieces)


def load_train_eval(
    settings: DataSettings,
    fields: list[str],
    check: RowCheck | None = None,
    seed: int = 42,
    prepare: Prepare | None = None,
) -> tuple[Dataset, Dataset | None]:
    """The training mixture and the held-out set (``eval_datasets`` or an ``eval_split_size`` fraction)."""
    if not settings.datasets:
        raise UserError(
            "datasets: no training data; add at least one source, e.g. datasets: [{path: data.jsonl}]"
        )
    check_sources_exist(settings)
    train = load_mixture(settings.datasets, fields, check, seed, prepare)
    if settings.eval_datasets:
        return train, load_mixture(settings.eval_datasets, fields, check, seed, prepare)
    if settings.eval_split_size > 0:
        if not 0 < settings.eval_split_size < 1:
            raise UserError(
                f"eval_split_size: expected a fraction between 0 and 1, got {settings.eval_split_size}"
            )
        split = train.train_test_split(test_size=settings.eval_split_size, seed=seed)
        return split["train"], split["test"]
    return train, None


def text_row_check(row: dict) -> str | None:
    """Pretraining/tokenizer rows need a non-empty string in ``text``."""
    text = row["text"]
    if text is None:
        return "field 'text' is missing or null; every row needs a 'text' string"
    if not isinstance(text, str):
        return f"field 'text' must be a string, got {type(text).__name__} ({text!r:.60})"
    return None
