"""One training step (forward, all losses, backward, AdamW) of the full model, per variant:

- eager reference: JSA's PyTorch path, the reference k-reciprocal mask (unchecked, as
  training calls the mask), no compile;
- compiled reference: the same under torch.compile;
- compiled fused: JSA backend "auto" (fused kernels on CUDA) and `jsa_fast.ops`'s
  k-reciprocal mask (the extension's kernel for the device), under torch.compile.

Each on the preset's architecture with its autocast (--amp: fp16 with a GradScaler for the
paper preset), and fused AdamW and channels-last on CUDA, exactly as `jsa_fast.train` runs
a step. Reports the median step time, samples/s and peak memory, and JSA's share of the
step: the variant's JSA module alone (compiled when the variant is), forward and backward
on the step's token shapes, dtype and masks, timed the same way, over the step time. Writes JSON through bench/common.py.

    python bench/train_step.py [--preset paper] [--batch-size 256] [--steps 20] [--device cuda]
    python bench/train_step.py --device cpu --preset tiny --batch-size 8 --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time_ms, peak_memory_mib, print_table, write_results  # noqa: E402

from jsa_fast import reference  # noqa: E402
from jsa_fast.config import PRESETS, RunConfig  # noqa: E402
from jsa_fast.model import JSAModel  # noqa: E402
from jsa_fast.runtime import autocast_context, memory_format  # noqa: E402
from jsa_fast.train import build_optimizer, loss_function, token_masks, train_step  # noqa: E402


def reference_mask(z_img: torch.Tensor, z_aud: torch.Tensor, k: int) -> torch.Tensor:
    """The reference k-reciprocal mask as training calls the mask: without the finiteness
    check (a host read; the loss reveals a non-finite row)."""
    return reference.mutual_neighbour_mask(z_img, z_aud, k, check_finite=False)


VARIANTS: dict[str, dict[str, Any]] = {
    "eager reference": dict(backend="torch", compile="none", false_negative_mask=reference_mask),
    "compiled reference": dict(backend="torch", compile="default", false_negative_mask=reference_mask),
    "compiled fused": dict(backend="auto", compile="default", false_negative_mask=None),
}

COLUMNS = ["variant", "step_ms", "samples_per_s", "peak_mib", "jsa_ms", "jsa_share"]


def bench_variant(
    cfg: RunConfig, device: torch.device, steps: int, warmup: int, options: dict[str, Any]
) -> dict[str, Any]:
    cfg = cfg.overridden(backend=options["backend"], compile=options["compile"])
    torch.manual_seed(cfg.optim.seed)
    layout = memory_format(device)
    model = JSAModel(cfg.model).to(device, memory_format=layout).train()
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.optim.amp == "fp16")
    loss_options = (
        {} if options["false_negative_mask"] is None else {"false_negative_mask": options["false_negative_mask"]}
    )
    loss_fn = loss_function(model, cfg, **loss_options)
    model_cfg = cfg.model
    batch = cfg.optim.batch_size
    inputs = (
        torch.randn(batch, 3, model_cfg.image_size, model_cfg.image_size, device=device).to(memory_format=layout),
        torch.randn(batch, 1, model_cfg.spec_bins, model_cfg.spec_frames, device=device).to(memory_format=layout),
        *(mask.to(device) for mask in token_masks(model_cfg, batch, cfg.optim.seed, 0)),
    )

    def step() -> None:
        train_step(loss_fn, optimizer, scaler, inputs, device, cfg.optim.amp)

    ms = median_time_ms(step, device, warmup=warmup, repeats=steps)
    result = {"step_ms": ms, "samples_per_s": batch / (ms / 1e3), "peak_mib": peak_memory_mib(step, device)}
    jsa_ms = time_jsa(model, cfg, device, inputs, steps, warmup, options["compile"] != "none")
    return result | {"jsa_ms": jsa_ms, "jsa_share": jsa_ms / ms}


def time_jsa(
    model: JSAModel, cfg: RunConfig, device: torch.device, inputs: tuple, steps: int, warmup: int, compile: bool
) -> float:
    """Median ms of the model's JSA module alone, forward and backward through every output,
    on the encoders' tokens for `inputs` (as the step feeds it: autocast, masks)."""
    image, spec, mask_img, mask_aud = inputs
    with torch.no_grad(), autocast_context(device, cfg.optim.amp):
        tokens = [t.detach().requires_grad_() for t in model.encode(image, spec)]
    jsa = torch.compile(model.jsa, fullgraph=True) if compile else model.jsa

    def forward_backward() -> None:
        with autocast_context(device, cfg.optim.amp):
            out = jsa(*tokens, mask_img, mask_aud)
        sum(field.float().sum() for field in out).backward()

    return median_time_ms(forward_backward, device, warmup=warmup, repeats=steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's (256 for paper)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (compilation); default 3, or 1 below 3 steps"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--json", default=None, help="output path (default bench/results/train_step-<device>-<time>.json)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    device = torch.device(args.device)
    cfg = PRESETS[args.preset]
    if args.batch_size is not None:
        cfg = cfg.overridden(batch_size=args.batch_size, k=min(cfg.loss.k, args.batch_size))
    warmup = args.warmup if args.warmup is not None else (3 if args.steps >= 3 else 1)
    rows = []
    for name in args.variants:
        row = {"variant": name, **bench_variant(cfg, device, args.steps, warmup, VARIANTS[name])}
        rows.append(row)
        print_table([row], COLUMNS)
    print()
    print_table(rows, COLUMNS)
    config = {
        "preset": args.preset,
        "batch_size": cfg.optim.batch_size,
        "steps": args.steps,
        "warmup": warmup,
        "amp": cfg.optim.amp,
    }
    config |= {"image_size": cfg.data.image.size, "dim": cfg.model.dim, "spec": list(cfg.data.audio.spectrogram_shape)}
    print(f"wrote {write_results('train_step', device, config, rows, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
