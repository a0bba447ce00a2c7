"""A deterministic synthetic audio-visual world in API.md's data set layout.

Each class has its own visual object (distinct colour and shape) and its own sound
(distinct fundamental and amplitude-modulation rate). An image shows the sounding object
large (its box covers 30-45 % of the image, so that SPEC.md's median-threshold cIoU can
reach 0.5) and off the image centre (so that a centre prior cannot score by itself) among 1-2 smaller silent distractors of other classes, which never overlap it;
the audio is the sounding class's sound, sometimes mixed with a quieter distractor sound,
plus noise. The test split carries every ground-truth format: test.json (VGG-SS),
test.txt + Annotations/<id>.xml (Flickr-SoundNet, two identical annotators) and
masks/<id>.png (AVSBench, the object's silhouette).

    python -m jsa_fast.data.synth --out DIR [--n-train N --n-test M --seed S
        --image-size 224 --audio-seconds 2.0 --num-classes 6]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

SAMPLE_RATE = 16000
# Part of every cache folder's name: bump it whenever the generator's output changes.
GENERATOR_VERSION = 2
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class SynthClass:
    """One sound class: how it looks and how it sounds."""

    name: str
    color: tuple[int, int, int]
    shape: str
    fundamental_hz: float
    modulation_hz: float  # amplitude-modulation rate; 0 means a steady tone


CLASSES = (
    SynthClass("red_disc", (220, 40, 40), "disc", 210.0, 0.0),
    SynthClass("green_square", (40, 200, 60), "square", 320.0, 2.0),
    SynthClass("blue_triangle", (40, 70, 230), "triangle", 470.0, 4.0),
    SynthClass("yellow_cross", (230, 210, 40), "cross", 730.0, 7.0),
    SynthClass("magenta_ring", (210, 50, 200), "ring", 1090.0, 11.0),
    SynthClass("cyan_diamond", (40, 210, 220), "diamond", 1650.0, 16.0),
)

SOUNDING_AREA_RANGE = (0.30, 0.45)  # fraction of the image the sounding object's box covers
# Least distance (in image widths, along x or y) of the sounding box's centre from the
# image centre: a centred Gaussian prior then reaches AP50 of about 0.3 instead of 0.8.
SOUNDING_MIN_CENTRE_OFFSET = 0.15
DISTRACTOR_AREA_RANGE = (0.10, 0.25)  # fraction of the sounding box's area
DISTRACTOR_SOUND_GAIN = 0.2
DISTRACTOR_SOUND_PROBABILITY = 0.5
NOISE_LEVEL = 0.02

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; covers [y0:y1, x0:x1]


def _shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """height x width bool silhouette touching all four sides of its box."""
    v = ((np.arange(height) + 0.5) / height * 2 - 1)[:, None]
    u = ((np.arange(width) + 0.5) / width * 2 - 1)[None, :]
    if shape == "disc":
        return u**2 + v**2 <= 1
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "triangle":  # apex at the top centre (one pixel column wide), base along the bottom
        return np.abs(u) <= (v + 1) / 2 + 1 / width
    if shape == "cross":
        return (np.abs(u) <= 1 / 3) | (np.abs(v) <= 1 / 3)
    if shape == "ring":
        radius_sq = u**2 + v**2
        return (radius_sq <= 1) & (radius_sq >= 0.5**2)
    if shape == "diamond":
        # the tolerance keeps a pixel at each tip when a side has an even pixel count
        return np.abs(u) + np.abs(v) <= 1 + max(1 / width, 1 / height)
    raise ValueError(f"unknown shape {shape!r}")


def _bilinear_weights(grid_size: int, size: int) -> np.ndarray:
    """size x grid_size float32 matrix of bilinear interpolation weights, corners aligned."""
    coords = np.linspace(0, grid_size - 1, size)
    low = np.minimum(coords.astype(int), grid_size - 2)
    weights = np.zeros((size, grid_size), dtype=np.float32)
    weights[np.arange(size), low] = 1 - (coords - low)
    weights[np.arange(size), low + 1] = coords - low
    return weights


def _upsample_bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """g x g x C -> size x size x C, corners aligned (two small matrix products)."""
    weights = _bilinear_weights(grid.shape[0], size)
    return np.einsum("ig,ghc,jh->ijc", weights, grid, weights, optimize=True)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """size x size x 3 float32: a dull tint with smooth blotches (the fine noise comes later)."""
    tint = rng.uniform(80, 160) + rng.uniform(-15, 15, size=3)
    blotches = _upsample_bilinear(rng.normal(0, 22, size=(6, 6, 3)).astype(np.float32), size)
    return (tint + blotches).astype(np.float32)


def _sounding_box(rng: np.random.Generator, size: int) -> Box:
    while True:  # rejection sampling: about half of the draws are off-centre enough
        area = rng.uniform(*SOUNDING_AREA_RANGE) * size * size
        aspect = rng.uniform(0.8, 1.25)
        width = min(size, round(math.sqrt(area * aspect)))
        height = min(size, round(math.sqrt(area / aspect)))
        x0 = int(rng.integers(0, size - width + 1))
        y0 = int(rng.integers(0, size - height + 1))
        offset = max(abs(x0 + width / 2 - size / 2), abs(y0 + height / 2 - size / 2)) / size
        if offset >= SOUNDING_MIN_CENTRE_OFFSET:
            return (x0, y0, x0 + width, y0 + height)


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _distractor_boxes(rng: np.random.Generator, size: int, sounding: Box, count: int) -> list[Box]:
    """Up to `count` square boxes in the strips left, right, above and below the sounding box.

    The sounding box is at most 75 % of the image wide, so one strip is always at least
    12 % of the image wide and the first distractor always fits.
    """
    x0, y0, x1, y1 = sounding
    strips = [(0, 0, x0, size), (x1, 0, size, size), (0, 0, size, y0), (0, y1, size, size)]
    min_side = max(4, size // 14)
    strips = [s for s in strips if min(s[2] - s[0], s[3] - s[1]) >= min_side]
    sounding_area = (x1 - x0) * (y1 - y0)
    boxes: list[Box] = []
    for _ in range(count):
        side = math.floor(math.sqrt(rng.uniform(*DISTRACTOR_AREA_RANGE) * sounding_area))
        for _attempt in range(10):
            sx0, sy0, sx1, sy1 = strips[int(rng.integers(len(strips)))]
            fitted = max(min_side, min(side, sx1 - sx0, sy1 - sy0))
            bx = int(rng.integers(sx0, sx1 - fitted + 1))
            by = int(rng.integers(sy0, sy1 - fitted + 1))
            box = (bx, by, bx + fitted, by + fitted)
            if not any(_overlaps(box, other) for other in boxes):
                boxes.append(box)
                break
    return boxes


def _paint(image: np.ndarray, rng: np.random.Generator, cls: SynthClass, box: Box) -> np.ndarray:
    """Paint the class's object into `box` (in place, colour jittered per object); its mask."""
    x0, y0, x1, y1 = box
    silhouette = _shape_mask(cls.shape, x1 - x0, y1 - y0)
    color = np.clip(np.asarray(cls.color, dtype=np.float32) + rng.uniform(-15, 15, size=3), 0, 255)
    image[y0:y1, x0:x1][silhouette] = color
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[y0:y1, x0:x1] = silhouette
    return mask


def _class_sound(rng: np.random.Generator, cls: SynthClass, t: np.ndarray) -> np.ndarray:
    """Three harmonics of a slightly jittered fundamental under the class's modulation."""
    f0 = cls.fundamental_hz * rng.uniform(0.97, 1.03)
    tone = sum(
        np.sin(2 * np.pi * f0 * harmonic * t + rng.uniform(0, 2 * np.pi)) / harmonic
        for harmonic in (1, 2, 3)
    )
    if cls.modulation_hz == 0:
        return tone
    envelope = (
        0.5 * (1 + np.sin(2 * np.pi * cls.modulation_hz * t + rng.uniform(0, 2 * np.pi)))
    ) ** 2
    return tone * envelope


@dataclass(frozen=True)
class _Sample:
    image: np.ndarray  # size x size x 3 uint8
    wave: np.ndarray  # float32 in [-1, 1]
    cls: SynthClass
    box: Box
    mask: np.ndarray  # size x size bool, the sounding object's silhouette


def _make_sample(
    rng: np.random.Generator, classes: Sequence[SynthClass], size: int, num_samples: int
) -> _Sample:
    sounding_index = int(rng.integers(len(classes)))
    others = [index for index in range(len(classes)) if index != sounding_index]
    distractor_indices = rng.choice(
        others, size=min(len(others), int(rng.integers(1, 3))), replace=False
    )

    image = _background(rng, size)
    sounding_box = _sounding_box(rng, size)
    distractor_boxes = _distractor_boxes(rng, size, sounding_box, len(distractor_indices))
    distractor_indices = distractor_indices[: len(distractor_boxes)]  # drop any that did not fit
    for index, box in zip(distractor_indices, distractor_boxes, strict=True):
        _paint(image, rng, classes[index], box)
    mask = _paint(image, rng, classes[sounding_index], sounding_box)
    image += rng.standard_normal(image.shape, dtype=np.float32) * 8
    pixels = np.clip(image + 0.5, 0, 255).astype(np.uint8)

    t = np.arange(num_samples, dtype=np.float32) / np.float32(SAMPLE_RATE)
    wave = _class_sound(rng, classes[sounding_index], t)
    if rng.random() < DISTRACTOR_SOUND_PROBABILITY:
        wave = wave + DISTRACTOR_SOUND_GAIN * _class_sound(rng, classes[distractor_indices[0]], t)
    wave = wave + NOISE_LEVEL * rng.standard_normal(num_samples, dtype=np.float32)
    wave = (0.8 * wave / np.abs(wave).max()).astype(np.float32)
    return _Sample(pixels, wave, classes[sounding_index], sounding_box, mask)


def _fraction(pixel: int, size: int) -> float:
    """pixel / size, nudged up until the evaluator's int(fraction * size) gives pixel back."""
    fraction = pixel / size
    while int(np.float64(fraction) * size) < pixel:
        fraction = float(np.nextafter(fraction, 2.0))
    return fraction


def _flickr_xml(box: Box, size: int, annotators: int = 2) -> str:
    """Flickr-SoundNet annotation: per annotator a <bbox> whose first child is not a coordinate,
    then xmin, ymin, xmax, ymax on 256 x 256 (rounded up, so int(size * c / 256) gives the
    pixel back for size <= 256)."""
    root = ET.Element("annotation")
    for annotator in range(annotators):
        bbox = ET.SubElement(ET.SubElement(root, "object"), "bbox")
        ET.SubElement(bbox, "annotator").text = str(annotator)
        for tag, pixel in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
            ET.SubElement(bbox, tag).text = str(-(-pixel * 256 // size))
    return ET.tostring(root, encoding="unicode") + "\n"


def _check_arguments(
    n_train: int, n_test: int, image_size: int, audio_seconds: float, num_classes: int
) -> None:
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if not audio_seconds > 0:
        raise ValueError(f"audio_seconds must be positive, got {audio_seconds}")
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(CLASSES)}, got {num_classes}")


def generate_synthetic_dataset(
    out: Path,
    n_train: int,
    n_test: int,
    seed: int,
    image_size: int = 224,
    audio_seconds: float = 2.0,
    num_classes: int = 6,
) -> Path:
    """Write the data set into `out` (created if needed) and return it.

    Ids are train_000000... and test_000000...; identical arguments give byte-identical files.
    """
    _check_arguments(n_train, n_test, image_size, audio_seconds, num_classes)
    out = Path(out)
    for folder in ("frames", "audio", "Annotations", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    classes = CLASSES[:num_classes]
    num_samples = round(audio_seconds * SAMPLE_RATE)
    train_ids = [f"train_{index:06d}" for index in range(n_train)]
    test_ids = [f"test_{index:06d}" for index in range(n_test)]
    # One generator per item, all spawned from the seed.
    item_seeds = np.random.SeedSequence(seed).spawn(n_train + n_test)
    test_records = []
    for index, (name, item_seed) in enumerate(zip(train_ids + test_ids, item_seeds, strict=True)):
        sample = _make_sample(np.random.default_rng(item_seed), classes, image_size, num_samples)
        Image.fromarray(sample.image).save(out / "frames" / f"{name}.jpg", quality=90)
        soundfile.write(out / "audio" / f"{name}.wav", sample.wave, SAMPLE_RATE, subtype="PCM_16")
        if index >= n_train:
            Image.fromarray(sample.mask.astype(np.uint8) * 255).save(out / "masks" / f"{name}.png")
            (out / "Annotations" / f"{name}.xml").write_text(_flickr_xml(sample.box, image_size))
            bbox = [_fraction(pixel, image_size) for pixel in sample.box]
            test_records.append({"file": name, "class": sample.cls.name, "bbox": [bbox]})
    (out / "train.txt").write_text("".join(f"{name}\n" for name in train_ids))
    (out / "test.txt").write_text("".join(f"{name}\n" for name in test_ids))
    (out / "test.json").write_text(json.dumps(test_records, indent=1) + "\n")
    return out


def ensure_synthetic_dataset(
    cache_dir: Path,
    n_train: int = 2000,
    n_test: int = 200,
    seed: int = 0,
    image_size: int = 224,
    audio_seconds: float = 2.0,
    num_classes: int = 6,
) -> Path:
    """The data set of these arguments under cache_dir, generated on the first call only.

    It is built in a private folder, marked complete last and then renamed into place, so
    a crashed build is never reused and concurrent builders do not collide.
    """
    _check_arguments(n_train, n_test, image_size, audio_seconds, num_classes)
    name = (
        f"synth-v{GENERATOR_VERSION}-train{n_train}-test{n_test}-seed{seed}"
        f"-img{image_size}-sec{audio_seconds:g}-cls{num_classes}"
    )
    final = Path(cache_dir) / name
    if (final / COMPLETE_MARKER).exists():
        return final
    building = final.with_name(f"{name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    generate_synthetic_dataset(
        building, n_train, n_test, seed, image_size, audio_seconds, num_classes
    )
    (building / COMPLETE_MARKER).write_text("complete\n")
    shutil.rmtree(
        final, ignore_errors=True
    )  # an incomplete folder left by an older layout or crash
    try:
        building.rename(final)
    except OSError:
        if not (final / COMPLETE_MARKER).exists():
            raise
        shutil.rmtree(building)  # another process finished the same data set first
    return final


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the data set into")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--audio-seconds", type=float, default=2.0)
    parser.add_argument("--num-classes", type=int, default=6)
    args = parser.parse_args(argv)
    out = generate_synthetic_dataset(
        args.out,
        args.n_train,
        args.n_test,
        args.seed,
        args.image_size,
        args.audio_seconds,
        args.num_classes,
    )
    print(f"wrote {args.n_train} train and {args.n_test} test items to {out}")


if __name__ == "__main__":
    main()
