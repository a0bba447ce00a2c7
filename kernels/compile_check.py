"""Compile every Triton kernel for a GPU without one, and report what it needs:
`python -m kernels.compile_check [--arch 90] [--shapes paper|all] [--json PATH]`.

For each kernel, dtype and shape, the launch configuration the op uses on a GPU
(`launch_config(..., interpret=False)`), with the argument specialisations a launch gets
(alignment and divisibility hints, sizes of 1 as constants), is compiled by Triton for sm_<arch> (Triton
ships ptxas and cuobjdump, so no GPU or CUDA toolkit is needed) and cuobjdump reports
registers per thread, spill stack bytes and shared memory. The exit status is 1 when a
kernel spills registers in fp32, bf16 or fp16 (fp64, there for gradcheck, may: it is
reported) or needs more shared memory than the architecture offers; a spill costs
local-memory traffic on every use, so the tile sizes are chosen to avoid one.

Run with TRITON_INTERPRET unset: under the interpreter there is nothing to compile.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.gru import _gru_bwd_kernel, _gru_fwd_kernel
from kernels.gru import launch_config as gru_launch_config
from kernels.registry import INTERPRET
from kernels.slot_attention import _slot_attention_bwd_kernel, _slot_attention_fwd_kernel
from kernels.slot_attention import launch_config as attention_launch_config

# Shared memory one block may use (opt-in maximum), by compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
# Slot attention shapes (name, L, d, S): the paper's image and audio sides, and odd ones.
SHAPES = {
    "paper": [("image", 49, 512, 2), ("audio", 16, 512, 2)],
    "all": [
        ("image", 49, 512, 2),
        ("audio", 16, 512, 2),
        ("odd", 7, 100, 3),
        ("one slot", 100, 96, 1),
        ("16x16 image", 256, 512, 2),
        ("512 tokens", 512, 512, 2),
    ],
}
INTEGER_ARGS = {"L", "D", "S", "N"}
FLOAT_ARGS = {"eps"}


def specialise(kernel: Any, dtype: torch.dtype, config: dict[str, Any], sizes: dict[str, int]) -> ASTSource:
    """The kernel as a launch on a GPU compiles it: Triton's JIT gives tensor pointers
    (16-byte aligned) and sizes divisible by 16 a divisibility hint, and makes sizes equal to
    1 constants. Tensors are in `dtype`, sizes i32, eps fp32; config holds the constexprs."""
    constants = {name: value for name, value in config.items() if name != "num_warps"}
    constants |= {name: 1 for name, value in sizes.items() if value == 1}
    types, attrs = {}, {}
    for position, name in enumerate(kernel.arg_names):
        if name in constants:
            types[name] = "constexpr"
        elif name in INTEGER_ARGS:
            types[name] = "i32"
        elif name in FLOAT_ARGS:
            types[name] = "fp32"
        else:
            types[name] = "*" + TRITON_TYPES[dtype]
        if types[name].startswith("*") or (name in INTEGER_ARGS and name not in constants and sizes[name] % 16 == 0):
            attrs[(position,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=kernel, signature=types, constexprs=constants, attrs=attrs)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, spill stack and static shared memory of a one-kernel cubin (cuobjdump)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([str(cuobjdump), "-res-usage", file.name], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"cuobjdump reported no resource usage:\n{report}")
    registers, stack, shared, local = map(int, match.groups())
    return {"registers": registers, "spill_bytes": stack + local, "static_shared_bytes": shared}


def compile_kernel(kernel: Any, dtype: torch.dtype, config: dict[str, Any], sizes: dict[str, int], arch: int) -> dict[str, Any]:
    options = {"num_warps": config["num_warps"]} if "num_warps" in config else {}
    source = specialise(kernel, dtype, config, sizes)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    usage = resource_usage(compiled.asm["cubin"])
    # Triton's shared memory (compiled.metadata.shared) is what it allocates dynamically.
    usage["shared_bytes"] = max(usage.pop("static_shared_bytes"), compiled.metadata.shared)
    usage["num_warps"] = compiled.metadata.num_warps
    return usage


def launches(shapes: str) -> list[tuple[str, Any, torch.dtype, str, dict[str, Any], dict[str, int]]]:
    """(kernel name, kernel, dtype, shape description, launch config, size arguments) for
    every launch."""
    rows = []
    for dtype in TRITON_TYPES:
        for name, length, dim, num_slots in SHAPES[shapes]:
            shape = f"{name}: L={length} d={dim} S={num_slots}"
            sizes = {"L": length, "D": dim, "S": num_slots}
            for direction, kernel in (("forward", _slot_attention_fwd_kernel), ("backward", _slot_attention_bwd_kernel)):
                config = attention_launch_config(length, dim, num_slots, dtype, direction, interpret=False)
                rows.append((f"slot_attention {direction}", kernel, dtype, shape, config, sizes))
        # The GRU epilogue is elementwise: one configuration whatever the size (B S x d
        # elements: B = 256, S = 2, d = 512 here).
        sizes = {"N": 256 * 2 * 512, "D": 512}
        config = gru_launch_config(sizes["N"], dtype, interpret=False)
        rows.append(("gru_gates forward", _gru_fwd_kernel, dtype, "R x d = 512 x 512", config, sizes))
        rows.append(("gru_gates backward", _gru_bwd_kernel, dtype, "R x d = 512 x 512", config, sizes))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="all")
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    if INTERPRET:
        print("TRITON_INTERPRET is set: the kernels are interpreted, not compiled; unset it", file=sys.stderr)
        return 2
    limit = SHARED_MEMORY_LIMIT.get(args.arch)
    rows, failures = [], []
    for name, kernel, dtype, shape, config, sizes in launches(args.shapes):
        usage = compile_kernel(kernel, dtype, config, sizes, args.arch)
        row = {"kernel": name, "dtype": TRITON_TYPES[dtype], "shape": shape, "config": config} | usage
        rows.append(row)
        print(f"{name:26s} {row['dtype']:5s} {shape:28s} warps {usage['num_warps']}  registers {usage['registers']:3d}  "
              f"spill {usage['spill_bytes']:4d} B  shared {usage['shared_bytes']:6d} B")  # fmt: skip
        if usage["spill_bytes"] > 0 and dtype != torch.float64:
            failures.append(f"{name} {row['dtype']} {shape}: spills {usage['spill_bytes']} bytes")
        if limit is not None and usage["shared_bytes"] > limit:
            failures.append(f"{name} {row['dtype']} {shape}: {usage['shared_bytes']} B shared > {limit} B")
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "rows": rows}, indent=1))
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
