"""The PyTorch data path: preprocessing, ground truth, the data set and its bad-file policy."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional as AF
from PIL import Image

from jsa_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AudioConfig,
    AudioVisualDataset,
    BadFilesError,
    ImageConfig,
    collate_skip_none,
    eval_transform,
    flickr_gt_map,
    load_audio,
    load_image,
    load_mask,
    log_spectrogram,
    make_loader,
    middle_clip,
    read_flickr_boxes,
    train_transform,
    vggss_gt_map,
    video_middle_frame,
    wav_to_spectrogram,
)
from jsa_fast.data.groundtruth import flickr_box_problem, vggss_box_problem
from jsa_fast.data.synth import generate_synthetic_dataset
from jsa_fast.errors import DataError

SMALL_AUDIO = AudioConfig(seconds=0.5)  # 1 x 257 x 51
SMALL_IMAGE = ImageConfig(size=32, train_resize=36)


# ---------------------------------------------------------------- audio


def test_log_spectrogram_of_5_seconds_is_257_x_501_and_matches_stft() -> None:
    cfg = AudioConfig()
    wave = torch.randn(cfg.num_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    spec = log_spectrogram(wave, cfg)
    assert spec.shape == (1, 257, 501) == cfg.spectrogram_shape
    assert spec.dtype == torch.float32
    stft = torch.stft(
        wave,
        n_fft=512,
        hop_length=160,
        win_length=512,
        window=torch.hann_window(512, periodic=True),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    expected = torch.log(stft.abs() ** 2 + 1e-7) / 12
    torch.testing.assert_close(spec[0], expected, atol=1e-5, rtol=0)
    # and the power itself against a float64 computation
    stft64 = torch.stft(
        wave.double(),
        n_fft=512,
        hop_length=160,
        window=torch.hann_window(512, dtype=torch.float64),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    torch.testing.assert_close((spec[0].double() * 12).exp(), stft64.abs() ** 2 + 1e-7, rtol=1e-4, atol=1e-9)


def test_log_spectrogram_of_silence_is_log_of_the_floor() -> None:
    spec = log_spectrogram(torch.zeros(1600), AudioConfig(seconds=0.1))
    assert spec.shape == (1, 257, 11)
    torch.testing.assert_close(spec, torch.full_like(spec, float(np.log(1e-7) / 12)))


def test_middle_clip_tiles_a_short_wave_from_its_start() -> None:
    clip = middle_clip(torch.tensor([0.0, 1.0, 2.0]), 7)
    assert clip.tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0]


def test_middle_clip_takes_the_middle_of_a_long_wave() -> None:
    assert middle_clip(torch.arange(10.0), 4).tolist() == [3.0, 4.0, 5.0, 6.0]
    assert middle_clip(torch.arange(9.0), 4).tolist() == [2.0, 3.0, 4.0, 5.0]  # rounds down
    wave = torch.arange(8 * 16000, dtype=torch.float32)  # 8 s: the middle 5 s start at 1.5 s
    clip = middle_clip(wave, AudioConfig().num_samples)
    assert clip.numel() == 80000 and clip[0].item() == 24000 and clip[-1].item() == 103999


def test_middle_clip_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="wave"):
        middle_clip(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="empty"):
        middle_clip(torch.zeros(0), 4)


@pytest.mark.parametrize(("subtype", "step"), [("PCM_16", 2.0**-15), ("PCM_24", 2.0**-23), ("FLOAT", 0.0)])
def test_load_audio_reads_every_sample_format(tmp_path: Path, subtype: str, step: float) -> None:
    values = np.array([0.0, 0.25, -0.5, 0.123456789, -0.9], dtype=np.float64)
    path = tmp_path / "clip.wav"
    soundfile.write(path, values, 16000, subtype=subtype)
    wave = load_audio(path, 16000)
    assert wave.dtype == torch.float32 and wave.shape == (5,)
    np.testing.assert_allclose(wave.numpy(), values, atol=step + 1e-7)


def test_load_audio_averages_channels(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.array([[0.5, -0.25], [0.0, 1.0], [-0.5, -0.5]]), 16000, subtype="FLOAT")
    assert load_audio(path, 16000).tolist() == [0.125, 0.5, -0.5]


def test_load_audio_resamples_44100_to_16000(tmp_path: Path) -> None:
    path = tmp_path / "cd.wav"
    t = np.arange(44100) / 44100
    soundfile.write(path, 0.5 * np.sin(2 * np.pi * 440 * t), 44100, subtype="FLOAT")
    wave = load_audio(path, 16000)
    assert wave.shape == (16000,)
    original = torch.from_numpy(soundfile.read(path, dtype="float32")[0])
    torch.testing.assert_close(wave, AF.resample(original, orig_freq=44100, new_freq=16000))
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    np.testing.assert_allclose(wave.numpy()[1000:15000], expected[1000:15000], atol=5e-3)


def test_load_audio_names_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.wav"
    path.write_bytes(b"not a wav file at all")
    with pytest.raises(RuntimeError, match="noise.wav"):
        load_audio(path, 16000)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ([0.1, np.nan, -0.2, 0.3], "1 of 4 samples are not finite"),
        ([0.1, -np.inf, np.inf, 0.3], "2 of 4 samples are not finite"),
        ([0.0, 0.0, 0.0, 0.0], r"the audio is silent \(all 4 samples are 0\)"),
    ],
)
def test_load_audio_names_unusable_samples(tmp_path: Path, values: list[float], named: str) -> None:
    path = tmp_path / "clip.wav"
    soundfile.write(path, np.array(values), 16000, subtype="FLOAT")
    with pytest.raises(DataError, match=rf"clip\.wav: {named}"):
        load_audio(path, 16000)


def test_a_spectrogram_beyond_float32_is_named(tmp_path: Path) -> None:
    path = tmp_path / "loud.wav"
    soundfile.write(path, np.full(16000, 1e30), 16000, subtype="FLOAT")  # finite, but 1e60 once squared
    with pytest.raises(DataError, match=r"loud\.wav: the spectrogram is not finite \(samples up to 1e\+30"):
        wav_to_spectrogram(path, SMALL_AUDIO)


def test_audio_config_needs_a_clip_longer_than_half_the_fft() -> None:
    with pytest.raises(ValueError, match="too few for n_fft 512"):
        AudioConfig(seconds=0.01)  # 160 samples


# ---------------------------------------------------------------- images


def _normalised(pixels: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> 3 x H x W, ImageNet-normalised by hand."""
    scaled = pixels.astype(np.float64) / 255
    return ((scaled - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)


def test_eval_transform_normalises_every_pixel() -> None:
    pixels = np.array([[[0, 128, 255], [10, 20, 30]], [[255, 0, 0], [1, 2, 3]]], dtype=np.uint8)
    out = eval_transform(ImageConfig(size=2, train_resize=2))(Image.fromarray(pixels))
    assert out.shape == (3, 2, 2) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _normalised(pixels), atol=1e-6)


def test_eval_transform_resizes_to_a_square() -> None:
    flat = np.full((3, 5, 3), (200, 100, 50), dtype=np.uint8)  # 5 wide, 3 high
    out = eval_transform(ImageConfig(size=4, train_resize=4))(Image.fromarray(flat))
    assert out.shape == (3, 4, 4)
    np.testing.assert_allclose(out.numpy(), _normalised(np.full((4, 4, 3), (200, 100, 50), np.uint8)), atol=1e-6)


def _train_output(seed: int, cfg: ImageConfig, image: Image.Image) -> torch.Tensor:
    torch.manual_seed(seed)
    return train_transform(cfg)(image)


def test_train_transform_is_a_crop_of_the_resized_image_and_reproducible() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8))
    cfg = ImageConfig(size=6, train_resize=8, augment="flip")
    # the short side (10) resized to 8, the aspect kept: 8 x 9
    resized = torch.from_numpy(_normalised(np.asarray(image.resize((9, 8), Image.BICUBIC)))).float()
    crops = [resized[:, top : top + 6, left : left + 6] for top in range(3) for left in range(4)]
    windows = crops + [crop.flip(-1) for crop in crops]
    outputs = [_train_output(seed, cfg, image) for seed in range(8)]
    for out in outputs:
        assert out.shape == (3, 6, 6)
        assert any(torch.allclose(out, window, atol=1e-6) for window in windows)
    assert len({out.numpy().tobytes() for out in outputs}) > 1  # different seeds, different crops
    torch.testing.assert_close(_train_output(3, cfg, image), outputs[3], rtol=0, atol=0)


def test_released_train_transform_is_reproducible() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(40, 40, 3), dtype=np.uint8))
    cfg = ImageConfig(size=32, train_resize=36, augment="released")
    first, second = _train_output(5, cfg, image), _train_output(5, cfg, image)
    assert first.shape == (3, 32, 32)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_image_config_rejects_a_resize_smaller_than_the_crop() -> None:
    with pytest.raises(ValueError, match="train_resize"):
        ImageConfig(size=224, train_resize=200)


def _write_grey_video(path: Path, levels: list[int]) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])  # mkv records no frame count
def test_video_middle_frame_is_the_middle_one(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"clip{suffix}"
    _write_grey_video(path, [20, 70, 120, 170, 220])
    frame = np.asarray(video_middle_frame(path), dtype=np.float64)
    assert frame.shape == (32, 32, 3)
    assert abs(frame.mean() - 120) < 3 and frame.std() < 1
    if suffix == ".mp4":
        assert np.asarray(load_image(path), dtype=np.float64).mean() == frame.mean()


# ---------------------------------------------------------------- ground truth


def test_vggss_gt_map_is_the_union_of_truncated_boxes() -> None:
    boxes = [
        [0.1, 0.1, 0.5, 0.5],  # pixels [1, 1, 5, 5]: 16
        [0.3, 0.3, 0.7, 0.6],  # [3, 3, 7, 6]: 12, 4 shared with the first
        [0.95, -0.2, 1.2, 0.15],  # clipped: [9, 0, 10, 1]: 1
    ]
    gt = vggss_gt_map(boxes, 10)
    assert gt.shape == (10, 10) and gt.dtype == torch.float32
    assert set(gt.unique().tolist()) == {0.0, 1.0}
    assert gt.sum().item() == 16 + 12 - 4 + 1
    assert gt[0, 9] == 1 and gt[5, 5] == 1 and gt[6, 6] == 0 and gt[1, 0] == 0


def test_vggss_gt_map_at_224_truncates_like_ezvsl() -> None:
    gt = vggss_gt_map([[0.123, 0.456, 0.789, 0.999]], 224)
    # int(0.123 * 224) = 27, int(0.456 * 224) = 102, int(0.789 * 224) = 176, int(0.999 * 224) = 223
    assert gt.sum().item() == (176 - 27) * (223 - 102)
    assert gt[102, 27] == 1 and gt[101, 27] == 0 and gt[222, 175] == 1 and gt[223, 175] == 0


def test_flickr_gt_map_is_the_consensus_of_scaled_boxes() -> None:
    boxes = [(0, 0, 128, 128), (64, 64, 192, 192), (0, 0, 32, 32)]
    # at 224: [0, 0, 112, 112], [56, 56, 168, 168], [0, 0, 28, 28]
    gt = flickr_gt_map(boxes, 224)
    assert set(gt.unique().tolist()) == {0.0, 0.5, 1.0}
    ones = 56 * 56 + 28 * 28  # covered twice: first and second, or first and third
    halves = (112 * 112 - 56 * 56 - 28 * 28) + (112 * 112 - 56 * 56)
    assert (gt == 1).sum().item() == ones and (gt == 0.5).sum().item() == halves
    assert gt.sum().item() == ones + halves / 2
    # int(224 * 100 / 256) = 87
    assert flickr_gt_map([(100, 100, 256, 256)] * 2, 224).sum().item() == (224 - 87) ** 2


def test_read_flickr_boxes_skips_the_first_child(tmp_path: Path) -> None:
    path = tmp_path / "a.xml"
    path.write_text(
        "<annotation><filename>a.jpg</filename>"
        "<object><bbox><id>7</id><xmin>10</xmin><ymin>20</ymin><xmax>30</xmax><ymax>40</ymax></bbox></object>"
        "<object><bbox><id>8</id><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax></bbox></object>"
        "</annotation>"
    )
    assert read_flickr_boxes(path) == [(10, 20, 30, 40), (1, 2, 3, 4)]
    path.write_text("<annotation><object><bbox><id>7</id><xmin>10</xmin></bbox></object></annotation>")
    with pytest.raises(ValueError, match="a.xml"):
        read_flickr_boxes(path)


@pytest.mark.parametrize(
    ("box", "problem"),
    [
        ([0.1, 0.2, 0.5, 0.6], None),
        (
            [10, 20, 40, 50],
            r"not inside the image \(VGG-SS coordinates are fractions in \[0, 1\]; these look like pixels\)",
        ),
        ([-0.1, 0.2, 0.5, 0.6], r"not inside the image \(VGG-SS coordinates are fractions in \[0, 1\]\)"),
        ([0.1, float("nan"), 0.5, 0.6], "not inside the image"),
        ([0.5, 0.2, 0.1, 0.6], "not ordered"),
        ([0.1, 0.2, 0.1, 0.6], "not ordered"),
        ([0.1, 0.2, 0.11, 0.6], "covers no pixel at 32 x 32"),  # int(3.2) = int(3.52) = 3
        ([0.1, 0.2, 0.5], "needs 4 coordinates"),
    ],
)
def test_vggss_box_problems_are_named(box: list[float], problem: str | None) -> None:
    found = vggss_box_problem(box, 32)
    assert found is None if problem is None else re.search(problem, found), found


@pytest.mark.parametrize(
    ("box", "problem"),
    [
        ((10, 20, 100, 200), None),
        ((10, 20, 300, 200), r"not inside the image \(Flickr-SoundNet coordinates are pixels in \[0, 256\]\)"),
        ((100, 20, 10, 200), "not ordered"),
        ((10, 20, 13, 200), "covers no pixel at 32 x 32"),  # 32 * 10 // 256 = 32 * 13 // 256 = 1
    ],
)
def test_flickr_box_problems_are_named(box: tuple[int, ...], problem: str | None) -> None:
    found = flickr_box_problem(box, 32)
    assert found is None if problem is None else re.search(problem, found), found


def test_a_mask_without_foreground_is_named(tmp_path: Path) -> None:
    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[0, 0] = 255  # one pixel, lost by a nearest resize to 8 x 8
    Image.fromarray(pixels).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", 64).sum() == 1
    with pytest.raises(DataError, match=r"m\.png: the mask has no foreground pixel at 8 x 8"):
        load_mask(tmp_path / "m.png", 8)


def test_load_mask_resizes_nearest(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4), dtype=np.uint8)
    pixels[1:3, 2:4] = 255
    Image.fromarray(pixels).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", 8)
    assert mask.shape == (8, 8) and mask.sum().item() == 16
    assert mask[2:6, 4:8].eq(1).all()


# ---------------------------------------------------------------- the data set


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth"), 6, 4, seed=3, image_size=48, audio_seconds=0.3)


@pytest.fixture
def root_copy(synth_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synth_root, tmp_path / "data"))


def test_train_items_have_the_documented_shapes(synth_root: Path) -> None:
    dataset = AudioVisualDataset(synth_root, "train", SMALL_IMAGE, SMALL_AUDIO)
    assert dataset.ids == [f"train_{i:06d}" for i in range(6)]
    assert dataset.classes == [] and len(dataset) == 6
    item = dataset[2]
    assert set(item) == {"image", "spec", "id", "label"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["spec"].shape == (1, 257, 51) and item["spec"].dtype == torch.float32
    assert item["id"] == "train_000002" and item["label"] == -1


def test_vggss_test_items_carry_labels_gt_and_masks(synth_root: Path) -> None:
    dataset = AudioVisualDataset(synth_root, "test", SMALL_IMAGE, SMALL_AUDIO)
    records = json.loads((synth_root / "test.json").read_text())
    assert dataset.gt_format == "vggss"
    assert dataset.ids == [record["file"] for record in records]
    assert dataset.classes == sorted({record["class"] for record in records})
    for index, record in enumerate(records):
        item = dataset[index]
        assert item["label"] == dataset.classes.index(record["class"])
        torch.testing.assert_close(item["gt"], vggss_gt_map(record["bbox"], 32))
        assert item["gt"].dtype == item["mask"].dtype == torch.float32
        assert item["mask"].shape == (32, 32) and 0 < item["mask"].sum() <= item["gt"].sum() + 32


def test_flickr_test_split_when_there_is_no_test_json(synth_root: Path, root_copy: Path) -> None:
    (root_copy / "test.json").unlink()
    dataset = AudioVisualDataset(root_copy, "test", ImageConfig(size=48, train_resize=48), SMALL_AUDIO)
    assert dataset.gt_format == "flickr" and dataset.classes == []
    records = json.loads((synth_root / "test.json").read_text())
    assert dataset.ids == [record["file"] for record in records]
    for index, record in enumerate(records):
        item = dataset[index]
        assert item["label"] == -1
        # two agreeing annotators on 256 x 256: the consensus is the VGG-SS box, pixel for pixel
        torch.testing.assert_close(item["gt"], vggss_gt_map(record["bbox"], 48), rtol=0, atol=0)


def test_loader_batches_and_is_reproducible(synth_root: Path) -> None:
    dataset = AudioVisualDataset(synth_root, "train", SMALL_IMAGE, SMALL_AUDIO)

    def epoch_ids(seed: int) -> list[str]:
        return [i for batch in make_loader(dataset, 4, True, 0, seed, False) for i in batch["id"]]

    assert epoch_ids(1) == epoch_ids(1)
    assert sorted(epoch_ids(1)) == dataset.ids
    assert any(epoch_ids(1) != epoch_ids(seed) for seed in (2, 3, 4))
    batch = next(iter(make_loader(dataset, 4, False, 0, 0, True)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["spec"].shape == (4, 1, 257, 51)
    assert batch["label"].tolist() == [-1] * 4 and batch["id"] == dataset.ids[:4]


# ---------------------------------------------------------------- bad files


def test_truncated_jpeg_fails_at_load_time_naming_the_path(root_copy: Path) -> None:
    jpeg = root_copy / "frames" / "train_000001.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])  # the header still opens
    dataset = AudioVisualDataset(root_copy, "train", SMALL_IMAGE, SMALL_AUDIO)
    with pytest.raises(BadFilesError, match="train_000001.jpg") as caught:
        dataset[1]
    assert caught.value.problems[0][0] == jpeg
    with pytest.raises(BadFilesError, match="train_000001.jpg"):  # also from a worker process
        list(make_loader(dataset, 2, False, 1, 0, False))

    skipping = AudioVisualDataset(root_copy, "train", SMALL_IMAGE, SMALL_AUDIO, on_bad_file="skip")
    with pytest.warns(UserWarning, match="train_000001.jpg"):
        assert skipping[1] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = collate_skip_none([skipping[0], skipping[1], skipping[2]])
        assert batch["id"] == ["train_000000", "train_000002"]
        assert collate_skip_none([skipping[1]]) is None


def test_construction_lists_every_bad_file(root_copy: Path) -> None:
    broken = root_copy / "frames" / "train_000002.jpg"
    broken.write_bytes(broken.read_bytes()[:10])
    (root_copy / "audio" / "train_000004.wav").unlink()
    (root_copy / "audio" / "train_000005.wav").write_bytes(b"RIFF....WAVE")
    with pytest.raises(BadFilesError) as caught:
        AudioVisualDataset(root_copy, "train", SMALL_IMAGE, SMALL_AUDIO)
    message = str(caught.value)
    for name in ("train_000002.jpg", "train_000004.wav", "train_000005.wav"):
        assert name in message
    assert len(caught.value.problems) == 3

    with pytest.warns(UserWarning) as records:
        dataset = AudioVisualDataset(root_copy, "train", SMALL_IMAGE, SMALL_AUDIO, on_bad_file="skip")
    assert len(records) == 1 and "train_000004.wav" in str(records[0].message)
    assert dataset.ids == ["train_000000", "train_000001", "train_000003"]


def test_missing_frame_names_both_candidates(root_copy: Path) -> None:
    (root_copy / "frames" / "test_000000.jpg").unlink()
    with pytest.raises(BadFilesError, match=r"test_000000\.jpg: missing \(no .*videos/test_000000\.mp4"):
        AudioVisualDataset(root_copy, "test", SMALL_IMAGE, SMALL_AUDIO)


def test_frames_may_come_from_videos(root_copy: Path) -> None:
    (root_copy / "frames" / "train_000000.jpg").unlink()
    (root_copy / "videos").mkdir()
    _write_grey_video(root_copy / "videos" / "train_000000.mp4", [0, 0, 200, 0])
    dataset = AudioVisualDataset(root_copy, "train", ImageConfig(32, 32, "flip"), SMALL_AUDIO)
    torch.manual_seed(0)
    image = dataset[0]["image"]
    grey = (200 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(image.mean(dim=(1, 2)).numpy(), grey, atol=0.05)


def test_empty_train_list_is_named(root_copy: Path) -> None:
    (root_copy / "train.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"train\.txt.*empty"):
        AudioVisualDataset(root_copy, "train", SMALL_IMAGE, SMALL_AUDIO)


@pytest.mark.parametrize(
    "content",
    [
        '{"file": "a"',
        "{}",
        "[]",
        '[{"file": "test_000000", "class": "x"}]',
        '[{"file": "test_000000", "class": "x", "bbox": [[0, 0, 1]]}]',
    ],
)
def test_malformed_test_json_is_named(root_copy: Path, content: str) -> None:
    (root_copy / "test.json").write_text(content)
    with pytest.raises(ValueError, match=r"test\.json"):
        AudioVisualDataset(root_copy, "test", SMALL_IMAGE, SMALL_AUDIO)


def test_masks_for_only_some_test_ids_are_rejected(root_copy: Path) -> None:
    (root_copy / "masks" / "test_000001.png").unlink()
    with pytest.raises(ValueError, match="test_000001"):
        AudioVisualDataset(root_copy, "test", SMALL_IMAGE, SMALL_AUDIO, on_bad_file="skip")


def test_bad_arguments_are_named(synth_root: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        AudioVisualDataset(synth_root, "val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_bad_file"):
        AudioVisualDataset(synth_root, "train", on_bad_file="ignore")  # type: ignore[arg-type]


def test_bad_boxes_are_listed_with_the_bad_files_and_skipped(root_copy: Path) -> None:
    entries = json.loads((root_copy / "test.json").read_text())
    entries[0]["bbox"] = [[12, 4, 30, 40]]
    entries[2]["bbox"].append([0.9, 0.1, 0.2, 0.3])  # one bad box spoils the item
    (root_copy / "test.json").write_text(json.dumps(entries))
    (root_copy / "audio" / "test_000003.wav").unlink()
    with pytest.raises(BadFilesError) as caught:
        AudioVisualDataset(root_copy, "test", SMALL_IMAGE, SMALL_AUDIO)
    assert [(path.name, reason.split(":")[0]) for path, reason in caught.value.problems] == [
        ("test.json", "item test_000000"),
        ("test.json", "item test_000002"),
        ("test_000003.wav", "missing"),
    ]
    assert "\n" not in str(caught.value) and "these look like pixels" in str(caught.value)
    with pytest.warns(UserWarning, match="skipping 3 id"):
        dataset = AudioVisualDataset(root_copy, "test", SMALL_IMAGE, SMALL_AUDIO, on_bad_file="skip")
    assert dataset.ids == ["test_000001"]


def test_bad_flickr_boxes_name_their_annotation(root_copy: Path) -> None:
    (root_copy / "test.json").unlink()
    xml = root_copy / "Annotations" / "test_000001.xml"
    xml.write_text(re.sub(r"<xmax>\d+</xmax>", "<xmax>999</xmax>", xml.read_text(), count=1))
    with pytest.raises(BadFilesError, match=r"test_000001\.xml: item test_000001: box .* is not inside the image"):
        AudioVisualDataset(root_copy, "test", SMALL_IMAGE, SMALL_AUDIO)


def test_a_wav_holding_nan_fails_or_is_skipped_when_read(root_copy: Path) -> None:
    path = root_copy / "audio" / "train_000002.wav"
    samples, rate = soundfile.read(path, dtype="float32")
    samples[len(samples) // 2] = np.nan
    soundfile.write(path, samples, rate, subtype="FLOAT")
    dataset = AudioVisualDataset(root_copy, "train", SMALL_IMAGE, SMALL_AUDIO)  # headers are fine
    with pytest.raises(BadFilesError, match=r"train_000002\.wav: 1 of \d+ samples are not finite \(NaN or inf\)$"):
        dataset[2]
    skipping = AudioVisualDataset(root_copy, "train", SMALL_IMAGE, SMALL_AUDIO, on_bad_file="skip")
    with pytest.warns(UserWarning, match="train_000002.wav"):
        assert skipping[2] is None
