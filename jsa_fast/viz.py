"""Pictures: heatmap overlays for localisation results and loss curves of a training run."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw

from jsa_fast.data.image import IMAGENET_MEAN, IMAGENET_STD

# Jet runs blue -> cyan -> yellow -> red and never reaches white, so white outlines stay
# visible on any part of the heatmap.
OUTLINE_RGB = (255, 255, 255)
OUTLINE_WIDTH = 2
PLOT_COLUMNS = 3

Box = tuple[float, float, float, float]


def _image_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 from an ImageNet-normalised 3 x H x W tensor or an H x W x 3 uint8 array."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be 3 x H x W, got {tuple(image.shape)}")
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        rgb = image.detach().cpu().float() * std + mean
        return (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    shape = getattr(image, "shape", None)
    raise ValueError(
        f"image must be a 3 x H x W tensor or an H x W x 3 uint8 array, got "
        f"{type(image).__name__} {shape} {getattr(image, 'dtype', '')}"
    )


def _map_array(values: torch.Tensor | np.ndarray, name: str, hw: tuple[int, int]) -> np.ndarray:
    array = values.detach().cpu().float().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.shape != hw:
        raise ValueError(f"{name} must be H x W = {hw} like the image, got {array.shape}")
    return array


def _region_outline(region: np.ndarray) -> np.ndarray:
    """Pixels of a boolean region that touch a pixel outside it (4-neighbourhood, image
    border counted as outside)."""
    padded = np.pad(region, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return region & ~interior


def overlay_heatmap(
    image: torch.Tensor | np.ndarray,
    heatmap: torch.Tensor | np.ndarray,
    boxes: Sequence[Box] | None = None,
    gt_map: torch.Tensor | np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend a jet-coloured heatmap over an image and outline the ground truth.

    image: 3 x H x W ImageNet-normalised tensor or H x W x 3 uint8 array. heatmap:
    H x W in [0, 1] (values outside are clipped). boxes: (x0, y0, x1, y1) pixel boxes,
    drawn as white rectangles. gt_map: H x W; the outline of gt_map > 0 is drawn white.
    alpha: weight of the heatmap. Returns H x W x 3 uint8.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = _image_uint8(image)
    hw = rgb.shape[:2]
    heat = np.clip(_map_array(heatmap, "heatmap", hw), 0, 1)
    coloured = colormaps["jet"](heat)[..., :3] * 255
    blended = (alpha * coloured + (1 - alpha) * rgb).round().astype(np.uint8)
    if gt_map is not None:
        blended[_region_outline(_map_array(gt_map, "gt_map", hw) > 0)] = OUTLINE_RGB
    if boxes:
        canvas = Image.fromarray(blended)
        draw = ImageDraw.Draw(canvas)
        for box in boxes:
            if len(box) != 4 or box[2] < box[0] or box[3] < box[1]:
                raise ValueError(f"each box must be (x0, y0, x1, y1) with x0 <= x1, y0 <= y1, got {box}")
            draw.rectangle(tuple(float(v) for v in box), outline=OUTLINE_RGB, width=OUTLINE_WIDTH)
        blended = np.asarray(canvas)
    return blended


def save_overlays(items: Iterable[tuple[str, np.ndarray]], out_dir: Path | str, prefix: str) -> list[Path]:
    """Write each (name, H x W x 3 uint8 picture) as out_dir/{prefix}_{name}.png.

    Returns the paths written, in order; out_dir is created when missing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, picture in items:
        if not name or "/" in name or "\\" in name:
            raise ValueError(f"overlay name must be a non-empty file name without separators, got {name!r}")
        if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
            raise ValueError(f"overlay {name!r} must be an H x W x 3 uint8 array, got {picture.shape} {picture.dtype}")
        path = out / f"{prefix}_{name}.png"
        Image.fromarray(picture).save(path)
        written.append(path)
    return written


def _read_records(metrics_jsonl: Path) -> list[dict]:
    records = []
    for line_no, line in enumerate(metrics_jsonl.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{metrics_jsonl}:{line_no} is not JSON: {err}") from None
    return records


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_loss_curves(metrics_jsonl: Path | str, out_png: Path | str) -> Path:
    """One panel per loss term (`loss`, `loss_*`) against step, from a metrics.jsonl, and
    one per validation score (`val_*` of `"kind": "val"` lines, a validation split's).

    Step lines (`"kind": "step"`, or no kind) are drawn as lines; per-epoch summaries
    (`"kind": "epoch"`) as markers at their step when they carry one, so that a run too
    short to log a step line still gets its panels; validation scores as markers joined
    by a line. A panel is log-y when all its values are positive (validation scores: never).
    Values that are null (non-finite when logged) are left out. ValueError when no line
    holds a loss value. Returns out_png.
    """
    metrics_jsonl, out_png = Path(metrics_jsonl), Path(out_png)
    records = _read_records(metrics_jsonl)
    steps = [r for r in records if r.get("kind", "step") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch" and "step" in r]
    terms = sorted(
        {k for r in steps + epochs for k, v in r.items() if (k == "loss" or k.startswith("loss_")) and _is_number(v)},
        key=lambda k: (k != "loss", k),
    )
    if not terms:
        raise ValueError(f"{metrics_jsonl} holds no loss values to draw")
    validations = [r for r in records if r.get("kind") == "val" and "step" in r]
    scores = sorted({k for r in validations for k, v in r.items() if k.startswith("val_") and _is_number(v)})

    panels = len(terms) + len(scores)
    ncols = min(PLOT_COLUMNS, panels)
    nrows = -(-panels // ncols)
    fig = Figure(figsize=(4 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax, term in zip(axes, terms):
        step_points = [(r["step"], r[term]) for r in steps if _is_number(r.get(term))]
        epoch_points = [(r["step"], r[term]) for r in epochs if _is_number(r.get(term))]
        if step_points:
            ax.plot(*zip(*step_points), linewidth=1, label="step")
        if epoch_points:
            ax.plot(*zip(*epoch_points), "o", markersize=4, label="epoch")
            ax.legend(fontsize="small")
        if all(v > 0 for _, v in step_points + epoch_points):
            ax.set_yscale("log")
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax, score in zip(axes[len(terms) :], scores):
        ax.plot(*zip(*[(r["step"], r[score]) for r in validations if _is_number(r.get(score))]), "s-", markersize=4)
        ax.set_title(f"{score} (validation)")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png
