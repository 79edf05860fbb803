"""Plain helpers every layer may import (this module imports nothing of gptpipe): atomic JSON writes, the
cache folder, and keeping credentials from the environment out of what a run writes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

# Environment variables whose values are credentials (WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY...).
SECRET_NAME = re.compile(r"TOKEN|API_KEY|SECRET|PASSWORD|ACCESS_KEY", re.IGNORECASE)


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def cache_dir() -> Path:
    """gptpipe's cache folder: ``$GPTPIPE_CACHE``, else ``$XDG_CACHE_HOME/gptpipe`` (``~/.cache/gptpipe``)."""
    root = os.environ.get("GPTPIPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "gptpipe"
    )
    return Path(root).expanduser()


def redact(text: str) -> str:
    """``text`` with the value of every credential-like environment variable replaced by ``***``."""
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= 8:
            text = text.replace(value, "***")
    return text
