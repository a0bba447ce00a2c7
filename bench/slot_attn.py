"""Benchmark joint slot attention: eager reference, torch.compile'd reference and the
fused Triton module, forward and forward+backward.

    python bench/slot_attn.py [--batch 256] [--dtype bf16] [--json PATH]
    TRITON_INTERPRET=1 python bench/slot_attn.py --device cpu --batch 2 --dim 32   # smoke test

Every module runs in training mode on the same explicit masks (so no random draw is
timed), with inputs that require grad (as the encoders' outputs do); forward+backward
back-propagates fixed random weights on all ten outputs. "bf16" means module and
inputs in bf16; "fp32" in fp32 (TF32 off, torch's default).

FLOP count (matrix products only, the reference algorithm's, the same for every
implementation so that TFLOP/s compare): per batch element and modality with L tokens,
S slots, width d, MLP hidden H and N iterations,

    F_fwd = 4 L d^2                               K and V
          + N (2 S d^2 + 4 L S d + 12 S d^2 + 4 S d H)   Q, M and U, GRU, MLP
          + 2 L S d                               the cross-modal map
    F_fwd+bwd = 3 F_fwd,

summed over the two modalities and multiplied by B. The fused kernels skip K and V
(they do less work than counted); TFLOP/s is counted FLOPs over time, and "peak" is the
device's dense tensor-core peak for bf16 and its non-tensor fp32 peak for fp32.
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
IMPLEMENTATIONS = ("eager", "compiled", "fused")


def jsa_flops(batch: int, l_img: int, l_aud: int, dim: int, slots: int, iters: int, hidden: int) -> int:
    """Forward matrix-product FLOPs of joint slot attention (module docstring)."""

    def modality(length: int) -> int:
        per_iter = 2 * slots * dim**2 + 4 * length * slots * dim + 12 * slots * dim**2 + 4 * slots * dim * hidden
        return 4 * length * dim**2 + iters * per_iter + 2 * length * slots * dim

    return batch * (modality(l_img) + modality(l_aud))


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before "H100"
        if key in name:
            return peaks[dtype]
    return None


def build(impl: str, args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = dict(dim=args.dim, num_slots=args.slots, iters=args.iters, mlp_hidden=args.mlp_hidden)
    if impl == "fused":
        module = FusedJointSlotAttention(**sizes, backend="triton")
    else:
        module = JointSlotAttention(**sizes)
    module = module.to(device, dtype).train()
    return torch.compile(module) if impl == "compiled" else module


def bench_one(impl: str, batch: int, dtype_name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    dtype = DTYPES[dtype_name]
    module = build(impl, args, dtype, device)
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
                "impl": impl,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, nargs="+", default=list(IMPLEMENTATIONS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--mlp-hidden", type=int, default=1024)
    parser.add_argument("--l-img", type=int, default=49)
    parser.add_argument("--l-aud", type=int, default=16)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None, help="output path (default bench/results/slot_attn-<device>-<time>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    rows = []
    for dtype_name in dtypes:
        for batch in args.batch:
            for impl in args.impl:
                rows.extend(bench_one(impl, batch, dtype_name, args, device))
    print_table(rows, ["impl", "mode", "batch", "dtype", "ms", "peak_mib", "gflop", "tflops", "pct_peak"])
    config = {k: v for k, v in vars(args).items() if k != "json"}
    print(f"wrote {write_results('slot_attn', device, config, rows, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
