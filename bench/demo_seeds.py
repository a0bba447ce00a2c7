"""The demo on several seeds: `python bench/demo_seeds.py [--seeds 0 1 2 3 4] [--work DIR]
[--json PATH] [--dry-run] [-- TRAIN FLAGS...]`.

Runs `make demo`'s two commands (`python -m jsa_fast.train --out DIR --seed S`, then
`python -m jsa_fast.evaluate --checkpoint DIR/last.pt --out DIR/eval`) for each seed, one
after another, and records per seed: the field protocol's figures at its median threshold
(AP50, AUC, mean cIoU of ca^{a,v}; AP50 of the IQR map and of the centre prior), R@1 both
ways, the last epoch's mean training losses, and the wall time of each command. Then the spread
over the seeds (min, median, max) and whether every seed reached the demo's bar (AP50 >=
0.7). Flags after `--` go to every training command (e.g. `-- --epochs 12`).

`--dry-run` checks this script's code in about a minute: a 64-item world, one epoch of
batches of 16, evaluation on 16 items; its figures mean nothing.

Writes JSON to bench/results/demo_seeds-cpu-<UTC time>.json with the host CPU named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_results  # noqa: E402

AP50_BAR = 0.7  # the demo's bar on every seed (field protocol, median threshold)
DRY_RUN_FLAGS = [
    "--synth-train", "64", "--synth-test", "16", "--epochs", "1", "--batch-size", "16", "--num-workers", "0",
]  # fmt: skip


def run_seed(seed: int, work: Path, train_flags: list[str]) -> dict[str, Any]:
    """Train and evaluate one seed under `work`; its figures and times."""
    out = work / f"seed-{seed}"
    train = [sys.executable, "-m", "jsa_fast.train", "--out", str(out), "--overwrite", "--seed", str(seed)]
    evaluate = [
        sys.executable,
        "-m",
        "jsa_fast.evaluate",
        "--checkpoint",
        str(out / "last.pt"),
        "--out",
        str(out / "eval"),
    ]
    times = {}
    for name, command in (("train", train + train_flags), ("evaluate", evaluate)):
        began = time.perf_counter()
        subprocess.run(command, check=True)
        times[f"{name}_s"] = time.perf_counter() - began
    scores = json.loads((out / "eval" / "eval.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_epoch = [record for record in records if record.get("kind") == "epoch"][-1]
    return {
        "seed": seed,
        "ap50": scores["ap50"],
        "auc": scores["auc"],
        "mean_ciou": scores["mean_ciou"],
        "iqr_ap50": scores["ap50_iqr"],
        "centre_prior_ap50": scores["ap50_centre_prior"],
        "r1_audio_to_image": scores["r1_a2i"],
        "r1_image_to_audio": scores["r1_i2a"],
        "final_loss": last_epoch["loss"],
        "final_loss_ctr": last_epoch["loss_ctr"],
        "final_step": last_epoch["step"],
        **times,
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """min / median / max over the seeds of each figure (of the seeds that have it: a last
    epoch whose every step the fp16 scaler skipped logs a null loss), and whether all reach
    the bar."""
    figures = ("ap50", "auc", "mean_ciou", "final_loss", "train_s")
    spread = {}
    for name in figures:
        values = [row[name] for row in rows if row[name] is not None]
        spread[name] = {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else None
    return {"spread": spread, "ap50_bar": AP50_BAR, "every_seed_reaches_bar": all(r["ap50"] >= AP50_BAR for r in rows)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="output path (default bench/results/demo_seeds-cpu-<time>.json)")
    parser.add_argument("--dry-run", action="store_true", help="a minute's check of this script (figures mean nothing)")
    args = parser.parse_args(own)
    if args.dry_run:
        train_flags = DRY_RUN_FLAGS + train_flags
    with tempfile.TemporaryDirectory(prefix="demo-seeds-") as scratch:
        work = args.work or Path(scratch)
        rows = [run_seed(seed, work, train_flags) for seed in args.seeds]
    print_table(rows, ["seed", "ap50", "auc", "iqr_ap50", "r1_audio_to_image", "final_loss", "train_s"])
    result = summary(rows)
    print(f"every seed AP50 >= {AP50_BAR}: {result['every_seed_reaches_bar']}")
    config = {"seeds": args.seeds, "train_flags": train_flags, "dry_run": args.dry_run}
    path = write_results(
        "demo_seeds",
        torch.device("cpu"),
        config,
        rows,
        args.json,
        {**result, "environment": environment(torch.device("cpu"))},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
