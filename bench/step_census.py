"""Census of the training step as `python -m jsa_fast.train` runs it, counted on a CPU.

    python bench/step_census.py [--presets tiny paper] [--amp none bf16 fp16] [--batch 4]
        [--steps 6] [--compile] [--no-collectives] [--json PATH] [--dry-run]

A GPU reaches its speed only if the host runs ahead of it: a host sync drains the queue of
launched kernels, a collective adds a round trip. This runs the real training loop
(`jsa_fast.train.train`) for one epoch of `--steps` steps on a small synthetic world made
here, with --log-every equal to the step count, so that every step but the last lies
between log points, and counts per step:

- ops: the aten ops that launch a kernel on CUDA (views, allocations and metadata excluded;
  a composite op that is several kernels there counted as such: `census.kernels_of`) and
  the Triton launches, in the phases forward (the model and losses), backward, optimizer
  (GradScaler.step and update, AdamW; built fused, as on CUDA) and loop (the masks, the
  copies to the device and the loss tally). The CPU runs the model's CPU path: the fused
  JSA's GPU launches are `bench/census.py`'s count.
- host syncs: what would wait for the GPU: `aten::_local_scalar_dense` (`.item()`,
  `bool(t)`, `float(t)`), copies from a non-CPU device to the CPU, and reads that bypass
  the dispatcher on a CPU tensor (`Tensor.tolist`, `Tensor.numpy`), each counted once;
  inside jsa_fast's C++ op, whose own calls do not pass through a dispatch mode, the
  profiler's record of its nested `aten::_local_scalar_dense` and `aten::nonzero` (which
  learns its output's size from the device). On a GPU,
  `torch.cuda.set_sync_debug_mode("warn")` gives the same count.
- collectives (2 gloo processes per preset and autocast, eager, unless --no-collectives):
  the collective ops dispatched per step (`CollectiveCounter`: c10d's, as the loop's
  agreements and DDP's gradient buckets call them, and the functional ones of the model and
  losses: each GlobalBatchNorm2d's statistics, the embeddings' all-gather for the global
  negatives and its backward's reduce-scatter).
- with --compile, over two epochs and a resume (each of `--steps` steps): graph breaks,
  recompiles and graphs from dynamo's counters, after the first step.

Writes JSON to bench/results/step_census-cpu-<UTC time>.json; the README's table is made
from it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from census import kernels_of, launches  # noqa: E402
from common import environment, print_table, write_results  # noqa: E402

from jsa_fast import train as train_module  # noqa: E402
from jsa_fast.config import PRESETS, RunConfig  # noqa: E402
from jsa_fast.data.synth import generate_synthetic_dataset  # noqa: E402
from jsa_fast.distributed import World  # noqa: E402
from jsa_fast.kernels import registry  # noqa: E402

PHASES = ("forward", "backward", "optimizer", "loop")
# What reads a value back to the host inside a C++ op (each a sync on CUDA).
NESTED_HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero")
# Small shapes that keep each preset's structure (layers, slots, iterations, token grids).
SMALL = {"image_size": 64, "train_resize": 72, "num_workers": 1}  # the loader in a worker, as on a GPU


class StepCounter(TorchDispatchMode):
    """Kernel-launching ops by phase and host syncs, per optimiser step (`begin_step`)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "loop"
        self.steps: list[dict[str, Counter]] = []

    def begin_step(self) -> None:
        self.steps.append({"ops": Counter(), "syncs": Counter()})

    def sync(self, what: str) -> None:
        if self.steps:
            self.steps[-1]["syncs"][what] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (dispatch signature)
        kwargs = kwargs or {}
        name = func._schema.name
        if name in registry.IMPLEMENTATIONS:  # a project op counts by what runs inside it
            with self:
                return registry.IMPLEMENTATIONS[name](*args, **kwargs)
        if not self.steps:
            return func(*args, **kwargs)
        if name.startswith("jsa_fast::"):  # the C++ op: what it calls, the profiler records
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                out = func(*args, **kwargs)
            for event in profile.events():
                if event.name in NESTED_HOST_READS:
                    self.sync(f"{event.name} (inside {name})")
        else:
            out = func(*args, **kwargs)
        if name == "aten::_local_scalar_dense":
            self.sync(f"{name} ({args[0].device.type})")
        elif name in ("aten::_to_copy", "aten::copy_"):
            source, target = (args[0], out) if name == "aten::_to_copy" else (args[1], args[0])
            if source.device.type != "cpu" and target.device.type == "cpu":
                self.sync(f"{name} {source.device.type} -> cpu")
        if launches(func, name, args, out):
            self.steps[-1]["ops"][self.phase] += kernels_of(name, args)
        return out


# Host reads that bypass the dispatcher on a CPU tensor; with `dispatch=False` also those
# that reach it as aten::_local_scalar_dense.
DIRECT_READS = ("tolist", "numpy")
SCALAR_READS = ("item", "__bool__", "__float__", "__int__")


@contextmanager
def counting(counter: StepCounter, dispatch: bool = True) -> Iterator[None]:
    """The training loop with `counter` counting: a step begins at each `train_step`, whose
    loss function runs as "forward", the rest as "backward" until GradScaler.step and
    update ("optimizer"). dispatch: count ops and syncs with the dispatch mode; without it
    (a compiled run: dynamo does not compile under a dispatch mode) only the host reads of
    tensors, by patching the Tensor methods that read."""
    real_step = train_module.train_step
    real_scaler_step, real_update = torch.amp.GradScaler.step, torch.amp.GradScaler.update
    reads = DIRECT_READS if dispatch else DIRECT_READS + SCALAR_READS
    real_reads = {name: getattr(torch.Tensor, name) for name in reads}

    def in_phase(phase: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            before, counter.phase = counter.phase, phase
            try:
                return fn(*args, **kwargs)
            finally:
                counter.phase = before

        return run

    def step(loss_fn: Any, *args: Any) -> Any:
        counter.begin_step()
        return in_phase("backward", real_step)(in_phase("forward", loss_fn), *args)

    def reading(name: str, real: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter.sync(f"Tensor.{name}")
            return real(tensor, *args, **kwargs)

        return read

    train_module.train_step = step
    torch.amp.GradScaler.step = in_phase("optimizer", real_scaler_step)
    torch.amp.GradScaler.update = in_phase("optimizer", real_update)
    for name, real in real_reads.items():
        setattr(torch.Tensor, name, reading(name, real))
    try:
        with counter if dispatch else nullcontext():
            yield
    finally:
        train_module.train_step = real_step
        torch.amp.GradScaler.step, torch.amp.GradScaler.update = real_scaler_step, real_update
        for name, real in real_reads.items():
            setattr(torch.Tensor, name, real)


@contextmanager
def fused_adamw() -> Iterator[None]:
    """build_optimizer as on CUDA (fused AdamW, which GradScaler steps without reading
    found_inf back)."""
    real = train_module.build_optimizer

    def fused(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
        return torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True)

    train_module.build_optimizer = fused
    try:
        yield
    finally:
        train_module.build_optimizer = real


def run_config(preset: str, amp: str, batch: int, steps: int, compile: bool) -> RunConfig:
    return PRESETS[preset].overridden(
        **SMALL, amp=amp, batch_size=batch, epochs=1, log_every=steps, compile="default" if compile else "none", k=min(batch, 2),
        pretrained_image="none", pretrained_audio="none",
    )  # fmt: skip


def world_for(batch: int, steps: int, folder: Path) -> Path:
    return generate_synthetic_dataset(folder / "world", batch * steps, 4, 0, image_size=72, audio_seconds=1.0)


def census_eager(preset: str, amp: str, batch: int, steps: int, data: Path, out: Path) -> dict[str, Any]:
    """Ops and host syncs of each step of one epoch (the first is a warm-up, the last a log point)."""
    counter = StepCounter()
    with fused_adamw(), counting(counter):
        train_module.train(run_config(preset, amp, batch, steps, False), str(data), out, torch.device("cpu"))
    between = counter.steps[1:-1]
    row: dict[str, Any] = {"preset": preset, "amp": amp, "mode": "eager", "batch": batch, "steps": len(counter.steps)}
    for phase in PHASES:
        row[f"ops_{phase}"] = statistics.median_low(s["ops"][phase] for s in between)
    row["ops_step"] = sum(row[f"ops_{phase}"] for phase in PHASES)
    row["host_syncs_between_logs"] = max(sum(s["syncs"].values()) for s in between)
    row["host_syncs_at_log"] = sum(counter.steps[-1]["syncs"].values())
    row["sync_kinds"] = dict(sum((s["syncs"] for s in between), Counter()))
    return row


def census_compiled(preset: str, amp: str, batch: int, steps: int, data: Path, out: Path) -> dict[str, Any]:
    """Graph breaks, graphs and host syncs over two epochs, then a resume (a new process
    starts with dynamo's caches empty: reset here) for a third. A recompile is any graph
    beyond the first in a process: the step has one graph (forward, losses, backward)."""
    from torch._dynamo.utils import counters

    counter = StepCounter()
    cfg = run_config(preset, amp, batch, steps, True)
    graphs, breaks = [], Counter()
    with fused_adamw(), counting(counter, dispatch=False):
        for epochs, resume in ((2, False), (3, True)):
            torch._dynamo.reset()
            counters.clear()
            train_module.train(cfg.overridden(epochs=epochs), str(data), out, torch.device("cpu"), resume=resume)
            graphs.append(counters["stats"]["unique_graphs"])
            breaks.update(counters["graph_break"])
    between = [s for i, s in enumerate(counter.steps) if (i + 1) % steps not in (0, 1)]
    return {
        "preset": preset, "amp": amp, "mode": "compiled", "batch": batch, "steps": len(counter.steps),
        "graph_breaks": sum(breaks.values()), "graph_break_reasons": dict(breaks),
        "graphs_per_process": graphs, "recompiles": sum(max(n - 1, 0) for n in graphs),
        "host_syncs_between_logs": max((sum(s["syncs"].values()) for s in between), default=0),
        "sync_kinds": dict(sum((s["syncs"] for s in between), Counter())),
    }  # fmt: skip


class CollectiveCounter(TorchDispatchMode):
    """Collective ops dispatched (c10d's and the functional ones; waits and wrappers
    excluded) per optimiser step, named "step: OP" inside `train_step` (the model's, the
    losses' and DDP's gradient buckets, which reach the dispatcher as c10d::allreduce_) and
    "loop: OP" outside it (the training loop's own)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[Counter] = []
        self.in_step = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (dispatch signature)
        namespace, _, name = func._schema.name.partition("::")
        if self.steps and namespace in ("c10d", "_c10d_functional") and not name.startswith(("wait", "_wrap")):
            self.steps[-1][f"{'step' if self.in_step else 'loop'}: {func._schema.name}"] += 1
        return func(*args, **(kwargs or {}))


def _collective_worker(
    rank: int, port: int, preset: str, amp: str, batch: int, steps: int, data: str, out: str, q: Any
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    dist.init_process_group("gloo", rank=rank, world_size=2)
    counter = CollectiveCounter()
    real_step = train_module.train_step

    def step(*args: Any) -> Any:
        counter.steps.append(Counter())
        counter.in_step = True
        try:
            return real_step(*args)
        finally:
            counter.in_step = False

    train_module.train_step = step
    try:
        world = World(rank, 2, rank, dist.group.WORLD)
        with counter:
            train_module.train(
                run_config(preset, amp, batch, steps, False), data, Path(out), torch.device("cpu"), world=world
            )
    finally:
        train_module.train_step = real_step
        dist.destroy_process_group()
    if rank == 0:
        q.put([dict(c) for c in counter.steps])


def census_collectives(preset: str, amp: str, batch: int, steps: int, data: Path, out: Path) -> dict[str, Any]:
    """Collectives per step of 2 gloo processes (global batch `batch`), eager: dynamo does
    not compile under the counter's dispatch mode (a compiled step runs the same loop
    around a graph of the same model and losses)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(
        _collective_worker,
        args=(port, preset, amp, batch, steps, str(data), str(out), queue),
        nprocs=2,
        start_method="spawn",
    )
    calls = [Counter(c) for c in queue.get()]
    # DDP's first two steps are its warm-up (the first pass; then the buckets rebuilt in the
    # gradients' order, which broadcasts it), the last step is the log point.
    between = calls[2:-1]
    per_step = dict(between[0])
    return {
        "preset": preset, "amp": amp, "mode": "2 gloo processes", "batch": batch, "steps": len(calls),
        "collectives_between_logs": max(sum(c.values()) for c in between),
        "loop_collectives_between_logs": max(sum(n for op, n in c.items() if op.startswith("loop:")) for c in between),
        "collective_kinds": per_step,
        "same_every_step": all(c == between[0] for c in between),
        "collectives_warm_up": [dict(c) for c in calls[:2]],
        "collectives_at_log": dict(calls[-1]),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["tiny", "paper"])
    parser.add_argument("--amp", nargs="+", choices=["none", "bf16", "fp16"], default=["none", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=4, help="global batch (small: the counts do not depend on it)")
    parser.add_argument("--steps", type=int, default=6, help="steps per epoch (>= 4)")
    parser.add_argument("--compile", action="store_true", help="also compiled: two epochs and a resume")
    parser.add_argument("--no-collectives", action="store_true", help="skip the 2-process run")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny preset, fp32 and fp16, 4 steps; 2 processes in fp32 only"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.presets, args.amp, args.steps = ["tiny"], ["none", "fp16"], 4
    if args.steps < 4:
        parser.error(f"--steps must be >= 4, got {args.steps}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="step-census-") as scratch:
        folder = Path(scratch)
        data = world_for(args.batch, args.steps, folder)
        for preset in args.presets:
            for amp in args.amp:
                rows.append(census_eager(preset, amp, args.batch, args.steps, data, folder / f"{preset}-{amp}"))
                if args.compile:
                    rows.append(
                        census_compiled(preset, amp, args.batch, args.steps, data, folder / f"{preset}-{amp}-c")
                    )
                # The dry run (the default test suite's) keeps its 2-process run to fp32: a
                # 2-process fp16 run once aborted in rank 0 on glibc's "unaligned tcache
                # chunk" (a heap corruption, CI on 2026-12-05), not seen in 30 reruns nor
                # in the full census; not yet diagnosed.
                if not args.no_collectives and not (args.dry_run and amp != "none"):
                    out = folder / f"{preset}-{amp}-ddp"
                    rows.append(census_collectives(preset, amp, args.batch, args.steps, data, out))
    print_table(
        rows,
        ["preset", "amp", "mode", *(f"ops_{p}" for p in PHASES), "host_syncs_between_logs", "loop_collectives_between_logs",
         "graph_breaks", "recompiles"],
    )  # fmt: skip
    config = {k: getattr(args, k) for k in ("presets", "amp", "batch", "steps", "compile", "dry_run")}
    path = write_results(
        "step_census", torch.device("cpu"), config, rows, args.json, {"environment": environment(torch.device("cpu"))}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
