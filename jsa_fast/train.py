"""Train JSA: `python -m jsa_fast.train [--data ROOT] [--out runs/NAME] [--preset tiny|paper] ...`.

With no --data the bundled synthetic world is built once in a cache folder and the `tiny`
preset is trained on it. Writes OUT/last.pt (atomically, every epoch and on Ctrl-C),
OUT/metrics.jsonl (a line per logged step and per epoch) and OUT/loss_curves.png; with a
validation split (--val FILE or --val-fraction F, see `jsa_fast.evaluation.Validation`)
OUT/best.pt, the epoch that scored best there (the test split is never used to select).
`--resume` continues exactly where OUT/last.pt stopped, mid-epoch included, with its
configuration (flags given must not change it, nor --data its training items, unless
--allow-changes); an --out that holds a run is otherwise refused unless --overwrite.
A non-finite loss or model stops the run before it overwrites last.pt.

Several GPUs (or CPU processes): `torchrun --nproc-per-node N -m jsa_fast.train ...` runs
DDP (`jsa_fast.distributed`). --batch-size is the global batch; each process takes its
B / N slice of every batch of `jsa_fast.data.datasets.epoch_batches`, and rank 0 alone writes the outputs, so a
run can be resumed with another process count.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from jsa_fast.checkpoint import (
    load_checkpoint,
    non_finite_tensors,
    remove_stale_temporaries,
    save_checkpoint,
    trained_model,
)
from jsa_fast.cli import ArgumentParser, command, one_line
from jsa_fast.config import (
    PRETRAINED_HINT,
    RunConfig,
    add_config_arguments,
    config_from_args,
    released_epochs,
    saved_config,
)
from jsa_fast.data.dali import DALILoader, make_dali_loader, resolve_loader
from jsa_fast.data.datasets import AudioVisualDataset, EpochSeededDataset, FullDecode, epoch_batches, make_loader
from jsa_fast.data.synth import default_cache_dir
from jsa_fast.distributed import World, convert_batchnorm, gather_with_grad, process_group, wrap_ddp
from jsa_fast.errors import DataError, Interrupted, RunError, UsageError
from jsa_fast.evaluation import Validation
from jsa_fast.losses import jsa_loss
from jsa_fast.model import JSAModel, ModelConfig
from jsa_fast.runtime import (
    DeferredInterrupt,
    MetricsLog,
    autocast_context,
    memory_format,
    output_lock,
    resolve_data_root,
    resolve_device,
    restore_rng_state,
    rng_state,
)
from jsa_fast.seeds import SeedDomain, derived_seed
from jsa_fast.viz import plot_loss_curves

__all__ = [
    "main",
    "train",
    "TrainState",
    "TrainRun",
    "token_masks",
    "build_optimizer",
    "loss_function",
    "train_step",
]

LOSS_TERMS = ("loss", "loss_ctr", "loss_match", "loss_div", "loss_recon")
# What may differ between a run and its --resume without changing the result (compile:
# beyond floating-point rounding). The process count is not in the config at all.
RESUMABLE_CHANGES = frozenset({"epochs", "num_workers", "log_every", "compile"})
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "loss_curves.png")  # what a run writes to OUT


def token_masks(cfg: ModelConfig, batch: int, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """JSA's training masks for the global batch of optimiser step `step` (docs/model.md: each
    token replaced with probability mask_prob): B x Lv and B x La bool, on the CPU.

    A function of (seed, step) alone, like the data: the same for any process count (each
    process takes its rows), on a resume, and with or without torch.compile.
    """
    generator = torch.Generator().manual_seed(derived_seed(SeedDomain.TOKEN_MASKS, seed, step))
    grid_h, grid_w = cfg.image_grid
    mask_img = torch.rand(batch, grid_h * grid_w, generator=generator) < cfg.mask_prob
    mask_aud = torch.rand(batch, cfg.audio_tokens, generator=generator) < cfg.mask_prob
    return mask_img, mask_aud


def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW of the config; the fused single-kernel implementation on CUDA."""
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda"
    )


def loss_function(module: nn.Module, cfg: RunConfig, **loss_options: Any) -> Callable[..., dict[str, Tensor]]:
    """(image B x 3 x H x W, spec B x 1 x F x T, mask_img B x Lv, mask_aud B x La) -> the
    `jsa_loss` terms of `module`'s output, torch.compile'd as one graph in cfg.optim.compile's
    mode ("reduce-overhead" also captures it in CUDA graphs) unless that is "none".

    module: the JSAModel, or its DDP wrapper; loss_options: keyword arguments of jsa_loss
    (`gather` under several processes, `false_negative_mask` for benchmarks).
    """
    loss_cfg = cfg.loss

    def forward_loss(image: Tensor, spec: Tensor, mask_img: Tensor, mask_aud: Tensor) -> dict[str, Tensor]:
        return jsa_loss(module(image, spec, mask_img, mask_aud), loss_cfg, **loss_options)

    return forward_loss if cfg.optim.compile == "none" else torch.compile(forward_loss, mode=cfg.optim.compile)


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


def new_epoch_sums() -> dict[str, float]:
    """Running sums of an epoch's loss terms, and the number of batches trained."""
    return {"batches": 0, **dict.fromkeys(LOSS_TERMS, 0.0)}


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


def resumed_run(
    out: Path, args: argparse.Namespace, default_preset: str
) -> tuple[RunConfig, str | None, dict[str, Any]]:
    """What --resume continues: OUT/last.pt's configuration with the flags given (and
    --preset, when given) applied over it, its --data unless one is given, and last.pt's
    state. `train` refuses a configuration or data set that changes the run unless
    --allow-changes."""
    checkpoint_path = out / "last.pt"
    state = load_checkpoint(checkpoint_path)
    saved = saved_config(state["config"], str(checkpoint_path))
    data = args.data if args.data is not None else state.get("data")
    return config_from_args(args, default_preset, saved=saved), data, state


def _config_changes(saved: RunConfig, cfg: RunConfig) -> list[str]:
    before, now = saved.settings(), cfg.settings()
    return [
        f"--{name.replace('_', '-')} {before[name]!r} then, {now[name]!r} now"
        for name in before
        if name not in RESUMABLE_CHANGES and before[name] != now[name]
    ]


def _refuse_changes(checkpoint_path: Path, changes: list[str]) -> None:
    if changes:
        raise UsageError(
            f"--resume: {checkpoint_path} was trained otherwise: {'; '.join(changes)}; "
            "drop those flags or that --data (the checkpoint's are used), or pass --allow-changes"
        )


class BatchLoss:
    """The loss function of a run's batches (`loss_function`), one per k-reciprocal k: a
    batch that skipped bad files may hold fewer than k items, and takes k clamped to it."""

    def __init__(self, module: nn.Module, cfg: RunConfig, world: World) -> None:
        self.module, self.cfg, self.world = module, cfg, world
        self.options = {"gather": gather_with_grad} if world.size > 1 else {}
        self.by_k = {cfg.loss.k: loss_function(module, cfg, **self.options)}

    def __call__(self, global_batch: int) -> Callable[..., dict[str, Tensor]]:
        k = min(self.cfg.loss.k, global_batch)
        if k not in self.by_k:
            if self.world.is_main and len(self.by_k) == 1:
                tqdm.write(
                    f"a batch of {global_batch} items (bad files skipped): k-reciprocal k {self.cfg.loss.k} -> {k} for such batches",
                    file=sys.stderr,
                )
            cfg = dataclasses.replace(self.cfg, loss=dataclasses.replace(self.cfg.loss, k=k))
            self.by_k[k] = loss_function(self.module, cfg, **self.options)
        return self.by_k[k]


@dataclass
class TrainState:
    """What changes as a run trains, and what last.pt keeps of it (with the RNG state).

    epoch, batch_in_epoch: where the next batch is (batches skipped for bad files
    included); step: optimiser steps taken; sums: the epoch's trained batches and loss
    sums (`new_epoch_sums`); best_val: the validation scores of best.pt; encoder_start:
    what the encoders started from (pretrained file and its SHA-256, or random);
    saved_step: the (step, epochs done) last.pt holds, None while none was written.
    """

    model: JSAModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    encoder_start: dict[str, Any]
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    sums: dict[str, float] = field(default_factory=new_epoch_sums)
    skipped_steps: int = 0
    best_val: dict[str, float] | None = None
    saved_step: tuple[int, int] | None = None

    def load(self, saved: dict[str, Any], checkpoint_path: Path, cfg: RunConfig) -> None:
        """Continue from the checkpoint `saved` (read from `checkpoint_path`, whose weights
        the model holds already: `trained_model`) with `cfg`'s learning rate and weight
        decay; the process RNG is set to the saved one."""
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError) as error:
            raise UsageError(
                f"--resume: {checkpoint_path} does not fit the configuration now: {one_line(error)}"
            ) from None
        for group in self.optimizer.param_groups:  # the saved ones, unless --allow-changes changed them
            group.update(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.scaler.load_state_dict(saved["scaler"])
        self.epoch, self.batch_in_epoch, self.step = saved["epoch"], saved["batch_in_epoch"], saved["step"]
        self.sums = saved["epoch_sums"]
        self.skipped_steps = saved.get("skipped_steps", 0)
        self.best_val = saved.get("best_val")
        self.saved_step = (self.step, self.epoch)
        restore_rng_state(saved["rng"])

    def scaler_record(self) -> dict[str, float]:
        """What a metrics line adds under fp16: the loss scale and the steps skipped so far."""
        return (
            {"grad_scale": self.scaler.get_scale(), "skipped_steps": self.skipped_steps}
            if self.scaler.is_enabled()
            else {}
        )


@dataclass
class TrainRun:
    """What stays fixed while a run trains: its configuration, places and data, the model
    as the steps run it (DDP-wrapped under several processes) and its loss."""

    cfg: RunConfig
    data: str | None  # --data as given (None: the synthetic world), kept in checkpoints
    out: Path
    device: torch.device
    world: World
    data_root: Path
    dataset: EpochSeededDataset
    fingerprint: dict[str, Any]
    epochs: int
    local_batch: int
    dali: DALILoader | None
    validation: Validation | None
    skips_bad_files: bool  # --on-bad-file skip
    log: MetricsLog
    layout: torch.memory_format
    step_module: nn.Module
    loss_for: BatchLoss

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "last.pt"

    def stopped(self, state: TrainState, reason: str) -> RunError:
        """The error that stops the run without saving, saying what last.pt still holds."""
        path = self.checkpoint_path
        kept = (
            f"{path} is unchanged (step {state.saved_step[0]}, {state.saved_step[1]} epoch(s) done)"
            if state.saved_step
            else f"no {path.name} was written"
        )
        return RunError(f"{reason}; stopped without saving: {kept}")

    def log_progress(self, kind: str, state: TrainState, losses: dict[str, float], samples_per_s: float) -> None:
        """A metrics line (rank 0) of `kind` ("step": that step's loss terms; "epoch": the
        epoch's means) at `state`'s step, with the learning rate, the throughput and, under
        fp16, the loss scale."""
        if self.world.is_main:
            self.log.write(
                {
                    "kind": kind,
                    "step": state.step,
                    "epoch": state.epoch,
                    **losses,
                    "lr": state.optimizer.param_groups[0]["lr"],
                    "samples_per_s": samples_per_s,
                    **state.scaler_record(),
                }
            )

    def interrupted(self, interrupt: DeferredInterrupt) -> Interrupted:
        """The error that ends a run stopped by a signal once its state is saved, said once."""
        if self.world.is_main:
            print(f"interrupted: state saved to {self.checkpoint_path}; continue with --resume", file=sys.stderr)
        return interrupt.interrupted()

    def stopped_at_step(self, state: TrainState, step: int, item_ids: list[str], what: str) -> RunError:
        return self.stopped(
            state,
            f"step {step} (epoch {state.epoch + 1}) on the batch of items {', '.join(item_ids)}: {what}; "
            f"lower --lr (now {self.cfg.optim.lr:g}) or check those items",
        )


def start_run(
    cfg: RunConfig,
    data: str | None,
    out: Path,
    device: torch.device,
    resume: bool,
    on_bad_file: str,
    world: World,
    loader: str,
    overwrite: bool,
    allow_changes: bool,
    saved: dict[str, Any] | None = None,
) -> tuple[TrainRun, TrainState]:
    """Check the run's flags, folder and data, build its data set, model and optimiser,
    and continue OUT/last.pt's state when `resume` (`saved`: that state when the caller
    has read it already; see `train`)."""
    optim = cfg.optim
    if optim.batch_size % world.size:
        raise UsageError(
            f"--batch-size {optim.batch_size} (the global batch) is not divisible by the {world.size} processes"
        )
    check_out_folder(out, resume, overwrite)
    if optim.compile == "reduce-overhead" and device.type != "cuda":
        raise UsageError(
            f"--compile reduce-overhead captures CUDA graphs: it needs a CUDA device, got {device.type}; use --compile default"
        )
    if optim.pretrained_image is None:
        raise UsageError(PRETRAINED_HINT)
    checkpoint_path = out / "last.pt"
    if not resume:
        saved = None
    elif saved is None:
        saved = load_checkpoint(checkpoint_path)
    if saved and not allow_changes:
        _refuse_changes(checkpoint_path, _config_changes(saved_config(saved["config"], str(checkpoint_path)), cfg))
    builds_data = world.local_rank == 0  # one synthetic-world build per node; the others wait
    if not builds_data:
        world.barrier()
    data_root = resolve_data_root(data, cfg.synth)
    if builds_data:
        world.barrier()
    torch.manual_seed(derived_seed(SeedDomain.MODEL_INIT, optim.seed))
    random.seed(derived_seed(SeedDomain.MODEL_INIT, optim.seed))

    validation = None
    if optim.val is not None or optim.val_fraction > 0:
        validation = Validation(cfg, data_root, on_bad_file)
    train_ids = validation.train_ids if validation is not None else None
    # Every file decoded once before the first step (a bad one is named now, not hours
    # in); one process per node decodes, the others then find its result cached.
    full_decode = FullDecode(optim.num_workers, default_cache_dir() / "decoded", progress=world.is_main)
    if not builds_data:
        world.barrier()
    dataset = AudioVisualDataset(
        data_root, "train", cfg.data.image, cfg.data.audio, on_bad_file, subset=train_ids, full_decode=full_decode
    )
    if builds_data:
        world.barrier()
    fingerprint = data_fingerprint(dataset.ids)
    if saved and not allow_changes and saved.get("data_fingerprint") not in (None, fingerprint):
        saved_items = saved["data_fingerprint"]["items"]
        _refuse_changes(
            checkpoint_path,
            [f"the training items of {data_root} ({fingerprint['items']} now, {saved_items} then, other ids)"],
        )
    if len(dataset) < optim.batch_size:
        raise UsageError(
            f"--batch-size {optim.batch_size} exceeds the {len(dataset)} usable training items of {data_root}"
        )
    local_batch = optim.batch_size // world.size
    dali = None
    if resolve_loader(loader, device) == "dali":
        # this process's shard: its own augmentation stream (the batches are planned here)
        dali = make_dali_loader(
            dataset, local_batch, shuffle=False, seed=optim.seed, shard_id=world.rank, num_shards=world.size,
            device=device, drop_last=True,
        )  # fmt: skip
    model = trained_model(saved, cfg, checkpoint_path) if saved else JSAModel(cfg.starting_model())
    encoder_start = saved.get("encoder_start", {}) if saved else {
        "image": model.image_encoder.started_from, "audio": model.audio_encoder.started_from,
    }  # fmt: skip
    if world.size > 1:
        convert_batchnorm(model)
    layout = memory_format(device)
    model.to(device, memory_format=layout)
    optimizer = build_optimizer(model, cfg, device)
    # fp16 steps whose loss or gradients are not finite are skipped by the scaler (and counted)
    scaler = torch.amp.GradScaler(device.type, enabled=optim.amp == "fp16")
    state = TrainState(model, optimizer, scaler, encoder_start)
    if saved:
        state.load(saved, checkpoint_path, cfg)
    log = MetricsLog(out / "metrics.jsonl")
    epochs = optim.epochs or released_epochs(len(dataset))
    if world.is_main:
        if overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(checkpoint_path)
        dropped = log.keep_until(state.step, state.epoch) if resume else 0
        print(f"training on {data_root} ({device}, {world.size} process(es)); writing {out}")
        print(f"{epochs} epoch(s){'' if optim.epochs else f' (by the {len(dataset)} training items, as released; --epochs N to choose)'}; "
              f"{cfg.data.image.augment} augmentation; {'fp32' if optim.amp == 'none' else optim.amp}; image encoder from {_start_text(encoder_start.get('image'))}")  # fmt: skip
        if dropped:
            print(
                f"{log.path}: dropped {dropped} line(s) logged after {checkpoint_path.name}'s step {state.step}; they are trained again"
            )
    # Loaded before DDP wraps the model (DDP starts every rank from rank 0's state).
    step_module = wrap_ddp(model, world, device)
    run = TrainRun(
        cfg=cfg, data=data, out=out, device=device, world=world, data_root=data_root,
        dataset=EpochSeededDataset(dataset, optim.seed), fingerprint=fingerprint, epochs=epochs,
        local_batch=local_batch, dali=dali, validation=validation, skips_bad_files=on_bad_file == "skip", log=log, layout=layout,
        step_module=step_module, loss_for=BatchLoss(step_module, cfg, world),
    )  # fmt: skip
    return run, state


def save_state(run: TrainRun, state: TrainState, best: bool = False) -> None:
    """Save last.pt (rank 0), and the same state as best.pt when `best`; RunError, and
    nothing written, when the model holds non-finite values."""
    if not run.world.is_main:
        return
    broken = non_finite_tensors(state.model.state_dict())
    if broken:
        raise run.stopped(
            state,
            f"after step {state.step} the model holds non-finite values ({len(broken)} tensors, e.g. {broken[0]}); lower --lr (now {run.cfg.optim.lr:g})",
        )
    saved = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "step": state.step,
        "epoch_sums": state.sums,
        "rng": rng_state(),
        "config": run.cfg.to_dict(),
        "data": run.data,
        "data_fingerprint": run.fingerprint,
        "best_val": state.best_val,
        "encoder_start": state.encoder_start,
        "skipped_steps": state.skipped_steps,
    }
    save_checkpoint(saved, run.checkpoint_path)
    if best:
        save_checkpoint(saved, run.out / "best.pt")
    state.saved_step = (state.step, state.epoch)


def epoch_loader(run: TrainRun, state: TrainState) -> tuple[Iterable[dict[str, Any] | None], int]:
    """The batches of `state.epoch` from `state.batch_in_epoch` on, this process's share of
    each (`epoch_batches`), loaded by DALI or a DataLoader (`make_loader`); and how many
    there are."""
    optim, world = run.cfg.optim, run.world
    run.dataset.epoch = state.epoch
    plan = dict(start=state.batch_in_epoch, shard=world.rank, num_shards=world.size)
    if run.dali is not None:
        batches = epoch_batches(len(run.dataset), optim.batch_size, optim.seed, state.epoch, **plan)
        return run.dali.iterate(batches), len(batches)
    loader = make_loader(
        run.dataset, optim.batch_size, True, optim.num_workers, optim.seed, True, epoch=state.epoch, **plan
    )
    return loader, len(loader)


class StepTally:
    """An epoch's loss sums, trained and skipped steps and first non-finite step, kept on
    the device so that a step needs no host sync (`add`); `read` brings them to the host
    at a log point, the epoch's end or an interrupt, over all processes at once.

    Keeps the ids of the batches since the last read, so that the first step whose loss
    was not finite can be named with its items after the fact. Sums are float64, as the
    host's running sums were: the epoch means are those of adding each step's float32
    terms in float64 in order.
    """

    NO_STEP = torch.iinfo(torch.int64).max  # first_bad_step while every loss was finite (the min's identity)

    def __init__(self, state: TrainState, device: torch.device) -> None:
        self.state, self.device = state, device
        self.sums = torch.tensor([state.sums[name] for name in LOSS_TERMS], dtype=torch.float64, device=device)
        self.batches = torch.tensor(state.sums["batches"], dtype=torch.int64, device=device)
        self.skipped = torch.tensor(state.skipped_steps, dtype=torch.int64, device=device)
        self.first_bad_step = torch.tensor(self.NO_STEP, dtype=torch.int64, device=device)
        self.first_bad_terms = torch.zeros(len(LOSS_TERMS), device=device)
        self.last_terms = torch.full((len(LOSS_TERMS),), math.nan, device=device)
        self.no_scaler = torch.zeros((), dtype=torch.bool, device=device)  # never skipped without one
        self.batch_ids: dict[int, list[str]] = {}

    def scale(self) -> Tensor | None:
        """The fp16 loss scale as a device tensor (the public get_scale() reads it back to
        the host); None without a scaler."""
        scaler = self.state.scaler
        if not scaler.is_enabled():
            return None
        if scaler._scale is None:  # set by the first scale()
            return torch.tensor(scaler.get_scale(), dtype=torch.float32, device=self.device)
        return scaler._scale.detach().clone()

    def add(self, step: int, ids: list[str], terms: dict[str, Tensor], scale_before: Tensor | None) -> None:
        """Count step `step` (on the batch of items `ids`) from its loss terms: summed when
        finite and not skipped by the fp16 scaler (which lowers its scale exactly when it
        skips), else counted as skipped or kept as the first non-finite step."""
        values = torch.stack([terms[name].detach().float() for name in LOSS_TERMS])
        finite = torch.isfinite(values).all()
        skipped = self.scale() < scale_before if scale_before is not None else self.no_scaler
        counted = finite & ~skipped
        self.sums += torch.where(counted, values.double(), 0.0)
        self.batches += counted
        self.skipped += skipped
        newly_bad = ~finite & ~skipped & (self.first_bad_step == self.NO_STEP)
        self.first_bad_step = torch.where(newly_bad, step, self.first_bad_step)
        self.first_bad_terms = torch.where(newly_bad, values, self.first_bad_terms)
        self.last_terms = values
        self.batch_ids[step] = ids

    def read(self, run: TrainRun) -> dict[str, float]:
        """Bring the tally to the host (mean over processes; one all-reduce) into
        `state.sums` and `state.skipped_steps`, and return the last step's terms; RunError
        naming the first step whose loss was not finite, or when fp16 steps keep
        overflowing. What was read is what a checkpoint may then save."""
        world, state = run.world, self.state
        packed = torch.cat([self.sums, self.last_terms.double()])
        counts = torch.stack([self.batches, self.skipped])
        packed, counts, first_bad = world.mean(packed), world.mean(counts.double()), world.min(self.first_bad_step)
        host = packed.tolist()
        batches, skipped = (round(count) for count in counts.tolist())
        first_bad = int(first_bad)
        n = len(LOSS_TERMS)
        state.sums = {"batches": batches, **dict(zip(LOSS_TERMS, host[:n]))}
        state.skipped_steps = skipped
        if first_bad != self.NO_STEP:
            # That step's terms, averaged over the processes whose first bad step it is
            # (every process takes this branch: the minimum is the same everywhere).
            mine = (self.first_bad_step == first_bad).double()
            terms = world.sum(torch.cat([self.first_bad_terms.double() * mine, mine[None]])).tolist()
            shown = ", ".join(f"{name} {value / terms[-1]:.4g}" for name, value in zip(LOSS_TERMS, terms[:-1]))
            raise run.stopped_at_step(state, first_bad, self.batch_ids[first_bad], f"the loss is not finite ({shown})")
        if state.scaler.is_enabled() and state.scaler.get_scale() < 1:
            raise run.stopped_at_step(
                state,
                state.step,
                self.batch_ids.get(state.step, []),
                f"fp16 steps keep overflowing ({skipped} skipped, loss scale now {state.scaler.get_scale():g}); try --amp bf16",
            )
        self.batch_ids.clear()
        return dict(zip(LOSS_TERMS, host[n : 2 * n]))


def train_epoch(run: TrainRun, state: TrainState, interrupt: DeferredInterrupt) -> dict[str, float]:
    """Train the rest of `state.epoch`, log it, score it on the validation split and save
    the state (best.pt too when it scored best); returns its mean loss terms.

    Between log points a step makes no host sync and no collective of its own (`StepTally`):
    the loss terms are read every --log-every steps, at an interrupt and at the epoch's end.
    """
    cfg, world, device = run.cfg, run.world, run.device
    batch_iterator, total = epoch_loader(run, state)
    tally = StepTally(state, device)
    seen_items, started = 0, time.perf_counter()
    progress = tqdm(
        batch_iterator,
        total=total,
        desc=f"epoch {state.epoch + 1}/{run.epochs}",
        dynamic_ncols=True,
        disable=None if world.is_main else True,
    )
    try:
        for batch in progress:
            state.batch_in_epoch += 1  # the position a --resume continues from, skipped batches included
            # None: every item was a skipped bad file. Several processes must also skip a
            # batch that one of them could not load in full (the gathers need equal shards).
            # Only a run that skips bad files meets such batches, so only it pays for the
            # agreement (a collective per batch under several processes).
            complete = batch is not None and (world.size == 1 or batch["image"].shape[0] == run.local_batch)
            if world.any(not complete) if run.skips_bad_files else not complete:
                continue
            global_batch = batch["image"].shape[0] * world.size
            masks = (world.shard(mask) for mask in token_masks(cfg.model, global_batch, cfg.optim.seed, state.step))
            inputs = (
                batch["image"].to(device, non_blocking=True, memory_format=run.layout),
                batch["spec"].to(device, non_blocking=True, memory_format=run.layout),
                *(mask.to(device, non_blocking=True) for mask in masks),
            )
            state.step += 1
            scale_before = tally.scale()
            try:
                terms = train_step(
                    run.loss_for(global_batch), state.optimizer, state.scaler, inputs, device, cfg.optim.amp
                )
            except ValueError as error:  # e.g. the k-reciprocal op refusing non-finite embeddings
                tally.read(run)  # an earlier step's non-finite loss is named first
                raise run.stopped_at_step(state, state.step, batch["id"], one_line(error)) from error
            tally.add(state.step, batch["id"], terms, scale_before)
            seen_items += global_batch
            at_read = state.step % cfg.optim.log_every == 0
            if at_read:
                values = tally.read(run)
                throughput = seen_items / (time.perf_counter() - started)
                progress.set_postfix(
                    {name.removeprefix("loss_"): f"{v:.3g}" for name, v in values.items()}
                    | {"samples/s": f"{throughput:.1f}"}
                )
                run.log_progress("step", state, values, throughput)
            # A flag of this process: free to look at every step; several processes agree
            # (a collective) only where they read the tally anyway, and stop after the same step.
            if interrupt.requested if world.size == 1 else (at_read and world.any(interrupt.requested)):
                tally.read(run)
                save_state(run, state)
                raise run.interrupted(interrupt)
        tally.read(run)
    finally:
        progress.close()
    sums = state.sums
    if sums["batches"] == 0 and not seen_items:
        raise DataError(
            f"epoch {state.epoch + 1}: no batch could be loaded from {run.data_root} (every item was skipped)"
        )
    # NaN (null in metrics.jsonl) when the scaler skipped every step of the epoch
    epoch_means = {name: sums[name] / sums["batches"] if sums["batches"] else math.nan for name in LOSS_TERMS}
    run.log_progress("epoch", state, epoch_means, seen_items / (time.perf_counter() - started))
    improved = False
    if run.validation is not None and world.is_main:
        scores = run.validation.score(state.model, device)
        run.log.write({"kind": "val", "step": state.step, "epoch": state.epoch, **scores})
        improved = run.validation.better(scores, state.best_val)
        state.best_val = scores if improved else state.best_val
    state.epoch, state.batch_in_epoch, state.sums = state.epoch + 1, 0, new_epoch_sums()
    save_state(run, state, best=improved)
    return epoch_means


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
    saved: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train `cfg` on the train split of `data` (a root folder, or None for the synthetic
    world) as process `world.rank` of `world.size` (each on its B / N slice of every
    global batch); returns the last epoch's mean loss terms (over the global batch).

    loader: "torch" (exact --resume), "dali" (decoding on the GPU; its random crops come
    from DALI's generator, so a resume is not bit-exact) or "auto" (`resolve_loader`).
    An `out` that holds a run is refused unless `resume` (continue it; a configuration or
    training set other than its own is refused unless `allow_changes`; `saved`: last.pt's
    state when already read) or `overwrite`
    (start over). Training stops with RunError at a non-finite loss or model, before
    anything overwrites the last checkpoint.

    The steps: `start_run` (checks, data, model and optimiser, or last.pt's state on a
    resume), then per epoch `train_epoch` (the batches of `epoch_loader`, validation,
    `save_state`)."""
    run, state = start_run(
        cfg, data, out, device, resume, on_bad_file, world, loader, overwrite, allow_changes, saved
    )  # fmt: skip
    epoch_means: dict[str, float] = {}
    if state.epoch >= run.epochs and world.is_main:
        print(f"{run.checkpoint_path} has trained {state.epoch} epoch(s), --epochs is {run.epochs}: nothing to train")
    state.model.train()
    with DeferredInterrupt() as interrupt:
        while state.epoch < run.epochs:
            epoch_means = train_epoch(run, state, interrupt)
            # A signal after the epoch's last check (its end, validation, the save): the
            # state is saved already; every process stops here (one agreement per epoch).
            if world.any(interrupt.requested):
                raise run.interrupted(interrupt)
    if world.is_main:
        try:
            plot_loss_curves(run.log.path, out / "loss_curves.png")
        except (ValueError, FileNotFoundError) as error:
            print(f"loss curves not drawn: {one_line(error)}")
    return epoch_means


def _start_text(start: dict[str, Any] | None) -> str:
    """An encoder's `started_from` record in words."""
    if not start or start.get("weights") == "random":
        return "random weights" if start else "an unrecorded start"
    unused = (
        f"; unused: {', '.join(start['unused'])} (ImageNet's classifier: the encoder has none)"
        if start["unused"]
        else ""
    )
    return f"{start['weights']} ({start['tensors']} tensors, sha256 {start['sha256'][:12]}{unused})"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m jsa_fast.train", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default=None,
        help="data set root (docs/api.md layout); default: the synthetic world, or on --resume the run's own",
    )
    parser.add_argument("--out", default="runs/default", help="output folder (last.pt, metrics.jsonl, loss_curves.png)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last.pt, with its configuration (flags given override it)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out that holds a run (its last.pt, metrics.jsonl and loss_curves.png are deleted)",
    )
    parser.add_argument(
        "--allow-changes", action="store_true",
        help="with --resume: continue although --data holds other training items or flags change the configuration",
    )  # fmt: skip
    parser.add_argument("--on-bad-file", choices=("fail", "skip"), default="fail")
    parser.add_argument(
        "--loader", choices=("torch", "dali", "auto"), default="auto", help="auto: DALI on CUDA when installed"
    )
    add_config_arguments(parser)
    return parser


@command("jsa_fast.train")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.allow_changes and not args.resume:
        raise UsageError("--allow-changes only applies to --resume")
    out = Path(args.out)
    # One run per --out: the first process of a torchrun job holds it for all of them.
    with output_lock(out) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
        return _train_main(args, out)


def _train_main(args: argparse.Namespace, out: Path) -> int:
    check_out_folder(out, args.resume, args.overwrite)
    default_preset = "tiny" if args.data is None else "paper"
    saved = None
    if args.resume:
        cfg, data, saved = resumed_run(out, args, default_preset)
    else:
        cfg, data = config_from_args(args, default_preset), args.data
    device = resolve_device(args.device)
    with process_group(device) as world:
        means = train(
            cfg, data, out, world.local_device(device), args.resume, args.on_bad_file, world, args.loader,
            overwrite=args.overwrite, allow_changes=args.allow_changes, saved=saved,
        )  # fmt: skip
    if world.is_main and means:
        print("last epoch: " + ", ".join(f"{name} {value:.4f}" for name, value in means.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
