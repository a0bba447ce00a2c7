"""Benchmark the data loaders against the train step: `python bench/loader.py [--n 20000]
[--batch 256] [--batches 20] [--device cuda|cpu] [--workers N] [--data DIR] [--json PATH]`.

Samples/s of the DALI loader (jsa_fast.data.dali) and of the PyTorch DataLoader (workers =
all cores) on the train split at the paper's preprocessing (ImageConfig(), AudioConfig():
246 resize, 224 crop and flip; 5 s middle clip -> 1 x 257 x 501), batches delivered on the
device; and the rate at which a train step consumes them (forward + backward of
jsa_fast.model.JSAModel at the paper config with jsa_loss, --model-batch pairs, bf16
autocast on CUDA), so that the table shows whether the loader is the bottleneck.

Without --data, a synthetic set of --n clips (256 x 256 JPEG, 10 s 16 kHz WAV) is built
under --cache: up to 256 distinct items of jsa_fast.data.synth, hard-linked over the rest.
Small CPU smoke test: `--n 64 --batch 8 --batches 4 --model-batch 2 --device cpu`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time_ms, print_table, write_results  # noqa: E402

from jsa_fast.config import RunConfig  # noqa: E402
from jsa_fast.data.dali import dali_available, make_dali_loader  # noqa: E402
from jsa_fast.data.datasets import AudioVisualDataset, make_loader  # noqa: E402
from jsa_fast.data.synth import generate_synthetic_dataset  # noqa: E402
from jsa_fast.losses import jsa_loss  # noqa: E402
from jsa_fast.model import JSAModel  # noqa: E402
from jsa_fast.runtime import autocast_context  # noqa: E402

DISTINCT_ITEMS = 256


def synthetic_set(cache: Path, n: int) -> Path:
    """n train clips in docs/api.md's layout: DISTINCT_ITEMS generated ones, hard-linked cyclically."""
    root = cache / f"loader-bench-n{n}"
    if (root / "train.txt").exists():
        return root
    distinct = min(n, DISTINCT_ITEMS)
    base = generate_synthetic_dataset(
        cache / f"loader-bench-base{distinct}", distinct, 1, seed=0, image_size=256, audio_seconds=10.0
    )
    for folder in ("frames", "audio"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = [f"clip_{index:07d}" for index in range(n)]
    for index, name in enumerate(names):
        source = f"train_{index % distinct:06d}"
        for folder, suffix in (("frames", ".jpg"), ("audio", ".wav")):
            target = root / folder / f"{name}{suffix}"
            if not target.exists():
                os.link(base / folder / f"{source}{suffix}", target)
    (root / "train.txt").write_text("".join(f"{name}\n" for name in names))
    return root


def loader_rate(loader: Iterable[dict], batches: int, device: torch.device) -> tuple[float, float]:
    """(samples/s over `batches` batches after the first, seconds to the first batch)."""
    began = time.perf_counter()
    iterator = iter(loader)
    seen, first_s, started = 0, 0.0, 0.0
    for count in range(batches + 1):
        batch = next(iterator)
        image = batch["image"].to(device, non_blocking=True)
        spec = batch["spec"].to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if count == 0:  # worker start-up, pipeline build and prefetch are not throughput
            started = time.perf_counter()
            first_s = started - began
        else:
            seen += image.shape[0]
    del spec
    return seen / (time.perf_counter() - started), first_s


def train_step_rate(batch: int, device: torch.device, repeats: int) -> float:
    """Samples/s of forward + backward of the paper-config model with jsa_loss."""
    cfg = RunConfig()
    model = JSAModel(cfg.model).to(device).train()
    loss_cfg = dataclasses.replace(cfg.loss, k=min(cfg.loss.k, batch))
    image = torch.randn(batch, 3, cfg.data.image.size, cfg.data.image.size, device=device)
    spec = torch.randn(batch, *cfg.data.audio.spectrogram_shape, device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast_context(device, cfg.optim.amp):
            loss = jsa_loss(model(image, spec), loss_cfg)["loss"]
        loss.backward()

    return batch / (median_time_ms(step, device, warmup=2, repeats=repeats) / 1e3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--data", type=Path, default=None, help="a data set root (default: a synthetic set of --n clips)"
    )
    parser.add_argument("--n", type=int, default=20000, help="clips in the synthetic set")
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("JSA_FAST_CACHE", Path.home() / ".cache" / "jsa-fast"))
    )
    parser.add_argument("--batch", type=int, default=256, help="loader batch size")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per loader")
    parser.add_argument(
        "--workers", type=int, default=len(os.sched_getaffinity(0)), help="DataLoader workers / DALI threads"
    )
    parser.add_argument("--model-batch", type=int, default=256, help="train step batch (0: skip)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--loaders", nargs="+", choices=("dali", "torch"), default=["dali", "torch"])
    parser.add_argument("--json", default=None, help="output path (default: bench/results/loader-<device>-<time>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    root = args.data or synthetic_set(args.cache, args.n)
    cfg = RunConfig()
    image_cfg, audio_cfg = cfg.data.image, cfg.data.audio
    if args.batches * args.batch > args.n and args.data is None:
        raise ValueError(
            f"--batches {args.batches} x --batch {args.batch} exceeds --n {args.n}: one epoch must cover the run"
        )

    rows = []
    for name in args.loaders:
        if name == "dali":
            if not dali_available(device):
                print(f"skipping dali: not installed or no {device} for it")
                continue
            loader = make_dali_loader(
                AudioVisualDataset(root, "train", image_cfg, audio_cfg),
                args.batch,
                True,
                0,
                device=device,
                drop_last=True,
                num_threads=args.workers,
            )
        else:
            dataset = AudioVisualDataset(root, "train", image_cfg, audio_cfg)
            loader = make_loader(dataset, args.batch, True, args.workers, 0, drop_last=True)
        rate, first_s = loader_rate(loader, args.batches, device)
        rows.append(
            {
                "what": f"{name} loader",
                "workers": args.workers,
                "batch": args.batch,
                "samples_per_s": rate,
                "first_batch_s": first_s,
            }
        )
        print_table(rows[-1:], list(rows[-1]))
        del loader
    if args.model_batch:
        rate = train_step_rate(args.model_batch, device, args.repeats)
        rows.append({"what": "train step (fwd+bwd)", "batch": args.model_batch, "samples_per_s": rate})
        for row in rows[:-1]:
            row["feeds_train_step"] = row["samples_per_s"] / rate  # < 1: the loader is the bottleneck
    columns = ["what", "workers", "batch", "samples_per_s", "first_batch_s", "feeds_train_step"]
    print_table(rows, columns)
    path = write_results(
        "loader",
        device,
        {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"root": str(root)},
        rows,
        args.json,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
