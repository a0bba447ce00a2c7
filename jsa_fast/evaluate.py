"""Evaluate a checkpoint: `python -m jsa_fast.evaluate --checkpoint OUT/last.pt [--data ROOT]
[--out DIR] [--protocol field|released] [--ogl R18.pth] [--subset FILE] [--on-missing fail|skip] ...`.

Localisation (cIoU AP50 / AUC / mean cIoU of ca^{a,v}, IQR, with --ogl the OGL and
object-only maps, and a centre-prior baseline scored the same way) at the median and at a
fixed threshold side by side, cross-modal retrieval R@1/5/10 both ways by class, and
AVSBench mIoU / F-score when the test split has masks. `--protocol` picks how the maps are
made and scored (the field's evaluators, or the released JSA code's; see PROTOCOLS), each
choice also its own flag. Prints a table, writes DIR/eval.json, DIR/items.csv (one row per
evaluated item), DIR/missing.txt (test ids not on disk, with --on-missing skip) and
heatmap overlays DIR/overlays/*.png of the first items.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from jsa_fast.checkpoint import load_trained_model
from jsa_fast.cli import ArgumentParser, bounded, command
from jsa_fast.data.datasets import AudioVisualDataset, BadFilesError
from jsa_fast.errors import DataError, UsageError
from jsa_fast.evaluation import (
    MAPS,
    RECALL_KS,
    SUMMARY_KEYS,
    add_protocol_arguments,
    evaluate,
    evaluation_loader,
    load_object_saliency,
    protocol_from_args,
)
from jsa_fast.protocol import PROTOCOLS
from jsa_fast.runtime import output_lock, resolve_data_root, resolve_device

__all__ = ["main", "format_table", "write_items", "read_subset"]


def write_items(items: list[dict[str, Any]], path: Path) -> Path:
    """items.csv: one row per evaluated item, the columns of the first row."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(items[0]))
        writer.writeheader()
        writer.writerows(items)
    return path


def format_table(results: dict[str, Any]) -> str:
    thresholds = list(results["by_threshold"])
    names = [name for name in MAPS if f"ap50{MAPS[name][1]}" in results["by_threshold"][thresholds[0]]]
    header = "".join(f"{'threshold ' + t:>30}" for t in thresholds)
    columns = "".join(f"{'AP50':>10}{'AUC':>10}{'mean cIoU':>10}" for _ in thresholds)
    lines = [f"{'':16}{header}", f"{'':16}{columns}"]
    for name in names:
        label, suffix = MAPS[name]
        if name == "iqr":
            label = f"IQR ({results['alpha']:g})"
        elif name == "ogl":
            label = f"OGL ({results['ogl_alpha']:g})"
        figures = "".join(
            f"{results['by_threshold'][t][key + suffix]:>10.4f}" for t in thresholds for key in SUMMARY_KEYS
        )
        lines.append(f"{label:16}{figures}")
    if results.get("r1_a2i") is not None:
        for direction in ("a2i", "i2a"):
            recalls = "  ".join(f"R@{k} {results[f'r{k}_{direction}']:.4f}" for k in RECALL_KS)
            lines.append(f"retrieval {direction:6}{recalls}")
    if "miou" in results:
        lines.append(f"AVSBench mIoU {results['miou']:.4f}  F-score {results['fscore']:.4f}")
    lines.append(
        f"n = {results['n']} evaluated, {results.get('missing', 0)} missing; protocol {results.get('protocol', 'custom')}: "
        f"{results['upsample']} upsampling, IQR alpha {results['alpha']:g}, temperature {results['temperature']:g}"
    )
    return "\n".join(lines)


def read_subset(path: str) -> list[str]:
    """--subset FILE: ids or class names, one per line (blank lines ignored)."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise UsageError(f"--subset {path}: no such file") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"--subset {path}: not UTF-8 text ({error})") from None
    if not names:
        raise UsageError(f"--subset {path}: the file names no ids or classes")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m jsa_fast.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a last.pt or best.pt written by jsa_fast.train")
    parser.add_argument("--data", default=None, help="data set root; default: the data the checkpoint was trained on")
    parser.add_argument("--out", default=None, help="output folder (default: CHECKPOINT's folder/eval)")
    add_protocol_arguments(parser)
    parser.add_argument(
        "--ogl",
        default=None,
        metavar="R18.pth",
        help="a local torchvision ResNet-18 state dict: adds the OGL and object-only maps",
    )
    parser.add_argument(
        "--subset", default=None, metavar="FILE", help="evaluate only these ids or class names (one per line)"
    )
    parser.add_argument(
        "--on-missing",
        choices=("fail", "skip"),
        default="fail",
        help="test ids whose files are not on disk: stop naming them, or count and list them",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument(
        "--amp",
        choices=("bf16", "fp16", "none"),
        default="none",
        help="autocast dtype (default: fp32, whatever the training used, as the released code)",
    )
    parser.add_argument("--batch-size", type=bounded(int, low=1), default=32)
    parser.add_argument("--num-workers", type=bounded(int, low=0), default=2)
    parser.add_argument("--overlays", type=bounded(int, low=0), default=16, help="heatmap overlays to save")
    parser.add_argument("--on-bad-file", choices=("fail", "skip"), default="fail")
    parser.add_argument(
        "--loader", choices=("torch", "dali", "auto"), default="auto", help="auto: DALI for CUDA when installed"
    )
    return parser


@command("jsa_fast.evaluate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    protocol = protocol_from_args(args)
    device = resolve_device(args.device)
    trained = load_trained_model(args.checkpoint, device)
    cfg = trained.cfg
    saliency = load_object_saliency(args.ogl, device) if args.ogl is not None else None
    subset = read_subset(args.subset) if args.subset is not None else None
    data_root = resolve_data_root(args.data if args.data is not None else trained.data, cfg.synth)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    with output_lock(out):
        try:
            dataset = AudioVisualDataset(
                data_root,
                "test",
                cfg.data.image,
                cfg.data.audio,
                args.on_bad_file,
                subset=subset,
                on_missing=args.on_missing,
            )
        except BadFilesError as error:
            if args.on_missing == "fail" and any(reason.startswith("missing") for _, reason in error.problems):
                raise DataError(f"{error}; --on-missing skip evaluates the items on disk and counts the rest") from None
            raise
        out.mkdir(parents=True, exist_ok=True)
        missing_path = out / "missing.txt"
        missing_path.unlink(missing_ok=True)  # a file of an earlier evaluation into the same folder
        if dataset.missing:
            missing_path.write_text("".join(f"{name}\n" for name in dataset.missing))
            print(f"{len(dataset.missing)} test id(s) not on disk, listed in {missing_path}", file=sys.stderr)
        loader = evaluation_loader(args.loader, dataset, device, args.batch_size, args.num_workers)
        results, items = evaluate(
            trained.model, loader, cfg.data.image.size, device, protocol, args.amp, args.overlays, out, saliency, dataset.classes
        )  # fmt: skip
        results.update(
            protocol=args.protocol if protocol == PROTOCOLS[args.protocol] else f"{args.protocol}, changed by flags",
            missing=len(dataset.missing),
            ogl=args.ogl,
            subset=args.subset,
            checkpoint=str(args.checkpoint),
            data=str(data_root),
        )
        (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        write_items(items, out / "items.csv")
        print(format_table(results))
        print(f"wrote {out / 'eval.json'} and {out / 'items.csv'}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
