"""Prepared data: what a stage trains on (loaded, converted, templated, tokenized, packed), built once and
kept on disk, found again by a fingerprint of everything it depends on.

``gptpipe prepare RECIPE`` builds it in one process with progress bars and prints a summary; the next
``gptpipe train RECIPE`` finds the same fingerprint and loads it instead of preprocessing. Without
``prepare``, training builds it the same way. Under several processes the first process of each machine
runs that same ``gptpipe prepare`` as a child process of its own (one process: TRL's preparation has
barriers inside, which must not pair up with the training processes' collectives), and every training
process waits for the finished folder on the file system and reads it. Nobody waits in a collective
meanwhile, so a long tokenization cannot hit the distributed timeout (``ddp_timeout``).

The fingerprint covers the stage's data settings (sources, splits, seed, lengths, packing, loss masks,
template), the tokenizer (vocabulary, special tokens, chat template), each local source file's size and
modification time, and the gptpipe, TRL and datasets versions. Change any of them and the data is built
anew. The folder is ``prepared_data_dir`` (default: ``$GPTPIPE_CACHE/prepared``) / ``<stage>-<fingerprint>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict, load_from_disk

import gptpipe
from gptpipe.config import plain
from gptpipe.errors import UserError
from gptpipe.files import cache_dir
from gptpipe.recipe import save_config

SUMMARY = "summary.json"  # written last: a folder without it is unfinished
FINGERPRINT_VERSION = 1  # bump when what a stage's preparation produces changes


def fingerprint(cfg, tokenizer, keys: list[str]) -> str:
    """A hash of what the prepared data depends on (see the module docstring)."""
    import datasets
    import trl

    tok = tokenizer
    described = {
        "version": FINGERPRINT_VERSION,
        "stage": cfg.stage,
        "settings": {k: plain(getattr(cfg, k, None)) for k in sorted(keys)},
        "files": [_file_stamp(s.path) for s in [*cfg.datasets, *cfg.eval_datasets]],
        "tokenizer": {
            "class": type(tok).__name__,
            "vocab": hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest(),
            "special": tok.special_tokens_map,
            "template": getattr(tok, "chat_template", None),
            "padding_side": tok.padding_side,
            "truncation_side": tok.truncation_side,
        },
        "libraries": [gptpipe.__version__, trl.__version__, datasets.__version__],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _file_stamp(path: str) -> list:
    p = Path(path).expanduser()
    if not p.exists():
        return [path]  # a Hub id or tinyworld:<part>: named, versioned by revision and library versions
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [str(p.resolve()), [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def location(cfg, fp: str) -> Path:
    root = getattr(cfg, "prepared_data_dir", None) or cache_dir() / "prepared"
    return Path(root).expanduser() / f"{cfg.stage}-{fp}"


def prepared(
    cfg,
    tokenizer,
    keys: list[str],
    build: Callable[[], tuple[dict[str, Dataset], dict]],
    say=print,
) -> tuple[dict[str, Dataset], dict]:
    """The stage's datasets and their summary: loaded when prepared before, else built (by the first
    process of this machine; the others wait for its folder) and saved for the next run."""
    into = os.environ.get(PREPARE_INTO)  # set for the child process of a multi-process run
    folder = Path(into) if into else location(cfg, fingerprint(cfg, tokenizer, keys))
    if not (folder / SUMMARY).is_file():
        if getattr(cfg, "world_size", 1) == 1:
            parts, summary = build()
            _save(folder, parts, summary)
            say(f"[{cfg.stage}] prepared data saved to {folder}")
            return _load(folder, reused=False)  # from disk, as a later run reads it: the same batches
        if getattr(cfg, "local_process_index", 0) == 0:
            _build_in_child(cfg, folder)
        else:
            _wait_for(folder, cfg.stage)
    parts, summary = _load(folder, reused=True)
    say(f"[{cfg.stage}] using prepared data from {folder} (no preprocessing)")
    return parts, summary


PREPARE_INTO = "GPTPIPE_PREPARE_INTO"
# The launcher's variables: without them the child is one process with no process group.
DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
DISTRIBUTED_PREFIXES = ("TORCHELASTIC_", "MASTER_", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_")


def _build_in_child(cfg, folder: Path) -> None:
    """``gptpipe prepare`` of this recipe as one separate process writing ``folder``; output passes through."""
    import subprocess
    import sys

    folder.parent.mkdir(parents=True, exist_ok=True)
    recipe = folder.with_name(f".{folder.name}.recipe-{os.getpid()}.yaml")
    save_config(cfg, recipe)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in DISTRIBUTED_VARIABLES and not k.startswith(DISTRIBUTED_PREFIXES)
    }
    env[PREPARE_INTO] = str(folder)
    print(
        f"[{cfg.stage}] preparing the data in a separate process (the others wait for {folder})", flush=True
    )
    # Data preparation needs neither DeepSpeed nor a GPU.
    overrides = ["deepspeed=null", "use_cpu=true", "report_to=none"]
    try:
        done = subprocess.run([sys.executable, "-m", "gptpipe", "prepare", str(recipe), *overrides], env=env)
    finally:
        recipe.unlink(missing_ok=True)
    if done.returncode != 0 or not (folder / SUMMARY).is_file():
        raise UserError(
            f"[{cfg.stage}] preparing the data failed (its message is above); fix it, or run gptpipe prepare "
            "on the recipe alone first"
        )


def _save(folder: Path, parts: dict[str, Dataset], summary: dict) -> None:
    """Written under a temporary name, then renamed: a half-written folder is never found."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    DatasetDict(parts).save_to_disk(str(tmp))
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another machine's builder (a shared file system) finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path, reused: bool) -> tuple[dict[str, Dataset], dict]:
    parts = load_from_disk(str(folder))
    summary = json.loads((folder / SUMMARY).read_text())
    return dict(parts), {**summary, "reused": reused, "folder": str(folder)}


def _wait_for(folder: Path, stage: str) -> None:
    """Poll the file system (no collective, so no distributed timeout) until the builder has finished.
    If the builder dies, the launcher stops every process."""
    waited = 0
    while not (folder / SUMMARY).is_file():
        time.sleep(1)
        waited += 1
        if waited % 60 == 0:
            print(f"[{stage}] waiting for the first process to prepare the data ({waited} s)", flush=True)


def part_summary(ds: Dataset, rows_in: int, row_length: int | None, packed: bool, dropped: dict) -> dict:
    """Rows in and out, tokens, tokens in the loss (``labels`` other than -100) and, packed, how full the rows
    are (tokens / rows x row length)."""
    tokens = trained = 0
    has_labels = "labels" in ds.column_names
    for batch in ds.select_columns(["input_ids", *(["labels"] if has_labels else [])]).iter(batch_size=1000):
        tokens += sum(len(ids) for ids in batch["input_ids"])
        if has_labels:
            trained += sum(sum(1 for t in labels if t != -100) for labels in batch["labels"])
    return {
        "rows_in": rows_in,
        "rows_out": len(ds),
        "dropped": dropped,
        "tokens": tokens,
        "trained_tokens": trained if has_labels else None,
        "row_length": row_length,
        "packing_efficiency": tokens / (len(ds) * row_length) if packed and len(ds) and row_length else None,
    }


def describe(summary: dict) -> str:
    """The summary as a few lines for people."""
    lines = []
    for name, part in summary.get("parts", {}).items():
        line = f"  {name}: {part['rows_in']} rows in, {part['rows_out']} out"
        dropped = {k: v for k, v in part.get("dropped", {}).items() if v}
        if dropped:
            line += " (dropped: " + ", ".join(f"{v} {why}" for why, v in dropped.items()) + ")"
        line += f"; {part['tokens']:,} tokens"
        if part.get("trained_tokens") is not None:
            line += f", {part['trained_tokens']:,} in the loss"
        if part.get("packing_efficiency") is not None:
            line += f"; packed into {part['rows_out']} rows of up to {part['row_length']} tokens, " + (
                f"{part['packing_efficiency']:.1%} full"
            )
        lines.append(line)
    return "\n".join(lines)
