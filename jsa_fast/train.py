"""Train JSA: `python -m jsa_fast.train [--data ROOT] [--out runs/NAME] [--preset tiny|paper] ...`.

With no --data the bundled synthetic world is built once in a cache folder and the `tiny`
preset is trained on it. Writes OUT/last.pt (atomically, every epoch and on Ctrl-C),
OUT/metrics.jsonl (a line per logged step and per epoch) and OUT/loss_curves.png; with a
validation split (--val FILE or --val-fraction F, see `jsa_fast.evaluate.Validation`)
OUT/best.pt, the epoch that scored best there (the test split is never used to select).
`--resume` continues exactly where OUT/last.pt stopped, mid-epoch included, with its
configuration (flags given must not change it, nor --data its training items, unless
--allow-changes); an --out that holds a run is otherwise refused unless --overwrite.
A non-finite loss or model stops the run before it overwrites last.pt.

Several GPUs (or CPU processes): `torchrun --nproc-per-node N -m jsa_fast.train ...` runs
DDP (`jsa_fast.distributed`). --batch-size is the global batch; each process takes its
B / N slice of every batch of `epoch_batches`, and rank 0 alone writes the outputs, so a
run can be resumed with another process count.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
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

from jsa_fast.checkpoint import is_disk_full, load_checkpoint, non_finite_tensors, remove_stale_temporaries, save_checkpoint
from jsa_fast.cli import ArgumentParser, DataError, RunError, UsageError, command, one_line
from jsa_fast.config import PRETRAINED_HINT, RunConfig, add_config_arguments, config_from_args, released_epochs, saved_config
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
    """bf16/fp16 autocast on `device` (CUDA or CPU) as `amp` asks; "none" runs in fp32."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    if amp not in dtypes:
        raise ValueError(f"amp must be one of {sorted(dtypes)}, got {amp!r}")
    if dtypes[amp] is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtypes[amp])


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA, where cuDNN runs convolutions fastest in it (NHWC tensor-core
    kernels, no layout transposes); NCHW on the CPU."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def _seed(*parts: int) -> int:
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


def token_masks(cfg: ModelConfig, batch: int, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """JSA's training masks for the global batch of optimiser step `step` (docs/model.md: each
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
    """OUT/metrics.jsonl: one JSON object per line (strict JSON: a non-finite value is
    written as null)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({key: _json_value(value) for key, value in record.items()}, allow_nan=False)
        try:
            with self.path.open("a") as file:
                file.write(line + "\n")
        except OSError as error:
            if is_disk_full(error):
                raise RunError(f"no space left on the device of {self.path.parent} to append to {self.path.name}") from error
            raise

    def keep_until(self, step: int, epochs_done: int) -> int:
        """Drop what a run logged after its checkpoint (step `step`, `epochs_done` whole
        epochs): the lines a resume will log again, and a line torn by a kill. Returns
        the number of lines dropped."""
        if not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if _logged_by_checkpoint(line, step, epochs_done)]
        if len(kept) < len(lines):
            temporary = self.path.with_name(f".{self.path.name}.tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            os.replace(temporary, self.path)
        return len(lines) - len(kept)


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _logged_by_checkpoint(line: str, step: int, epochs_done: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    if record.get("kind") == "epoch":
        return record.get("epoch", epochs_done) < epochs_done
    return record.get("step", step + 1) <= step


RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "loss_curves.png")  # what a run writes to OUT


def check_out_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """UsageError unless `out` may be written: a folder (or nothing yet) that holds no
    run, or holds one that --resume continues or --overwrite replaces."""
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite starts it over: give one of them")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if resume:
        if not (out / "last.pt").is_file():
            raise UsageError(f"--resume: {out} holds no last.pt to continue from")
        return
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not overwrite:
        raise UsageError(
            f"--out {out} already holds a run ({', '.join(held)}): continue it with --resume, "
            "start over with --overwrite, or choose another --out"
        )


def data_fingerprint(ids: list[str]) -> dict[str, Any]:
    """What identifies a training set on --resume: its number of items and a hash of their ids."""
    return {"items": len(ids), "sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def resumed_run(out: Path, args: argparse.Namespace, default_preset: str) -> tuple[RunConfig, str | None]:
    """What --resume continues: OUT/last.pt's configuration with the flags given (and
    --preset, when given) applied over it, and its --data unless one is given. `train`
    refuses a configuration or data set that changes the run unless --allow-changes."""
    checkpoint_path = out / "last.pt"
    state = load_checkpoint(checkpoint_path)
    saved = saved_config(state["config"], str(checkpoint_path))
    data = args.data if args.data is not None else state.get("data")
    return config_from_args(args, default_preset, saved=saved), data


def _config_changes(saved: RunConfig, cfg: RunConfig) -> list[str]:
    return [
        f"--{field.name.replace('_', '-')} {getattr(saved, field.name)!r} then, {getattr(cfg, field.name)!r} now"
        for field in dataclasses.fields(RunConfig)
        if field.name not in RESUMABLE_CHANGES and getattr(saved, field.name) != getattr(cfg, field.name)
    ]


def _refuse_changes(checkpoint_path: Path, changes: list[str]) -> None:
    if changes:
        raise UsageError(
            f"--resume: {checkpoint_path} was trained otherwise: {'; '.join(changes)}; "
            "drop those flags or that --data (the checkpoint's are used), or pass --allow-changes"
        )


def train(
    cfg: RunConfig,
    data: str | None,
    out: Path,
    device: torch.device,
    resume: bool = False,
    on_bad_file: str = "fail",
    world: World = World(),
    loader: str = "torch",
    overwrite: bool = False,
    allow_changes: bool = False,
) -> dict[str, float]:
    """Train `cfg` on the train split of `data` (a root folder, or None for the synthetic
    world) as process `world.rank` of `world.size` (each on its B / N slice of every
    global batch); returns the last epoch's mean loss terms (over the global batch).

    loader: "torch" (exact --resume), "dali" (decoding on the GPU; its random crops come
    from DALI's generator, so a resume is not bit-exact) or "auto" (`resolve_loader`).
    An `out` that holds a run is refused unless `resume` (continue it; a configuration or
    training set other than its own is refused unless `allow_changes`) or `overwrite`
    (start over). Training stops with RunError at a non-finite loss or model, before
    anything overwrites the last checkpoint."""
    if cfg.batch_size % world.size:
        raise UsageError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the {world.size} processes")
    check_out_folder(out, resume, overwrite)
    if cfg.pretrained_image is None:
        raise UsageError(PRETRAINED_HINT)
    checkpoint_path = out / "last.pt"
    state = load_checkpoint(checkpoint_path) if resume else None
    if state and not allow_changes:
        _refuse_changes(checkpoint_path, _config_changes(saved_config(state["config"], str(checkpoint_path)), cfg))
    local_batch = cfg.batch_size // world.size
    builds_data = world.local_rank == 0  # one synthetic-world build per node; the others wait
    if not builds_data:
        world.barrier()
    data_root = resolve_data_root(data, cfg)
    if builds_data:
        world.barrier()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    validation = None
    if cfg.val is not None or cfg.val_fraction > 0:
        from jsa_fast.evaluate import Validation  # here: jsa_fast.evaluate imports this module

        validation = Validation(cfg, data_root, on_bad_file)
    train_ids = validation.train_ids if validation is not None else None
    dataset = AudioVisualDataset(data_root, "train", cfg.image_config(), cfg.audio_config(), on_bad_file, subset=train_ids)
    fingerprint = data_fingerprint(dataset.ids)
    if state and not allow_changes and state.get("data_fingerprint") not in (None, fingerprint):
        saved_items = state["data_fingerprint"]["items"]
        _refuse_changes(checkpoint_path, [f"the training items of {data_root} ({fingerprint['items']} now, {saved_items} then, other ids)"])
    if len(dataset) < cfg.batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} exceeds the {len(dataset)} usable training items of {data_root}")
    epochs = cfg.epochs or released_epochs(len(dataset))
    seeded = EpochSeededDataset(dataset, cfg.seed)
    dali = None
    if resolve_loader(loader, device) == "dali":
        dali = make_dali_loader(dataset, local_batch, shuffle=False, seed=cfg.seed, device=device, drop_last=True)
    model_cfg = cfg.model_config(start_weights=not state)  # a resumed model's weights come from last.pt
    model = JSAModel(model_cfg)
    # What the encoders started from (pretrained file and its SHA-256, or random), kept in every checkpoint.
    encoder_start = state.get("encoder_start", {}) if state else {
        "image": model.image_encoder.started_from, "audio": model.audio_encoder.started_from,
    }  # fmt: skip
    if world.size > 1:
        convert_batchnorm(model)
    layout = memory_format(device)
    model.to(device, memory_format=layout)
    optimizer = build_optimizer(model, cfg, device)
    # fp16 steps whose loss or gradients are not finite are skipped by the scaler (and counted)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    skipped_steps = 0
    epoch, batch_in_epoch, step = 0, 0, 0
    sums = new_epoch_sums()  # this epoch's trained batches and loss sums, for its summary line
    best_val = None  # the validation scores of best.pt
    log = MetricsLog(out / "metrics.jsonl")

    if state:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as error:
            raise UsageError(f"--resume: {checkpoint_path} does not fit the configuration now: {one_line(error)}") from None
        for group in optimizer.param_groups:  # the saved ones, unless --allow-changes changed them
            group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
        scaler.load_state_dict(state["scaler"])
        epoch, batch_in_epoch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        sums = state["epoch_sums"]
        skipped_steps = state.get("skipped_steps", 0)
        best_val = state.get("best_val")
        _set_rng_state(state["rng"])
    if world.is_main:
        if overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(checkpoint_path)
        dropped = log.keep_until(step, epoch) if resume else 0
        print(f"training on {data_root} ({device}, {world.size} process(es)); writing {out}")
        print(f"{epochs} epoch(s){'' if cfg.epochs else f' (by the {len(dataset)} training items, as released; --epochs N to choose)'}; "
              f"{cfg.augment} augmentation; {'fp32' if cfg.amp == 'none' else cfg.amp}; image encoder from {_start_text(encoder_start.get('image'))}")  # fmt: skip
        if dropped:
            print(f"{log.path}: dropped {dropped} line(s) logged after {checkpoint_path.name}'s step {step}; they are trained again")
    saved_step = (step, epoch) if resume else None  # what last.pt holds
    # Loaded before DDP wraps the model (DDP starts every rank from rank 0's state).
    ddp_model = wrap_ddp(model, world, device)
    loss_options = {"gather": gather_with_grad} if world.size > 1 else {}
    loss_fns = {cfg.k: loss_function(ddp_model, cfg, **loss_options)}

    def loss_for(global_batch: int) -> Callable[..., dict[str, Tensor]]:
        """The loss of a batch that skipped bad files made smaller than k: k clamped to it."""
        k = min(cfg.k, global_batch)
        if k not in loss_fns:
            if world.is_main and len(loss_fns) == 1:
                tqdm.write(f"a batch of {global_batch} items (bad files skipped): k-reciprocal k {cfg.k} -> {k} for such batches", file=sys.stderr)
            loss_fns[k] = loss_function(ddp_model, dataclasses.replace(cfg, k=k), **loss_options)
        return loss_fns[k]

    def stopped(reason: str) -> RunError:
        kept = f"{checkpoint_path} is unchanged (step {saved_step[0]}, {saved_step[1]} epoch(s) done)" if saved_step else f"no {checkpoint_path.name} was written"
        return RunError(f"{reason}; stopped without saving: {kept}")

    def stopped_at_step(item_ids: list[str], what: str) -> RunError:
        return stopped(
            f"step {step} (epoch {epoch + 1}) on the batch of items {', '.join(item_ids)}: {what}; "
            f"lower --lr (now {cfg.lr:g}) or check those items"
        )

    def checkpoint(best: bool = False) -> None:
        """Save last.pt, and the same state as best.pt when `best`."""
        nonlocal saved_step
        if not world.is_main:
            return
        broken = non_finite_tensors(model.state_dict())
        if broken:
            raise stopped(f"after step {step} the model holds non-finite values ({len(broken)} tensors, e.g. {broken[0]}); lower --lr (now {cfg.lr:g})")
        saved = {
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
            "data_fingerprint": fingerprint,
            "best_val": best_val,
            "encoder_start": encoder_start,
            "skipped_steps": skipped_steps,
        }
        save_checkpoint(saved, checkpoint_path)
        if best:
            save_checkpoint(saved, out / "best.pt")
        saved_step = (step, epoch)

    def scaler_record() -> dict[str, float]:
        """What a metrics line adds under fp16: the loss scale and the steps skipped so far."""
        return {"grad_scale": scaler.get_scale(), "skipped_steps": skipped_steps} if scaler.is_enabled() else {}

    epoch_means: dict[str, float] = {}
    if epoch >= epochs and world.is_main:
        print(f"{checkpoint_path} has trained {epoch} epoch(s), --epochs is {epochs}: nothing to train")
    model.train()
    with DeferredInterrupt() as interrupt:
        while epoch < epochs:
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
                desc=f"epoch {epoch + 1}/{epochs}",
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
                step += 1
                scale = scaler.get_scale()
                try:
                    terms = train_step(loss_for(global_batch), optimizer, scaler, inputs, device, cfg.amp)
                except ValueError as error:  # e.g. the k-reciprocal op refusing non-finite embeddings
                    progress.close()
                    raise stopped_at_step(batch["id"], one_line(error)) from error
                means = world.mean(torch.stack([terms[name].detach().float() for name in LOSS_TERMS]))
                values = dict(zip(LOSS_TERMS, means.tolist()))
                # The scaler lowers its scale exactly when it skipped the step (inf/NaN gradients).
                skipped = scaler.is_enabled() and scaler.get_scale() < scale
                if skipped:
                    skipped_steps += 1
                    if scaler.get_scale() < 1:
                        progress.close()
                        raise stopped_at_step(batch["id"], f"fp16 steps keep overflowing ({skipped_steps} skipped, loss scale now {scaler.get_scale():g}); try --amp bf16")
                elif not all(math.isfinite(value) for value in values.values()):
                    progress.close()
                    shown = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
                    raise stopped_at_step(batch["id"], f"the loss is not finite ({shown})")
                else:
                    sums["batches"] += 1
                    for name, value in values.items():
                        sums[name] += value
                seen_items += global_batch
                throughput = seen_items / (time.perf_counter() - started)
                progress.set_postfix({name.removeprefix("loss_"): f"{v:.3g}" for name, v in values.items()} | {"samples/s": f"{throughput:.1f}"})
                if step % cfg.log_every == 0 and world.is_main:
                    log.write({"kind": "step", "step": step, "epoch": epoch, **values, "lr": optimizer.param_groups[0]["lr"], "samples_per_s": throughput, **scaler_record()})
                if world.any(interrupt.requested):  # every rank stops after the same step
                    progress.close()
                    checkpoint()
                    if world.is_main:
                        print(f"interrupted: state saved to {checkpoint_path}; continue with --resume", file=sys.stderr)
                    raise KeyboardInterrupt
            if sums["batches"] == 0 and not seen_items:
                raise DataError(f"epoch {epoch + 1}: no batch could be loaded from {data_root} (every item was skipped)")
            # NaN (null in metrics.jsonl) when the scaler skipped every step of the epoch
            epoch_means = {name: sums[name] / sums["batches"] if sums["batches"] else math.nan for name in LOSS_TERMS}
            if world.is_main:
                log.write({"kind": "epoch", "step": step, "epoch": epoch, **epoch_means, "lr": optimizer.param_groups[0]["lr"], "samples_per_s": seen_items / (time.perf_counter() - started), **scaler_record()})
            improved = False
            if validation is not None and world.is_main:
                scores = validation.score(model, device)
                log.write({"kind": "val", "step": step, "epoch": epoch, **scores})
                improved = validation.better(scores, best_val)
                best_val = scores if improved else best_val
            epoch, batch_in_epoch, sums = epoch + 1, 0, new_epoch_sums()
            checkpoint(best=improved)
    if world.is_main:
        try:
            plot_loss_curves(log.path, out / "loss_curves.png")
        except (ValueError, FileNotFoundError) as error:
            print(f"loss curves not drawn: {one_line(error)}")
    return epoch_means


def _start_text(start: dict[str, Any] | None) -> str:
    """An encoder's `started_from` record in words."""
    if not start or start.get("weights") == "random":
        return "random weights" if start else "an unrecorded start"
    unused = f"; unused: {', '.join(start['unused'])} (ImageNet's classifier: the encoder has none)" if start["unused"] else ""
    return f"{start['weights']} ({start['tensors']} tensors, sha256 {start['sha256'][:12]}{unused})"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m jsa_fast.train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="data set root (docs/api.md layout); default: the synthetic world, or on --resume the run's own")
    parser.add_argument("--out", default="runs/default", help="output folder (last.pt, metrics.jsonl, loss_curves.png)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt, with its configuration (flags given override it)")
    parser.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run (its last.pt, metrics.jsonl and loss_curves.png are deleted)")
    parser.add_argument(
        "--allow-changes", action="store_true",
        help="with --resume: continue although --data holds other training items or flags change the configuration",
    )  # fmt: skip
    parser.add_argument("--on-bad-file", choices=("fail", "skip"), default="fail")
    parser.add_argument("--loader", choices=("torch", "dali", "auto"), default="auto", help="auto: DALI on CUDA when installed")
    add_config_arguments(parser)
    return parser


@command("jsa_fast.train")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.allow_changes and not args.resume:
        raise UsageError("--allow-changes only applies to --resume")
    out = Path(args.out)
    check_out_folder(out, args.resume, args.overwrite)
    default_preset = "tiny" if args.data is None else "paper"
    if args.resume:
        cfg, data = resumed_run(out, args, default_preset)
    else:
        cfg, data = config_from_args(args, default_preset), args.data
    device = resolve_device(args.device)
    with process_group(device) as world:
        means = train(
            cfg, data, out, world.local_device(device), args.resume, args.on_bad_file, world, args.loader,
            overwrite=args.overwrite, allow_changes=args.allow_changes,
        )  # fmt: skip
    if world.is_main and means:
        print("last epoch: " + ", ".join(f"{name} {value:.4f}" for name, value in means.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
