"""Benchmark k-reciprocal masks: `python bench/kreciprocal.py [--device cpu|cuda]
[--batch 256 4096 ...] [--inputs random collapsed-0.1 collapsed-0.01] [--dim 512] [--k 20]
[--repeats 10] [--paths] [--unchecked] [--json PATH]`.

Compares jsa_fast.k_reciprocal_mask (the jsa_fast._C kernel for the device), as a B x B
bool mask ("extension") and as packed bit words ("packed"), with the reference
(`reference.mutual_neighbour_mask`: torch sort on the full B x B similarity) on three
kinds of rows. With --paths, also the
kernel's two paths whatever B is ("direct": every row against all rows, which the CPU
takes up to its crossover; "filter": the bfloat16 filter and refinement), by setting
JSA_FAST_KRECIPROCAL_DIRECT_MAX_BATCH around each call: the measurement that places a
device's crossover (kDirectMaxBatch in csrc/k_reciprocal_cpu.cpp and _cuda.cu). With
--unchecked, every call passes check_finite=False, as training does (no host read on the
direct path). The rows:

- random: independent Gaussian rows;
- collapsed-S: one shared Gaussian mean plus S times Gaussian noise per row, the target
  slots of a batch early in training or dominated by one class, whose similarities crowd
  together (S = 0.1: within ~1e-3 of each other at D = 512; S = 0.01: ~1e-5, a few
  hundred float32 steps).

Reports median times, peak memory above the inputs (CUDA), the extension's time relative
to its time on random rows of the same B, and whether the masks are identical (the
number of differing entries otherwise: near-ties within float32 rounding may be ranked
differently by the two summation orders). Each repeat times every input and
implementation once, in turn, so that all of them see the same load on a shared machine.
Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time_ms, peak_memory_mib, print_table, write_results  # noqa: E402

from jsa_fast import k_reciprocal_mask, reference  # noqa: E402
from jsa_fast.ops import extension_available, pack_mask  # noqa: E402

INPUTS = ("random", "collapsed-0.1", "collapsed-0.01")
DIRECT_MAX_BATCH = "JSA_FAST_KRECIPROCAL_DIRECT_MAX_BATCH"
# The largest batch each path is forced for: a direct path over every batch, or none.
PATH_LIMITS = {"direct": str(2**31 - 1), "filter": "0"}


def on_path(path: str, call: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """call, run with the kernel forced onto `path` ("direct" or "filter")."""

    def forced() -> torch.Tensor:
        before = os.environ.get(DIRECT_MAX_BATCH)
        os.environ[DIRECT_MAX_BATCH] = PATH_LIMITS[path]
        try:
            return call()
        finally:
            if before is None:
                del os.environ[DIRECT_MAX_BATCH]
            else:
                os.environ[DIRECT_MAX_BATCH] = before

    return forced


def make_rows(kind: str, batch: int, dim: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """batch x dim rows of the named kind (see the module docstring)."""
    noise = torch.randn(batch, dim, device=device, generator=gen)
    if kind == "random":
        return noise
    spread = float(kind.removeprefix("collapsed-"))
    return torch.randn(1, dim, device=device, generator=gen) + spread * noise


def input_kind(text: str) -> str:
    if text != "random":
        try:
            if not text.startswith("collapsed-") or float(text.removeprefix("collapsed-")) <= 0:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'random' or 'collapsed-S' with S > 0, got {text!r}") from None
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=None, help="default: 64 128 ... 16384 (CPU), 4096 16384 65536 (CUDA)"
    )
    parser.add_argument(
        "--inputs", type=input_kind, nargs="+", default=list(INPUTS), help=f"default: {' '.join(INPUTS)}"
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--paths", action="store_true", help="also time the kernel's direct and filter paths at every B (see above)"
    )
    parser.add_argument("--unchecked", action="store_true", help="call with check_finite=False, as training does")
    parser.add_argument(
        "--json", default=None, help="output path (default: bench/results/kreciprocal-<device>-<time>.json)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    check_finite = not args.unchecked
    batches = args.batch or ([4096, 16384, 65536] if device.type == "cuda" else [64 << i for i in range(9)])
    if not extension_available(device):
        print(f"note: jsa_fast._C has no {device.type} kernel; 'extension' runs the reference path")

    rows = []
    for batch in batches:
        calls, rows_at_batch = {}, {}
        for kind in args.inputs:
            gen = torch.Generator(device=device).manual_seed(batch)
            z_img = make_rows(kind, batch, args.dim, gen, device)
            z_aud = make_rows(kind, batch, args.dim, gen, device)
            row = rows_at_batch[kind] = {"B": batch, "D": args.dim, "k": args.k, "input": kind}
            implementations = {
                "extension": lambda z_img=z_img, z_aud=z_aud: k_reciprocal_mask(
                    z_img, z_aud, args.k, check_finite=check_finite
                ),
                "packed": lambda z_img=z_img, z_aud=z_aud: k_reciprocal_mask(
                    z_img, z_aud, args.k, packed=True, check_finite=check_finite
                ),
                "reference": lambda z_img=z_img, z_aud=z_aud: reference.mutual_neighbour_mask(
                    z_img, z_aud, args.k, check_finite=check_finite
                ),
            }
            if args.paths:
                for path in PATH_LIMITS:
                    implementations[path] = on_path(path, implementations["extension"])
            results = {}
            for name, call in implementations.items():  # the warm-up call gives the masks
                try:
                    row[f"{name}_peak_mib"] = peak_memory_mib(call, device)
                    results[name] = call()
                    calls[kind, name] = call
                except (torch.OutOfMemoryError, RuntimeError) as error:
                    if name != "reference":
                        raise  # the kernels must run at every size; only the reference's B x B matrices may not fit
                    row[f"{name}_ms"], row[f"{name}_error"] = None, str(error).splitlines()[0]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if args.paths:  # the two paths give one mask: the same similarities, the same selection
                row["paths_identical"] = all(torch.equal(results[path], results["extension"]) for path in PATH_LIMITS)
            if "reference" in results:
                expected = results.pop("reference")
                row["differing_entries"] = int((results["extension"] != expected).sum())
                row["identical"] = row["differing_entries"] == 0 and torch.equal(results["packed"], pack_mask(expected))
            results.clear()  # frees this input's masks before the next input is drawn
        times = {key: [] for key in calls}
        for _ in tqdm(range(args.repeats), desc=f"B={batch}", leave=False):
            for key, call in calls.items():
                times[key].append(median_time_ms(call, device, warmup=0, repeats=1))
        for (kind, name), samples in times.items():
            rows_at_batch[kind][f"{name}_ms"] = statistics.median(samples)
        random_ms = rows_at_batch["random"]["extension_ms"] if "random" in rows_at_batch else None
        for row in rows_at_batch.values():
            row["vs_random"] = None if random_ms is None else row["extension_ms"] / random_ms
            if row.get("reference_ms") is not None:
                row["speedup"] = row["reference_ms"] / row["extension_ms"]
            rows.append(row)
        columns = ["B", "input", "extension_ms", "packed_ms", "reference_ms", "speedup", "vs_random"]
        if args.paths:
            columns += [f"{path}_ms" for path in PATH_LIMITS]
        columns.append("differing_entries")
        print_table(list(rows_at_batch.values()), columns)
    path = write_results("kreciprocal", device, vars(args) | {"batch": batches}, rows, args.json)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
