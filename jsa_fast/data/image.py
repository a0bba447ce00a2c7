"""Image preprocessing (SPEC.md "Preprocessing") and frame reading (a JPEG or a video frame)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import torchvision.transforms as T
from PIL import Image
from torch import Tensor

from jsa_fast.cli import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageTransform = Callable[[Image.Image], Tensor]


@dataclass(frozen=True)
class ImageConfig:
    """Image sizes: evaluation resizes to size x size; training resizes to train_resize x
    train_resize and crops size x size at random. color_augment adds the released JSA code's
    blur, colour jitter and grayscale."""

    size: int = 224
    train_resize: int = 246
    color_augment: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"ImageConfig.size must be a positive int, got {self.size!r}")
        if not isinstance(self.train_resize, int) or self.train_resize < self.size:
            raise ValueError(
                f"ImageConfig.train_resize must be an int >= size ({self.size}), "
                f"got {self.train_resize!r}"
            )


def eval_transform(cfg: ImageConfig) -> ImageTransform:
    """PIL RGB image -> 3 x size x size float32: bicubic resize, ImageNet normalisation."""
    return T.Compose(
        [
            T.Resize((cfg.size, cfg.size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def train_transform(cfg: ImageConfig) -> ImageTransform:
    """PIL RGB image -> 3 x size x size float32 with random crop and flip (+ colour augmentation).

    All randomness comes from torch's global RNG (torchvision's transforms draw from it), so
    torch.manual_seed, or a DataLoader's seeded generator, makes it reproducible.
    """
    blur = [T.RandomApply([T.GaussianBlur(kernel_size=5)], p=0.8)] if cfg.color_augment else []
    color = (
        [T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2)]
        if cfg.color_augment
        else []
    )
    # The order (blur before the flip, colour after it) is the released JSA code's.
    return T.Compose(
        [
            T.Resize(
                (cfg.train_resize, cfg.train_resize), interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomCrop(cfg.size),
            *blur,
            T.RandomHorizontalFlip(),
            *color,
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def video_frame_count(path: str | Path) -> int:
    """The number of frames of a video's first video stream, from its container (PyAV),
    without decoding any."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DataError(f"{path}: the file has no video stream")
        num_frames = container.streams.video[0].frames
    if num_frames == 0:
        # Some containers do not record a frame count; counting packets needs no decoding.
        with av.open(str(path)) as container:
            num_frames = sum(1 for packet in container.demux(video=0) if packet.size)
    return num_frames


def video_middle_frame(path: str | Path) -> Image.Image:
    """The frame at index n // 2 of a video's n frames, as a PIL RGB image (decoded with PyAV)."""
    num_frames = video_frame_count(path)
    if num_frames == 0:
        raise DataError(f"{path}: the video holds no frame")
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index == num_frames // 2:
                return frame.to_image().convert("RGB")
    raise DataError(f"{path}: decoded fewer frames than the {num_frames} the container lists")


def is_video(path: str | Path) -> bool:
    """Whether a frame path names a video (.mp4), whose middle frame is the clip's frame."""
    return Path(path).suffix.lower() == ".mp4"


def load_image(path: str | Path) -> Image.Image:
    """A frame as a decoded PIL RGB image: a video's middle frame for .mp4, else the image file."""
    if is_video(path):
        return video_middle_frame(path)
    with Image.open(path) as image:
        return image.convert("RGB")
