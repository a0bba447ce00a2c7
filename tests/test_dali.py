"""The DALI data path against the PyTorch one (jsa_fast.data.datasets), sample by sample.

Runs DALI's CPU operators here (device "cpu", device_id=None); the GPU variants are marked
gpu. Without nvidia.dali the DALI tests skip with the reason; `epoch_batches` runs anyway.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch

from jsa_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AudioConfig,
    AudioVisualDataset,
    BadFilesError,
    ImageConfig,
    eval_transform,
    load_image,
)
from jsa_fast.data.dali import dali_available, make_dali_loader
from jsa_fast.data.datasets import EpochSeededDataset, epoch_batches
from jsa_fast.data.synth import generate_synthetic_dataset

needs_dali = pytest.mark.skipif(
    not dali_available("cpu"), reason="nvidia.dali is not installed (pip install -r requirements-dali.txt)"
)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    ),
]

# Crop and flip only, no spectrogram masks: the training items the tests compare item by
# item (the released augmentation is compared in distribution, below).
IMAGE = ImageConfig(size=48, train_resize=56, augment="flip")
AUDIO = AudioConfig(seconds=0.5, n_fft=256, win_length=256, hop_length=160, spec_augment=False)  # 1 x 129 x 51
RELEASED_IMAGE = dataclasses.replace(IMAGE, augment="released")
RELEASED_AUDIO = dataclasses.replace(AUDIO, spec_augment=True)  # mask widths below (5, 10)
DRAWS = 256  # augmentations of one item compared in distribution
# PIL's and DALI's antialiased bicubic resizes agree within 4 grey levels (docs/build.md): 4 / 255
# in [0, 1], divided by the smallest ImageNet std.
IMAGE_ATOL = 4 / 255 / min(0.229, 0.224, 0.225)
SPEC_ATOL = 1e-3  # log spectrogram; docs/build.md measured 8e-5 at 257 x 501
# DALI's resampler is not torchaudio's (other filter): within 1e-4 on the wave, more in
# near-silent bins after the log.
RESAMPLED_SPEC_ATOL = 0.05
POWER_RTOL = 1e-3  # power spectrogram |difference| over its peak


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth"), 8, 6, seed=5, image_size=64, audio_seconds=0.7)


@pytest.fixture
def root_copy(synth_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synth_root, tmp_path / "data"))


def _cat(batches: list[dict], key: str) -> torch.Tensor:
    return torch.cat([batch[key].cpu() for batch in batches])


def _assert_matches_torch_path(
    root: Path, split: str, device: str, image_atol: float = IMAGE_ATOL, image_mean_atol: float = 0.01
) -> None:
    dataset = AudioVisualDataset(root, split, IMAGE, AUDIO)
    batches = list(make_dali_loader(AudioVisualDataset(root, split, IMAGE, AUDIO), 4, False, 0, device=device))
    assert [len(batch["id"]) for batch in batches] == [4, len(dataset) - 4]  # partial last kept
    assert [name for batch in batches for name in batch["id"]] == dataset.ids
    items = [dataset[index] for index in range(len(dataset))]
    image, spec = _cat(batches, "image"), _cat(batches, "spec")
    assert image.dtype == spec.dtype == torch.float32
    assert image.shape == (len(dataset), 3, 48, 48) and spec.shape == (len(dataset), 1, 129, 51)
    assert batches[0]["image"].device.type == batches[0]["label"].device.type == device
    assert _cat(batches, "label").tolist() == [item["label"] for item in items]
    assert _cat(batches, "label").dtype == torch.int64
    spec_errors, image_errors = [], []
    for row, item in enumerate(items):
        power, reference = (torch.exp(12 * x) for x in (spec[row], item["spec"]))
        resampled = soundfile.info(str(root / "audio" / f"{dataset.ids[row]}.wav")).samplerate != AUDIO.sample_rate
        spec_errors.append(
            (
                (spec[row] - item["spec"]).abs().max().item(),
                ((power - reference).abs().max() / reference.max()).item(),
                RESAMPLED_SPEC_ATOL if resampled else SPEC_ATOL,
            )
        )
        image_errors.append((image[row] - item["image"]).abs())
    print(
        f"{split}/{device}: log spectrogram max abs {max(e[0] for e in spec_errors):.2e}, "
        f"power max rel {max(e[1] for e in spec_errors):.2e}; "
        f"image max abs {max(e.max().item() for e in image_errors):.3f}"
    )
    assert all(log_error < atol and power_error < POWER_RTOL for log_error, power_error, atol in spec_errors), (
        spec_errors
    )
    assert max(e.max().item() for e in image_errors) < image_atol
    assert max(e.mean().item() for e in image_errors) < image_mean_atol  # most pixels agree exactly
    if split == "test":
        for key in ("gt", "mask"):
            values = _cat(batches, key)
            assert values.dtype == torch.float32 and values.shape == (len(dataset), 48, 48)
            assert torch.equal(values, torch.stack([item[key] for item in items]))


@needs_dali
@pytest.mark.parametrize("device", DEVICES)
def test_test_split_matches_the_torch_path(synth_root: Path, device: str) -> None:
    _assert_matches_torch_path(synth_root, "test", device)


@needs_dali
@pytest.mark.parametrize("device", DEVICES)
def test_unshuffled_train_split_has_the_torch_spectrograms(synth_root: Path, device: str) -> None:
    dataset = AudioVisualDataset(synth_root, "train", IMAGE, AUDIO)
    (batch,) = list(make_dali_loader(AudioVisualDataset(synth_root, "train", IMAGE, AUDIO), 8, False, 0, device=device))
    assert set(batch) == {"image", "spec", "id", "label"} and batch["id"] == dataset.ids
    assert batch["label"].tolist() == [-1] * len(dataset)
    for row in range(len(dataset)):
        assert (batch["spec"][row].cpu() - dataset[row]["spec"]).abs().max() < SPEC_ATOL


def _write_video(path: Path, frames: list[np.ndarray], codec: str) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=5)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@needs_dali
@pytest.mark.parametrize("device", DEVICES)
def test_resampled_stereo_short_clips_and_video_frames_match(root_copy: Path, device: str) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(round(0.9 * 44100)) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 1300 * t)], axis=1)
    soundfile.write(root_copy / "audio" / "test_000001.wav", 0.4 * stereo, 44100)
    # 0.2 s: tiled 3 times (2.5 s would be needed for 0.5 s clips), 24-bit
    soundfile.write(root_copy / "audio" / "test_000002.wav", 0.3 * rng.standard_normal(3200), 16000, subtype="PCM_24")
    (root_copy / "frames" / "test_000003.jpg").unlink()
    (root_copy / "videos").mkdir()
    frames = []
    for level in (10, 90, 170, 250, 30):
        pixels = np.full((64, 64, 3), level, np.uint8)
        pixels[:32, :, 0] = 255 - level  # some structure for the resize
        frames.append(pixels)
    _write_video(root_copy / "videos" / "test_000003.mp4", frames, "libx264")
    _assert_matches_torch_path(root_copy, "test", device)


def _test_items_as_videos(root: Path, device: str) -> None:
    """Every test item becomes ROOT/videos/<id>.mp4 whose middle frame (index 2 of 5) is the
    item's image and whose other frames are its negative, so a wrong frame shows. DALI's
    CPU video decoder has no H.264 (docs/build.md): VP9 there, H.264 (NVDEC) on the GPU."""
    codec = "libx264" if device == "cuda" else "libvpx-vp9"
    (root / "videos").mkdir()
    for frame_path in sorted((root / "frames").glob("test_*.jpg")):
        pixels = np.asarray(load_image(frame_path))
        _write_video(
            root / "videos" / f"{frame_path.stem}.mp4", [255 - pixels] * 2 + [pixels] + [255 - pixels] * 2, codec
        )
        frame_path.unlink()


@needs_dali
@pytest.mark.parametrize("device", DEVICES)
def test_a_data_set_of_videos_is_decoded_by_dalis_video_decoder(root_copy: Path, device: str) -> None:
    _test_items_as_videos(root_copy, device)
    dataset = AudioVisualDataset(root_copy, "test", IMAGE, AUDIO)
    assert all(entry.image_path.suffix == ".mp4" for entry in dataset.entries)
    # Both paths decode one bitstream to the same YUV; DALI's chroma upsampling for the
    # BT.601 conversion to RGB differs from swscale's (PyAV): measured 3.4 grey levels mean,
    # 30 at most (at sharp colour edges), before resizing. DALI's frame is the closer of the
    # two to the original image (6.5 vs 7.2 levels mean).
    _assert_matches_torch_path(root_copy, "test", device, image_atol=40 / 255 / 0.224, image_mean_atol=6 / 255 / 0.224)


@needs_dali
@pytest.mark.parametrize("device", DEVICES)
def test_train_batches_are_crops_of_the_resize_and_reproducible(synth_root: Path, device: str) -> None:
    def run(seed: int, epochs: int = 2) -> list[list[dict]]:
        loader = make_dali_loader(
            AudioVisualDataset(synth_root, "train", IMAGE, AUDIO), 3, True, seed, device=device, drop_last=True
        )
        assert len(loader) == 2
        return [list(loader) for _ in range(epochs)]

    first, again = run(7), run(7)
    for epoch in range(2):
        assert [b["id"] for b in first[epoch]] == [b["id"] for b in again[epoch]]
        for key in ("image", "spec"):
            assert torch.equal(_cat(first[epoch], key), _cat(again[epoch], key))
    ids = [[name for b in epoch for name in b["id"]] for epoch in first]
    assert ids[0] != ids[1] and all(len(set(e)) == 6 for e in ids)  # reshuffled, 2 left out
    assert ids[0] != [name for b in run(8, 1)[0] for name in b["id"]]
    # the same batches as the torch training loop of the same seed and epoch
    names = AudioVisualDataset(synth_root, "train", IMAGE, AUDIO).ids
    assert [b["id"] for b in first[0]] == [[names[i] for i in batch] for batch in epoch_batches(8, 3, 7, 0, 0)]

    resized = eval_transform(ImageConfig(size=56, train_resize=56))
    flips = []
    for batch in first[0]:
        assert batch["image"].shape == (3, 3, 48, 48) and batch["spec"].shape == (3, 1, 129, 51)
        for name, image in zip(batch["id"], batch["image"].cpu(), strict=True):
            full = resized(load_image(synth_root / "frames" / f"{name}.jpg"))
            errors = {
                (x, y, flip): (image - (full.flip(2) if flip else full)[:, y : y + 48, x : x + 48]).abs().max().item()
                for x in range(9) for y in range(9) for flip in (False, True)
            }  # fmt: skip
            best = min(errors, key=errors.get)
            assert errors[best] < IMAGE_ATOL, (name, best, errors[best])
            flips.append(best[2])
    assert len(set(flips)) == 2  # both flipped and unflipped crops among six


@pytest.mark.parametrize("num_items, num_shards, drop_last", [(8, 2, True), (8, 3, False), (8, 3, True), (5, 1, False)])
def test_shards_partition_thelist(num_items: int, num_shards: int, drop_last: bool) -> None:
    planned = [
        epoch_batches(num_items, 2 * num_shards, 3, 1, drop_last=drop_last, shard=shard, num_shards=num_shards)
        for shard in range(num_shards)
    ]
    shards = [[i for batch in batches for i in batch] for batches in planned]
    assert len({len(shard) for shard in shards}) == 1  # equal shares keep DDP ranks in step
    covered = [i for shard in shards for i in shard]
    if drop_last:
        assert len(set(covered)) == len(covered) == num_items // num_shards // 2 * 2 * num_shards
    else:  # wrapped around: every item, the first ones twice
        assert set(covered) == set(range(num_items)) and len(covered) == -(-num_items // num_shards) * num_shards
    # the shards of a global batch are its contiguous slices, in shard order (training's world.shard)
    whole = epoch_batches(num_items, 2 * num_shards, 3, 1, drop_last=drop_last)
    assert [sum(parts, []) for parts in zip(*planned)][: len(whole) - (not drop_last)] == whole[
        : len(whole) - (not drop_last)
    ]
    unshuffled = epoch_batches(5, 2, 3, 0, shuffle=False, drop_last=False)
    assert unshuffled == [[0, 1], [2, 3], [4]] and epoch_batches(5, 2, 3, 0, shuffle=False) == [[0, 1], [2, 3]]
    assert epoch_batches(8, 3, 9, 4, start=1) == epoch_batches(8, 3, 9, 4)[1:]


def test_epoch_batches_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shard"):
        epoch_batches(8, 2, 0, 0, shuffle=False, drop_last=False, shard=2, num_shards=2)
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batches(8, 0, 0, 0, shuffle=False, drop_last=False)
    with pytest.raises(ValueError, match="split evenly"):
        epoch_batches(8, 3, 0, 0, shard=0, num_shards=2)


@needs_dali
def test_sharded_loaders_split_the_data(synth_root: Path) -> None:
    ids = [
        [name for batch in make_dali_loader(AudioVisualDataset(synth_root, "train", IMAGE, AUDIO), 2, True, 4, shard, 2, "cpu") for name in batch["id"]]
        for shard in range(2)
    ]  # fmt: skip
    assert len(ids[0]) == len(ids[1]) == 4
    assert sorted(ids[0] + ids[1]) == [f"train_{i:06d}" for i in range(8)]


@needs_dali
def test_each_process_draws_its_own_augmentation(synth_root: Path) -> None:
    """#22: training gives each process its shard id, so that the processes' DALI
    pipelines draw different crops and flips for the same planned batches; one process's
    stream is the same as a single process's."""

    def crops(shard_id: int, num_shards: int) -> torch.Tensor:
        dataset = AudioVisualDataset(synth_root, "train", IMAGE, AUDIO)
        loader = make_dali_loader(dataset, 2, False, 5, shard_id, num_shards, "cpu", drop_last=True)
        return _cat(list(loader.iterate([[0, 1], [2, 3]])), "image")

    single, first, second = crops(0, 1), crops(0, 2), crops(1, 2)
    assert torch.equal(single, first)
    assert not torch.equal(first, second)


@needs_dali
def test_a_corrupt_jpeg_is_named_or_skipped(root_copy: Path) -> None:
    jpeg = root_copy / "frames" / "test_000004.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])  # the header still opens
    loader = make_dali_loader(AudioVisualDataset(root_copy, "test", IMAGE, AUDIO), 2, False, 0, device="cpu")
    with pytest.raises(BadFilesError, match="test_000004.jpg") as caught:
        list(loader)
    assert caught.value.problems[0][0] == jpeg

    skipping = make_dali_loader(
        AudioVisualDataset(root_copy, "test", IMAGE, AUDIO, on_bad_file="skip"), 2, False, 0, device="cpu"
    )
    with pytest.warns(UserWarning, match="test_000004.jpg"):
        first = list(skipping)
    expected = [["test_000000", "test_000001"], ["test_000002", "test_000003"], ["test_000005"]]
    assert [batch["id"] for batch in first] == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bad item stays out of later epochs, unwarned
        assert [batch["id"] for batch in list(skipping)] == expected
    assert len(skipping) == 3


@needs_dali
@pytest.mark.parametrize("augment", [None, "flip", "released"], ids=["eval", "train-flip", "train-released"])
@pytest.mark.parametrize("videos", [False, True], ids=["images", "videos"])
def test_the_gpu_pipeline_is_a_valid_dali_graph(root_copy: Path, videos: bool, augment: str | None) -> None:
    # Without a GPU, DALI can neither build nor run a device_id=0 pipeline, but defining one
    # checks every operator's arguments and where each input lives (CPU, GPU, mixed).
    from jsa_fast.data.dali import _build_pipeline, _Source

    if videos:
        _test_items_as_videos(root_copy, "cuda")
    source = _Source(AudioVisualDataset(root_copy, "test", IMAGE, AUDIO))
    assert source.videos == videos
    image_cfg, audio_cfg = (RELEASED_IMAGE, RELEASED_AUDIO) if augment == "released" else (IMAGE, AUDIO)
    pipeline = _build_pipeline(
        source, augment is not None, image_cfg, audio_cfg, batch_size=2, device_id=0, seed=1, num_threads=1
    )
    assert pipeline.device_id == 0


@needs_dali
def test_a_corrupt_video_is_named_or_skipped(root_copy: Path) -> None:
    _test_items_as_videos(root_copy, "cpu")
    video = root_copy / "videos" / "test_000002.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])  # loses the index (moov)
    # The data set's probe opens every container before any pipeline runs.
    with pytest.raises(BadFilesError, match="test_000002.mp4"):
        list(make_dali_loader(AudioVisualDataset(root_copy, "test", IMAGE, AUDIO), 2, False, 0, device="cpu"))
    with pytest.warns(UserWarning, match="test_000002.mp4"):
        dataset = AudioVisualDataset(root_copy, "test", IMAGE, AUDIO, on_bad_file="skip")
    ids = [name for batch in make_dali_loader(dataset, 2, False, 0, device="cpu") for name in batch["id"]]
    assert ids == [f"test_{i:06d}" for i in (0, 1, 3, 4, 5)]


def test_without_dali_the_module_imports_and_says_what_to_install(
    synth_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = AudioVisualDataset(synth_root, "train", IMAGE, AUDIO)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now fails
    assert not dali_available("cpu") and not dali_available("cuda")
    with pytest.raises(ImportError, match="requirements-dali.txt"):
        make_dali_loader(dataset, 2, False, 0, device="cpu")


@needs_dali
def test_unreadable_files_are_named_at_construction(root_copy: Path) -> None:
    (root_copy / "audio" / "train_000003.wav").write_bytes(b"RIFF....WAVE")
    with pytest.raises(BadFilesError, match="train_000003.wav"):
        make_dali_loader(AudioVisualDataset(root_copy, "train", IMAGE, AUDIO), 2, False, 0, device="cpu")


@needs_dali
def test_bad_arguments_are_named(synth_root: Path) -> None:
    with pytest.raises(ValueError, match="shard_id"):
        make_dali_loader(AudioVisualDataset(synth_root, "train", IMAGE, AUDIO), 2, True, 0, 3, 2, "cpu")
    with pytest.raises(ValueError, match="device"):
        make_dali_loader(AudioVisualDataset(synth_root, "train", IMAGE, AUDIO), 2, True, 0, device="meta")
    assert not dali_available("cuda:64")


@pytest.fixture(scope="module")
def one_item_many_times(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training set of DRAWS copies (links) of one frame and its sound: each item is one
    draw of the augmentation."""
    root = tmp_path_factory.mktemp("copies")
    ids = [f"copy_{i:04d}" for i in range(DRAWS)]
    for folder, suffix in (("frames", ".jpg"), ("audio", ".wav")):
        (root / folder).mkdir()
        for name in ids:
            os.symlink(synth_root / folder / f"train_000001{suffix}", root / folder / f"{name}{suffix}")
    (root / "train.txt").write_text("".join(f"{name}\n" for name in ids))
    return root


def _augmentation_statistics(image: torch.Tensor, spec: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per draw (N x 3 x H x W normalised images, N x 1 x F x T spectrograms): the image's
    mean and spread of its values in [0, 1], its sharpness (mean |horizontal step|),
    whether it is grey (R = G = B everywhere), and the widths of the spectrogram's zeroed
    frequency and time bands."""
    pixels = image.cpu() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    zeros = spec.cpu()[:, 0] == 0
    return {
        "mean": pixels.mean(dim=(1, 2, 3)),
        "spread": pixels.std(dim=(1, 2, 3)),
        "sharpness": (pixels[..., 1:] - pixels[..., :-1]).abs().mean(dim=(1, 2, 3)),
        "grey": ((pixels.amax(dim=1) - pixels.amin(dim=1)).amax(dim=(1, 2)) < 1e-4).float(),
        "freq_width": zeros.all(dim=2).sum(dim=1).float(),
        "time_width": zeros.all(dim=1).sum(dim=1).float(),
    }


@needs_dali
@pytest.mark.parametrize("device", DEVICES)
def test_released_augmentation_matches_the_torch_path_in_distribution(one_item_many_times: Path, device: str) -> None:
    # DALI draws from its own generator, and its resize, blur and hue are not PIL's: the
    # two paths agree in distribution, over DRAWS augmentations of one item each.
    dataset = AudioVisualDataset(one_item_many_times, "train", RELEASED_IMAGE, RELEASED_AUDIO)
    seeded = EpochSeededDataset(dataset, seed=0)  # as the training loop draws them
    items = [seeded[index] for index in range(DRAWS)]
    torch_stats = _augmentation_statistics(
        torch.stack([i["image"] for i in items]), torch.stack([i["spec"] for i in items])
    )
    batches = list(make_dali_loader(dataset, 64, False, 0, device=device))
    dali_stats = _augmentation_statistics(_cat(batches, "image"), _cat(batches, "spec"))
    summary = {name: (float(torch_stats[name].mean()), float(dali_stats[name].mean())) for name in torch_stats}
    print(f"{device}: torch vs DALI means over {DRAWS} draws: {summary}")
    for name, torch_values in torch_stats.items():
        dali_values = dali_stats[name]
        # 4.5 standard errors of the difference of the two means
        bound = 4.5 * float((torch_values.var() / DRAWS + dali_values.var() / DRAWS).sqrt())
        assert abs(float(torch_values.mean() - dali_values.mean())) < bound, (name, summary[name], bound)
        if name in ("mean", "spread", "sharpness"):  # how much the draws vary: colour jitter, blur
            assert float(dali_values.std()) == pytest.approx(float(torch_values.std()), rel=0.25), name
    freq_bound, time_bound = RELEASED_AUDIO.mask_widths
    for stats in (torch_stats, dali_stats):
        assert stats["freq_width"].max() == freq_bound - 1 and stats["time_width"].max() == time_bound - 1
        assert 0.1 < float(stats["grey"].mean()) < 0.3  # RandomGrayscale(p=0.2)
    # Each start over its own axis: zeroed bins beyond the 51 frames' count in both paths.
    for spec in (torch.stack([i["spec"] for i in items]), _cat(batches, "spec")):
        assert (spec[:, 0, 51:] == 0).all(dim=2).any()
