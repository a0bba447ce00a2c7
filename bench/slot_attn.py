"""Benchmark joint slot attention, forward and forward+backward, like with like: the
reference and the fused module, each eager, compiled (torch.compile) and compiled with
CUDA graphs (mode="reduce-overhead"; GPU only).

    python bench/slot_attn.py [--batch 256] [--dtype bf16] [--json PATH]
    TRITON_INTERPRET=1 python bench/slot_attn.py --device cpu --batch 2 --dim 32   # smoke test

Every module runs in training mode on the same explicit masks (so no random draw is
timed), with inputs that require grad (as the encoders' outputs do); forward+backward
back-propagates fixed random weights on all ten outputs. "bf16" means module and
inputs in bf16; "fp32" in fp32 (TF32 off, torch's default). The ratio that matters is
`vs_best_reference`: each variant's time over the fastest reference variant's.

FLOP count: the products the K/V-free algorithm needs (jsa_fast/kernels/joint_slot_attention.py),
the same for every variant so that TFLOP/s compare; per batch element and modality with
L tokens, S slots, width d, MLP hidden H and N iterations,

    F_fwd = N (2 S d (d+1)            G = s̃ W_logit
               + 2 L S (2d + 1)       logits and context
               + 12 S d^2              the GRU's input and hidden products
               + 4 S d H)              the MLP
          + 2 S d^2 + 2 S d (d+1) + 2 L S (d+1)   the last queries and the cross map
    F_fwd+bwd = 3 F_fwd,

summed over the two modalities and multiplied by B (the once-per-call weight fold and
the LayerNorms are not counted). "peak" is the device's dense datasheet peak: tensor
cores for bf16, no tensor cores for fp32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time_ms, peak_memory_mib, print_table, write_results  # noqa: E402

from jsa_fast import FusedJointSlotAttention, JointSlotAttention  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Dense peak TFLOP/s (NVIDIA datasheets): bf16 tensor cores, fp32 without tensor cores.
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp32": 66.9},
}
# (name, module, how it runs); "graphs" needs CUDA.
VARIANTS = (
    ("reference eager", "reference", "eager"),
    ("reference compiled", "reference", "compiled"),
    ("reference compiled+graphs", "reference", "graphs"),
    ("fused eager", "fused", "eager"),
    ("fused compiled", "fused", "compiled"),
    ("fused compiled+graphs", "fused", "graphs"),
)


def jsa_flops(batch: int, l_img: int, l_aud: int, dim: int, slots: int, iters: int, hidden: int) -> int:
    """Forward FLOPs of the K/V-free algorithm (module docstring)."""

    def modality(length: int) -> int:
        per_iter = (
            2 * slots * dim * (dim + 1)
            + 2 * length * slots * (2 * dim + 1)
            + 12 * slots * dim**2
            + 4 * slots * dim * hidden
        )
        last = 2 * slots * dim**2 + 2 * slots * dim * (dim + 1) + 2 * length * slots * (dim + 1)
        return iters * per_iter + last

    return batch * (modality(l_img) + modality(l_aud))


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before "H100"
        if key in name:
            return peaks[dtype]
    return None


def build(variant: str, args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    _, impl, how = next(v for v in VARIANTS if v[0] == variant)
    torch.manual_seed(0)
    sizes = dict(dim=args.dim, num_slots=args.slots, iters=args.iters, mlp_hidden=args.mlp_hidden)
    module = FusedJointSlotAttention(**sizes, backend="triton") if impl == "fused" else JointSlotAttention(**sizes)
    module = module.to(device, dtype).train()
    if how == "compiled":
        return torch.compile(module)
    if how == "graphs":
        return torch.compile(module, mode="reduce-overhead")
    return module


def bench_one(variant: str, batch: int, dtype_name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    dtype = DTYPES[dtype_name]
    module = build(variant, args, dtype, device)
    gen = torch.Generator().manual_seed(1)
    x_img = torch.randn(batch, args.l_img, args.dim, generator=gen).to(device, dtype).requires_grad_()
    x_aud = torch.randn(batch, args.l_aud, args.dim, generator=gen).to(device, dtype).requires_grad_()
    mask_img = (torch.rand(batch, args.l_img, generator=gen) < 0.1).to(device)
    mask_aud = (torch.rand(batch, args.l_aud, generator=gen) < 0.1).to(device)
    with torch.no_grad():
        weights = [torch.randn_like(o) for o in module(x_img, x_aud, mask_img, mask_aud)]

    def forward() -> None:
        module(x_img, x_aud, mask_img, mask_aud)

    def forward_backward() -> None:
        torch.autograd.backward(list(module(x_img, x_aud, mask_img, mask_aud)), weights)

    flops = jsa_flops(batch, args.l_img, args.l_aud, args.dim, args.slots, args.iters, args.mlp_hidden)
    peak = peak_tflops(device, dtype_name)
    rows = []
    for mode, fn, mode_flops in (("fwd", forward, flops), ("fwd+bwd", forward_backward, 3 * flops)):
        ms = median_time_ms(fn, device, warmup=args.warmup, repeats=args.repeats)
        tflops = mode_flops / (ms * 1e-3) / 1e12
        rows.append(
            {
                "impl": variant,
                "mode": mode,
                "batch": batch,
                "dtype": dtype_name,
                "ms": ms,
                "peak_mib": peak_memory_mib(fn, device),
                "gflop": mode_flops / 1e9,
                "tflops": tflops,
                "pct_peak": None if peak is None else 100 * tflops / peak,
            }
        )
    return rows


def compare_with_best_reference(rows: list[dict]) -> None:
    """Adds vs_best_reference (time / the fastest reference variant's time) and
    memory_vs_best_reference (peak memory / that variant's) to every row."""
    for row in rows:
        references = [
            r
            for r in rows
            if r["impl"].startswith("reference") and all(r[k] == row[k] for k in ("mode", "batch", "dtype"))
        ]
        best = min(references, key=lambda r: r["ms"], default=None)
        row["vs_best_reference"] = None if best is None else row["ms"] / best["ms"]
        row["memory_vs_best_reference"] = (
            None if best is None or not best["peak_mib"] else row["peak_mib"] / best["peak_mib"]
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument(
        "--impl",
        choices=[v[0] for v in VARIANTS],
        nargs="+",
        default=None,
        help="variants to time (default: all; those with CUDA graphs only on a GPU)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--mlp-hidden", type=int, default=1024)
    parser.add_argument("--l-img", type=int, default=49)
    parser.add_argument("--l-aud", type=int, default=16)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--json", default=None, help="output path (default bench/results/slot_attn-<device>-<time>.json)"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    variants = args.impl or [name for name, _, how in VARIANTS if how != "graphs" or device.type == "cuda"]
    rows = []
    for dtype_name in dtypes:
        for batch in args.batch:
            for variant in variants:
                rows.extend(bench_one(variant, batch, dtype_name, args, device))
    compare_with_best_reference(rows)
    print_table(
        rows,
        [
            "impl",
            "mode",
            "batch",
            "dtype",
            "ms",
            "peak_mib",
            "tflops",
            "pct_peak",
            "vs_best_reference",
            "memory_vs_best_reference",
        ],
    )
    config = {k: v for k, v in vars(args).items() if k != "json"}
    print(f"wrote {write_results('slot_attn', device, config, rows, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
