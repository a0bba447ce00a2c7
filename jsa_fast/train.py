"""Train JSA: `python -m jsa_fast.train [--data ROOT] [--out runs/NAME] [--preset tiny|paper] ...`.

With no --data the bundled synthetic world is built once in a cache folder and the `tiny`
preset is trained on it. Writes OUT/last.pt (atomically, every epoch and on Ctrl-C),
OUT/metrics.jsonl (a line per logged step and per epoch) and OUT/loss_curves.png.
`--resume` continues exactly where OUT/last.pt stopped, mid-epoch included.

Several GPUs (or CPU processes): `torchrun --nproc-per-node N -m jsa_fast.train ...` runs
DDP (`jsa_fast.distributed`). --batch-size is the global batch; each process takes its
B / N slice of every batch of `epoch_batches`, and rank 0 alone writes the outputs, so a
run can be resumed with another process count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from jsa_fast.checkpoint import load_checkpoint, save_checkpoint
from jsa_fast.config import RunConfig, add_config_arguments, config_from_args
from jsa_fast.data.dali import make_dali_loader, resolve_loader
from jsa_fast.data.datasets import AudioVisualDataset, collate_skip_none, epoch_order
from jsa_fast.data.synth import ensure_synthetic_dataset
from jsa_fast.distributed import World, convert_batchnorm, gather_with_grad, process_group, wrap_ddp
from jsa_fast.losses import jsa_loss
from jsa_fast.model import JSAModel, ModelConfig
from jsa_fast.viz import plot_loss_curves

__all__ = [
    "main",
    "train",
    "resolve_data_root",
    "resolve_device",
    "autocast_context",
    "memory_format",
    "token_masks",
    "build_optimizer",
    "loss_function",
    "train_step",
]

LOSS_TERMS = ("loss", "loss_ctr", "loss_match", "loss_div", "loss_recon")
# What may differ between a run and its --resume without changing the result (compile:
# beyond floating-point rounding). The process count is not in the config at all.
RESUMABLE_CHANGES = frozenset({"epochs", "num_workers", "log_every", "compile"})


def default_cache_dir() -> Path:
    """Where the synthetic world is built: $JSA_FAST_CACHE or ~/.cache/jsa-fast."""
    return Path(os.environ.get("JSA_FAST_CACHE", Path.home() / ".cache" / "jsa-fast"))


def resolve_data_root(data: str | None, cfg: RunConfig) -> Path:
    """--data when given, else the synthetic world of `cfg` (built on first use)."""
    if data is not None:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root} is not a folder")
        return root
    return ensure_synthetic_dataset(default_cache_dir() / "synth", **cfg.synth_kwargs())


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def autocast_context(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA as the config asks; CPU runs in fp32."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    if amp not in dtypes:
        raise ValueError(f"amp must be one of {sorted(dtypes)}, got {amp!r}")
    if device.type != "cuda" or dtypes[amp] is None:
        return nullcontext()
    return torch.autocast("cuda", dtype=dtypes[amp])


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA, where cuDNN runs convolutions fastest in it (NHWC tensor-core
    kernels, no layout transposes); NCHW on the CPU."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def _seed(*parts: int) -> int:
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


def token_masks(cfg: ModelConfig, batch: int, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """JSA's training masks for the global batch of optimiser step `step` (SPEC.md: each
    token replaced with probability mask_prob): B x Lv and B x La bool, on the CPU.

    A function of (seed, step) alone, like the data: the same for any process count (each
    process takes its rows), on a resume, and with or without torch.compile.
    """
    generator = torch.Generator().manual_seed(_seed(seed, step, 1))
    grid_h, grid_w = cfg.image_grid
    mask_img = torch.rand(batch, grid_h * grid_w, generator=generator) < cfg.mask_prob
    mask_aud = torch.rand(batch, cfg.audio_tokens, generator=generator) < cfg.mask_prob
    return mask_img, mask_aud


def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW of the config; the fused single-kernel implementation on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def loss_function(module: nn.Module, cfg: RunConfig, **loss_options: Any) -> Callable[..., dict[str, Tensor]]:
    """(image B x 3 x H x W, spec B x 1 x F x T, mask_img B x Lv, mask_aud B x La) -> the
    `jsa_loss` terms of `module`'s output, torch.compile'd as one graph when cfg.compile.

    module: the JSAModel, or its DDP wrapper; loss_options: keyword arguments of jsa_loss
    (`gather` under several processes, `false_negative_mask` for benchmarks).
    """
    loss_cfg = cfg.loss_config()

    def forward_loss(image: Tensor, spec: Tensor, mask_img: Tensor, mask_aud: Tensor) -> dict[str, Tensor]:
        return jsa_loss(module(image, spec, mask_img, mask_aud), loss_cfg, **loss_options)

    return torch.compile(forward_loss) if cfg.compile else forward_loss


def train_step(
    loss_fn: Callable[..., dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    inputs: tuple[Tensor, Tensor, Tensor, Tensor],
    device: torch.device,
    amp: str,
) -> dict[str, Tensor]:
    """One optimiser step on `inputs` (image, spec, mask_img, mask_aud, as `loss_function`
    takes them); returns the loss terms."""
    with autocast_context(device, amp):
        terms = loss_fn(*inputs)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return terms


class EpochSeededDataset(Dataset):
    """Makes each item a function of (seed, epoch, index) alone.

    The item's random draws run on a forked RNG, so they neither depend on nor disturb
    the process's RNG (saved in checkpoints). This is what lets --resume be exact from
    any batch, with any number of loader workers.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        threads = torch.get_num_threads()
        # One thread, as in a loader worker: the FFT's rounding depends on the thread count.
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed(self.seed, self.epoch, index))
                return self.dataset[index]
        finally:
            torch.set_num_threads(threads)


def new_epoch_sums() -> dict[str, float]:
    """Running sums of an epoch's loss terms, and the number of batches trained."""
    return {"batches": 0, **dict.fromkeys(LOSS_TERMS, 0.0)}


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, start: int) -> list[list[int]]:
    """The epoch's shuffled full batches (the last partial one dropped), from batch `start` on."""
    order = epoch_order(num_items, seed, epoch)
    full = num_items // batch_size
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(start, full)]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DeferredInterrupt:
    """Turns the first Ctrl-C into a request that the loop honours between steps, so a
    checkpoint never holds a half-done step (BatchNorm statistics, optimiser state);
    a second Ctrl-C stops at once."""

    def __enter__(self) -> DeferredInterrupt:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving after this step (press again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._previous)


class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def train(
    cfg: RunConfig,
    data: str | None,
    out: Path,
    device: torch.device,
    resume: bool = False,
    on_bad_file: str = "fail",
    world: World = World(),
    loader: str = "torch",
) -> dict[str, float]:
    """Train `cfg` on the train split of `data` (a root folder, or None for the synthetic
    world) as process `world.rank` of `world.size` (each on its B / N slice of every
    global batch); returns the last epoch's mean loss terms (over the global batch).

    loader: "torch" (exact --resume), "dali" (decoding on the GPU; its random crops come
    from DALI's generator, so a resume is not bit-exact) or "auto" (`resolve_loader`)."""
    if cfg.batch_size % world.size:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the {world.size} processes")
    local_batch = cfg.batch_size // world.size
    builds_data = world.local_rank == 0  # one synthetic-world build per node; the others wait
    if not builds_data:
        world.barrier()
    data_root = resolve_data_root(data, cfg)
    if builds_data:
        world.barrier()
    if world.is_main:
        print(f"training on {data_root} ({device}, {world.size} process(es)); writing {out}")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "last.pt"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    dataset = AudioVisualDataset(data_root, "train", cfg.image_config(), cfg.audio_config(), on_bad_file)
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {len(dataset)} training items of {data_root}")
    seeded = EpochSeededDataset(dataset, cfg.seed)
    dali = None
    if resolve_loader(loader, device, dataset.image_cfg) == "dali":
        dali = make_dali_loader(dataset, local_batch, shuffle=False, seed=cfg.seed, device=device, drop_last=True)
    model_cfg = cfg.model_config()
    model = JSAModel(model_cfg)
    if world.size > 1:
        convert_batchnorm(model)
    layout = memory_format(device)
    model.to(device, memory_format=layout)
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.amp == "fp16")
    epoch, batch_in_epoch, step = 0, 0, 0
    sums = new_epoch_sums()  # this epoch's trained batches and loss sums, for its summary line
    log = MetricsLog(out / "metrics.jsonl")

    if resume:
        state = load_checkpoint(checkpoint_path)
        changed = {
            name: (saved, getattr(cfg, name))
            for name, saved in state["config"].items()
            if name not in RESUMABLE_CHANGES and getattr(cfg, name) != saved
        }
        if changed:
            raise ValueError(f"--resume with a configuration other than {checkpoint_path}'s (saved, now): {changed}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        epoch, batch_in_epoch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        sums = state["epoch_sums"]
        _set_rng_state(state["rng"])
    elif log.path.exists() and world.is_main:
        log.path.unlink()  # a fresh run starts a fresh log
    # Loaded before DDP wraps the model (DDP starts every rank from rank 0's state).
    loss_fn = loss_function(wrap_ddp(model, world, device), cfg, **({"gather": gather_with_grad} if world.size > 1 else {}))

    def checkpoint() -> None:
        if not world.is_main:
            return
        save_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "step": step,
                "epoch_sums": sums,
                "rng": _rng_state(),
                "config": dataclasses.asdict(cfg),
                "data": data,
            },
            checkpoint_path,
        )

    epoch_means: dict[str, float] = {}
    model.train()
    with DeferredInterrupt() as interrupt:
        while epoch < cfg.epochs:
            seeded.epoch = epoch
            batches = epoch_batches(len(dataset), cfg.batch_size, cfg.seed, epoch, batch_in_epoch)
            rank_batches = [world.shard(indices, "--batch-size") for indices in batches]
            if dali is not None:
                batch_iterator: Iterable[dict[str, Any] | None] = dali.iterate(rank_batches)
            else:
                batch_iterator = DataLoader(
                    seeded,
                    batch_sampler=rank_batches,
                    num_workers=cfg.num_workers,
                    collate_fn=collate_skip_none,
                    pin_memory=device.type == "cuda",
                    # its own generator: a loader would otherwise draw its worker seed from
                    # the process RNG, which a mid-epoch resume restores to another point
                    generator=torch.Generator().manual_seed(epoch),
                )
            seen_items, started = 0, time.perf_counter()
            progress = tqdm(
                batch_iterator,
                total=len(batches),
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                dynamic_ncols=True,
                disable=None if world.is_main else True,
            )
            for batch in progress:
                batch_in_epoch += 1  # the position a --resume continues from, skipped batches included
                # None: every item was a skipped bad file. Several processes must also skip a
                # batch that one of them could not load in full (the gathers need equal shards).
                complete = batch is not None and (world.size == 1 or batch["image"].shape[0] == local_batch)
                if world.any(not complete):
                    continue
                global_batch = batch["image"].shape[0] * world.size
                masks = (world.shard(mask) for mask in token_masks(model_cfg, global_batch, cfg.seed, step))
                inputs = (
                    batch["image"].to(device, non_blocking=True, memory_format=layout),
                    batch["spec"].to(device, non_blocking=True, memory_format=layout),
                    *(mask.to(device, non_blocking=True) for mask in masks),
                )
                terms = train_step(loss_fn, optimizer, scaler, inputs, device, cfg.amp)
                step += 1
                sums["batches"] += 1
                means = world.mean(torch.stack([terms[name].detach().float() for name in LOSS_TERMS]))
                values = dict(zip(LOSS_TERMS, means.tolist()))
                for name, value in values.items():
                    sums[name] += value
                seen_items += global_batch
                throughput = seen_items / (time.perf_counter() - started)
                progress.set_postfix({name.removeprefix("loss_"): f"{v:.3g}" for name, v in values.items()} | {"samples/s": f"{throughput:.1f}"})
                if step % cfg.log_every == 0 and world.is_main:
                    log.write({"kind": "step", "step": step, "epoch": epoch, **values, "lr": optimizer.param_groups[0]["lr"], "samples_per_s": throughput})
                if world.any(interrupt.requested):  # every rank stops after the same step
                    progress.close()
                    checkpoint()
                    if world.is_main:
                        print(f"interrupted: state saved to {checkpoint_path}; continue with --resume", file=sys.stderr)
                    raise KeyboardInterrupt
            if sums["batches"] == 0:
                raise RuntimeError(f"epoch {epoch}: no batch could be loaded from {data_root}")
            epoch_means = {name: sums[name] / sums["batches"] for name in LOSS_TERMS}
            if world.is_main:
                log.write({"kind": "epoch", "step": step, "epoch": epoch, **epoch_means, "lr": optimizer.param_groups[0]["lr"], "samples_per_s": seen_items / (time.perf_counter() - started)})
            epoch, batch_in_epoch, sums = epoch + 1, 0, new_epoch_sums()
            checkpoint()
    if world.is_main:
        plot_loss_curves(log.path, out / "loss_curves.png")
    return epoch_means


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jsa_fast.train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="data set root (API.md layout); default: the synthetic world")
    parser.add_argument("--out", default="runs/default", help="output folder (last.pt, metrics.jsonl, loss_curves.png)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--on-bad-file", choices=("fail", "skip"), default="fail")
    parser.add_argument("--loader", choices=("torch", "dali", "auto"), default="auto", help="auto: DALI on CUDA when installed")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, default_preset="tiny" if args.data is None else "paper")
    device = resolve_device(args.device)
    with process_group(device) as world:
        try:
            means = train(
                cfg, args.data, Path(args.out), world.local_device(device), args.resume, args.on_bad_file, world, args.loader
            )
        except KeyboardInterrupt:
            return 130
    if world.is_main:
        print("last epoch: " + ", ".join(f"{name} {value:.4f}" for name, value in means.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
