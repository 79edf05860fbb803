"""User code a recipe names as ``module:function`` or ``path/to/file.py:function`` (reward functions, tools)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from gptpipe.errors import UserError


def import_callable(spec: str, where: str) -> Callable:
    """The function ``module:function`` or ``path/to/file.py:function`` names; ``where`` (the recipe key) in errors."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise UserError(f"{where}: expected 'module:function' or 'path/to/file.py:function', got {spec!r}")
    try:
        if source.endswith(".py"):
            path = Path(source)
            if not path.is_file():
                raise UserError(f"{where}: {path} not found (from {spec!r})")
            module_spec = importlib.util.spec_from_file_location(f"gptpipe_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
        fn = getattr(module, name)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise UserError(f"{where}: cannot import {spec!r}: {e}") from None
    if not callable(fn):
        raise UserError(f"{where}: {spec!r} is not callable")
    return fn
