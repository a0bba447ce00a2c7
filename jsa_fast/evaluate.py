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
import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from jsa_fast.checkpoint import load_checkpoint, non_finite_tensors
from jsa_fast.cli import ArgumentParser, DataError, UsageError, bounded, command
from jsa_fast.config import RunConfig, saved_config
from jsa_fast.data.dali import make_dali_loader, resolve_loader
from jsa_fast.data.datasets import (
    AudioVisualDataset,
    BadFilesError,
    EpochSeededDataset,
    make_loader,
    read_id_list,
    read_vggss_json,
)
from jsa_fast.losses import jsa_loss
from jsa_fast.maps import UPSAMPLE_MODES, blend_maps, centre_prior_map, localization_maps, normalised_map
from jsa_fast.metrics import LocalizationEvaluator, SegmentationEvaluator, first_match_ranks, recall_at
from jsa_fast.model import JSAModel, ObjectSaliency
from jsa_fast.runtime import autocast_context, resolve_data_root, resolve_device
from jsa_fast.viz import overlay_heatmap, save_overlays

__all__ = [
    "Protocol",
    "PROTOCOLS",
    "Evaluation",
    "Validation",
    "main",
    "evaluate",
    "scored_maps",
    "load_object_saliency",
    "protocol_from_args",
    "temperature_value",
]

FIXED_THRESHOLD = 0.6  # the released code's; the table's second threshold under "median"
RECALL_KS = (1, 5, 10)


@dataclass(frozen=True)
class Protocol:
    """How the maps are made and scored (docs/model.md "Inference", README "Evaluation protocols").

    upsample: "bilinear" (align_corners=True) or "bicubic" (align_corners=False), from
    the token grid to the image; threshold: "median" or a fixed cut on the min-max
    normalised map; alpha: IQR's weight on ca^{a,v}; temperature: the factor on the
    logits of the inference maps (the released code's `infer_sharpening`); ogl_alpha:
    OGL's weight on ca^{a,v}.
    """

    upsample: str
    threshold: str | float
    alpha: float
    temperature: float
    ogl_alpha: float = 0.4

    def __post_init__(self) -> None:
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {sorted(UPSAMPLE_MODES)}, got {self.upsample!r}")
        LocalizationEvaluator(self.threshold)  # its check of the threshold
        for name in ("alpha", "ogl_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")

    @property
    def thresholds(self) -> tuple[str | float, str | float]:
        """(this protocol's threshold, the other kind): the median and a fixed value,
        both scored; the first gives eval.json's top-level figures."""
        if self.threshold == "median":
            return "median", FIXED_THRESHOLD
        return self.threshold, "median"


PROTOCOLS = {
    # EZ-VSL, LVS, SSL-TIE; the paper's IQR alpha (eq. 14)
    "field": Protocol(upsample="bilinear", threshold="median", alpha=0.6, temperature=1.0),
    # the released JSA code (test_model.py): its sharpening factor for 10k-pair models
    "released": Protocol(upsample="bicubic", threshold=FIXED_THRESHOLD, alpha=0.4, temperature=0.1),
}

# The scored maps: name -> (table label, suffix of its eval.json keys)
MAPS = {
    "av": ("ca^{a,v}", ""),
    "iqr": ("IQR", "_iqr"),
    "ogl": ("OGL", "_ogl"),
    "obj": ("object only", "_obj"),
    "centre_prior": ("centre prior", "_centre_prior"),
}
SUMMARY_KEYS = ("ap50", "auc", "mean_ciou")


class Evaluation(NamedTuple):
    """summary: what eval.json holds; items: one dict per evaluated item (items.csv)."""

    summary: dict[str, Any]
    items: list[dict[str, Any]]


def load_object_saliency(path: str | Path, device: torch.device) -> ObjectSaliency:
    """OGL's ResNet-18 from a local torchvision state dict; UsageError naming --ogl."""
    try:
        return ObjectSaliency(path).to(device)
    except (ValueError, OSError) as error:
        raise UsageError(f"--ogl {path}: {error}") from None


def evaluation_loader(
    kind: str, dataset: AudioVisualDataset, device: torch.device, batch_size: int, num_workers: int
) -> Iterable[dict[str, Any] | None]:
    """Batches of a test split in order: the PyTorch DataLoader ("torch") or DALI ("dali";
    "auto": see `resolve_loader`)."""
    if resolve_loader(kind, device) == "dali":
        return make_dali_loader(dataset, batch_size, shuffle=False, seed=0, device=device)
    return make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, seed=0, drop_last=False)


def scored_maps(
    ca: torch.Tensor, ia: torch.Tensor, obj: torch.Tensor | None, size: tuple[int, int], protocol: Protocol
) -> dict[str, torch.Tensor]:
    """The maps a protocol scores, B x H x W each in [0, 1], from B x h x w token-grid maps:
    "av" (ca^{a,v}), "iqr" and, when the object map `obj` is given, "obj" and "ogl"
    (norm(ogl_alpha norm(AV) + (1 - ogl_alpha) norm(OBJ)), the released test_model.py)."""
    av, iqr = localization_maps(ca, ia, size, protocol.alpha, protocol.upsample)
    maps = {"av": av, "iqr": iqr}
    if obj is not None:
        maps["obj"] = normalised_map(obj, size, protocol.upsample)
        maps["ogl"] = blend_maps(av, maps["obj"], protocol.ogl_alpha)
    return maps


def _column(name: str, threshold: str | float) -> str:
    return f"ciou_{name}@{threshold}"


@torch.no_grad()
def evaluate(
    model: JSAModel,
    loader: Iterable[dict[str, Any] | None],
    image_size: int,
    device: torch.device,
    protocol: Protocol = PROTOCOLS["field"],
    amp: str = "none",
    overlays: int = 16,
    out: Path | None = None,
    saliency: ObjectSaliency | None = None,
    classes: Sequence[str] = (),
) -> Evaluation:
    """All metrics of `model` over a test loader's batches (image_size x image_size
    images) under `protocol`, with OGL when `saliency` is given; `classes` names the
    labels. Overlays of the first `overlays` items go to out/overlays when `out` is given.
    """
    model.eval()
    size = (image_size, image_size)
    names = ["av", "iqr", *(("ogl", "obj") if saliency is not None else ()), "centre_prior"]
    evaluators = {(name, t): LocalizationEvaluator(t) for name in names for t in protocol.thresholds}
    segmentation = SegmentationEvaluator()
    p_img, p_aud, labels, items = [], [], [], []
    pictures: dict[str, list] = {"ca": [], "ogl": []}
    prior = centre_prior_map(*size)
    has_masks = False
    for batch in tqdm(loader, desc="evaluate", dynamic_ncols=True, disable=None):
        if batch is None:
            continue
        image, spec = batch["image"].to(device), batch["spec"].to(device)
        with autocast_context(device, amp):
            inference = model.infer(image, spec, protocol.temperature)
            obj = saliency(image) if saliency is not None else None
        maps = scored_maps(inference.ca, inference.ia, obj, size, protocol)
        maps = {name: m.cpu() for name, m in maps.items()}
        for i, gt in enumerate(batch["gt"].cpu()):
            label = int(batch["label"][i])
            row: dict[str, Any] = {"id": batch["id"][i], "class": classes[label] if label >= 0 else ""}
            for name in names:
                pred = prior if name == "centre_prior" else maps[name][i]
                for t in protocol.thresholds:
                    row[_column(name, t)] = evaluators[name, t].update(pred, gt)
            for t in protocol.thresholds:
                row[f"area_av@{t}"] = evaluators["av", t].area[-1]
            items.append(row)
            if "mask" in batch:
                has_masks = True
                segmentation.update(maps["av"][i], batch["mask"][i].cpu())
            for prefix, name in (("ca", "av"), ("ogl", "ogl")):
                if name in maps and len(pictures[prefix]) < overlays:
                    pictures[prefix].append(
                        (batch["id"][i], overlay_heatmap(batch["image"][i].cpu(), maps[name][i], gt_map=gt))
                    )
        p_img.append(inference.p_img.float().cpu())
        p_aud.append(inference.p_aud.float().cpu())
        labels.append(batch["label"].cpu())
    if not items:
        raise DataError("no test sample could be loaded (every item was skipped)")

    by_threshold = {}
    for t in protocol.thresholds:
        figures = {}
        for name in names:
            summary = evaluators[name, t].summary()
            figures.update({f"{key}{MAPS[name][1]}": summary[key] for key in SUMMARY_KEYS})
        by_threshold[str(t)] = figures
    results: dict[str, Any] = {**by_threshold[str(protocol.threshold)], "n": len(items)}
    results["by_threshold"] = by_threshold
    all_labels = torch.cat(labels)
    if bool((all_labels >= 0).all()):
        embeddings = {"img": torch.cat(p_img), "aud": torch.cat(p_aud)}
        for direction, (query, gallery) in (("a2i", ("aud", "img")), ("i2a", ("img", "aud"))):
            ranks = first_match_ranks(embeddings[query], embeddings[gallery], all_labels, all_labels)
            results.update({f"r{k}_{direction}": v for k, v in recall_at(ranks, RECALL_KS).items()})
            for row, rank in zip(items, ranks.tolist(), strict=True):
                row[f"rank_{direction}"] = rank
    else:  # Flickr-style ground truth carries no classes
        results.update({f"r{k}_{d}": None for k in RECALL_KS for d in ("a2i", "i2a")})
    if has_masks:
        results.update(segmentation.summary())
    results.update(dataclasses.asdict(protocol))
    if out is not None:
        for prefix, taken in pictures.items():
            if taken:
                save_overlays(taken, out / "overlays", prefix=prefix)
    return Evaluation(results, items)


def listed_test_ids(root: Path) -> set[str]:
    """The ids of ROOT's test list (test.json, else test.txt; none without either)."""
    if (root / "test.json").exists():
        return {name for name, _, _ in read_vggss_json(root / "test.json")}
    if (root / "test.txt").exists():
        return set(read_id_list(root / "test.txt"))
    return set()


class Validation:
    """Model selection on a validation split, never on the test split.

    cfg.optim.val: a VGG-SS style JSON (file, class, bbox) of ids of `root`; they must not be
    test ids, and those in train.txt are held out of training. A model scores its
    AP50 / AUC / mean cIoU there (the field's protocol, ca^{a,v}); higher AP50 is better,
    ties go to the higher AUC. cfg.optim.val_fraction: that fraction of train.txt's ids
    (test ids excluded; drawn by cfg.optim.seed) is held out. Those items carry no boxes, so a
    model scores the training objective there (eval mode, batches of cfg.optim.batch_size in
    list order, the training transform drawn once by cfg.optim.seed); lower is better.
    `train_ids` are the ids left to train on. Scores are computed in fp32, as evaluation's.
    """

    def __init__(self, cfg: RunConfig, root: Path, on_bad_file: str = "fail") -> None:
        if cfg.optim.val is None and not cfg.optim.val_fraction > 0:
            raise ValueError("a validation split needs cfg.optim.val or cfg.optim.val_fraction > 0")
        self.cfg = cfg
        listed = read_id_list(root / "train.txt")
        tests = listed_test_ids(root)
        if cfg.optim.val is not None:
            self.dataset = AudioVisualDataset(
                root, "test", cfg.data.image, cfg.data.audio, on_bad_file, ground_truth=cfg.optim.val
            )  # fmt: skip
            overlap = sorted(tests.intersection(self.dataset.ids))
            if overlap:
                raise UsageError(
                    f"--val {cfg.optim.val} holds {len(overlap)} test id(s) of {root}, e.g. {overlap[:5]}: a validation split must leave the test split out"
                )
            held_out = set(self.dataset.ids)
        else:
            candidates = [name for name in listed if name not in tests]
            count = max(1, round(cfg.optim.val_fraction * len(candidates)))
            if count >= len(candidates):
                raise UsageError(
                    f"--val-fraction {cfg.optim.val_fraction} of the {len(candidates)} training ids of {root} leaves none to train on"
                )
            order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(cfg.optim.seed))
            held_out = {candidates[i] for i in order[:count].tolist()}
            dataset = AudioVisualDataset(root, "train", cfg.data.image, cfg.data.audio, on_bad_file, subset=held_out)
            self.dataset = EpochSeededDataset(dataset, cfg.optim.seed)
        self.train_ids = [name for name in listed if name not in held_out]
        self.loader = make_loader(
            self.dataset, cfg.optim.batch_size, shuffle=False, num_workers=0, seed=cfg.optim.seed, drop_last=False
        )

    def score(self, model: JSAModel, device: torch.device) -> dict[str, float]:
        """{"val_ap50", "val_auc", "val_mean_ciou"} (cfg.optim.val) or {"val_loss"}; leaves the
        model in the mode it found it in."""
        training = model.training
        try:
            if self.cfg.optim.val is not None:
                summary = evaluate(
                    model, self.loader, self.cfg.data.image.size, device, overlays=0, classes=self.dataset.classes
                ).summary
                return {f"val_{key}": summary[key] for key in SUMMARY_KEYS}
            return {"val_loss": self._loss(model, device)}
        finally:
            model.train(training)

    @torch.no_grad()
    def _loss(self, model: JSAModel, device: torch.device) -> float:
        model.eval()
        total, count = 0.0, 0
        for batch in self.loader:
            if batch is None:
                continue
            size = batch["image"].shape[0]
            loss_cfg = dataclasses.replace(self.cfg.loss, k=min(self.cfg.loss.k, size))
            terms = jsa_loss(model(batch["image"].to(device), batch["spec"].to(device)), loss_cfg)
            total, count = total + terms["loss"].float().item() * size, count + size
        if count == 0:
            raise DataError("no validation item could be loaded (every item was skipped)")
        return total / count

    @staticmethod
    def better(scores: dict[str, float], best: dict[str, float] | None) -> bool:
        """Whether `scores` beat `best` (None: nothing yet)."""
        if best is None:
            return True
        if "val_loss" in scores:
            return scores["val_loss"] < best["val_loss"]
        return (scores["val_ap50"], scores["val_auc"]) > (best["val_ap50"], best["val_auc"])


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


def _threshold(text: str) -> str | float:
    if text == "median":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'median' or a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def temperature_value(text: str) -> float:
    """argparse type of --temperature: a finite number > 0."""
    value = bounded(float, low=0)(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


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
    protocol = parser.add_argument_group("protocol (each flag overrides the --protocol's choice)")
    protocol.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="field",
        help="field: EZ-VSL's evaluator (default); released: the JSA code's",
    )
    protocol.add_argument(
        "--upsample",
        choices=sorted(UPSAMPLE_MODES),
        default=None,
        help="bilinear (align_corners=True) or bicubic (align_corners=False)",
    )
    protocol.add_argument(
        "--threshold", type=_threshold, default=None, help="'median' or a fixed value (the other kind is scored too)"
    )
    protocol.add_argument(
        "--alpha", type=bounded(float, 0, 1), default=None, help="IQR weight on ca^{a,v} (field 0.6, released 0.4)"
    )
    protocol.add_argument(
        "--temperature",
        type=temperature_value,
        default=None,
        help="factor on the inference logits (field 1, released 0.1)",
    )
    protocol.add_argument("--ogl-alpha", type=bounded(float, 0, 1), default=None, help="OGL weight on ca^{a,v} (0.4)")
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


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    """--protocol's choices with the flags given (those of the five a CLI has) applied over them."""
    given = {name: getattr(args, name, None) for name in ("upsample", "threshold", "alpha", "temperature", "ogl_alpha")}
    return dataclasses.replace(PROTOCOLS[args.protocol], **{k: v for k, v in given.items() if v is not None})


@command("jsa_fast.evaluate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    protocol = protocol_from_args(args)
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint)
    cfg = saved_config(state["config"], args.checkpoint)
    broken = non_finite_tensors(state["model"])
    if broken:
        raise DataError(
            f"checkpoint {args.checkpoint} holds non-finite weights ({len(broken)} tensors, e.g. {broken[0]}): "
            "it was saved from a run that diverged"
        )
    saliency = load_object_saliency(args.ogl, device) if args.ogl is not None else None
    subset = read_subset(args.subset) if args.subset is not None else None
    model = JSAModel(cfg.model)
    model.load_state_dict(state["model"])
    model.to(device)
    data_root = resolve_data_root(args.data if args.data is not None else state.get("data"), cfg.synth)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
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
        model, loader, cfg.data.image.size, device, protocol, args.amp, args.overlays, out, saliency, dataset.classes
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
