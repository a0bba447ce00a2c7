"""The synthetic audio-visual world: determinism, layout, geometry and sounds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from jsa_fast.data import flickr_gt_map, read_flickr_boxes, synth, vggss_gt_map
from jsa_fast.data.synth import CLASSES, SynthConfig, ensure_synthetic_dataset, generate_synthetic_dataset

SIZE = 64


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("world"), 8, 12, seed=7, image_size=SIZE, audio_seconds=0.5
    )


def test_same_seed_gives_byte_identical_files(world: Path, tmp_path: Path) -> None:
    again = generate_synthetic_dataset(tmp_path / "again", 8, 12, seed=7, image_size=SIZE, audio_seconds=0.5)
    assert _files(again) == _files(world)
    other = _files(generate_synthetic_dataset(tmp_path / "other", 8, 12, seed=8, image_size=SIZE, audio_seconds=0.5))
    assert other.keys() == _files(world).keys()
    assert other["frames/train_000000.jpg"] != _files(world)["frames/train_000000.jpg"]


def test_layout_lists_and_formats(world: Path) -> None:
    train_ids = (world / "train.txt").read_text().split()
    test_ids = (world / "test.txt").read_text().split()
    assert train_ids == [f"train_{i:06d}" for i in range(8)] and test_ids == [f"test_{i:06d}" for i in range(12)]
    for name in train_ids + test_ids:
        with Image.open(world / "frames" / f"{name}.jpg") as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        info = soundfile.info(str(world / "audio" / f"{name}.wav"))
        assert (info.samplerate, info.channels, info.frames) == (16000, 1, 8000)
    records = json.loads((world / "test.json").read_text())
    assert [record["file"] for record in records] == test_ids
    assert {record["class"] for record in records} <= {cls.name for cls in CLASSES}
    for name in test_ids:
        assert (world / "masks" / f"{name}.png").exists() and (world / "Annotations" / f"{name}.xml").exists()
    assert not (world / "masks" / "train_000000.png").exists()


def test_sounding_box_is_large_and_matches_every_ground_truth_format(world: Path) -> None:
    for record in json.loads((world / "test.json").read_text()):
        (box,) = record["bbox"]
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        box_map = vggss_gt_map(record["bbox"], SIZE)
        assert 0.28 <= box_map.mean().item() <= 0.47  # 30-45 % up to pixel rounding
        flickr_boxes = read_flickr_boxes(world / "Annotations" / f"{record['file']}.xml")
        assert len(flickr_boxes) == 2 and flickr_boxes[0] == flickr_boxes[1]
        assert (flickr_gt_map(flickr_boxes, SIZE) == box_map).all()
        mask = np.asarray(Image.open(world / "masks" / f"{record['file']}.png")) > 0
        assert mask.sum() > 0 and not mask[box_map.numpy() == 0].any()  # silhouette inside its box
        rows, cols = np.nonzero(box_map.numpy())
        # the silhouette touches all four sides of its box
        assert mask[rows.min()].any() and mask[rows.max()].any()
        assert mask[:, cols.min()].any() and mask[:, cols.max()].any()


def test_distractors_are_small_inside_and_apart_from_the_sounding_object() -> None:
    counts = []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        sounding = synth._sounding_box(rng, 224)
        sounding_area = (sounding[2] - sounding[0]) * (sounding[3] - sounding[1])
        assert 0.295 <= sounding_area / 224**2 <= 0.455
        centre_x, centre_y = (sounding[0] + sounding[2]) / 2, (sounding[1] + sounding[3]) / 2
        assert max(abs(centre_x - 112), abs(centre_y - 112)) >= 0.15 * 224  # off-centre
        boxes = synth._distractor_boxes(rng, 224, sounding, 2)
        counts.append(len(boxes))
        for i, box in enumerate(boxes):
            assert 0 <= box[0] < box[2] <= 224 and 0 <= box[1] < box[3] <= 224
            assert (box[2] - box[0]) * (box[3] - box[1]) <= 0.25 * sounding_area + 1
            assert not synth._overlaps(box, sounding)
            assert not any(synth._overlaps(box, other) for other in boxes[:i])
    assert min(counts) >= 1 and 2 in counts


def test_each_class_sounds_at_its_own_fundamental(world: Path) -> None:
    fundamentals = {cls.name: cls.fundamental_hz for cls in CLASSES}
    for record in json.loads((world / "test.json").read_text()):
        wave, rate = soundfile.read(str(world / "audio" / f"{record['file']}.wav"))
        spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
        peak_hz = np.argmax(spectrum) * rate / len(wave)
        f0 = fundamentals[record["class"]]
        assert 0.96 * f0 - 2 <= peak_hz <= 1.04 * f0 + 2, (record, peak_hz)


def test_each_class_has_its_own_colour_shape_and_sound() -> None:
    assert len({cls.color for cls in CLASSES}) == len({cls.shape for cls in CLASSES}) == len(CLASSES)
    assert len({cls.fundamental_hz for cls in CLASSES}) == len({cls.modulation_hz for cls in CLASSES}) == 6
    for cls in CLASSES:
        silhouette = synth._shape_mask(cls.shape, 40, 30)
        assert silhouette.shape == (30, 40) and 0.2 < silhouette.mean() <= 1


def test_num_classes_limits_the_classes_used(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path, 2, 10, seed=0, image_size=32, audio_seconds=0.1, num_classes=2)
    assert {r["class"] for r in json.loads((root / "test.json").read_text())} <= {
        "red_disc",
        "green_square",
    }
    with pytest.raises(ValueError, match="num_classes"):
        generate_synthetic_dataset(tmp_path, 2, 2, seed=0, num_classes=7)
    with pytest.raises(ValueError, match="n_train"):
        generate_synthetic_dataset(tmp_path, 0, 2, seed=0)


def test_ensure_builds_once_and_rebuilds_an_unfinished_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = SynthConfig(n_train=2, n_test=2, seed=1, image_size=32, audio_seconds=0.1, num_classes=3)
    root = ensure_synthetic_dataset(tmp_path, world)
    assert (root / synth.COMPLETE_MARKER).exists() and (root / "train.txt").exists()
    assert [path.name for path in tmp_path.iterdir()] == [root.name]
    original = _files(root)

    def refuse(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a complete data set was generated again")

    monkeypatch.setattr(synth, "generate_synthetic_dataset", refuse)
    assert ensure_synthetic_dataset(tmp_path, world) == root
    monkeypatch.undo()

    (root / synth.COMPLETE_MARKER).unlink()
    (root / "train.txt").write_text("half-written\n")
    assert ensure_synthetic_dataset(tmp_path, world) == root
    assert _files(root) == original
    assert ensure_synthetic_dataset(tmp_path, dataclasses.replace(world, seed=2)) != root


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synth.main(
        [
            "--out",
            str(tmp_path),
            "--n-train",
            "3",
            "--n-test",
            "2",
            "--image-size",
            "32",
            "--audio-seconds",
            "0.1",
            "--num-classes",
            "4",
            "--seed",
            "5",
        ]
    )
    assert "3 train and 2 test" in capsys.readouterr().out
    assert (tmp_path / "train.txt").read_text().split() == [
        "train_000000",
        "train_000001",
        "train_000002",
    ]


@pytest.mark.parametrize("shape", sorted({cls.shape for cls in CLASSES}))
def test_every_silhouette_touches_all_four_sides_of_its_box(shape: str) -> None:
    for width in range(4, 120):
        for height in range(max(2, int(width / 1.3)), int(width * 1.3) + 1):
            mask = synth._shape_mask(shape, width, height)
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any(), (width, height)
