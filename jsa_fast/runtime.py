"""What every command runs on, apart from what it computes: the device and its autocast and
memory format, the process RNG state, Ctrl-C between steps, the metrics file, the lock
that gives an output folder to one run at a time, and the data root."""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from jsa_fast.data.synth import SynthConfig, cached_synthetic_dataset
from jsa_fast.errors import Interrupted, RunError, UsageError, is_disk_full

__all__ = [
    "AMP_DTYPES",
    "resolve_device",
    "autocast_context",
    "memory_format",
    "rng_state",
    "restore_rng_state",
    "DeferredInterrupt",
    "MetricsLog",
    "LOCK_NAME",
    "staged_outputs",
    "output_lock",
    "resolve_data_root",
]

# --amp: the autocast dtype of each choice ("none": fp32, no autocast)
AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_device(name: str | None) -> torch.device:
    """--device NAME as a torch.device; None: CUDA when torch sees a GPU, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def autocast_context(device: torch.device, amp: str) -> AbstractContextManager:
    """bf16/fp16 autocast on `device` (CUDA or CPU) as `amp` asks; "none" runs in fp32."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA, where cuDNN runs convolutions fastest in it (NHWC tensor-core
    kernels, no layout transposes); NCHW on the CPU."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def rng_state() -> dict[str, Any]:
    """The process RNG state (torch, Python, and CUDA when present), as checkpoints keep it."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the process RNG to a state `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DeferredInterrupt:
    """Turns the first Ctrl-C or SIGTERM (a scheduler's notice before its kill) into a
    request that the loop honours between steps (`signum`, None until one came), so a
    checkpoint never holds a half-done step (BatchNorm statistics, optimiser state); a
    second signal stops at once (`Interrupted`)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> DeferredInterrupt:
        self.signum: int | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise Interrupted(signum)
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: saving after this step (again to stop at once)", file=sys.stderr)

    def interrupted(self) -> Interrupted:
        """The error that ends the run after the state was saved."""
        return Interrupted(self.signum or signal.SIGINT)

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class MetricsLog:
    """OUT/metrics.jsonl: one JSON object per line (strict JSON: a non-finite value is
    written as null)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({key: _json_value(value) for key, value in record.items()}, allow_nan=False)
        try:
            with self.path.open("a") as file:
                file.write(line + "\n")
        except OSError as error:
            if is_disk_full(error):
                raise RunError(
                    f"no space left on the device of {self.path.parent} to append to {self.path.name}"
                ) from error
            raise

    def keep_until(self, step: int, epochs_done: int) -> int:
        """Drop what a run logged after its checkpoint (step `step`, `epochs_done` whole
        epochs): the lines a resume will log again, and a line torn by a kill. Returns
        the number of lines dropped."""
        if not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if _logged_by_checkpoint(line, step, epochs_done)]
        if len(kept) < len(lines):
            temporary = self.path.with_name(f".{self.path.name}.tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            os.replace(temporary, self.path)
        return len(lines) - len(kept)


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _logged_by_checkpoint(line: str, step: int, epochs_done: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    if record.get("kind") == "epoch":
        return record.get("epoch", epochs_done) < epochs_done
    return record.get("step", step + 1) <= step


def resolve_data_root(data: str | None, synth: SynthConfig) -> Path:
    """--data when given, else the synthetic world `synth` (built on first use, cached)."""
    if data is not None:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root} is not a folder")
        return root
    return cached_synthetic_dataset(synth)


@contextmanager
def staged_outputs(finals: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """Temporary paths (hidden, beside each of `finals`: .<name>.<random>.tmp, unique even
    between machines sharing a folder) to write a result's files to; they replace the
    finals together when the block ends, and are deleted when it fails or is interrupted,
    so that an earlier result in the same place stays whole."""
    temporaries = {kind: path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp") for kind, path in finals.items()}
    try:
        yield temporaries
        for kind, temporary in temporaries.items():
            os.replace(temporary, finals[kind])
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)


LOCK_NAME = ".jsa-fast.lock"


@contextmanager
def output_lock(folder: Path, flag: str = "--out", name: str = LOCK_NAME) -> Iterator[None]:
    """Hold `folder` (created if needed) for this run alone while the block runs: the
    file folder/`name` (JSON: pid, host, command, start time) is created exclusively and
    removed at the end. A lock whose process is gone (same host, PID not running) is taken
    over, said once on stderr; a live one (or another host's) is refused with UsageError
    naming `flag`. A folder the lock created and the run left empty is removed again."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file, not a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv), "started": time.time()}
    try:
        _take_lock(path, record, flag)
        yield
    finally:
        if _read_lock(path) == record:
            path.unlink(missing_ok=True)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _take_lock(path: Path, record: dict[str, Any], flag: str) -> None:
    # A few tries: after a dead run's lock was removed (by this run or another), or while
    # another run removes one, the exclusive create is tried again.
    for _ in range(_LOCK_TRIES):
        try:
            with open(path, "x", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
            return
        except FileExistsError:
            holder = _read_lock(path)
        except OSError as error:
            if _read_lock(path) is None:  # a half-written lock of this run
                path.unlink(missing_ok=True)
            if is_disk_full(error):
                raise RunError(
                    f"no space left on the device of {path.parent} to take its lock ({path.name})"
                ) from error
            raise
        if holder is None:  # torn, being written, or gone since the create failed
            age = _age_s(path)
            if age is None:
                continue
            if age < _JUNK_AFTER_S:
                raise UsageError(f"{flag} {path.parent} is being taken by another run ({path.name} is being written)")
        elif holder.get("host") != record["host"] or _process_alive(holder.get("pid")):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            raise UsageError(
                f"{flag} {path.parent} is in use by another run (PID {holder.get('pid')} on {holder.get('host')}, "
                f"started {started}: {holder.get('command', '?')}); wait for it, or choose another {flag} "
                f"(if that run is gone, delete {path})"
            )
        if _removed_if_still(path, holder) and holder is not None:  # said once, by the run that removed it
            print(
                f"{path.parent}: taking over the lock of a run that is gone (PID {holder.get('pid')} on {holder.get('host')})",
                file=sys.stderr,
            )
    raise UsageError(f"{flag} {path.parent}: another run took the lock at the same time; choose another {flag}")


_LOCK_TRIES = 20
_JUNK_AFTER_S = 60  # a lock file unreadable for this long is no run's


def _age_s(path: Path) -> float | None:
    """Seconds since `path` was last written; None when it is gone."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _removed_if_still(path: Path, seen: dict[str, Any] | None) -> bool:
    """Remove the lock `path` if it still holds `seen` (a dead run's record, or None for a
    junk file); whether this process removed it. Removals go through the exclusive guard
    file path.takeover, so that no run removes a lock another has taken in between (a lock
    is created only where none is, and removed only here or by its owner). A guard held by
    another run: wait a moment and let the caller try again; a guard older than a minute
    is a crashed run's and is removed."""
    guard = path.with_name(f"{path.name}.takeover")
    try:
        with open(guard, "x", encoding="utf-8") as file:
            file.write(f"{os.getpid()}\n")
    except FileExistsError:
        age = _age_s(guard)
        if age is not None and age >= _JUNK_AFTER_S:
            guard.unlink(missing_ok=True)
        time.sleep(0.05)
        return False
    try:
        if _read_lock(path) != seen or (seen is None and not path.exists()):
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        guard.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _process_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
