"""Benchmark k-reciprocal masks: `python bench/kreciprocal.py [--device cpu|cuda]
[--batch 256 4096 ...] [--dim 512] [--k 20] [--json PATH]`.

Compares jsa_fast.k_reciprocal_mask (the jsa_fast._C kernel for the device), as a B x B
bool mask ("extension") and as packed bit words ("packed"), with the reference (torch
sort on the full B x B similarity): median time, peak memory above the inputs (CUDA),
and whether the masks are identical. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time_ms, peak_memory_mib, print_table, write_results  # noqa: E402

from jsa_fast import k_reciprocal_mask  # noqa: E402
from jsa_fast import reference  # noqa: E402
from jsa_fast.ops import extension_available, pack_mask  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 256 1024 4096 (CPU), 256 4096 16384 65536 (CUDA)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="output path (default: bench/results/kreciprocal-<device>-<time>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batches = args.batch or ([256, 4096, 16384, 65536] if device.type == "cuda" else [256, 1024, 4096])
    if not extension_available(device):
        print(f"note: jsa_fast._C has no {device.type} kernel; 'extension' runs the reference path")

    rows = []
    for batch in batches:
        gen = torch.Generator(device=device).manual_seed(batch)
        z_img = torch.randn(batch, args.dim, device=device, generator=gen)
        z_aud = torch.randn(batch, args.dim, device=device, generator=gen)
        row = {"B": batch, "D": args.dim, "k": args.k}
        results = {}
        implementations = {
            "extension": lambda: k_reciprocal_mask(z_img, z_aud, args.k),
            "packed": lambda: k_reciprocal_mask(z_img, z_aud, args.k, packed=True),
            "reference": lambda: reference.k_reciprocal_mask(z_img, z_aud, args.k),
        }
        for name, call in implementations.items():
            try:
                row[f"{name}_ms"] = median_time_ms(call, device, warmup=1, repeats=args.repeats)
                row[f"{name}_peak_mib"] = peak_memory_mib(call, device)
                results[name] = call()
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if name != "reference":
                    raise  # the kernels must run at every size; only the reference's B x B matrices may not fit
                row[f"{name}_ms"], row[f"{name}_error"] = None, str(error).splitlines()[0]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "reference" in results:
            expected = results.pop("reference")
            row["identical"] = torch.equal(results["extension"], expected) and torch.equal(results["packed"], pack_mask(expected))
            row["speedup"] = row["reference_ms"] / row["extension_ms"]
        results.clear()  # frees this size's masks before the next size's inputs are drawn
        rows.append(row)
        print_table([row], list(row))
    path = write_results("kreciprocal", device, vars(args) | {"batch": batches}, rows, args.json)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
