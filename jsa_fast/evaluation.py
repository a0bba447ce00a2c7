"""Evaluation as the commands share it: a model's localisation, retrieval and segmentation
metrics over a test split (`evaluate`), model selection on a validation split during
training (`Validation`), the protocol's command-line flags, and OGL's object model."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from jsa_fast.cli import bounded
from jsa_fast.config import RunConfig
from jsa_fast.data.dali import make_dali_loader, resolve_loader
from jsa_fast.data.datasets import AudioVisualDataset, EpochSeededDataset, make_loader, read_id_list, read_vggss_json
from jsa_fast.errors import DataError, UsageError
from jsa_fast.losses import jsa_loss
from jsa_fast.maps import UPSAMPLE_MODES, centre_prior_map
from jsa_fast.metrics import LocalizationEvaluator, SegmentationEvaluator, first_match_ranks, recall_at
from jsa_fast.model import JSAModel, ObjectSaliency
from jsa_fast.protocol import PROTOCOLS, Protocol, scored_maps
from jsa_fast.runtime import autocast_context
from jsa_fast.seeds import SeedDomain, derived_seed
from jsa_fast.viz import overlay_heatmap, save_overlays

__all__ = [
    "MAPS",
    "SUMMARY_KEYS",
    "RECALL_KS",
    "Evaluation",
    "evaluate",
    "evaluation_loader",
    "listed_test_ids",
    "Validation",
    "load_object_saliency",
    "add_protocol_arguments",
    "protocol_from_args",
]

RECALL_KS = (1, 5, 10)

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
            order = torch.randperm(
                len(candidates),
                generator=torch.Generator().manual_seed(derived_seed(SeedDomain.VALIDATION_SPLIT, cfg.optim.seed)),
            )
            held_out = {candidates[i] for i in order[:count].tolist()}
            dataset = AudioVisualDataset(root, "train", cfg.data.image, cfg.data.audio, on_bad_file, subset=held_out)
            self.dataset = EpochSeededDataset(dataset, cfg.optim.seed, SeedDomain.VALIDATION_AUGMENT)
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


def add_protocol_arguments(parser: argparse.ArgumentParser, scoring: bool = True) -> None:
    """--protocol and the flags that change its choices (`protocol_from_args`); scoring:
    with --threshold (what is scored; localisation scores nothing)."""
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
    if scoring:
        protocol.add_argument(
            "--threshold",
            type=_threshold,
            default=None,
            help="'median' or a fixed value (the other kind is scored too)",
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


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    """--protocol's choices with the flags given (those of the five a CLI has) applied over them."""
    given = {name: getattr(args, name, None) for name in ("upsample", "threshold", "alpha", "temperature", "ogl_alpha")}
    return dataclasses.replace(PROTOCOLS[args.protocol], **{k: v for k, v in given.items() if v is not None})
