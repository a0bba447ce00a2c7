"""A deterministic synthetic audio-visual world in docs/api.md's data set layout.

Each class has its own visual object (distinct colour and shape) and its own sound
(distinct fundamental and amplitude-modulation rate). An image shows the sounding object
large (its box covers 30-45 % of the image, so that docs/model.md's median-threshold cIoU can
reach 0.5) and off the image centre (so that a centre prior cannot score by itself) among 1-2 smaller silent distractors of other classes, which never overlap it;
the audio is the sounding class's sound, sometimes mixed with a quieter distractor sound,
plus noise. The test split carries every ground-truth format: test.json (VGG-SS),
test.txt + Annotations/<id>.xml (Flickr-SoundNet, two identical annotators) and
masks/<id>.png (AVSBench, the object's silhouette).

    python -m jsa_fast.data.synth --out DIR [--n-train N --n-test M --seed S
        --image-size 224 --audio-seconds 2.0 --num-classes 6]
    python -m jsa_fast.data.synth --video OUT.mp4 [--clip-seconds 4 --fps 25 --seed S
        --image-size 224 --num-classes 6]      # a moving clip and its boxes, OUT.csv
"""

from __future__ import annotations

import argparse
import dataclasses
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

from jsa_fast.data.audio import SAMPLE_RATE
from jsa_fast.data.video import write_video
from jsa_fast.seeds import SeedDomain, derived_seed
from jsa_fast.settings import check_fields, integer, number, setting

# Part of every cache folder's name: bump it whenever the generator's output changes.
GENERATOR_VERSION = 3
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


def _object_color(rng: np.random.Generator, cls: SynthClass) -> np.ndarray:
    """The class's colour, jittered per object: 3 float32 in [0, 255]."""
    return np.clip(np.asarray(cls.color, dtype=np.float32) + rng.uniform(-15, 15, size=3), 0, 255)


def _paint(image: np.ndarray, cls: SynthClass, color: np.ndarray, box: Box) -> np.ndarray:
    """Paint the class's silhouette into `box` of a float image (in place); its mask."""
    x0, y0, x1, y1 = box
    silhouette = _shape_mask(cls.shape, x1 - x0, y1 - y0)
    image[y0:y1, x0:x1][silhouette] = color
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[y0:y1, x0:x1] = silhouette
    return mask


# An object in a scene: its class, its (jittered) colour and its box.
SceneObject = tuple[SynthClass, np.ndarray, Box]


def _render(
    rng: np.random.Generator, background: np.ndarray, objects: Sequence[SceneObject]
) -> tuple[np.ndarray, np.ndarray]:
    """One picture: the objects painted in order over a copy of the background, then fine
    noise. Returns (size x size x 3 uint8, the last object's mask). A still image is one
    call; a moving clip calls it per frame with the objects' boxes of that frame."""
    image = background.copy()
    mask = np.zeros(image.shape[:2], dtype=bool)
    for cls, color, box in objects:
        mask = _paint(image, cls, color, box)
    image += rng.standard_normal(image.shape, dtype=np.float32) * 8
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask


def _class_sound(rng: np.random.Generator, cls: SynthClass, t: np.ndarray) -> np.ndarray:
    """Three harmonics of a slightly jittered fundamental under the class's modulation."""
    f0 = cls.fundamental_hz * rng.uniform(0.97, 1.03)
    tone = sum(np.sin(2 * np.pi * f0 * harmonic * t + rng.uniform(0, 2 * np.pi)) / harmonic for harmonic in (1, 2, 3))
    if cls.modulation_hz == 0:
        return tone
    envelope = (0.5 * (1 + np.sin(2 * np.pi * cls.modulation_hz * t + rng.uniform(0, 2 * np.pi)))) ** 2
    return tone * envelope


@dataclass(frozen=True)
class _Sample:
    image: np.ndarray  # size x size x 3 uint8
    wave: np.ndarray  # float32 in [-1, 1]
    cls: SynthClass
    box: Box
    mask: np.ndarray  # size x size bool, the sounding object's silhouette


def _make_sample(rng: np.random.Generator, classes: Sequence[SynthClass], size: int, num_samples: int) -> _Sample:
    sounding_index = int(rng.integers(len(classes)))
    others = [index for index in range(len(classes)) if index != sounding_index]
    distractor_indices = rng.choice(others, size=min(len(others), int(rng.integers(1, 3))), replace=False)

    background = _background(rng, size)
    sounding_box = _sounding_box(rng, size)
    distractor_boxes = _distractor_boxes(rng, size, sounding_box, len(distractor_indices))
    distractor_indices = distractor_indices[: len(distractor_boxes)]  # drop any that did not fit
    objects = [
        (classes[index], _object_color(rng, classes[index]), box)
        for index, box in zip(distractor_indices, distractor_boxes, strict=True)
    ]
    sounding = classes[sounding_index]
    pixels, mask = _render(rng, background, [*objects, (sounding, _object_color(rng, sounding), sounding_box)])

    t = _times(num_samples)
    wave = _class_sound(rng, sounding, t)
    if rng.random() < DISTRACTOR_SOUND_PROBABILITY:
        wave = wave + DISTRACTOR_SOUND_GAIN * _class_sound(rng, classes[distractor_indices[0]], t)
    return _Sample(pixels, _noisy_normalized(rng, wave), sounding, sounding_box, mask)


def _times(num_samples: int) -> np.ndarray:
    """Sample times in seconds at SAMPLE_RATE, float32."""
    return np.arange(num_samples, dtype=np.float32) / np.float32(SAMPLE_RATE)


def _noisy_normalized(rng: np.random.Generator, wave: np.ndarray) -> np.ndarray:
    """A clip's wave with background noise added, scaled to a peak of 0.8: float32."""
    wave = wave + NOISE_LEVEL * rng.standard_normal(wave.shape[0], dtype=np.float32)
    return (0.8 * wave / np.abs(wave).max()).astype(np.float32)


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


@dataclass(frozen=True)
class SynthConfig:
    """The synthetic world: its size, seed, image side, clip length and classes (the
    first `num_classes` of CLASSES). Each is a run's setting `--synth-*`."""

    n_train: int = setting(2000, "synthetic world: training items", integer(1), name="synth_train")
    n_test: int = setting(200, "synthetic world: test items", integer(1), name="synth_test")
    seed: int = setting(0, "synthetic world: the seed it is drawn from", integer(), name="synth_seed")
    image_size: int = setting(224, "synthetic world: image side", integer(32), name="synth_image_size")
    audio_seconds: float = setting(
        2.0, "synthetic world: clip length in seconds", number(0, include_low=False), name="synth_audio_seconds"
    )
    num_classes: int = setting(6, "synthetic world: sounding object classes", integer(2), name="synth_classes")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.num_classes > len(CLASSES):
            raise ValueError(f"SynthConfig.num_classes must be in 2..{len(CLASSES)}, got {self.num_classes}")


def generate_synthetic_dataset(
    out: Path,
    n_train: int,
    n_test: int,
    seed: int,
    image_size: int = SynthConfig.image_size,
    audio_seconds: float = SynthConfig.audio_seconds,
    num_classes: int = SynthConfig.num_classes,
) -> Path:
    """Write the data set into `out` (created if needed) and return it.

    Ids are train_000000... and test_000000...; identical arguments give byte-identical files.
    """
    SynthConfig(n_train, n_test, seed, image_size, audio_seconds, num_classes)  # its checks
    out = Path(out)
    for folder in ("frames", "audio", "Annotations", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    classes = CLASSES[:num_classes]
    num_samples = round(audio_seconds * SAMPLE_RATE)
    train_ids = [f"train_{index:06d}" for index in range(n_train)]
    test_ids = [f"test_{index:06d}" for index in range(n_test)]
    # One generator per item, all spawned from the world's seed.
    item_seeds = np.random.SeedSequence(derived_seed(SeedDomain.SYNTHETIC_WORLD, seed)).spawn(n_train + n_test)
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


def default_cache_dir() -> Path:
    """Where the synthetic world is built: $JSA_FAST_CACHE or ~/.cache/jsa-fast."""
    return Path(os.environ.get("JSA_FAST_CACHE", Path.home() / ".cache" / "jsa-fast"))


def cached_synthetic_dataset(world: SynthConfig) -> Path:
    """The world under `default_cache_dir()`/synth, built on first use."""
    return ensure_synthetic_dataset(default_cache_dir() / "synth", world)


def ensure_synthetic_dataset(cache_dir: Path, world: SynthConfig) -> Path:
    """The data set of `world` under cache_dir, generated on the first call only.

    It is built in a private folder, marked complete last and then renamed into place, so
    a crashed build is never reused and concurrent builders do not collide.
    """
    n_train, n_test, seed = world.n_train, world.n_test, world.seed
    image_size, audio_seconds, num_classes = world.image_size, world.audio_seconds, world.num_classes
    name = (
        f"synth-v{GENERATOR_VERSION}-train{n_train}-test{n_test}-seed{seed}"
        f"-img{image_size}-sec{audio_seconds:g}-cls{num_classes}"
    )
    final = Path(cache_dir) / name
    if (final / COMPLETE_MARKER).exists():
        return final
    building = final.with_name(f"{name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    generate_synthetic_dataset(building, n_train, n_test, seed, image_size, audio_seconds, num_classes)
    (building / COMPLETE_MARKER).write_text("complete\n")
    shutil.rmtree(final, ignore_errors=True)  # an incomplete folder left by an older layout or crash
    try:
        building.rename(final)
    except OSError:
        if not (final / COMPLETE_MARKER).exists():
            raise
        shutil.rmtree(building)  # another process finished the same data set first
    return final


@dataclass(frozen=True)
class MovingClip:
    """A clip of the synthetic world in which the sounding object crosses the picture
    (left to right or back) while a silent distractor of another class stays put.

    frames: T x size x size x 3 uint8 at `fps`; wave: float32 at SAMPLE_RATE, as long as
    the frames (T / fps seconds); boxes: T x 4 int, the sounding object's box per frame
    (x0, y0, x1, y1 in pixels, covering [y0:y1, x0:x1]).
    """

    frames: np.ndarray
    wave: np.ndarray
    boxes: np.ndarray
    fps: int
    cls: SynthClass
    distractor: SynthClass
    distractor_box: Box


def render_moving_clip(
    seed: int = 0, image_size: int = 224, seconds: float = 4.0, fps: int = 25, num_classes: int = 6
) -> MovingClip:
    """A moving clip drawn from `seed`, painted and sounded like the still data set.

    The sounding object is as large as the smallest of the still set (its box a square of
    30 % of the picture) and travels along the top or bottom edge from one side to the
    other; the distractor sits in the band left free above or below its path.
    """
    SynthConfig(1, 1, seed, image_size, seconds, num_classes)  # its checks
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive int, got {fps!r}")
    num_frames = round(seconds * fps)
    if num_frames < 2:
        raise ValueError(f"a clip of {seconds} s at {fps} fps has fewer than 2 frames")
    rng = np.random.default_rng(derived_seed(SeedDomain.SYNTHETIC_CLIP, seed))
    classes = CLASSES[:num_classes]
    sounding_index, distractor_index = (int(i) for i in rng.choice(len(classes), size=2, replace=False))
    sounding, distractor = classes[sounding_index], classes[distractor_index]
    background = _background(rng, image_size)

    side = round(math.sqrt(SOUNDING_AREA_RANGE[0]) * image_size)
    along_top = rng.random() < 0.5
    path_y0 = 0 if along_top else image_size - side
    band_y0, band_y1 = (side, image_size) if along_top else (0, image_size - side)
    distractor_side = math.floor(math.sqrt(rng.uniform(*DISTRACTOR_AREA_RANGE)) * side)
    distractor_side = max(4, min(distractor_side, band_y1 - band_y0))
    dx0 = int(rng.integers(0, image_size - distractor_side + 1))
    dy0 = int(rng.integers(band_y0, band_y1 - distractor_side + 1))
    distractor_box = (dx0, dy0, dx0 + distractor_side, dy0 + distractor_side)
    distractor_color, sounding_color = _object_color(rng, distractor), _object_color(rng, sounding)

    starts = np.linspace(0, image_size - side, num_frames).round().astype(int)
    if rng.random() < 0.5:
        starts = starts[::-1]
    boxes = np.stack(
        [starts, np.full_like(starts, path_y0), starts + side, np.full_like(starts, path_y0 + side)], axis=1
    )
    frames = np.stack(
        [
            _render(
                rng,
                background,
                [(distractor, distractor_color, distractor_box), (sounding, sounding_color, tuple(box))],
            )[0]
            for box in boxes.tolist()
        ]
    )
    wave = _noisy_normalized(rng, _class_sound(rng, sounding, _times(round(num_frames / fps * SAMPLE_RATE))))
    return MovingClip(frames, wave, boxes, fps, sounding, distractor, distractor_box)


def write_moving_clip(clip: MovingClip, video_path: Path) -> Path:
    """Write the clip as an MP4 (H.264 + AAC) and its boxes as a CSV beside it (same name,
    .csv: frame, time_s, x0, y0, x1, y1 in pixels of the frame). Returns the CSV's path."""
    video_path = Path(video_path)
    video_path.parent.mkdir(parents=True, exist_ok=True)
    write_video(video_path, clip.frames, clip.fps, audio=(clip.wave[None], SAMPLE_RATE))
    csv_path = video_path.with_suffix(".csv")
    rows = [
        f"{index},{index / clip.fps:.6f},{x0},{y0},{x1},{y1}\n"
        for index, (x0, y0, x1, y1) in enumerate(clip.boxes.tolist())
    ]
    csv_path.write_text("frame,time_s,x0,y0,x1,y1\n" + "".join(rows))
    return csv_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="folder to write the data set into")
    target.add_argument("--video", type=Path, help="write a moving clip instead: VIDEO.mp4 and its boxes VIDEO.csv")
    for option in dataclasses.fields(SynthConfig):
        parser.add_argument(f"--{option.name.replace('_', '-')}", type=type(option.default), default=option.default)
    parser.add_argument("--clip-seconds", type=float, default=4.0, help="--video: the clip's length")
    parser.add_argument("--fps", type=int, default=25, help="--video: frames per second")
    args = parser.parse_args(argv)
    if args.video is not None:
        clip = render_moving_clip(args.seed, args.image_size, args.clip_seconds, args.fps, args.num_classes)
        csv_path = write_moving_clip(clip, args.video)
        print(
            f"wrote {args.video} ({len(clip.frames)} frames, a {clip.cls.name} crossing, "
            f"a silent {clip.distractor.name}) and its boxes {csv_path}"
        )
        return
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
