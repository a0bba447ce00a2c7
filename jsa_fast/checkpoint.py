"""Checkpoints: written atomically, read as untrusted input (`weights_only=True`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` through a temporary file in the same folder and a rename,
    so that a crash or Ctrl-C never leaves a half-written checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {path} cannot be read safely: {error}") from error
    missing = {"model", "config"} - set(state) if isinstance(state, dict) else {"model", "config"}
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}: not a jsa-fast checkpoint")
    return state
