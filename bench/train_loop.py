"""Samples/s of whole training epochs, data loading included, for each training loop:

- released: the loop as the authors' `train_slot.py` runs it: a PyTorch DataLoader
  (shuffle, pinned memory, last partial batch dropped, workers restarted every epoch),
  fp16 autocast with a GradScaler, Adam (foreach), JSA's PyTorch path and the reference
  k-reciprocal mask, no compile, contiguous layout, and every loss term read back with
  `.item()` after every step;
- eager, compiled, cudagraphs: `jsa_fast.train.train` as `python -m jsa_fast.train`
  runs it (the step tally read every --log-every steps, fused AdamW and channels-last on
  CUDA, the fused JSA and the extension's mask), with --compile none, default and
  reduce-overhead (CUDA graphs; CUDA only), each with every loader in --loaders (the
  PyTorch DataLoader, DALI).

All train the preset's architecture on one synthetic world at the preset's sizes (frames at
its train_resize, audio of its length): `--steps` batches of `--batch-size` pairs per
epoch (default 39: VGGSound-10k's epoch at B = 256, so that the workers' start each epoch
weighs as in a real run), for `--epochs` epochs. The last epoch's samples/s is reported
(the first holds compilation and the first decodes), and each loop's over the released
loop's. Each loop runs in a process of its own (spawned), so none inherits another's
compiled graphs, CUDA memory or DALI threads. Ours runs at --amp (bf16 by default); the
released loop at fp16, as released.

    python bench/train_loop.py [--preset paper] [--batch-size 256] [--steps 39] [--epochs 2]
        [--amp bf16] [--variants released eager compiled cudagraphs] [--loaders torch dali]
        [--device cuda] [--json PATH] [--dry-run]

Writes JSON to bench/results/train_loop-<device>-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402
from train_step import reference_mask  # noqa: E402

from jsa_fast import train as train_module  # noqa: E402
from jsa_fast.config import PRESETS, RunConfig  # noqa: E402
from jsa_fast.data.dali import dali_available  # noqa: E402
from jsa_fast.data.datasets import AudioVisualDataset, EpochSeededDataset, collate_skip_none  # noqa: E402
from jsa_fast.data.synth import generate_synthetic_dataset  # noqa: E402
from jsa_fast.model import JSAModel  # noqa: E402

# Ours: --compile of each variant; "released" is the loop written below.
OUR_COMPILE = {"eager": "none", "compiled": "default", "cudagraphs": "reduce-overhead"}
VARIANTS = ("released", *OUR_COMPILE)
LOADERS = ("torch", "dali")
COLUMNS = ["variant", "loader", "amp", "samples_per_s", "first_epoch_samples_per_s", "vs_released"]
# VGGSound-10k's epoch at the paper's B = 256
DEFAULT_STEPS = 10_000 // 256


def loop_config(preset: str, batch: int, steps: int, epochs: int, amp: str, overrides: dict[str, Any]) -> RunConfig:
    """The preset at `batch` for `epochs` epochs, logging once an epoch, its encoders from
    random weights (the speed does not depend on them)."""
    cfg = PRESETS[preset]
    return cfg.overridden(
        **overrides, batch_size=batch, epochs=epochs, log_every=steps, amp=amp,
        k=min(cfg.loss.k, batch),  # a pair's k nearest are among the batch's
        pretrained_image="none", pretrained_audio="none",
    )  # fmt: skip


def make_world(folder: Path, cfg: RunConfig, pairs: int) -> Path:
    """A synthetic world of `pairs` training pairs at `cfg`'s sizes: one batch of them
    generated, the others hard links to those files under ids of their own. Every pair is
    still read, decoded and augmented (with its own draws) on its own; generating 10,000
    pairs at the paper's sizes would take minutes of the GPU machine's time."""
    batch = cfg.optim.batch_size
    root = generate_synthetic_dataset(
        folder / "world", min(batch, pairs), 1, 0, image_size=cfg.data.image.train_resize,
        audio_seconds=cfg.data.audio.seconds,
    )  # fmt: skip
    generated = (root / "train.txt").read_text().split()
    names = generated + [f"train_{index:06d}" for index in range(len(generated), pairs)]
    for index, name in enumerate(names[len(generated) :], start=len(generated)):
        source = generated[index % len(generated)]
        for folder_name, suffix in (("frames", ".jpg"), ("audio", ".wav")):
            os.link(root / folder_name / f"{source}{suffix}", root / folder_name / f"{name}{suffix}")
    (root / "train.txt").write_text("".join(f"{name}\n" for name in names))
    return root


def released_loop(cfg: RunConfig, data: Path, device: torch.device) -> tuple[list[float], list[int]]:
    """Samples/s and steps of each epoch of the released-style loop (module docstring)."""
    cfg = cfg.overridden(backend="torch", compile="none", amp="fp16")
    optim = cfg.optim
    torch.manual_seed(optim.seed)
    model = JSAModel(cfg.starting_model()).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    scaler = torch.amp.GradScaler(device.type)
    loss_fn = train_module.loss_function(model, cfg, false_negative_mask=reference_mask)
    dataset = EpochSeededDataset(AudioVisualDataset(data, "train", cfg.data.image, cfg.data.audio), optim.seed)
    rates, steps, step = [], [], 0
    for epoch in range(optim.epochs):
        dataset.epoch = epoch
        loader = DataLoader(
            dataset, batch_size=optim.batch_size, shuffle=True, num_workers=optim.num_workers,
            pin_memory=device.type == "cuda", drop_last=True, collate_fn=collate_skip_none,
        )  # fmt: skip
        started, seen, ended = time.perf_counter(), 0, 0.0
        for batch in loader:
            masks = train_module.token_masks(cfg.model, optim.batch_size, optim.seed, step)
            inputs = (
                batch["image"].to(device, non_blocking=True),
                batch["spec"].to(device, non_blocking=True),
                *(mask.to(device, non_blocking=True) for mask in masks),
            )
            terms = train_module.train_step(loss_fn, optimizer, scaler, inputs, device, optim.amp)
            for name in train_module.LOSS_TERMS[1:]:  # the released meters' four terms: a host sync each
                terms[name].item()
            step, seen = step + 1, seen + optim.batch_size
            # Ended at the last read, as ours ends at its tally's read: the workers' shutdown
            # after the last batch falls outside both clocks.
            ended = time.perf_counter()
        rates.append(seen / (ended - started))
        steps.append(seen // optim.batch_size)
    return rates, steps


def our_loop(
    cfg: RunConfig, data: Path, out: Path, device: torch.device, compile_mode: str, loader: str
) -> tuple[list[float], list[int]]:
    """Samples/s and steps of each epoch of `jsa_fast.train.train`, from its metrics.jsonl."""
    train_module.train(cfg.overridden(compile=compile_mode), str(data), out, device, loader=loader)
    with open(out / "metrics.jsonl") as lines:
        epochs = [record for record in map(json.loads, lines) if record["kind"] == "epoch"]
    ends = [0] + [record["step"] for record in epochs]
    return [record["samples_per_s"] for record in epochs], [b - a for a, b in zip(ends, ends[1:])]


def run_loop(
    variant: str, loader: str, cfg: RunConfig, data: Path, out: Path, device: torch.device
) -> tuple[list[float], list[int]]:
    if variant == "released":
        return released_loop(cfg, data, device)
    return our_loop(cfg, data, out, device, OUR_COMPILE[variant], loader)


def _send_loop(sender: Any, *args: Any) -> None:
    try:
        sender.send((True, run_loop(*args)))
    except BaseException:
        sender.send((False, traceback.format_exc()))
        raise


def run_loop_spawned(*args: Any) -> tuple[list[float], list[int]]:
    """run_loop(*args) in a spawned process of its own (not a pool's: the loaders' workers
    are its children), stopped when this one is interrupted."""
    spawn = multiprocessing.get_context("spawn")
    receiver, sender = spawn.Pipe(duplex=False)
    child = spawn.Process(target=_send_loop, args=(sender, *args))
    child.start()
    sender.close()
    try:
        ok, result = receiver.recv()
    except EOFError:
        child.join()
        ok, result = False, f"its process ended without a result (exit code {child.exitcode})"
    except BaseException:  # Ctrl-C here: the loop is stopped too, not waited for
        child.terminate()
        child.join()
        raise
    child.join()
    if not ok:
        raise RuntimeError(f"loop {args[0]} with loader {args[1]} failed:\n{result}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's (256 for paper)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="the last one is reported")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="bf16", help="ours (released: fp16)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None, help="default: all the device runs")
    parser.add_argument("--loaders", nargs="+", choices=LOADERS, default=None, help="default: those installed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--json", default=None, help="output path (default bench/results/train_loop-<device>-<time>.json)"
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny preset at 64 px, B = 4, 2 steps, 2 epochs")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    overrides: dict[str, Any] = {}
    if args.dry_run:
        args.preset, args.batch_size, args.steps, args.epochs = "tiny", 4, 2, 2
        overrides = {"image_size": 64, "train_resize": 72, "audio_seconds": 1.0, "num_workers": 1}
    for name in ("batch_size", "steps", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    variants = args.variants or [v for v in VARIANTS if v != "cudagraphs" or device.type == "cuda"]
    if "cudagraphs" in variants and device.type != "cuda":
        parser.error(f"--variants cudagraphs captures CUDA graphs: it needs --device cuda, got {args.device}")
    loaders = args.loaders or [kind for kind in LOADERS if kind == "torch" or dali_available(device)]
    if "dali" in loaders and not dali_available(device):
        parser.error(f"--loaders dali: DALI is not installed or cannot run on {args.device}")
    batch = args.batch_size if args.batch_size is not None else PRESETS[args.preset].optim.batch_size
    cfg = loop_config(args.preset, batch, args.steps, args.epochs, args.amp, overrides)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="train-loop-") as scratch:
        folder = Path(scratch)
        os.environ["JSA_FAST_CACHE"] = str(folder / "cache")  # the runs' decode markers, not the user's cache
        data = make_world(folder, cfg, batch * args.steps)
        runs = [("released", "torch")] if "released" in variants else []
        runs += [(variant, loader) for variant in variants if variant in OUR_COMPILE for loader in loaders]
        for variant, loader in runs:
            rates, steps = run_loop_spawned(variant, loader, cfg, data, folder / f"{variant}-{loader}", device)
            amp = "fp16" if variant == "released" else args.amp
            row = {"variant": variant, "loader": loader, "amp": amp, "samples_per_s": rates[-1]}
            row |= {"first_epoch_samples_per_s": rates[0], "epoch_samples_per_s": rates, "epoch_steps": steps}
            rows.append(row)
            print_table([row], COLUMNS[:-1])
    released = next((row["samples_per_s"] for row in rows if row["variant"] == "released"), None)
    for row in rows:
        row["vs_released"] = None if released is None else row["samples_per_s"] / released
    print()
    print_table(rows, COLUMNS)
    config = {"preset": args.preset, "batch_size": batch, "steps": args.steps, "epochs": args.epochs, "amp": args.amp}
    config |= {"image_size": cfg.data.image.size, "train_resize": cfg.data.image.train_resize}
    config |= {"audio_seconds": cfg.data.audio.seconds, "num_workers": cfg.optim.num_workers, "dry_run": args.dry_run}
    print(f"wrote {write_results('train_loop', device, config, rows, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
