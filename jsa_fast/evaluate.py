"""Evaluate a checkpoint: `python -m jsa_fast.evaluate --checkpoint OUT/last.pt [--data ROOT]
[--out DIR] [--threshold median|FLOAT] [--alpha 0.6] [--device cpu|cuda]`.

Localisation (cIoU AP50 / AUC / mean cIoU, with and without IQR, and a centre-prior
baseline scored the same way), cross-modal retrieval R@1/5/10 both ways by class, and
AVSBench mIoU / F-score when the test split has masks. Prints a table, writes
DIR/eval.json and heatmap overlays DIR/overlays/*.png for the first samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from jsa_fast.checkpoint import load_checkpoint, non_finite_tensors
from jsa_fast.cli import ArgumentParser, DataError, UsageError, bounded, command
from jsa_fast.config import saved_config
from jsa_fast.data.dali import make_dali_loader, resolve_loader
from jsa_fast.data.datasets import AudioVisualDataset, make_loader
from jsa_fast.metrics import LocalizationEvaluator, SegmentationEvaluator, centre_prior_map, cross_modal_retrieval
from jsa_fast.model import JSAModel, localization_maps
from jsa_fast.train import autocast_context, resolve_data_root, resolve_device
from jsa_fast.viz import overlay_heatmap, save_overlays

__all__ = ["main", "evaluate"]


def _threshold(text: str) -> str | float:
    if text == "median":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threshold must be 'median' or a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--threshold must lie in [0, 1], got {value}")
    return value


def evaluation_loader(
    kind: str, dataset: AudioVisualDataset, device: torch.device, batch_size: int, num_workers: int
) -> Iterable[dict[str, Any] | None]:
    """Batches of a test split in order: the PyTorch DataLoader ("torch") or DALI ("dali";
    "auto": see `resolve_loader`)."""
    if resolve_loader(kind, device, dataset.image_cfg) == "dali":
        return make_dali_loader(dataset, batch_size, shuffle=False, seed=0, device=device)
    return make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, seed=0, drop_last=False)


@torch.no_grad()
def evaluate(
    model: JSAModel,
    loader: Iterable[dict[str, Any] | None],
    image_size: int,
    device: torch.device,
    threshold: str | float = "median",
    alpha: float = 0.6,
    amp: str = "none",
    overlays: int = 16,
    out: Path | None = None,
) -> dict[str, Any]:
    """All metrics of `model` over a test loader's batches (image_size x image_size
    images); overlays of the first `overlays` samples go to out/overlays when `out` is
    given."""
    model.eval()
    loc, loc_iqr, baseline = (LocalizationEvaluator(threshold) for _ in range(3))
    segmentation = SegmentationEvaluator()
    slots_img, slots_aud, labels, pictures = [], [], [], []
    size = (image_size, image_size)
    prior = centre_prior_map(*size)
    for batch in tqdm(loader, desc="evaluate", dynamic_ncols=True, disable=None):
        if batch is None:
            continue
        image, spec = batch["image"].to(device), batch["spec"].to(device)
        with autocast_context(device, amp):
            jsa = model.jsa(*model.encode(image, spec))
        ca, iqr = (m.cpu() for m in localization_maps(jsa, size, alpha))
        for i, gt in enumerate(batch["gt"].cpu()):
            loc.update(ca[i], gt)
            loc_iqr.update(iqr[i], gt)
            baseline.update(prior, gt)
            if "mask" in batch:
                segmentation.update(ca[i], batch["mask"][i].cpu())
            if len(pictures) < overlays:
                pictures.append((batch["id"][i], overlay_heatmap(batch["image"][i].cpu(), ca[i], gt_map=gt)))
        slots_img.append(jsa.slots_img[:, 0].float().cpu())
        slots_aud.append(jsa.slots_aud[:, 0].float().cpu())
        labels.append(batch["label"].cpu())
    if not slots_img:
        raise DataError("no test sample could be loaded (every item was skipped)")

    results: dict[str, Any] = {}
    for suffix, evaluator in (("", loc), ("_iqr", loc_iqr), ("_centre_prior", baseline)):
        summary = evaluator.summary()
        results.update({f"{key}{suffix}": summary[key] for key in ("ap50", "auc", "mean_ciou")})
    results["n"] = loc.summary()["n"]
    all_labels = torch.cat(labels)
    if bool((all_labels >= 0).all()):
        results.update(cross_modal_retrieval(torch.cat(slots_img), torch.cat(slots_aud), all_labels))
    else:  # Flickr-style ground truth carries no classes
        results.update({f"r{k}_{d}": None for k in (1, 5, 10) for d in ("a2i", "i2a")})
    if "mask" in batch:
        results.update(segmentation.summary())
    results.update(threshold=threshold, alpha=alpha)
    if out is not None and pictures:
        save_overlays(pictures, out / "overlays", prefix="ca")
    return results


def format_table(results: dict[str, Any]) -> str:
    rows = [
        ("AP50 (cIoU >= 0.5)", "ap50", "ap50_iqr", "ap50_centre_prior"),
        ("AUC", "auc", "auc_iqr", "auc_centre_prior"),
        ("mean cIoU", "mean_ciou", "mean_ciou_iqr", "mean_ciou_centre_prior"),
    ]
    lines = [f"{'':22}{'ca^{a,v}':>10}{'IQR':>10}{'centre prior':>14}"]
    lines += [f"{label:22}{results[a]:>10.4f}{results[b]:>10.4f}{results[c]:>14.4f}" for label, a, b, c in rows]
    if results.get("r1_a2i") is not None:
        for direction in ("a2i", "i2a"):
            recalls = "  ".join(f"R@{k} {results[f'r{k}_{direction}']:.4f}" for k in (1, 5, 10))
            lines.append(f"retrieval {direction:12}{recalls}")
    if "miou" in results:
        lines.append(f"AVSBench mIoU {results['miou']:.4f}  F-score {results['fscore']:.4f}")
    lines.append(f"n = {results['n']}, threshold = {results['threshold']}, alpha = {results['alpha']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m jsa_fast.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a last.pt written by jsa_fast.train")
    parser.add_argument("--data", default=None, help="data set root; default: the data the checkpoint was trained on")
    parser.add_argument("--out", default=None, help="output folder (default: CHECKPOINT's folder/eval)")
    parser.add_argument("--threshold", type=_threshold, default="median", help="'median' (EZ-VSL) or a fixed value")
    parser.add_argument("--alpha", type=bounded(float, 0, 1), default=0.6, help="IQR weight on ca^{a,v} (the released code uses 0.4)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--batch-size", type=bounded(int, low=1), default=32)
    parser.add_argument("--num-workers", type=bounded(int, low=0), default=2)
    parser.add_argument("--overlays", type=bounded(int, low=0), default=16, help="heatmap overlays to save")
    parser.add_argument("--on-bad-file", choices=("fail", "skip"), default="fail")
    parser.add_argument("--loader", choices=("torch", "dali", "auto"), default="auto", help="auto: DALI for CUDA when installed")
    return parser


@command("jsa_fast.evaluate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint)
    cfg = saved_config(state["config"], args.checkpoint)
    broken = non_finite_tensors(state["model"])
    if broken:
        raise DataError(
            f"checkpoint {args.checkpoint} holds non-finite weights ({len(broken)} tensors, e.g. {broken[0]}): "
            "it was saved from a run that diverged"
        )
    model = JSAModel(cfg.model_config())
    model.load_state_dict(state["model"])
    model.to(device)
    data_root = resolve_data_root(args.data if args.data is not None else state.get("data"), cfg)
    dataset = AudioVisualDataset(data_root, "test", cfg.image_config(), cfg.audio_config(), args.on_bad_file)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    loader = evaluation_loader(args.loader, dataset, device, args.batch_size, args.num_workers)
    results = evaluate(model, loader, cfg.image_size, device, args.threshold, args.alpha, cfg.amp, args.overlays, out)
    results.update(checkpoint=str(args.checkpoint), data=str(data_root))
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    print(f"wrote {out / 'eval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
