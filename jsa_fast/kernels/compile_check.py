"""Compile every Triton kernel for a GPU without one, and report what it needs:
`python -m jsa_fast.kernels.compile_check [--arch 80 90 100 | --arch sm_80,sm_90,sm_100]
[--shapes paper|all] [--batch 256 4096] [--precisions ...] [--kernels NAME ...] [--json PATH]`.

The launches are those the operators make: their GPU bodies (registry.IMPLEMENTATIONS,
forward and backward) run on fake CUDA tensors with the GPU's dtypes and launch
configurations (registry.planning_gpu_launches), and every launch is recorded with its
arguments instead of run. Each launch is specialised by Triton's JIT binder as a GPU
launch would be (dtypes; 16-byte alignment of pointers, from the tensors' offsets in
their allocations; integers divisible by 16, equal to 1, past i32) and each distinct
specialisation compiled by Triton for each sm_<arch> (Triton ships ptxas, so no GPU or
CUDA toolkit is needed). The `ptxas -v` report of the ptxas run that made the cubin
gives registers per thread, spill stores and loads, the stack frame and static shared
memory. Each call is traced twice: with token masks and a gradient for every output,
and without masks with the slots' gradients only.

The exit status is 1 when a kernel spills (ptxas reports spill stores or loads: local
memory traffic, which the tile sizes are chosen to avoid) in any precision but fp64
(there for gradcheck, reported only), or needs more shared memory than the architecture
offers. A stack frame alone is reported, never failed on: ptxas keeps one for other
things than spills (printf's arguments, a call's saved registers), so cuobjdump's STACK
and LOCAL, sizes of the frame, say nothing of traffic.

Precisions: fp32, bf16, fp16 and fp64 (inputs, parameters, products and outputs in
one dtype) and "autocast" (fp32 inputs, parameters and outputs, bf16 products: what
bf16 autocast runs over an fp32 model).

`--precisions` and `--kernels` restrict the precisions and kernels (default: all; a
kernel by its @triton.jit name, e.g. linear_kernel); `--arch` defaults to the
extension's architectures, `--shapes` to the paper's (`all` adds odd widths, one and
three slots, 256 and 512 image tokens), `--batch` to the paper's B = 256 and B = 4,096.
A batch size reaches a compile only through the launches' configurations and
specialisations, so one whose launches specialise as another's reuses those compiles.

Run with TRITON_INTERPRET unset: under the interpreter there is nothing to compile.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import re
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from jsa_fast.kernels import registry
from jsa_fast.kernels.joint_slot_attention import PARAMETERS
from jsa_fast.reference import MLP_HIDDEN, JointSlotAttention

# The extension's architectures (setup.py).
ARCHITECTURES = [80, 90, 100]
# The paper's batch size and the large one bench/slot_attn.py runs.
BATCH_SIZES = [256, 4096]
# Shared memory one block may use (opt-in maximum), by compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# Precision -> (dtype of inputs, parameters and outputs; dtype of the products).
PRECISIONS = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "autocast": (torch.float32, torch.bfloat16),
    "fp64": (torch.float64, torch.float64),
}
FORWARD, BACKWARD = "jsa_fast::joint_slot_attention", "jsa_fast::joint_slot_attention_backward"
EPS, LN_EPS = 1e-8, [1e-5] * 3


@dataclass(frozen=True)
class Shape:
    """One JSA configuration: image and audio tokens, width, slots, MLP width,
    iterations, batch."""

    name: str
    l_img: int
    l_aud: int
    dim: int
    slots: int
    hidden: int = MLP_HIDDEN
    iters: int = 5
    batch: int = 256

    def __str__(self) -> str:
        return f"{self.name}: Lv={self.l_img} La={self.l_aud} d={self.dim} S={self.slots} B={self.batch}"


SHAPES = {
    "paper": [Shape("paper", 49, 16, 512, 2)],
    "all": [
        Shape("paper", 49, 16, 512, 2),
        Shape("odd", 7, 5, 100, 3, hidden=200),
        Shape("one slot", 100, 10, 96, 1, hidden=192),
        Shape("16x16 image", 256, 16, 512, 2),
        Shape("512 tokens", 512, 16, 512, 2),
    ],
}


class Pointer:
    """A tensor argument as the JIT's binder sees it: its dtype and address. Allocations
    are aligned (the CUDA caching allocator's 512 bytes), so a view's alignment is that
    of its offset."""

    def __init__(self, dtype: torch.dtype, offset: int = 0) -> None:
        self.dtype, self.offset = dtype, offset

    def data_ptr(self) -> int:
        return 2**32 + self.offset


@dataclass
class Launch:
    """One kernel launch of an op body: the kernel, the line of the body that made it,
    and its arguments (tensors as Pointers)."""

    kernel: Any
    site: str
    args: list[Any]
    kwargs: dict[str, Any]


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Op bodies' launches recorded, not run, while inside (GPU dtypes and configurations:
    registry.planning_gpu_launches)."""
    launches: list[Launch] = []
    kernels_folder, this_file = Path(registry.__file__).parent, Path(__file__).resolve()

    def pointer(arg: Any) -> Any:
        return Pointer(arg.dtype, arg.storage_offset() * arg.element_size()) if isinstance(arg, torch.Tensor) else arg

    class Recording(registry._Launcher):
        def __getitem__(self, grid: Any) -> Any:
            def run(*args: Any, **kwargs: Any) -> None:
                # The outermost frame in jsa_fast/kernels but this file: the op body's line.
                site = next(
                    f
                    for f in traceback.extract_stack()
                    if Path(f.filename).parent == kernels_folder and Path(f.filename).resolve() != this_file
                )
                launches.append(
                    Launch(
                        self.kernel,
                        f"{Path(site.filename).name}:{site.lineno}",
                        [pointer(arg) for arg in args],
                        {name: pointer(value) for name, value in kwargs.items()},
                    )
                )

            return run

    launcher = registry._Launcher
    registry._Launcher = Recording
    try:
        with registry.planning_gpu_launches():
            yield launches
    finally:
        registry._Launcher = launcher


@functools.cache
def parameter_shapes(dim: int, slots: int, iters: int, hidden: int) -> list[tuple[int, ...]]:
    """Each modality's parameter shapes, in PARAMETERS' order."""
    with torch.device("meta"):
        module = JointSlotAttention(dim=dim, num_slots=slots, iters=iters, mlp_hidden=hidden)
    return [tuple(module.image.get_parameter(name).shape) for name in PARAMETERS]


def traced_launches(shape: Shape, precision: str) -> list[Launch]:
    """The launches of a forward and a backward at `shape` (module docstring: twice)."""
    dtype, compute = PRECISIONS[precision]
    b, d = shape.batch, shape.dim
    with recording_launches() as launches, FakeTensorMode():

        def new(*size: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.empty(size, device="cuda", dtype=dtype)

        x_img, x_aud, slots_init = new(b, shape.l_img, d), new(b, shape.l_aud, d), new(shape.slots, d)
        params = [new(2, *size) for size in parameter_shapes(d, shape.slots, shape.iters, shape.hidden)]
        for masks, every_output in (((new(b, shape.l_img, dtype=torch.bool), new(b, shape.l_aud, dtype=torch.bool)), True),
                                    ((None, None), False)):  # fmt: skip
            inputs = (x_img, x_aud, *masks, slots_init, params)
            out = registry.IMPLEMENTATIONS[FORWARD](*inputs, shape.iters, EPS, LN_EPS, compute, dtype)
            grads = [torch.empty_like(o) if every_output or i < 2 else None for i, o in enumerate(out[:10])]
            registry.IMPLEMENTATIONS[BACKWARD](grads, *inputs, out[10:], shape.iters, EPS, LN_EPS)
    return launches


@functools.cache
def binder(kernel: Any, arch: int) -> tuple[Any, Any]:
    """The CUDA backend for sm_<arch> and the kernel's argument binder (what
    JITFunction.create_binder makes for the current GPU)."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialise(launch: Launch, arch: int) -> tuple[ASTSource, Any]:
    """The source and options Triton's JIT compiles for this launch (JITFunction.run)."""
    backend, bind = binder(launch.kernel, arch)
    bound, specialization, options = bind(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(
        backend, launch.kwargs, bound, specialization, options
    )
    return ASTSource(launch.kernel, signature, constexprs, attrs), options


# ptxas -v: per function "N bytes stack frame, N bytes spill stores, N bytes spill loads"
# (the kernel and any function it calls), then "Used N registers, ...[, N bytes smem], ...".
PTXAS_FUNCTION = re.compile(
    r"Function properties for (\S+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
PTXAS_USED = re.compile(r"Used (\d+) registers[^\n]*")


def parse_ptxas_report(report: str) -> dict[str, int]:
    """Registers, stack frame, spill stores and loads and static shared memory from the
    `ptxas -v` report of one kernel. Spills of the functions it calls are its own traffic,
    so they add up; the stack is the cumulative size where ptxas gives one (the kernel's
    frame and its callees'), else the largest frame."""
    functions = PTXAS_FUNCTION.findall(report)
    used = PTXAS_USED.search(report)
    if not functions or used is None:
        raise RuntimeError(f"ptxas reported no resource usage:\n{report}")
    cumulative = re.search(r"(\d+) bytes cumulative stack size", used.group(0))
    smem = re.search(r"(\d+) bytes smem", used.group(0))
    return {
        "registers": int(used.group(1)),
        "stack_bytes": int(cumulative.group(1)) if cumulative else max(int(f[1]) for f in functions),
        "spill_store_bytes": sum(int(f[2]) for f in functions),
        "spill_load_bytes": sum(int(f[3]) for f in functions),
        "static_shared_bytes": int(smem.group(1)) if smem else 0,
    }


def compile_reporting(source: ASTSource, arch: int, options: dict[str, Any]) -> tuple[Any, str]:
    """Triton's compile and the `ptxas -v` report of the ptxas run that made its cubin
    (Triton prints it when asked; a cached kernel would skip ptxas, so every compile runs)."""
    report = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(report):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled, report.getvalue()


def resources(launch: Launch, arch: int, compiled_before: dict) -> dict[str, Any]:
    """What the launch's kernel needs on sm_<arch>; compiled_before keeps it by
    specialisation, for the launches, batch sizes and shapes that compile alike."""
    source, options = specialise(launch, arch)
    key = (source.hash(), options.hash(), arch)
    if key not in compiled_before:
        compiled, report = compile_reporting(source, arch, options.__dict__)
        usage = parse_ptxas_report(report)
        # Triton's shared memory (compiled.metadata.shared) is what it allocates dynamically.
        usage["shared_bytes"] = usage.pop("static_shared_bytes") + compiled.metadata.shared
        usage["num_warps"] = compiled.metadata.num_warps
        compiled_before[key] = usage
    return compiled_before[key] | {"specialisation": key[0][:12]}


def architectures(text: str) -> list[int]:
    """Compute capabilities x 10 from `90`, `sm_90`, `sm_90a` or a comma-separated list."""
    parts = [re.fullmatch(r"(?:sm_?)?(\d+)a?", part.strip()) for part in text.split(",") if part.strip()]
    if not parts or None in parts:
        raise argparse.ArgumentTypeError(f"not an architecture list: {text!r} (e.g. 90, sm_90, sm_80,sm_90,sm_100)")
    return [int(part.group(1)) for part in parts]


def problems(usage: dict[str, Any], precision: str, arch: int) -> list[str]:
    """What fails a launch: spill traffic (but in fp64, there for gradcheck) and more
    shared memory than the architecture offers. A stack frame alone fails nothing."""
    found = []
    if usage["spill_store_bytes"] + usage["spill_load_bytes"] > 0 and precision != "fp64":
        found.append(f"spills ({usage['spill_store_bytes']} B stores, {usage['spill_load_bytes']} B loads)")
    limit = SHARED_MEMORY_LIMIT.get(arch)
    if limit is not None and usage["shared_bytes"] > limit:
        found.append(f"{usage['shared_bytes']} B shared > {limit} B")
    return found


def summary(rows: list[dict[str, Any]]) -> str:
    """The largest figures over rows, and how many of them spill."""
    spilling = sum(row["spill_store_bytes"] + row["spill_load_bytes"] > 0 for row in rows)
    return (
        f"{len(rows)} launches, at most {max(row['registers'] for row in rows)} registers, "
        f"{max(row['spill_store_bytes'] for row in rows)} B spill stores, {max(row['spill_load_bytes'] for row in rows)} B "
        f"spill loads ({spilling} spilling), stack frame at most {max(row['stack_bytes'] for row in rows)} B, "
        f"shared at most {max(row['shared_bytes'] for row in rows)} B"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        type=architectures,
        nargs="+",
        default=[ARCHITECTURES],
        help="compute capabilities x 10, or sm_<arch>, comma- or space-separated (80: Ampere, 90: Hopper, "
        "100: Blackwell; default: the extension's list, 80 90 100)",
    )
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="paper", help="default: the paper's")
    parser.add_argument("--batch", type=int, nargs="+", default=BATCH_SIZES, help="batch sizes (default: 256 4096)")
    parser.add_argument("--precisions", choices=list(PRECISIONS), nargs="+", default=list(PRECISIONS))
    parser.add_argument("--kernels", nargs="+", default=None, help="only these kernels' launches (default: all)")
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    if registry.INTERPRET:
        print("TRITON_INTERPRET is set: the kernels are interpreted, not compiled; unset it", file=sys.stderr)
        return 2
    rows, failures, compiled_before = [], [], {}
    archs = list(dict.fromkeys(arch for group in args.arch for arch in group))
    shapes = [replace(base, batch=batch) for base in SHAPES[args.shapes] for batch in args.batch]
    traced = {
        (precision, shape): traced_launches(shape, precision) for precision in args.precisions for shape in shapes
    }
    if args.kernels:
        launched = {launch.kernel.fn.__name__ for launches in traced.values() for launch in launches}
        if unknown := set(args.kernels) - launched:
            parser.error(f"no launch of {sorted(unknown)}; the operators launch {sorted(launched)}")
        traced = {
            key: [la for la in launches if la.kernel.fn.__name__ in args.kernels] for key, launches in traced.items()
        }
    for arch in archs:
        for (precision, shape), launches in traced.items():
            # One row per distinct specialisation: the iterations repeat the same launches.
            distinct: dict[str, dict[str, Any]] = {}
            for launch in launches:
                usage = resources(launch, arch, compiled_before)
                row = distinct.setdefault(usage["specialisation"], {
                    "arch": arch, "kernel": launch.kernel.fn.__name__, "site": launch.site, "precision": precision,
                    "shape": str(shape), "batch": shape.batch, "launches": 0} | usage)  # fmt: skip
                row["launches"] += 1
            for row in distinct.values():
                rows.append(row)
                print(f"sm_{arch} {row['kernel']:22s} {row['site']:28s} {precision:8s} {str(shape):46s} x{row['launches']:<3d} "
                      f"warps {row['num_warps']}  registers {row['registers']:3d}  spill stores {row['spill_store_bytes']:4d} B "
                      f"loads {row['spill_load_bytes']:4d} B  stack {row['stack_bytes']:4d} B  shared {row['shared_bytes']:6d} B")  # fmt: skip
                where = f"sm_{arch} {row['kernel']} ({row['site']}) {precision} {shape}"
                failures += [f"{where}: {problem}" for problem in problems(row, precision, arch)]
    for arch in archs:
        for fp64, label in ((False, ""), (True, ", fp64 (reported only)")):
            chosen = [row for row in rows if row["arch"] == arch and (row["precision"] == "fp64") == fp64]
            if chosen:
                print(f"sm_{arch}{label}: {summary(chosen)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
