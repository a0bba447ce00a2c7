"""Training augmentation (--augment released|flip|none) against the released JSA code's
transforms (dataset.py: hard_img, hard_aud), written out here with torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from jsa_fast.data import AudioConfig, ImageConfig, eval_transform, mask_spectrogram, train_transform

NORMALISE = [T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])]


def released_transform(size: int, blur: T.GaussianBlur, hard: bool) -> T.Compose:
    """dataset.py's img_transform at image size `size` (224 there): hard_img true or false."""
    colour = [
        T.RandomApply([blur], p=0.8),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    return T.Compose(
        [
            T.Resize(int(size * 1.1), T.InterpolationMode.BICUBIC),
            T.RandomCrop((size, size)),
            *(colour if hard else [T.RandomHorizontalFlip()]),
            *NORMALISE,
        ]
    )


@pytest.fixture(scope="module")
def frame() -> Image.Image:
    """A fixed, non-square frame (the short side is resized with the aspect kept)."""
    rng = np.random.default_rng(17)
    smooth = rng.integers(0, 256, size=(13, 15, 3), dtype=np.uint8)
    return Image.fromarray(smooth).resize((300, 260), Image.BILINEAR)


@pytest.mark.parametrize(
    "size, train_resize, blur",
    [
        (224, 246, T.GaussianBlur(kernel_size=5)),  # the released transform, literally
        (112, 123, T.GaussianBlur(kernel_size=3, sigma=(0.05, 1.0))),  # the tiny preset: sizes x 1/2
    ],
    ids=["224", "112"],
)
@pytest.mark.parametrize("augment", ["released", "flip"])
def test_seeded_transform_equals_the_released_one(frame, size, train_resize, blur, augment) -> None:
    ours = train_transform(ImageConfig(size, train_resize, augment))
    theirs = released_transform(size, blur, hard=augment == "released")
    outputs = set()
    for seed in range(4):
        torch.manual_seed(seed)
        mine = ours(frame)
        torch.manual_seed(seed)
        assert torch.equal(mine, theirs(frame)), seed
        assert mine.shape == (3, size, size)
        outputs.add(mine.numpy().tobytes())
    assert len(outputs) == 4  # the seeds draw different augmentations


def test_released_blur_scales_with_the_image_size() -> None:
    assert ImageConfig(224, 246).blur == (5, (0.1, 2.0))
    assert ImageConfig(112, 123).blur == (3, (0.05, 1.0))
    kernel, sigma = ImageConfig(448, 492).blur
    assert kernel == 9 and sigma == pytest.approx((0.2, 4.0))
    assert ImageConfig(32, 36).blur[0] == 3  # the smallest kernel that blurs


def test_no_augmentation_is_the_evaluation_transform(frame) -> None:
    cfg = ImageConfig(32, 36, "none")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert torch.equal(train_transform(cfg)(frame), eval_transform(cfg)(frame))
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn


def test_augment_must_be_a_known_choice() -> None:
    with pytest.raises(ValueError, match="augment must be one of released, flip, none, got 'hard'"):
        ImageConfig(32, 36, "hard")


def test_mask_widths_keep_the_released_spans() -> None:
    assert AudioConfig().mask_widths == (10, 10)  # 16 kHz, n_fft 512, hop 160: the released 10 bins
    assert AudioConfig(n_fft=256, win_length=256).mask_widths == (5, 10)  # the tiny preset: 62.5 Hz bins
    assert AudioConfig(hop_length=320).mask_widths == (10, 5)


def _bands(masked: torch.Tensor) -> tuple[list[int], list[int]]:
    """The frequency bins and frames set to 0 over a whole 1 x F x T spectrogram."""
    zeros = masked[0] == 0
    return zeros.all(dim=1).nonzero().flatten().tolist(), zeros.all(dim=0).nonzero().flatten().tolist()


def test_spectrogram_masks_cover_their_own_axis_with_the_released_widths() -> None:
    # F = 40 bins, T = 120 frames: the released classes' starts (frequency over T, time
    # over F) would leave most frequency masks outside and no time mask after frame 39.
    cfg = AudioConfig()
    freq_bound, time_bound = cfg.mask_widths  # the released 10 and 10
    spec = torch.rand(1, 40, 120, generator=torch.Generator().manual_seed(0)) + 0.5  # no zero of its own
    widths: dict[str, list[int]] = {"freq": [], "time": []}
    starts: dict[str, list[int]] = {"freq": [], "time": []}
    for seed in range(400):
        torch.manual_seed(seed)
        masked = mask_spectrogram(spec, cfg)
        assert masked.shape == spec.shape and spec.min() > 0  # a copy: the input is untouched
        for axis, band in zip(("freq", "time"), _bands(masked)):
            if band:
                assert band == list(range(band[0], band[-1] + 1)), band  # one contiguous band
                starts[axis].append(band[0])
            widths[axis].append(len(band))
        kept = torch.ones_like(spec, dtype=torch.bool)
        freq_band, time_band = _bands(masked)
        kept[:, freq_band, :] = False
        kept[:, :, time_band] = False
        assert torch.equal(masked[kept], spec[kept])  # everything else as it was
        assert (masked[~kept] == 0).all()
    assert max(widths["freq"]) == freq_bound - 1 and max(widths["time"]) == time_bound - 1
    assert set(widths["freq"]) == set(range(freq_bound)) == set(widths["time"])  # 0 .. 9 bins, uniformly drawn
    assert max(starts["time"]) > 100 and max(starts["freq"]) > 30  # each start over its own axis
    assert np.mean(widths["time"]) == pytest.approx((time_bound - 1) / 2, abs=0.5)


def test_spectrogram_masks_are_drawn_from_torchs_rng() -> None:
    spec = torch.rand(1, 33, 50) + 1
    torch.manual_seed(3)
    first = mask_spectrogram(spec, AudioConfig())
    torch.manual_seed(3)
    assert torch.equal(mask_spectrogram(spec, AudioConfig()), first)
    with pytest.raises(ValueError, match="spec must be 1 x F x T"):
        mask_spectrogram(spec[0], AudioConfig())
