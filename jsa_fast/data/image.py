"""Image preprocessing (docs/model.md "Preprocessing") and frame reading (a JPEG or a video frame)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torchvision.transforms as T
from PIL import Image
from torch import Tensor

from jsa_fast.data.video import displayed_rgb, pyav
from jsa_fast.errors import DataError
from jsa_fast.settings import check_fields, integer, one_of, setting

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageTransform = Callable[[Image.Image], Tensor]

# --augment: what training does to a frame (and, in AudioConfig, to a spectrogram).
# released: the released JSA scripts' --hard_img/--hard_aud; flip: their default
# (crop and flip); none: the evaluation transform, nothing drawn.
AUGMENTS = ("released", "flip", "none")
RELEASED_SIZE = 224  # the image size the released transform's pixel sizes are stated for


@dataclass(frozen=True)
class ImageConfig:
    """Image sizes and training augmentation. Evaluation resizes to size x size (bicubic).
    Training (`train_transform`) by `augment`: "released" and "flip" resize the short side
    to train_resize (aspect kept) and crop size x size at random, "none" is the evaluation
    transform."""

    size: int = setting(224, "square image side", integer(1), name="image_size")
    train_resize: int = setting(
        246, "training resizes the short side to this before the random crop", integer(1)
    )  # the released int(1.1 x 224)
    augment: str = setting(
        "released",
        "training augmentation of images and spectrograms: released (the released code's), flip (crop and flip) or none",
        one_of(AUGMENTS),
        # an older checkpoint's colour jitter on top of crop and flip, without audio masks
        formerly={"color_augment": lambda color: "released" if color is True else "flip"},
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.train_resize < self.size:
            raise ValueError(
                f"ImageConfig.train_resize must be an int >= size ({self.size}), got {self.train_resize!r}"
            )

    @property
    def blur(self) -> tuple[int, tuple[float, float]]:
        """The released Gaussian blur at this size: (kernel size, sigma range). At 224 it is
        torchvision's GaussianBlur(kernel_size=5) (sigma drawn from [0.1, 2.0]); at other
        sizes the kernel's radius (2) and the sigmas scale with size / 224, the radius
        rounded and at least 1 (112: kernel 3, sigma in [0.05, 1.0])."""
        scale = self.size / RELEASED_SIZE
        return 2 * max(1, round(2 * scale)) + 1, (0.1 * scale, 2.0 * scale)


def _to_normalised_tensor() -> list[Callable]:
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def eval_transform(cfg: ImageConfig) -> ImageTransform:
    """PIL RGB image -> 3 x size x size float32: bicubic resize, ImageNet normalisation."""
    return T.Compose(
        [T.Resize((cfg.size, cfg.size), interpolation=T.InterpolationMode.BICUBIC), *_to_normalised_tensor()]
    )


def train_transform(cfg: ImageConfig) -> ImageTransform:
    """PIL RGB image -> 3 x size x size float32, augmented as cfg.augment says.

    "released" is the released JSA code's training transform (dataset.py, hard_img):
    Resize(train_resize) of the short side (bicubic, aspect kept) -> RandomCrop(size) ->
    GaussianBlur (`ImageConfig.blur`) with p 0.8 -> horizontal flip (p 0.5) ->
    ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8 -> RandomGrayscale(p 0.2); "flip" the same
    without blur and colour (its default); "none" is `eval_transform`.

    All randomness comes from torch's global RNG (torchvision's transforms draw from it), so
    torch.manual_seed, or a DataLoader's seeded generator, makes it reproducible.
    """
    if cfg.augment == "none":
        return eval_transform(cfg)
    kernel, sigma = cfg.blur
    released = cfg.augment == "released"
    return T.Compose(
        [
            T.Resize(cfg.train_resize, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomCrop(cfg.size),
            *([T.RandomApply([T.GaussianBlur(kernel, sigma)], p=0.8)] if released else []),
            T.RandomHorizontalFlip(),
            *(
                [T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2)]
                if released
                else []
            ),
            *_to_normalised_tensor(),
        ]
    )


def video_frame_count(path: str | Path) -> int:
    """The number of frames of a video's first video stream, from its container (PyAV),
    without decoding any."""
    with pyav().open(str(path)) as container:
        if not container.streams.video:
            raise DataError(f"{path}: the file has no video stream")
        num_frames = container.streams.video[0].frames
    if num_frames == 0:
        # Some containers do not record a frame count; counting packets needs no decoding.
        with pyav().open(str(path)) as container:
            num_frames = sum(1 for packet in container.demux(video=0) if packet.size)
    return num_frames


def video_middle_frame(path: str | Path) -> Image.Image:
    """The frame at index n // 2 of a video's n frames, as a PIL RGB image as displayed
    (decoded with PyAV, its display rotation applied)."""
    num_frames = video_frame_count(path)
    if num_frames == 0:
        raise DataError(f"{path}: the video holds no frame")
    with pyav().open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index == num_frames // 2:
                return Image.fromarray(displayed_rgb(frame))
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
