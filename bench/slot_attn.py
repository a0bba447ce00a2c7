"""Benchmark joint slot attention like with like: the reference module and the fused one,
forward and forward+backward, each variant in a fresh process, checked before it is timed.

    python bench/slot_attn.py [--batch 256 4096] [--dtype bf16 autocast] [--impl NAME ...] [--json PATH]
    TRITON_INTERPRET=1 python bench/slot_attn.py --dry-run     # every code path, on CPU, in about a minute

Variants (`VARIANTS`): the reference eager, compiled (torch.compile default mode, and
max-autotune without CUDA graphs), compiled with CUDA graphs (mode="reduce-overhead",
and "max-autotune", which adds them); the fused module (backend="triton") eager, eager
captured by hand into one torch.cuda.CUDAGraph per mode (static inputs, warm-up on a
side stream), and compiled. Every torch.compile is fullgraph=True, and a recompile limit
hit is an error (dynamo's fail_on_recompile_limit_hit), never a silent eager fallback;
dynamo's counters (graphs, graph breaks, recompiles) are recorded per row. On a CPU the
CUDA-graph variants are listed as skipped, with the reason.

dtypes: "bf16" (module and inputs in bf16), "autocast" (fp32 module and inputs, the
forward under torch.autocast to bf16: how training runs) and "fp32" (TF32 off).

Method, per (variant, batch, dtype), in a fresh worker process (`--worker`; `--dry-run`
runs one job through it and the rest in this process after torch._dynamo.reset()):

1. The eager fp32 reference computes the expected outputs and the gradients of a fixed
   random weighting of all ten outputs, for every parameter and both inputs. The
   variant's module gets the same weights (load_state_dict), inputs and masks.
2. Warm-up (compiles, records graphs), its last forward+backward checked (a captured
   graph: its first replay): every output and gradient within `tolerance(dtype)` of the
   expected one (see there), else the variant is reported as failed and not timed.
3. Each mode (fwd+bwd, then fwd) is timed over --repeats calls after --warmup untimed
   ones (for fwd+bwd, those of 2.; a captured graph warms up before its capture), the
   gradients (parameters and inputs) set to None before every call outside the timed
   region, so that no call accumulates into the last one's; a hand-captured graph was
   captured with them None, so its replay writes them afresh. Recorded: every
   per-repeat time and their median, min, max, quartiles and IQR.
4. Peak memory of one more call, above what was allocated before it (parameters, inputs,
   cotangents): max_memory_allocated for what is allocated outside any CUDA-graph pool,
   plus the size of the graph pools (the segments of the caching allocator's private
   pools), which a replay allocates nothing from and which would otherwise read as zero.

Training mode with explicit token masks (no random draw is timed); inputs require grad,
as the encoders' outputs do.

FLOPs, both in every row:
- needed (`needed_flops`): the GEMM work the K/V-free algorithm needs, the same for
  every variant (bench/census.py's `needed_forward_flops`: the logit projection, the GRU's
  input and hidden products and the MLP of every iteration, and the weight folds; 3x for
  forward + backward: 95.0 GFLOP at the paper's shape);
- executed: what each module's forward and backward run (`count_flops`: bench/census.py's
  count, on fake tensors at each batch size, of aten's products, 2 M N K, and what each
  Triton launch declares). Compiled variants and autocast are credited the eager
  module's products (inductor and autocast change where products run, not their sizes).

Derived, per row: TFLOP/s and percent of the device's dense datasheet peak (bf16 tensor
cores for bf16 and autocast, no tensor cores for fp32), from needed FLOPs
(`tflops`, `pct_of_peak`) and executed ones (`tflops_executed`, `pct_of_peak_executed`);
`vs_best_reference`: the fastest reference variant's median time over this row's (> 1:
faster than every reference variant) and `memory_vs_best_reference`: this row's peak
memory over that variant's, both at the same mode, batch and dtype. `acceptance` (in the
JSON) checks the fused forward+backward bf16 rows against the targets: >= 3x the best
reference with <= 0.5x its memory at B = 256, >= 35 % of peak at B = 4,096.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import census  # noqa: E402
from common import environment, print_table, spread, time_repeats_ms, write_results  # noqa: E402

from jsa_fast import FusedJointSlotAttention, JointSlotAttention  # noqa: E402
from jsa_fast.kernels import registry  # noqa: E402
from jsa_fast.reference import JSAOutput  # noqa: E402

DTYPES = ("bf16", "autocast", "fp32")
MODES = ("fwd+bwd", "fwd")  # fwd+bwd first: a graph pool it records is measured before fwd adds to it
# Dense peak TFLOP/s (NVIDIA datasheets): bf16 tensor cores, fp32 without tensor cores.
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp32": 66.9},
}
PEAK_DTYPE = {"bf16": "bf16", "autocast": "bf16", "fp32": "fp32"}
TARGETS = {"speed_batch": 256, "vs_best_reference_min": 3.0, "memory_vs_best_reference_max": 0.5,
           "peak_batch": 4096, "pct_of_peak_min": 35.0, "dtype": "bf16", "mode": "fwd+bwd"}  # fmt: skip
RESULT_MARKER = "SLOT_ATTN_RESULT "


class Variant(NamedTuple):
    name: str
    module: str  # "reference" or "fused"
    how: str  # "eager", "compiled" or "graph" (captured by hand)
    compile_mode: str | None  # torch.compile's mode
    needs_cuda: bool


VARIANTS = (
    Variant("reference eager", "reference", "eager", None, False),
    Variant("reference compiled", "reference", "compiled", "default", False),
    Variant("reference compiled max-autotune", "reference", "compiled", "max-autotune-no-cudagraphs", False),
    Variant("reference compiled+graphs", "reference", "compiled", "reduce-overhead", True),
    Variant("reference compiled max-autotune+graphs", "reference", "compiled", "max-autotune", True),
    Variant("fused eager", "fused", "eager", None, False),
    Variant("fused eager+graph", "fused", "graph", None, True),
    Variant("fused compiled", "fused", "compiled", "default", False),
)
BY_NAME = {v.name: v for v in VARIANTS}
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

# The sizes (the paper's widths) and, for --dry-run, tiny ones on the CPU.
DEFAULTS = dict(batch=[256, 4096], dtype=["bf16", "autocast"], dim=512, mlp_hidden=1024, l_img=49, l_aud=16,
                slots=2, iters=5, warmup=3, repeats=20, compile_backend="inductor")  # fmt: skip
DRY_RUN = dict(batch=[2], dtype=list(DTYPES), dim=16, mlp_hidden=32, l_img=4, l_aud=3, slots=2, iters=2,
               warmup=1, repeats=2, compile_backend="eager", device="cpu")  # fmt: skip
# The dry run compiles with backend "eager": dynamo's capture (fullgraph, its counters)
# without inductor's code generation, which takes minutes per variant on a CPU.
# The dry run runs every variant a CPU can at bf16, the eager ones under autocast and the
# reference at fp32 (a variant's code path is the same at every dtype, but for the
# autocast context): about a minute on 2 idle cores, the Triton interpreter most of it.
DRY_RUN_PLAN = {"bf16": None, "autocast": ("reference eager", "fused eager"), "fp32": ("reference eager",)}


# ----------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------


def count_flops(args: argparse.Namespace) -> dict[str, Any]:
    """Executed FLOPs of one forward and one backward of each module at each of
    args.batch, as {module: {batch: {"fwd", "bwd", "triton_launches"}}}: bench/census.py's
    count on fake tensors (shapes without data or arithmetic, so B = 4,096 costs nothing),
    the operators on their GPU path, each Triton launch credited with the FLOPs it
    declares."""
    counted_args = argparse.Namespace(
        dim=args.dim, mlp_hidden=args.mlp_hidden, l_img=args.l_img, l_aud=args.l_aud, slots=args.slots, iters=args.iters
    )
    result: dict[str, Any] = {}
    for impl in ("reference", "fused"):
        result[impl] = {}
        for batch in args.batch:
            row = census.census_one(impl, batch, "fp32", counted_args)
            launches = {**row["fwd_kernels_by_name"]}
            for name, n in row["bwd_kernels_by_name"].items():
                launches[name] = launches.get(name, 0) + n
            result[impl][str(batch)] = {
                "fwd": round(row["fwd_gflop"] * 1e9),
                "bwd": round(row["bwd_gflop"] * 1e9),
                "triton_launches": {k: n for k, n in launches.items() if k.startswith("triton::")},
            }
    return result


def needed_flops(args: argparse.Namespace, batch: int, mode: str) -> int:
    """What the K/V-free algorithm needs (bench/census.py), forward or forward + backward."""
    forward = census.needed_forward_flops(batch, args.dim, args.slots, args.iters, args.mlp_hidden)
    return (3 if mode == "fwd+bwd" else 1) * forward


def executed_flops(flops: dict[str, Any], module: str, mode: str, batch: int) -> int:
    """Executed FLOPs of `module` at `batch`, as count_flops counted them."""
    counted = flops[module][str(batch)]
    return counted["fwd"] + (counted["bwd"] if mode == "fwd+bwd" else 0)


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before "H100"
        if key in name:
            return peaks[PEAK_DTYPE[dtype]]
    return None


# ----------------------------------------------------------------------------------
# Modules, inputs, parity
# ----------------------------------------------------------------------------------


def sizes(args: argparse.Namespace) -> dict[str, int]:
    return dict(dim=args.dim, num_slots=args.slots, iters=args.iters, mlp_hidden=args.mlp_hidden)


def reference_module(args: argparse.Namespace, device: torch.device) -> JointSlotAttention:
    """The fp32 reference with the benchmark's weights (seed 0)."""
    torch.manual_seed(0)
    return JointSlotAttention(**sizes(args)).to(device).train()


def build_module(
    impl: str, args: argparse.Namespace, device: torch.device, reference: JointSlotAttention
) -> torch.nn.Module:
    """A fresh `impl` module ("reference" or "fused", backend="triton") with `reference`'s weights, fp32."""
    if impl == "fused":
        module = FusedJointSlotAttention(**sizes(args), backend="triton")
    else:
        module = JointSlotAttention(**sizes(args))
    module.load_state_dict(reference.state_dict())
    return module.to(device).train()


def make_inputs(args: argparse.Namespace, batch: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """x_img, x_aud (requiring grad, in `dtype`), mask_img, mask_aud: the same for every variant."""
    gen = torch.Generator().manual_seed(1)
    x_img = torch.randn(batch, args.l_img, args.dim, generator=gen)
    x_aud = torch.randn(batch, args.l_aud, args.dim, generator=gen)
    mask_img = torch.rand(batch, args.l_img, generator=gen) < 0.1
    mask_aud = torch.rand(batch, args.l_aud, generator=gen) < 0.1
    return [
        x_img.to(device, dtype).requires_grad_(),
        x_aud.to(device, dtype).requires_grad_(),
        mask_img.to(device),
        mask_aud.to(device),
    ]


# Tolerance of the parity check. The error of a tensor is max |got - want| / max(max |want|,
# FLOOR): its largest error relative to its own scale (a tensor smaller than FLOOR is
# compared absolutely); the check takes the worst over the ten outputs and the gradients
# of every parameter and both inputs, against the eager fp32 reference.
# Why `tolerance` is what it is: every value on the longest path through the network
# (ROUNDINGS_PER_ITERATION stored results per iteration each way: logits, softmax,
# context, GRU gates, LayerNorms, MLP; plus a few around the iterations) is rounded once
# to the dtype it is stored in (unit roundoff u: 2^-8 for bf16, 2^-24 for fp32) and its
# products accumulate in fp32 over at most K = max(d, H, L) terms (relative error about
# sqrt(K) 2^-24). Independent rounding errors add in quadrature, so over n roundings the
# expected relative error is sqrt(n) (u + sqrt(K) 2^-24): 0.037 for bf16 and 1.8e-5 for
# fp32 at the paper's shapes, 0.025 and 2.5e-6 at the dry run's. The network's own
# decisions make the largest errors a few times that: a ReLU or a softmax that rounding
# tips the other way, gradients that are sums with cancellation (to_k.bias, the
# LayerNorms' parameters). Measured on the CPU (worst tensor against the fp32
# reference): the reference in bf16 or under autocast 0.11-0.15 at both shapes (3-6x the
# estimate), the fused module in bf16 0.14 at the paper's; in fp32 the fused module
# 5e-6 at the paper's shapes, 2.4e-6 at the dry run's (0.3-1x). KAPPA = 12 covers these
# with a further 2-4x of margin, so that a GPU's different but equally accurate
# reduction orders pass, while a wrong result (a bug's error is of order 1) fails:
# 0.44 for bf16 and autocast (u is bf16's: the products run in bf16) and 2.2e-4 for fp32
# at the paper's shapes, 0.30 and 3.0e-5 at the dry run's.
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "autocast": 2.0**-8, "fp32": 2.0**-24}
ROUNDINGS_PER_ITERATION = 8
KAPPA = 12.0
FLOOR = 1e-3


def tolerance(dtype: str, args: argparse.Namespace) -> float:
    """The parity check's tolerance for `dtype` at the benchmark's shapes (comment above)."""
    roundings = 2 * (ROUNDINGS_PER_ITERATION * args.iters + 4)  # forward and backward
    k = max(args.dim, args.mlp_hidden, args.l_img, args.l_aud)
    return KAPPA * math.sqrt(roundings) * (UNIT_ROUNDOFF[dtype] + math.sqrt(k) * 2.0**-24)


def results_of(out: JSAOutput, module: torch.nn.Module, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The outputs by field name and the gradients by parameter name (and x_img, x_aud)."""
    got: dict[str, torch.Tensor | None] = {f"out.{name}": t for name, t in zip(JSAOutput._fields, out)}
    got |= {f"grad.{name}": p.grad for name, p in module.named_parameters()}
    got |= {"grad.x_img": inputs[0].grad, "grad.x_aud": inputs[1].grad}
    return got


def parity(got: dict[str, torch.Tensor | None], want: dict[str, torch.Tensor | None], tol: float) -> dict[str, Any]:
    """Worst error (as `tolerance` measures it) of `got` against `want`; a missing
    gradient counts as zeros, a shape mismatch or a non-finite value fails."""
    worst, worst_name, problems = 0.0, None, []
    for name, expected in want.items():
        actual = got.get(name)
        if expected is None and actual is None:
            continue
        if expected is None or actual is None:
            expected = torch.zeros_like(actual) if expected is None else expected
            actual = torch.zeros_like(expected) if actual is None else actual
        if actual.shape != expected.shape:
            problems.append(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
            continue
        actual, expected = actual.detach().float(), expected.detach().float().to(actual.device)
        if not torch.isfinite(actual).all():
            problems.append(f"{name}: non-finite values")
            continue
        scale = max(expected.abs().max().item(), FLOOR)
        error = (actual - expected).abs().max().item() / scale
        if error > worst:
            worst, worst_name = error, name
    return {
        "passed": not problems and worst <= tol,
        "max_error": worst,
        "tolerance": tol,
        "worst": worst_name,
        "checked": len(want),
        "problems": problems,
    }


# ----------------------------------------------------------------------------------
# One variant (a worker's job)
# ----------------------------------------------------------------------------------


def dynamo_counters() -> dict[str, dict[str, int]]:
    from torch._dynamo.utils import counters

    keep = ("stats", "frames", "graph_break", "aot_autograd", "recompiles")
    return {k: {str(n): int(c) for n, c in v.items()} for k, v in counters.items() if k in keep}


def reset_dynamo() -> None:
    """A fresh start for torch.compile (what a new process has)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def graph_pool_mib(pool: tuple[int, int] | None) -> float:
    """Bytes in the caching allocator's segments of CUDA-graph pool `pool` (all private
    pools if None), in MiB."""
    total = 0
    for segment in torch.cuda.memory_snapshot():
        segment_pool = tuple(segment.get("segment_pool_id", (0, 0)))
        if segment_pool != (0, 0) and (pool is None or segment_pool == tuple(pool)):
            total += segment["total_size"]
    return total / 2**20


def run_variant(args: argparse.Namespace, variant: Variant, batch: int, dtype_name: str) -> list[dict[str, Any]]:
    """Check, then time, one variant at one batch and dtype: a row per mode (module
    docstring). fp32 products without TF32; a recompile limit hit raises."""
    device = torch.device(args.device)
    if variant.needs_cuda and device.type != "cuda":
        raise RuntimeError(f"{variant.name} needs CUDA")
    if variant.module == "fused" and device.type == "cpu" and not registry.INTERPRET:
        raise RuntimeError("the fused module on the CPU needs TRITON_INTERPRET=1 set before jsa_fast is imported")
    settings = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    reset_dynamo()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return _run_variant(args, variant, batch, dtype_name, device)
    finally:  # as they were (the dry run runs in the caller's process)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = settings
        torch.set_float32_matmul_precision(precision)


def _run_variant(
    args: argparse.Namespace, variant: Variant, batch: int, dtype_name: str, device: torch.device
) -> list[dict[str, Any]]:

    # 1. What the eager fp32 reference computes, for a fixed random weighting of the outputs.
    reference = reference_module(args, device)
    ref_inputs = make_inputs(args, batch, device, torch.float32)
    ref_out = reference(*ref_inputs)
    gen = torch.Generator().manual_seed(2)
    cotangents = [torch.randn(o.shape, generator=gen).to(device) for o in ref_out]
    torch.autograd.backward(list(ref_out), cotangents)
    want = {k: None if v is None else v.detach().clone() for k, v in results_of(ref_out, reference, ref_inputs).items()}
    del ref_out, ref_inputs

    # 2. The variant: same weights, inputs and masks.
    module = build_module(variant.module, args, device, reference)
    del reference
    param_dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    module = module.to(param_dtype)
    inputs = make_inputs(args, batch, device, param_dtype)
    # Cotangents in each dtype an output may have, cast once here, not in the timed calls.
    weights = {dt: [c.to(dt) for c in cotangents] for dt in (torch.float32, torch.bfloat16)}
    amp_cache = variant.how != "graph"  # a captured graph must not use autocast's weight cache

    def autocast() -> contextlib.AbstractContextManager:
        if dtype_name != "autocast":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=amp_cache)

    compile_info = None
    runner: Callable[..., JSAOutput] = module
    if variant.how == "compiled":
        inductor = args.compile_backend == "inductor"
        runner = torch.compile(
            module,
            fullgraph=True,
            backend=args.compile_backend,
            **({"mode": variant.compile_mode} if inductor else {}),
        )
        compile_info = {
            "backend": args.compile_backend,
            "mode": variant.compile_mode,
            "mode_applied": inductor,  # a mode is inductor's; other backends (the dry run's) ignore it
            "fullgraph": True,
        }
    graph_trees = variant.how == "compiled" and variant.compile_mode in CUDA_GRAPH_MODES and device.type == "cuda"

    def forward() -> JSAOutput:
        with autocast():
            return runner(*inputs)

    def forward_backward() -> JSAOutput:
        out = forward()
        torch.autograd.backward(list(out), [weights[o.dtype][i] for i, o in enumerate(out)])
        return out

    def reset_grads() -> None:
        module.zero_grad(set_to_none=True)
        inputs[0].grad = inputs[1].grad = None
        if graph_trees:
            torch.compiler.cudagraph_mark_step_begin()

    rows, check = [], None
    for mode in MODES:
        fn = forward_backward if mode == "fwd+bwd" else forward
        pool = None
        if variant.how == "graph":
            call, before, pool = capture(fn, reset_grads, args.warmup, device)
            warmup = 0  # warmed up before the capture
        else:
            call, before, warmup = fn, reset_grads, args.warmup
        if check is None:  # 3. The first mode's last warm-up call (a graph's first replay) is checked.
            for _ in range(warmup - 1):
                before()
                fn()
            warmup = 0
            if before is not None:
                before()
            out = call() if variant.how != "graph" else call.outputs
            if variant.how == "graph":
                call()
            check = parity(results_of(out, module, inputs), want, tolerance(dtype_name, args))
            del out, want
            if compile_info is not None:
                counters = dynamo_counters()
                graphs = counters.get("stats", {}).get("unique_graphs", 0)
                compile_info |= {
                    "graphs": graphs,
                    "graph_breaks": sum(counters.get("graph_break", {}).values()),
                    "recompiles": max(graphs - 1, 0),
                }
                if graphs == 0:
                    check["passed"] = False
                    check["problems"].append("torch.compile compiled no graph: the variant ran eager")
            if not check["passed"]:
                return [failed_row(variant, m, batch, dtype_name, check, compile_info) for m in MODES]
        times = time_repeats_ms(call, device, warmup=warmup, repeats=args.repeats, before=before)
        memory = peak_memory(call, before, device, pool, graph_trees or variant.how == "graph")
        rows.append(
            {
                **row_key(variant, mode, batch, dtype_name),
                "status": "ok",
                "ms": spread(times)["median"],
                **{f"ms_{k}": v for k, v in spread(times).items() if k != "median"},
                "times_ms": times,
                **memory,
                "parity": check,
                "compile": compile_info,
            }
        )
        if variant.how == "graph":
            del call
    if compile_info is not None:  # the counters after every call: a recompile while timing shows here
        counters = dynamo_counters()
        graphs = counters.get("stats", {}).get("unique_graphs", 0)
        compile_info |= {"graphs": graphs, "recompiles": max(graphs - 1, 0), "counters": counters}
    return rows


class _Replay:
    """A captured graph: calling it replays; `outputs` are its static outputs."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: JSAOutput) -> None:
        self.graph, self.outputs = graph, outputs

    def __call__(self) -> None:
        self.graph.replay()


def capture(
    fn: Callable[[], JSAOutput], reset_grads: Callable[[], None], warmup: int, device: torch.device
) -> tuple[_Replay, None, tuple[int, int]]:
    """fn captured into a CUDAGraph of its own pool, after max(warmup, 2) calls on a side
    stream (the Triton kernels compile, autograd's streams settle); the gradients are None
    at the capture, so the replay writes them (no accumulate kernels)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 2)):
            reset_grads()
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    reset_grads()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    torch.cuda.synchronize(device)
    return _Replay(graph, outputs), None, graph.pool()


def peak_memory(
    call: Callable[[], Any],
    before: Callable[[], None] | None,
    device: torch.device,
    pool: tuple[int, int] | None,
    graphs: bool,
) -> dict[str, Any]:
    """Peak memory of one call (module docstring, 4.): peak_mib = outside the graph pools
    + the pools' size."""
    if device.type != "cuda":
        return {"peak_mib": None, "peak_mib_outside_graph_pool": None, "graph_pool_mib": None}
    if before is not None:
        before()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    allocated = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    outside = (torch.cuda.max_memory_allocated(device) - allocated) / 2**20
    graph_pool = graph_pool_mib(pool) if graphs else 0.0
    return {"peak_mib": outside + graph_pool, "peak_mib_outside_graph_pool": outside, "graph_pool_mib": graph_pool}


def row_key(variant: Variant, mode: str, batch: int, dtype: str) -> dict[str, Any]:
    return {"impl": variant.name, "module": variant.module, "how": variant.how, "mode": mode, "batch": batch,
            "dtype": dtype}  # fmt: skip


def failed_row(variant: Variant, mode: str, batch: int, dtype: str, check: dict | None, compile_info: dict | None,
               reason: str | None = None) -> dict[str, Any]:  # fmt: skip
    if reason is None:
        reason = f"parity check failed: {check['worst']} error {check['max_error']:.3g} > {check['tolerance']:.3g}"
        if check["problems"]:
            reason += f"; {'; '.join(check['problems'])}"
    return {**row_key(variant, mode, batch, dtype), "status": "failed", "reason": reason, "parity": check,
            "compile": compile_info}  # fmt: skip


def skipped_row(variant: Variant, mode: str, batch: int, dtype: str, reason: str) -> dict[str, Any]:
    return {**row_key(variant, mode, batch, dtype), "status": "skipped", "reason": reason, "parity": None}


# ----------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------


def worker_argv(args: argparse.Namespace, job: list[str]) -> list[str]:
    """This script's command line for a worker running `job` with args' sizes."""
    shared = ["--device", args.device, "--dim", str(args.dim), "--mlp-hidden", str(args.mlp_hidden),
              "--l-img", str(args.l_img), "--l-aud", str(args.l_aud), "--slots", str(args.slots),
              "--iters", str(args.iters), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
              "--compile-backend", args.compile_backend]  # fmt: skip
    return [sys.executable, str(Path(__file__).resolve()), "--worker", *shared, *job]


def run_worker(argv: list[str], env: dict[str, str], timeout: float) -> tuple[Any, str | None]:
    """Run a worker; (its result, None) or (None, why it failed)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"worker timed out after {timeout:.0f} s"
    results = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode != 0 or not results:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        return None, f"worker exited with {done.returncode}: " + "\n".join(tail)
    return json.loads(results[-1][len(RESULT_MARKER) :]), None


def worker_env(device: torch.device) -> dict[str, str]:
    """A variant worker's environment: the interpreter on the CPU, never on a GPU."""
    env = dict(os.environ)
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def worker_main(args: argparse.Namespace) -> int:
    """--worker: one job, its result printed on one line after RESULT_MARKER."""
    if args.count_flops:
        result: Any = count_flops(args)
    else:
        (impl,), (batch,), (dtype,) = args.impl, args.batch, args.dtype
        result = run_variant(args, BY_NAME[impl], batch, dtype)
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------
# The whole benchmark
# ----------------------------------------------------------------------------------


def add_derived(rows: list[dict[str, Any]], flops: dict[str, Any] | None, args: argparse.Namespace,
                device: torch.device) -> None:  # fmt: skip
    """FLOPs, TFLOP/s, percent of peak and the comparison with the best reference variant."""
    for row in rows:
        row["gflop_needed"] = needed_flops(args, row["batch"], row["mode"]) / 1e9
        row["gflop_executed"] = (
            None if flops is None else executed_flops(flops, row["module"], row["mode"], row["batch"]) / 1e9
        )
        ok = row["status"] == "ok"
        peak = peak_tflops(device, row["dtype"])
        for suffix, gflop in (("", row["gflop_needed"]), ("_executed", row["gflop_executed"])):
            tflops = gflop / row["ms"] if ok and gflop is not None else None  # GFLOP / ms = TFLOP/s
            row[f"tflops{suffix}"] = tflops
            row[f"pct_of_peak{suffix}"] = None if tflops is None or peak is None else 100 * tflops / peak
    for row in rows:
        references = [
            r
            for r in rows
            if r["module"] == "reference"
            and r["status"] == "ok"
            and all(r[k] == row[k] for k in ("mode", "batch", "dtype"))
        ]
        best = min(references, key=lambda r: r["ms"], default=None)
        ok = row["status"] == "ok" and best is not None
        row["best_reference"] = None if best is None else best["impl"]
        row["vs_best_reference"] = best["ms"] / row["ms"] if ok else None
        row["memory_vs_best_reference"] = (
            row["peak_mib"] / best["peak_mib"]
            if ok and row.get("peak_mib") is not None and best.get("peak_mib")
            else None
        )


def acceptance(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each fused fwd+bwd row at TARGETS' dtype and batches against TARGETS."""
    checks = []
    for row in rows:
        if row["module"] != "fused" or row["mode"] != TARGETS["mode"] or row["dtype"] != TARGETS["dtype"]:
            continue
        if row["batch"] == TARGETS["speed_batch"]:
            speed, memory = row.get("vs_best_reference"), row.get("memory_vs_best_reference")
            checks.append(
                {
                    "impl": row["impl"],
                    "batch": row["batch"],
                    "target": f">= {TARGETS['vs_best_reference_min']}x the best reference, "
                    f"<= {TARGETS['memory_vs_best_reference_max']}x its peak memory",
                    "vs_best_reference": speed,
                    "memory_vs_best_reference": memory,
                    "passed": speed is not None
                    and memory is not None
                    and speed >= TARGETS["vs_best_reference_min"]
                    and memory <= TARGETS["memory_vs_best_reference_max"],
                }
            )
        if row["batch"] == TARGETS["peak_batch"]:
            pct = row.get("pct_of_peak")
            checks.append(
                {
                    "impl": row["impl"],
                    "batch": row["batch"],
                    "target": f">= {TARGETS['pct_of_peak_min']} % of the dense bf16 peak (needed FLOPs)",
                    "pct_of_peak": pct,
                    "passed": pct is not None and pct >= TARGETS["pct_of_peak_min"],
                }
            )
    return checks


def skip_reason(variant: Variant, dtype: str, device: torch.device, args: argparse.Namespace) -> str | None:
    """Why `variant` is not run at `dtype` here (None: it is run)."""
    if variant.needs_cuda and device.type != "cuda":
        return "needs CUDA: CUDA graphs are captured on a GPU only"
    if variant.compile_mode not in (None, "default") and args.compile_backend != "inductor":
        return (
            f"mode {variant.compile_mode!r} is inductor's: with backend {args.compile_backend!r} this variant "
            "would repeat the default-mode one"
        )
    plan = DRY_RUN_PLAN.get(dtype)
    if args.dry_run and plan is not None and variant.name not in plan:
        return f"dry run: {dtype} runs {' and '.join(plan)} only (the others' code path runs at bf16)"
    return None


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what was not given from DRY_RUN (--dry-run) or DEFAULTS."""
    for key, value in (DRY_RUN if args.dry_run else DEFAULTS).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if "all" in args.dtype:
        args.dtype = list(DTYPES)
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1: the last warm-up call is the one checked")
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default 256 4096")
    parser.add_argument("--dtype", choices=[*DTYPES, "all"], nargs="+", default=None, help="default bf16 autocast")
    parser.add_argument("--impl", choices=list(BY_NAME), nargs="+", default=None, help="variants (default: all)")
    parser.add_argument("--device", default=None, help="default cuda if available")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--mlp-hidden", type=int, default=None)
    parser.add_argument("--l-img", type=int, default=None)
    parser.add_argument("--l-aud", type=int, default=None)
    parser.add_argument("--slots", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls before each mode's repeats, at least 1 (default 3)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per mode (default 20)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="every code path on the CPU at tiny sizes (TRITON_INTERPRET=1 needed; compile backend eager): "
        "the jobs in this process after torch._dynamo.reset(), but the first and the FLOP count in workers",
    )
    parser.add_argument("--in-process", action="store_true", help="run every job in this process (debugging)")
    parser.add_argument("--worker-timeout", type=float, default=3600.0, help="seconds per worker")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--json", default=None, help="output path (default bench/results/slot_attn-<device>-<time>.json)"
    )
    return resolve_args(parser.parse_args(argv))


@contextlib.contextmanager
def _timer(label: str) -> Iterator[None]:
    began = time.perf_counter()
    yield
    print(f"  {label}: {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    device = torch.device(args.device)
    if device.type == "cpu" and not registry.INTERPRET:
        raise SystemExit(
            "bench/slot_attn.py on the CPU runs the fused module's Triton kernels under the interpreter: "
            "set TRITON_INTERPRET=1 in the environment (before jsa_fast is imported)"
        )
    if device.type == "cuda" and registry.INTERPRET:
        raise SystemExit("TRITON_INTERPRET is set: unset it to time the Triton kernels on the GPU")
    variants = [BY_NAME[name] for name in args.impl] if args.impl else list(VARIANTS)

    # Executed FLOPs: counted on the CPU (fake tensors), in a worker that sees no GPU.
    flops_env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    with _timer("FLOP count (worker)"):
        flops, flops_error = run_worker(
            worker_argv(args, ["--device", "cpu", "--count-flops", "--batch", *map(str, args.batch)]),
            flops_env,
            args.worker_timeout,
        )
    if flops_error:
        print(f"FLOP count failed: {flops_error}", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    workers = 0
    for dtype in args.dtype:
        for batch in args.batch:
            for variant in variants:
                reason = skip_reason(variant, dtype, device, args)
                if reason:
                    rows.extend(skipped_row(variant, m, batch, dtype, reason) for m in MODES)
                    continue
                label = f"{variant.name}, B={batch}, {dtype}"
                in_process = args.in_process or (args.dry_run and workers > 0)
                with _timer(label + (" (in process)" if in_process else " (worker)")):
                    if in_process:
                        try:
                            result, error = run_variant(args, variant, batch, dtype), None
                        except Exception:  # recorded as the variant's failure, as a worker's is
                            result, error = (
                                None,
                                "in process: " + "\n".join(traceback.format_exc().strip().splitlines()[-15:]),
                            )
                        reset_dynamo()
                    else:
                        workers += 1
                        job = ["--impl", variant.name, "--batch", str(batch), "--dtype", dtype]
                        result, error = run_worker(worker_argv(args, job), worker_env(device), args.worker_timeout)
                if error:
                    result = [failed_row(variant, m, batch, dtype, None, None, error) for m in MODES]
                rows.extend(row | {"ran_in": "this process" if in_process else "a worker"} for row in result)
    add_derived(rows, flops, args, device)
    columns = ["impl", "mode", "batch", "dtype", "status", "ms", "ms_iqr", "peak_mib", "tflops", "pct_of_peak",
               "gflop_needed", "gflop_executed", "vs_best_reference", "memory_vs_best_reference"]  # fmt: skip
    print_table([row for row in rows if row["status"] != "skipped"], columns)  # the skipped are listed below
    not_run: dict[tuple[str, str, str], list[str]] = {}
    for row in rows:
        if row["status"] != "ok":
            reason = row["reason"].strip().splitlines()[-1]  # the JSON has the rest
            not_run.setdefault((row["impl"], row["status"], reason), []).append(f"{row['dtype']} B={row['batch']}")
    for (impl, status, reason), where in not_run.items():
        print(f"{impl} ({', '.join(dict.fromkeys(where))}): {status}: {reason}")
    config = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "count_flops")}
    extra = {
        "environment": environment(device),
        "executed_flops": flops,
        "executed_flops_error": flops_error,
        "targets": TARGETS,
        "acceptance": acceptance(rows),
    }
    print(f"wrote {write_results('slot_attn', device, config, rows, args.json, extra)}")
    return 0 if all(row["status"] in ("ok", "skipped") for row in rows) and not flops_error else 1


if __name__ == "__main__":
    sys.exit(main())
