"""Checkpoints: written atomically, read as untrusted input (`weights_only=True`), and the
one way a trained model is loaded from one (evaluate, localize and a resumed training)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from jsa_fast.config import RunConfig, saved_config
from jsa_fast.errors import DataError, RunError, is_disk_full
from jsa_fast.model import JSAModel

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "remove_stale_temporaries",
    "non_finite_tensors",
    "TrainedModel",
    "trained_model",
    "load_trained_model",
]


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


class TrainedModel(NamedTuple):
    """A checkpoint's model (in eval mode on the device asked for), its run configuration,
    its --data (None: the synthetic world) and the whole state it was read from."""

    model: JSAModel
    cfg: RunConfig
    data: str | None
    state: dict[str, Any]


def trained_model(state: Mapping[str, Any], cfg: RunConfig, source: str | Path) -> JSAModel:
    """A JSAModel of `cfg`'s architecture holding the weights of the checkpoint `state` (read
    from `source`): DataError naming `source` when they are not finite or do not fit."""
    weights = state["model"]
    if not isinstance(weights, Mapping) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise DataError(
            f"checkpoint {source} holds model weights of type {type(weights).__name__}, not tensors by name"
        )
    broken = non_finite_tensors(weights)
    if broken:
        raise DataError(
            f"checkpoint {source} holds non-finite weights ({len(broken)} tensors, e.g. {broken[0]}): "
            "it was saved from a run that diverged"
        )
    model = JSAModel(cfg.model)
    misfits = _misfits(model.state_dict(), weights)
    if misfits:
        raise DataError(f"checkpoint {source}: its weights do not fit its configuration ({'; '.join(misfits)})")
    model.load_state_dict(weights)
    return model


def _misfits(expected: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps `weights` from loading into a model whose state dict is `expected`."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    reshaped = [
        f"{name} {tuple(weights[name].shape)} where the configuration makes {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(weights))
        if weights[name].shape != expected[name].shape
    ]
    found = []
    for count_of, names in (("missing", missing), ("unknown here", unexpected), ("of another shape", reshaped)):
        if names:
            found.append(f"{len(names)} tensor(s) {count_of}, e.g. {names[0]}")
    return found


def load_trained_model(path: str | Path, device: torch.device) -> TrainedModel:
    """The trained model `path` holds (`load_checkpoint`, `saved_config`, `trained_model`),
    in eval mode on `device`."""
    state = load_checkpoint(path)
    if not isinstance(state["config"], Mapping):
        raise DataError(
            f"checkpoint {path} holds a configuration of type {type(state['config']).__name__}, not a mapping"
        )
    cfg = saved_config(state["config"], str(path))
    model = trained_model(state, cfg, path).to(device).eval()
    return TrainedModel(model, cfg, state.get("data"), state)
