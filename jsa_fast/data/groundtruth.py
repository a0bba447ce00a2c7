"""Ground-truth maps (docs/model.md "Metrics"), rasterised on integer pixels like the field's
evaluator (EZ-VSL): a box [x0, y0, x1, y1] covers gt[y0:y1, x0:x1]."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from jsa_fast.errors import DataError

FLICKR_ANNOTATION_SIZE = 256  # Flickr-SoundNet boxes are drawn on 256 x 256 images


def _box_count_map(pixel_boxes: Sequence[Sequence[int]], size: int) -> np.ndarray:
    """size x size float32: how many boxes cover each pixel."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    counts = np.zeros((size, size), dtype=np.float32)
    for x0, y0, x1, y1 in pixel_boxes:
        counts[y0:y1, x0:x1] += 1
    return counts


def _check_boxes(boxes: Sequence[Sequence[float]], name: str) -> None:
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"{name}: every box needs 4 coordinates [x0, y0, x1, y1], got {box!r}")


def _box_problem(
    box: Sequence[float], side: float, to_pixel: Callable[[float], int], size: int, unit: str
) -> str | None:
    """Why a box [x0, y0, x1, y1] with coordinates in [0, side] is not usable, or None;
    `to_pixel` maps a coordinate to the pixel edge the gt map uses on size x size."""
    if len(box) != 4:
        return f"box {list(box)} needs 4 coordinates [x0, y0, x1, y1]"
    if not all(math.isfinite(c) and 0 <= c <= side for c in box):
        return f"box {list(box)} is not inside the image ({unit})"
    if not (box[0] < box[2] and box[1] < box[3]):
        return f"box {list(box)} is not ordered (x0 < x1 and y0 < y1 are needed)"
    x0, y0, x1, y1 = (to_pixel(c) for c in box)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return f"box {list(box)} covers no pixel at {size} x {size}"
    return None


def vggss_box_problem(box: Sequence[float], size: int) -> str | None:
    """Why a VGG-SS box cannot give a ground-truth region on size x size, or None: its
    coordinates must be fractions of the image side in [0, 1], x0 < x1, y0 < y1, and it
    must cover at least one pixel as `vggss_gt_map` rasterises it."""
    looks_like_pixels = any(c > 1 for c in box if math.isfinite(c))
    unit = "VGG-SS coordinates are fractions in [0, 1]" + ("; these look like pixels" if looks_like_pixels else "")
    return _box_problem(box, 1.0, lambda c: int(c * size), size, unit)


def flickr_box_problem(box: Sequence[int], size: int) -> str | None:
    """Why a Flickr-SoundNet box cannot give a ground-truth region on size x size, or None:
    pixel coordinates on 256 x 256, ordered, covering a pixel as `flickr_gt_map` scales it."""
    unit = f"Flickr-SoundNet coordinates are pixels in [0, {FLICKR_ANNOTATION_SIZE}]"
    return _box_problem(box, FLICKR_ANNOTATION_SIZE, lambda c: size * int(c) // FLICKR_ANNOTATION_SIZE, size, unit)


def vggss_gt_map(boxes: Sequence[Sequence[float]], size: int) -> Tensor:
    """VGG-SS: size x size float32 in {0, 1}, the union of boxes given as fractions in [0, 1].

    Coordinates are clipped to [0, 1], scaled by size and truncated to ints, as EZ-VSL does.
    """
    _check_boxes(boxes, "boxes")
    pixel_boxes = [(np.clip(np.asarray(box, dtype=np.float64), 0, 1) * size).astype(int) for box in boxes]
    return torch.from_numpy((_box_count_map(pixel_boxes, size) > 0).astype(np.float32))


def flickr_gt_map(boxes: Sequence[Sequence[int]], size: int) -> Tensor:
    """Flickr-SoundNet: size x size float32 consensus map min(1, number of covering boxes / 2).

    boxes: every annotator's boxes in 256 x 256 pixel coordinates, each scaled by
    int(size * c / 256) as EZ-VSL does (clipped to [0, 256] first).
    """
    _check_boxes(boxes, "boxes")
    pixel_boxes = [
        [size * min(max(int(c), 0), FLICKR_ANNOTATION_SIZE) // FLICKR_ANNOTATION_SIZE for c in box] for box in boxes
    ]
    return torch.from_numpy(np.minimum(1.0, _box_count_map(pixel_boxes, size) / 2))


def read_flickr_boxes(path: str | Path) -> list[tuple[int, int, int, int]]:
    """Every <bbox> of a Flickr-SoundNet annotation XML as (xmin, ymin, xmax, ymax) on 256 x 256.

    The first child of each <bbox> is not a coordinate and is skipped; the next four are.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{path}: not well-formed XML ({error})") from error
    boxes = []
    for bbox in root.iter("bbox"):
        fields = list(bbox)[1:]
        try:
            coordinates = tuple(int(field.text or "") for field in fields)
        except ValueError as error:
            raise ValueError(f"{path}: a <bbox> holds a non-integer coordinate ({error})") from error
        if len(coordinates) != 4:
            raise ValueError(f"{path}: a <bbox> needs a label then 4 coordinates, got {len(fields) + 1} children")
        boxes.append(coordinates)
    if not boxes:
        raise ValueError(f"{path}: no <bbox> element")
    return boxes


def load_mask(path: str | Path, size: int) -> Tensor:
    """AVSBench binary mask PNG -> size x size float32 in {0, 1} (nearest resize; nonzero = 1).
    DataError naming the file when no pixel of the resized mask is foreground."""
    with Image.open(path) as image:
        grey = image.convert("L").resize((size, size), Image.Resampling.NEAREST)
    mask = torch.from_numpy((np.asarray(grey) > 0).astype(np.float32))
    if not mask.any():
        raise DataError(f"{path}: the mask has no foreground pixel at {size} x {size}")
    return mask
