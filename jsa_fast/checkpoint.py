"""Checkpoints: written atomically, read as untrusted input (`weights_only=True`)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from jsa_fast.cli import DataError, RunError

__all__ = ["save_checkpoint", "load_checkpoint", "remove_stale_temporaries", "non_finite_tensors", "is_disk_full"]


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from or during, is ENOSPC / EDQUOT
    (torch.save reports a full disk as a RuntimeError raised during the OSError)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__ or current.__context__
    return False


def _temporary_pattern(path: Path) -> str:
    return f".{path.name}.*.tmp"


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files that writes of `path` interrupted by a kill or a crash
    left beside it (a run folder has one writer, so none of them is in progress)."""
    path = Path(path)
    stale = sorted(path.parent.glob(_temporary_pattern(path)))
    for temporary in stale:
        temporary.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` through a temporary file in the same folder and a rename,
    so that a crash or Ctrl-C never leaves a half-written checkpoint behind. RunError
    when the disk is full (the previous file at `path` is then unchanged)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if is_disk_full(error):
            free_mib = shutil.disk_usage(path.parent).free / 2**20
            kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
            raise RunError(
                f"no space left on the device of {path.parent} to write {path.name} ({free_mib:.1f} MiB free); {kept}"
            ) from error
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` without unpickling arbitrary objects."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a folder, not a checkpoint file (e.g. {path / 'last.pt'})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise DataError(f"checkpoint {path} cannot be read safely: {_load_failure(error)}") from error
    missing = {"model", "config"} - set(state) if isinstance(state, dict) else {"model", "config"}
    if missing:
        raise DataError(f"checkpoint {path} lacks {sorted(missing)}: not a jsa-fast checkpoint")
    return state


def _load_failure(error: Exception) -> str:
    """The part of torch.load's (paragraph-long) message that says what was wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    unpickler = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    if unpickler:
        return "it holds objects other than tensors and plain values (" + unpickler[0].split(". Please use")[0] + ")"
    return lines[0] if lines else type(error).__name__


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of a state dict holding NaN or inf."""
    return [
        name
        for name, tensor in state_dict.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
