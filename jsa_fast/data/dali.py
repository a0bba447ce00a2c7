"""The DALI data path: the PyTorch path's preprocessing (docs/model.md "Preprocessing") as a DALI
pipeline, decoding frames and spectrograms on the GPU.

Per item of a data set in docs/api.md's layout (the same items, probes and bad-file policy as
`AudioVisualDataset`, which this path builds and reads its entries from):

- frame: ROOT/frames/<id>.jpg decoded by nvJPEG (`fn.decoders.image`, "mixed"). In a data
  set of videos (ROOT/videos/<id>.mp4 for every item) the middle frame, index n // 2 of
  the n frames the container lists (read on the host without decoding), is decoded by
  DALI's video decoder (`fn.decoders.video`: NVDEC on the GPU; on the CPU it has only
  VP8, VP9 and MJPEG). A stray .mp4 among image files is decoded with PyAV on the host and
  handed over losslessly as a PPM. Evaluation (and training with augment "none"):
  bicubic resize to size x size; training otherwise as `train_transform` does (see
  `_augmented_image`). Then (x / 255 - mean) / std with ImageNet's mean and std.
- audio: ROOT/audio/<id>.wav decoded, averaged over channels and resampled to
  sample_rate (`fn.decoders.audio`), the middle num_samples (tiled from the start when
  shorter), |STFT|^2 with a periodic Hann window, centred reflect-padded frames, then
  log(x + 1e-7) / 12; in training with spec_augment, `mask_spectrogram`'s two masks.

The random draws are DALI's (its generator, seeded per loader), so that augmented batches
equal the PyTorch path's in distribution, not bit for bit.

`nvidia.dali` is optional (requirements-dali.txt) and imported only when a loader is built.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate

from jsa_fast.data.audio import AudioConfig
from jsa_fast.data.datasets import AudioVisualDataset, epoch_batches
from jsa_fast.data.image import IMAGENET_MEAN, IMAGENET_STD, ImageConfig, is_video, load_image, video_frame_count
from jsa_fast.seeds import SeedDomain, derived_seed

INSTALL_HINT = "pip install 'jsa-fast[dali]', or pip install -r requirements-dali.txt in a checkout"
LOG_FLOOR = 1e-7


def dali_available(device: str | torch.device = "cpu") -> bool:
    """True when nvidia.dali imports and can run on `device` (CPU operators for "cpu"; a GPU
    that DALI sees for "cuda" / "cuda:N")."""
    try:
        from nvidia.dali import backend
    except (ImportError, OSError):
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and backend.GetCUDADeviceCount() > (device.index or 0)


def resolve_loader(kind: str, device: torch.device) -> Literal["torch", "dali"]:
    """The loader that --loader KIND means: "auto" is DALI on a CUDA device when DALI is
    installed."""
    if kind not in ("torch", "dali", "auto"):
        raise ValueError(f"kind must be torch, dali or auto, got {kind!r}")
    if kind == "auto":
        return "dali" if device.type == "cuda" and dali_available(device) else "torch"
    return kind  # type: ignore[return-value]


def _ppm(image: Any) -> np.ndarray:
    """A PIL RGB image as the bytes of a binary PPM, which DALI's decoders read losslessly."""
    pixels = np.asarray(image, dtype=np.uint8)
    header = f"P6\n{pixels.shape[1]} {pixels.shape[0]}\n255\n".encode()
    return np.concatenate([np.frombuffer(header, np.uint8), pixels.reshape(-1)])


def _frame_bytes(path: Path) -> np.ndarray:
    if is_video(path):
        return _ppm(load_image(path))
    return np.fromfile(path, dtype=np.uint8)


class _Source:
    """The pipeline's external source: encoded frames (or videos and their middle frame's
    index), WAV bytes and item indices, one planned batch per call, StopIteration after the
    last."""

    def __init__(self, dataset: AudioVisualDataset) -> None:
        self.entries = dataset.entries
        self.videos = bool(self.entries) and all(is_video(entry.image_path) for entry in self.entries)
        self.middle_frames: dict[int, int] = {}  # item index -> its middle frame's index, read once
        self.batches: list[list[int]] = []
        self.served = 0

    def _middle_frame(self, index: int) -> int:
        if index not in self.middle_frames:
            self.middle_frames[index] = video_frame_count(self.entries[index].image_path) // 2
        return self.middle_frames[index]

    def restart(self, batches: list[list[int]]) -> None:
        self.batches, self.served = batches, 0

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        if self.served == len(self.batches):
            raise StopIteration
        indices = self.batches[self.served]
        self.served += 1
        entries = [self.entries[index] for index in indices]
        waves = [np.fromfile(entry.audio_path, dtype=np.uint8) for entry in entries]
        index = [np.array([index], dtype=np.int64) for index in indices]
        if self.videos:
            videos = [np.fromfile(entry.image_path, dtype=np.uint8) for entry in entries]
            middle = [np.array([self._middle_frame(index)], dtype=np.int32) for index in indices]
            return videos, waves, index, middle
        return [_frame_bytes(entry.image_path) for entry in entries], waves, index


# ColorJitter applies its four adjustments in an order drawn uniformly from these.
JITTER_ORDERS = list(itertools.permutations(range(4)))


def _augmented_image(image: Any, cfg: ImageConfig) -> tuple[Any, Any]:
    """DALI's `train_transform` (cfg.augment "released" or "flip"): a decoded H x W x 3
    uint8 frame -> (size x size x 3, float in [0, 255] for "released", and the flip to
    apply with the normalisation). The operations and parameters are torchvision's:

    - Resize(train_resize) of the short side (the long side int(train_resize x long /
      short), as torchvision computes it), bicubic, antialiased;
    - RandomCrop(size): offsets uniform over the integers 0 .. H - size and 0 .. W - size;
    - released: GaussianBlur (`ImageConfig.blur`: kernel, sigma uniform in its range),
      p 0.8; ColorJitter(0.8, 0.8, 0.8, 0.2), p 0.8: brightness x b, contrast c around
      the mean grey level, saturation s towards each pixel's grey level (b, c, s uniform
      in [0.2, 1.8]), hue shifted by h x 360 degrees (h uniform in [-0.2, 0.2]), in one of
      the 24 orders, each clamped to [0, 255]; RandomGrayscale p 0.2 (ITU-R 601 luma, as
      PIL's "L");
    - the flip (p 0.5), returned, since it commutes with the rest.

    What differs from PIL's: values are not rounded to integers between steps, and
    DALI's hue (`fn.hsv`) rotates colours about the grey axis in RGB rather than
    shifting the HSV hue (the same for greys, close for others).
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    def uniform(low: float, high: float) -> Any:
        return fn.random.uniform(range=[low, high])

    def grey(pixels: Any) -> Any:
        return pixels[:, :, 0] * 0.299 + pixels[:, :, 1] * 0.587 + pixels[:, :, 2] * 0.114

    # Each branch of a conditional must give the same layout; stacks and arithmetic drop it.
    def grey_rgb(pixels: Any) -> Any:
        level = grey(pixels)
        return fn.reshape(fn.stack(level, level, level, axis=2), layout="HWC")

    def clamped(pixels: Any) -> Any:
        return fn.reshape(dmath.clamp(pixels, 0.0, 255.0), layout="HWC")

    shape = image.shape(dtype=types.INT32)
    height, width = shape[0], shape[1]
    short = dmath.min(height, width)
    resized = fn.stack((height * cfg.train_resize) // short, (width * cfg.train_resize) // short)
    image = fn.resize(image, size=fn.cast(resized, dtype=types.FLOAT), interp_type=types.INTERP_CUBIC, antialias=True)
    offsets = [
        fn.cast(dmath.floor(uniform(0.0, 1.0) * fn.cast(side - cfg.size + 1, dtype=types.FLOAT)), dtype=types.INT32)
        for side in (resized[0], resized[1])
    ]
    image = fn.slice(image, fn.stack(*offsets), [cfg.size, cfg.size], axes=[0, 1])
    mirror = fn.random.coin_flip(probability=0.5)
    if cfg.augment != "released":
        return image, mirror
    image = fn.cast(image, dtype=types.FLOAT)
    kernel, (sigma_low, sigma_high) = cfg.blur
    if fn.random.coin_flip(probability=0.8):
        image = fn.gaussian_blur(image, window_size=kernel, sigma=uniform(sigma_low, sigma_high))
    if fn.random.coin_flip(probability=0.8):
        factors = [uniform(0.2, 1.8) for _ in range(3)]
        hue_degrees = uniform(-0.2, 0.2) * 360.0
        order = fn.random.uniform(values=list(range(len(JITTER_ORDERS))), dtype=types.INT32)
        for position in range(4):
            which = fn.lookup_table(
                order,
                keys=list(range(len(JITTER_ORDERS))),
                values=[o[position] for o in JITTER_ORDERS],
                dtype=types.INT32,
            )
            if which == 0:
                image = clamped(image * factors[0])
            elif which == 1:
                image = clamped(image * factors[1] + (1.0 - factors[1]) * fn.reductions.mean(grey(image)))
            elif which == 2:
                image = clamped(image * factors[2] + (1.0 - factors[2]) * grey_rgb(image))
            else:
                image = clamped(fn.hsv(image, hue=hue_degrees, dtype=types.FLOAT))
    if fn.random.coin_flip(probability=0.2):
        image = grey_rgb(image)
    return image, mirror


def _build_pipeline(
    source: _Source,
    train: bool,
    image_cfg: ImageConfig,
    audio_cfg: AudioConfig,
    batch_size: int,
    device_id: int | None,
    seed: int,
    num_threads: int,
) -> Any:
    """The DALI pipeline: outputs image N x 3 x H x W float32, spec N x 1 x F x T float32 and
    index N x 1 int64 (into the data set's entries)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    on_gpu = device_id is not None
    n = audio_cfg.num_samples
    # fn.spectrogram's default window is a shifted Hann; torch's periodic one is what the
    # PyTorch path uses (docs/build.md).
    window = torch.hann_window(audio_cfg.win_length, dtype=torch.float64).tolist()

    augment = train and image_cfg.augment != "none"
    mask_audio = train and audio_cfg.spec_augment

    # Conditionals: the released augmentation applies its steps with probabilities.
    @pipeline_def(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, enable_conditionals=True
    )
    def pipeline() -> tuple[Any, Any, Any]:
        decoder_device = "mixed" if on_gpu else "cpu"
        if source.videos:
            encoded, waves, index, middle = fn.external_source(
                source=source, num_outputs=4, batch=True, dtype=[types.UINT8, types.UINT8, types.INT64, types.INT32]
            )
            # 1 x H x W x 3 (one frame of the sequence) -> H x W x 3
            image = fn.squeeze(fn.decoders.video(encoded, device=decoder_device, frames=middle), axes=[0])
        else:
            encoded, waves, index = fn.external_source(
                source=source, num_outputs=3, batch=True, dtype=[types.UINT8, types.UINT8, types.INT64]
            )
            image = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
        if augment:
            image, mirror = _augmented_image(image, image_cfg)
        else:
            image = fn.resize(
                image, size=[image_cfg.size, image_cfg.size], interp_type=types.INTERP_CUBIC, antialias=True
            )
            mirror = False
        image = fn.crop_mirror_normalize(
            image,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255 * m for m in IMAGENET_MEAN],
            std=[255 * s for s in IMAGENET_STD],
            mirror=mirror,
        )

        wave, _ = fn.decoders.audio(waves, sample_rate=audio_cfg.sample_rate, downmix=True, dtype=types.FLOAT)
        length = wave.shape(dtype=types.INT32)
        # Tile a short wave: a 1 x L row broadcast against R x 1 ones, flattened, holds it R
        # times; R = ceil(n / L) is 1 for a long wave, whose middle is then taken.
        repeats = (n + length - 1) // length
        ones = fn.ones(shape=fn.cat(repeats, repeats // repeats))
        tiled = fn.reshape(fn.reshape(wave, shape=[1, -1]) * ones, shape=[-1])
        clip = fn.slice(tiled, dmath.max(length - n, 0) // 2, n, axes=[0])
        if on_gpu:
            clip = clip.gpu()
        power = fn.spectrogram(
            clip,
            nfft=audio_cfg.n_fft,
            window_length=audio_cfg.win_length,
            window_step=audio_cfg.hop_length,
            window_fn=window,
            center_windows=True,
            reflect_padding=True,
            power=2,
            layout="ft",
        )
        spec = dmath.log(power + LOG_FLOOR) / 12.0
        if mask_audio:  # `mask_spectrogram`: a frequency mask, then a time mask
            for axis, length, bound in zip((0, 1), audio_cfg.spectrogram_shape[1:], audio_cfg.mask_widths):
                start, width = (fn.random.uniform(values=[float(k) for k in range(n)]) for n in (length, bound))
                spec = fn.erase(spec, anchor=start, shape=width, axes=[axis], fill_value=0.0)
        return image, fn.expand_dims(spec, axes=[0]), index

    return pipeline()


class DALILoader:
    """Batches of a data set decoded by DALI; iterate once per epoch.

    Each batch is a dict like the PyTorch loader's (`make_loader` over `AudioVisualDataset`):
    image B x 3 x H x W float32, spec B x 1 x F x T float32, id list of str, label B int64,
    and for the test split gt B x H x W float32 (plus mask B x H x W when the data set has
    masks), all tensors on `device`. The batches are shard `shard_id`'s of `epoch_batches`
    (global batches of batch_size x num_shards items); each pass
    advances the epoch (`epoch`); training plans its batches itself and calls `iterate`.

    A file that fails to decode (DALI stops with an error that does not name the sample) is
    found by loading the batches in flight with the PyTorch path: on_bad_file="fail" raises
    its BadFilesError naming the path; "skip" warns, drops the item from this and later
    epochs and continues on a rebuilt pipeline. A WAV that decodes to NaN, inf or silence
    (a spectrogram that is not finite, or constant) is found the same way, by the PyTorch
    path's content checks. A batch left with no item is not yielded.
    """

    def __init__(
        self,
        dataset: AudioVisualDataset,
        batch_size: int,
        shuffle: bool,
        seed: int,
        shard_id: int,
        num_shards: int,
        device: torch.device,
        drop_last: bool,
        num_threads: int,
    ) -> None:
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        if not dali_available(device):
            raise ValueError(f"device {device}: DALI is not installed or sees no such GPU ({INSTALL_HINT})")
        if num_threads < 1:
            raise ValueError(f"num_threads must be positive, got {num_threads}")
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, num_shards), got shard {shard_id} of {num_shards}")
        epoch_batches(
            len(dataset), batch_size * num_shards, seed, 0, shuffle=shuffle, shard=shard_id, num_shards=num_shards
        )  # validates them
        self.dataset = dataset
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.shard_id, self.num_shards = shard_id, num_shards
        self.device, self.num_threads = device, num_threads
        self.epoch = 0
        self._bad: set[int] = set()
        self._source = _Source(dataset)
        self._iterator: Any = None

    def _plan(self) -> list[list[int]]:
        batches = epoch_batches(
            len(self.dataset), self.batch_size * self.num_shards, self.seed, self.epoch, shuffle=self.shuffle,
            drop_last=self.drop_last, shard=self.shard_id, num_shards=self.num_shards,
        )  # fmt: skip
        kept = ([index for index in batch if index not in self._bad] for batch in batches)
        return [batch for batch in kept if batch]

    def __len__(self) -> int:
        return len(self._plan())

    def _new_iterator(self) -> Any:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipeline = _build_pipeline(
            self._source,
            self.dataset.split == "train",
            self.dataset.image_cfg,
            self.dataset.audio_cfg,
            self.batch_size,
            (self.device.index or 0) if self.device.type == "cuda" else None,
            derived_seed(SeedDomain.DALI_AUGMENT, self.seed, self.shard_id, bits=31),
            self.num_threads,
        )
        return DALIGenericIterator(pipeline, ["image", "spec", "index"], last_batch_policy=LastBatchPolicy.PARTIAL)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = self._plan()
        self.epoch += 1
        return self.iterate(batches)

    def iterate(self, batches: list[list[int]]) -> Iterator[dict[str, Any]]:
        """The given batches of item indices (at most batch_size each), in order: what a
        caller that plans its own batches (the training loop) iterates."""
        remaining = [kept for batch in batches if (kept := [i for i in batch if i not in self._bad])]
        # The pipeline is kept for the next epoch only when this pass runs to its end; one
        # left mid-epoch still holds prefetched batches.
        iterator, self._iterator = self._iterator, None
        while remaining:
            self._source.restart(remaining)
            if iterator is None:
                iterator = self._new_iterator()
            else:
                iterator.reset()
            try:
                for outputs in iterator:
                    batch = self._batch(outputs[0])
                    remaining = remaining[1:]
                    if batch is not None:
                        yield batch
            except Exception:  # noqa: BLE001 - DALI raises RuntimeError, a reader what it raised
                in_flight = remaining[: self._source.served]
                bad = self._find_bad([index for batch in in_flight for index in batch])
                if not bad:
                    raise
                self._bad |= bad
                remaining = [kept for batch in remaining if (kept := [i for i in batch if i not in bad])]
                iterator = None
        self._iterator = iterator

    def _find_bad(self, indices: Sequence[int]) -> set[int]:
        """Items among `indices` that the PyTorch path cannot load. It raises BadFilesError for
        the first under on_bad_file="fail", and warns and returns None for each under "skip"."""
        with torch.random.fork_rng(devices=[]):  # the PyTorch transforms draw from the global RNG
            return {index for index in indices if self.dataset[index] is None}

    def _unusable_rows(self, indices: list[int], spec: Tensor) -> set[int]:
        """Items whose spectrogram (N x 1 x F x T) is not finite or constant: DALI decoded a
        WAV holding NaN or inf, or silence, which the PyTorch path's checks name. They are
        routed through `_find_bad` (raises under "fail"; under "skip" they are dropped)."""
        flat = spec.flatten(1)
        suspect = ~torch.isfinite(flat).all(dim=1) | (flat.amax(dim=1) == flat.amin(dim=1))
        rows = [index for index, flagged in zip(indices, suspect.tolist()) if flagged]
        return self._find_bad(rows) if rows else set()

    def _batch(self, outputs: dict[str, Tensor]) -> dict[str, Any] | None:
        """The DALI outputs with id, label and the test split's ground truth attached by
        index, less the items `_unusable_rows` drops; None when none is left."""
        all_entries = self.dataset.entries
        indices = outputs["index"].view(-1).tolist()
        unusable = self._unusable_rows(indices, outputs["spec"])
        self._bad |= unusable
        keep = [row for row, index in enumerate(indices) if index not in unusable]
        if not keep:
            return None
        entries = [all_entries[indices[row]] for row in keep]
        # A mask that does not decode raises here; __iter__ maps it to its path.
        batch = default_collate([self.dataset.annotations(entry) for entry in entries])
        rows = torch.tensor(keep, device=outputs["image"].device) if unusable else slice(None)
        batch.update(image=outputs["image"][rows], spec=outputs["spec"][rows])
        return {
            key: value.to(self.device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()
        }


def make_dali_loader(
    dataset: AudioVisualDataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    shard_id: int = 0,
    num_shards: int = 1,
    device: str | torch.device = "cuda",
    drop_last: bool = False,
    num_threads: int | None = None,
) -> DALILoader:
    """A DALI loader over `dataset` (its items, its checks and its bad-file policy), the
    counterpart of `make_loader`: batches match its keys, shapes and dtypes (see
    `DALILoader`). device "cuda[:N]" runs the pipeline on that GPU; "cpu" runs DALI's CPU
    operators (device_id=None). num_threads: DALI's CPU threads (default: the CPUs this
    process may use).
    """
    if not dali_available("cpu"):
        # ModuleNotFoundError naming the module: the command lines name the extra to install
        raise ModuleNotFoundError(f"the DALI loader needs nvidia.dali ({INSTALL_HINT})", name="nvidia.dali")
    threads = num_threads if num_threads is not None else len(os.sched_getaffinity(0))
    return DALILoader(
        dataset, batch_size, shuffle, seed, shard_id, num_shards, torch.device(device), drop_last, threads
    )
