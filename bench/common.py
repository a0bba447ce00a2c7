"""Shared benchmark helpers: timing (CUDA events on GPU, perf_counter on CPU) and the
spread of repeated times, peak memory, the environment a result was measured in
(versions, GPU, driver, commit, host CPU), and the JSON record every benchmark writes
under bench/results/."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def median_time_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of fn() in milliseconds after `warmup` calls."""
    return statistics.median(time_repeats_ms(fn, device, warmup, repeats))


def time_repeats_ms(
    fn: Callable[[], Any],
    device: torch.device,
    warmup: int = 3,
    repeats: int = 20,
    before: Callable[[], Any] | None = None,
) -> list[float]:
    """Wall time of each of `repeats` fn() calls in milliseconds, after `warmup` calls.
    `before()` (e.g. setting gradients to None) runs before every call, warm-up included,
    outside the timed region. On CUDA each call is timed by events on the current stream
    after a synchronize, so the time includes the host's launch gaps (what bounds a
    launch-bound op)."""
    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - began) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return times


def spread(times: list[float]) -> dict[str, float]:
    """median, min, max, first and third quartiles and IQR of `times` (quartiles by
    statistics.quantiles' inclusive method; with one time they all equal it)."""
    if len(times) == 1:
        q1 = q3 = times[0]
    else:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
    }


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory of one fn() call above what was allocated before, in MiB; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _run(command: list[str]) -> str | None:
    """A read-only command's stripped stdout, None if it cannot run or fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def host_cpu() -> str:
    """The host CPU's model name (/proc/cpuinfo on Linux) and its logical core count."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def environment(device: torch.device) -> dict[str, Any]:
    """What a result was measured with: Python, torch, Triton, CUDA and cuDNN versions,
    the NVIDIA driver and GPU (None on CPU), the git commit (and whether the working
    tree had changes), the host CPU and the matmul precision settings."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    root = Path(__file__).resolve().parents[1]
    # --no-optional-locks: git status must not refresh (write) the index.
    status = _run(["git", "-C", str(root), "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"])
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count,
        }
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": driver.splitlines()[0] if driver else None,
        "gpu": gpu,
        "commit": _run(["git", "-C", str(root), "rev-parse", "HEAD"]),
        "commit_dirty": None if status is None else bool(status),
        "host_cpu": host_cpu(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }


def write_results(
    name: str,
    device: torch.device,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    path: str | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write {benchmark, device, versions, config, rows} as JSON, plus the keys of
    `extra`; default path bench/results/<name>-<device>-<UTC time>.json."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = Path(path) if path else RESULTS / f"{name}-{device.type}-{stamp}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "utc": stamp,
        "config": config,
        "rows": rows,
        **(extra or {}),
    }
    target.write_text(json.dumps(record, indent=2) + "\n")
    return target


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).rjust(widths[c]) for c in columns))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)
