"""Compile every Triton kernel for a GPU without one, and report what it needs:
`python -m jsa_fast.kernels.compile_check [--arch 80 90 100] [--shapes paper|all] [--json PATH]`.

For each kernel, precision and shape, the launch configuration the operator uses on a
GPU (`row_config` / `attention_config` with interpret=False), with the argument
specialisations a launch gets (alignment and divisibility hints, sizes of 1 as
constants), is compiled by Triton for each sm_<arch> (Triton ships ptxas and cuobjdump, so no
GPU or CUDA toolkit is needed) and cuobjdump reports registers per thread, spill stack
bytes and shared memory. The exit status is 1 when a kernel spills registers in any
precision but fp64 (there for gradcheck, reported only) or needs more shared memory than
the architecture offers; a spill costs local-memory traffic on every use, so the tile
sizes are chosen to avoid one.

Precisions: each kernel pointer plays a role (token inputs, parameters, the products'
buffers, outputs, fp32 accumulators, byte masks), and a precision gives each role its
dtype: fp32, bf16 and fp16 (all alike), fp64, and "autocast" (fp32 inputs, parameters
and outputs; bf16 buffers: what bf16 autocast runs over an fp32 model).

`--precisions` restricts the precisions (default: all).

Run with TRITON_INTERPRET unset: under the interpreter there is nothing to compile.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from jsa_fast.kernels.gru import gru_bwd_kernel, gru_fwd_kernel
from jsa_fast.kernels.joint_slot_attention import attention_config, row_config
from jsa_fast.kernels.layer_norm import ln_in_bwd_kernel, ln_in_fwd_kernel, residual_norm_kernel, slot_norm_bwd_kernel
from jsa_fast.kernels.registry import INTERPRET
from jsa_fast.kernels.slot_attention import attention_bwd_kernel, attention_fwd_kernel

# Shared memory one block may use (opt-in maximum), by compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
TRITON_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
    torch.uint8: "u8",
}
F32, B16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
# Role -> dtype, by precision (module docstring).
PRECISIONS = {
    "fp32": {"input": F32, "param": F32, "buffer": F32, "output": F32, "acc": F32},
    "bf16": {"input": B16, "param": B16, "buffer": B16, "output": B16, "acc": F32},
    "fp16": {"input": F16, "param": F16, "buffer": F16, "output": F16, "acc": F32},
    "autocast": {"input": F32, "param": F32, "buffer": B16, "output": F32, "acc": F32},
    "fp64": {"input": F64, "param": F64, "buffer": F64, "output": F64, "acc": F64},
}


@dataclass(frozen=True)
class Shape:
    """One JSA configuration: image and audio tokens, width, slots, iterations, batch."""

    name: str
    l_img: int
    l_aud: int
    dim: int
    slots: int
    iters: int = 5
    batch: int = 256

    def __str__(self) -> str:
        return f"{self.name}: Lv={self.l_img} La={self.l_aud} d={self.dim} S={self.slots}"


SHAPES = {
    "paper": [Shape("paper", 49, 16, 512, 2)],
    "all": [
        Shape("paper", 49, 16, 512, 2),
        Shape("odd", 7, 5, 100, 3),
        Shape("one slot", 100, 10, 96, 1),
        Shape("16x16 image", 256, 16, 512, 2),
        Shape("512 tokens", 512, 16, 512, 2),
    ],
}
# Pointer roles (module docstring); pointers not named are "buffer".
ROLES = {
    "ln_in_fwd_kernel": {"X_IMG": "input", "X_AUD": "input", "MASK_IMG": "mask", "MASK_AUD": "mask", "TOKEN": "param", "W": "param", "B": "param"},
    "ln_in_bwd_kernel": {"X_IMG": "input", "X_AUD": "input", "MASK_IMG": "mask", "MASK_AUD": "mask", "TOKEN": "param", "W": "param",
                         "G_OUT": "acc", "GX_IMG": "input", "GX_AUD": "input", "PARTIAL": "acc"},
    "residual_norm_kernel": {"BIAS": "param", "SLOTS_IMG": "output", "SLOTS_AUD": "output"},
    "attention_fwd_kernel": {name: "output" for name in ("ATTN_IMG", "ATTN_AUD", "IA_IMG", "IA_AUD", "CA_IMG", "CA_AUD", "Q_IMG", "Q_AUD")},
    "attention_bwd_kernel": {"GRAD_X": "acc"} | {name: "output" for name in
                             ("G_ATTN_IMG", "G_ATTN_AUD", "G_IA_IMG", "G_IA_AUD", "G_CA_IMG", "G_CA_AUD")},
}  # fmt: skip


def size_arguments(shape: Shape) -> dict[str, int]:
    """The integer arguments of the kernels at `shape` (their values give the
    divisibility hints a launch would get)."""
    r, d = shape.batch * shape.slots, shape.dim
    return {
        "D": d, "S": shape.slots, "batch": shape.batch, "l_img": shape.l_img, "l_aud": shape.l_aud,
        "n_img_rows": shape.batch * shape.l_img, "n_rows": 2 * r, "rows_per_m": r,
        "stride_g_m": r * (d + 1), "stride_ctx_m": shape.iters * r * 2 * d, "stride_ctx_r": 2 * d,
        "stride_gctx_m": r * 2 * d, "stride_gctx_r": 2 * d, "stride_dg_m": shape.iters * r * (d + 1),
        "stride_out_m": shape.iters * r * 2 * d, "stride_out_r": 2 * d, "stride_norm_m": shape.iters * r * d,
        "stride_z_m": r * 4 * d, "stride_h_m": shape.iters * r * 2 * d, "stride_h_r": 2 * d,
        "stride_gs_m": shape.iters * r * d, "stride_gz_m": shape.iters * r * 4 * d,
        "stride_s_m": shape.iters * r * 2 * d, "stride_s_r": 2 * d, "stride_gh_r": 2 * d,
    }  # fmt: skip


def specialise(
    kernel: Any, dtypes: dict[str, torch.dtype], roles: dict[str, str], config: dict[str, Any], sizes: dict[str, int]
) -> ASTSource:
    """The kernel as a launch on a GPU compiles it: Triton's JIT gives tensor pointers
    (16-byte aligned) and integers divisible by 16 a divisibility hint, and makes integers
    equal to 1 constants. Pointers take their role's dtype, integers are i32, floats fp32;
    config holds the constexprs."""
    constants = {name: value for name, value in config.items() if name != "num_warps"}
    constants |= {name: 1 for name in kernel.arg_names if sizes.get(name) == 1}
    types, attrs = {}, {}
    for position, name in enumerate(kernel.arg_names):
        if name in constants:
            types[name] = "constexpr"
        elif name in sizes:
            types[name] = "i32"
            if sizes[name] % 16 == 0:
                attrs[(position,)] = [["tt.divisibility", 16]]
        elif name in ("eps", "scale"):
            types[name] = "fp32"
        else:
            role = roles.get(name, "buffer")
            types[name] = "*" + TRITON_TYPES[torch.uint8 if role == "mask" else dtypes[role]]
            attrs[(position,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=kernel, signature=types, constexprs=constants, attrs=attrs)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, spill stack and static shared memory of a one-kernel cubin (cuobjdump)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run(
            [str(cuobjdump), "-res-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"cuobjdump reported no resource usage:\n{report}")
    registers, stack, shared, local = map(int, match.groups())
    return {"registers": registers, "spill_bytes": stack + local, "static_shared_bytes": shared}


def compile_kernel(
    kernel: Any, precision: str, config: dict[str, Any], sizes: dict[str, int], arch: int
) -> dict[str, Any]:
    options = {"num_warps": config["num_warps"]} if "num_warps" in config else {}
    roles = ROLES.get(kernel.fn.__name__, {})
    source = specialise(kernel, PRECISIONS[precision], roles, config, sizes)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    usage = resource_usage(compiled.asm["cubin"])
    # Triton's shared memory (compiled.metadata.shared) is what it allocates dynamically.
    usage["shared_bytes"] = max(usage.pop("static_shared_bytes"), compiled.metadata.shared)
    usage["num_warps"] = compiled.metadata.num_warps
    return usage


def launches(shapes: str, precisions: list[str]) -> list[tuple[str, Any, str, Shape, dict[str, Any]]]:
    """(launch name, kernel, precision, shape, constexpr config) for every launch the
    operator makes, by distinct configuration."""
    rows = []
    for precision in precisions:
        fp64 = {"FP64": precision == "fp64"}
        for shape in SHAPES[shapes]:
            row_cfg = row_config(shape.dim, 2 * shape.batch * shape.slots, interpret=False) | fp64
            length = max(shape.l_img, shape.l_aud)
            for name, kernel, config in (
                ("ln_in forward", ln_in_fwd_kernel, row_cfg | {"HAS_MASK": True}),
                ("ln_in backward", ln_in_bwd_kernel, row_cfg | {"HAS_MASK": True}),
                ("residual + LN_slots", residual_norm_kernel, row_cfg | {"MODE": 1}),
                ("residual, last", residual_norm_kernel, row_cfg | {"MODE": 2}),
                ("LN_slots backward", slot_norm_bwd_kernel, row_cfg),
                ("gru + LN_ff forward", gru_fwd_kernel, row_cfg | {"STORE_BAR": True}),
                ("gru + LN_ff backward", gru_bwd_kernel, row_cfg),
            ):
                rows.append((name, kernel, precision, shape, config))
            for last in (False, True):
                suffix = ", last" if last else ""
                forward = attention_config(length, shape.dim, shape.slots, "forward", last, interpret=False)
                backward = attention_config(length, shape.dim, shape.slots, "backward", last, interpret=False)
                flags = {"HAS_G_ATTN": last, "HAS_G_IA": last, "HAS_G_CA": last, "ACCUMULATE": not last}
                rows.append(
                    (
                        f"attention forward{suffix}",
                        attention_fwd_kernel,
                        precision,
                        shape,
                        forward | fp64 | {"LAST": last},
                    )
                )
                rows.append(
                    (
                        f"attention backward{suffix}",
                        attention_bwd_kernel,
                        precision,
                        shape,
                        backward | fp64 | {"LAST": last} | flags,
                    )
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=[90],
        help="compute capabilities x 10 (80: Ampere, 90: Hopper, 100: Blackwell; the extension's list)",
    )
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="all")
    parser.add_argument("--precisions", choices=list(PRECISIONS), nargs="+", default=list(PRECISIONS))
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    if INTERPRET:
        print("TRITON_INTERPRET is set: the kernels are interpreted, not compiled; unset it", file=sys.stderr)
        return 2
    rows, failures = [], []
    for arch in args.arch:
        limit = SHARED_MEMORY_LIMIT.get(arch)
        for name, kernel, precision, shape, config in launches(args.shapes, args.precisions):
            usage = compile_kernel(kernel, precision, config, size_arguments(shape), arch)
            row = {"arch": arch, "kernel": name, "precision": precision, "shape": str(shape), "config": config} | usage
            rows.append(row)
            print(f"sm_{arch} {name:26s} {precision:8s} {str(shape):44s} warps {usage['num_warps']}  registers {usage['registers']:3d}  "
                  f"spill {usage['spill_bytes']:4d} B  shared {usage['shared_bytes']:6d} B")  # fmt: skip
            if usage["spill_bytes"] > 0 and precision != "fp64":
                failures.append(f"sm_{arch} {name} {precision} {shape}: spills {usage['spill_bytes']} bytes")
            if limit is not None and usage["shared_bytes"] > limit:
                failures.append(f"sm_{arch} {name} {precision} {shape}: {usage['shared_bytes']} B shared > {limit} B")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
