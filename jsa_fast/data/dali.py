"""The DALI data path: the PyTorch path's preprocessing (SPEC.md "Preprocessing") as a DALI
pipeline, decoding frames and spectrograms on the GPU.

Per item of a data set in API.md's layout (the same items, probes and bad-file policy as
`AudioVisualDataset`, which this path builds and reads its entries from):

- frame: ROOT/frames/<id>.jpg decoded by nvJPEG (`fn.decoders.image`, "mixed"). In a data
  set of videos (ROOT/videos/<id>.mp4 for every item) the middle frame, index n // 2 of
  the n frames the container lists (read on the host without decoding), is decoded by
  DALI's video decoder (`fn.decoders.video`: NVDEC on the GPU; on the CPU it has only
  VP8, VP9 and MJPEG). A stray .mp4 among image files is decoded with PyAV on the host and
  handed over losslessly as a PPM. Evaluation: bicubic resize to size x size;
  training: resize to train_resize, a uniformly drawn size x size crop and a flip with
  probability 1/2. Then (x / 255 - mean) / std with ImageNet's mean and std.
- audio: ROOT/audio/<id>.wav decoded, averaged over channels and resampled to
  sample_rate (`fn.decoders.audio`), the middle num_samples (tiled from the start when
  shorter), |STFT|^2 with a periodic Hann window, centred reflect-padded frames, then
  log(x + 1e-7) / 12.

`nvidia.dali` is optional (requirements-dali.txt) and imported only when a loader is built.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate

from jsa_fast.data.audio import AudioConfig
from jsa_fast.data.datasets import AudioVisualDataset, epoch_order
from jsa_fast.data.image import IMAGENET_MEAN, IMAGENET_STD, ImageConfig, is_video, load_image, video_frame_count

INSTALL_HINT = "pip install -r requirements-dali.txt"
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


def resolve_loader(kind: str, device: torch.device, image_cfg: ImageConfig) -> Literal["torch", "dali"]:
    """The loader that --loader KIND means: "auto" is DALI on a CUDA device when DALI is
    installed (and no colour augmentation is asked for, which only the PyTorch path has)."""
    if kind not in ("torch", "dali", "auto"):
        raise ValueError(f"--loader must be torch, dali or auto, got {kind!r}")
    if kind == "auto":
        usable = device.type == "cuda" and dali_available(device) and not image_cfg.color_augment
        return "dali" if usable else "torch"
    return kind  # type: ignore[return-value]


def shard_batches(
    num_items: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    shard_id: int,
    num_shards: int,
    drop_last: bool,
) -> list[list[int]]:
    """Item indices of one shard's batches for one epoch.

    The epoch's order is `epoch_order(num_items, seed, epoch)` (the order
    `jsa_fast.train.epoch_batches` uses), or 0..num_items-1 without shuffle. With several shards, the order is first cut (drop_last) or wrapped around from
    its start (otherwise) to a multiple of num_shards, as DistributedSampler does, so that
    every shard has as many items; shard s takes positions s, s + num_shards, ... The last
    partial batch is dropped when drop_last, else kept, as a DataLoader does.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, num_shards), got shard {shard_id} of {num_shards}")
    order = epoch_order(num_items, seed, epoch) if shuffle else list(range(num_items))
    if num_shards > 1:
        if drop_last:
            order = order[: num_items // num_shards * num_shards]
        else:
            total = -(-num_items // num_shards) * num_shards
            order = (order * (total // max(num_items, 1) + 1))[:total]
    mine = order[shard_id::num_shards]
    count = len(mine) // batch_size if drop_last else -(-len(mine) // batch_size)
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(count)]


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
    # PyTorch path uses (ENV.md).
    window = torch.hann_window(audio_cfg.win_length, dtype=torch.float64).tolist()

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
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
        side = image_cfg.train_resize if train else image_cfg.size
        image = fn.resize(image, size=[side, side], interp_type=types.INTERP_CUBIC, antialias=True)
        crop: dict[str, Any] = {}
        if train:
            # torchvision's RandomCrop draws an integer offset uniformly from 0..side - size.
            room = side - image_cfg.size
            positions = [k / room for k in range(room + 1)] if room else [0.0]
            crop = dict(
                crop=[image_cfg.size, image_cfg.size],
                crop_pos_x=fn.random.uniform(values=positions),
                crop_pos_y=fn.random.uniform(values=positions),
                mirror=fn.random.coin_flip(probability=0.5),
            )
        image = fn.crop_mirror_normalize(
            image,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255 * m for m in IMAGENET_MEAN],
            std=[255 * s for s in IMAGENET_STD],
            **crop,
        )

        wave, _ = fn.decoders.audio(
            waves, sample_rate=audio_cfg.sample_rate, downmix=True, dtype=types.FLOAT
        )
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
        spec = fn.expand_dims(dmath.log(power + LOG_FLOOR) / 12.0, axes=[0])
        return image, spec, index

    return pipeline()


class DALILoader:
    """Batches of a data set decoded by DALI; iterate once per epoch.

    Each batch is a dict like the PyTorch loader's (`make_loader` over `AudioVisualDataset`):
    image B x 3 x H x W float32, spec B x 1 x F x T float32, id list of str, label B int64,
    and for the test split gt B x H x W float32 (plus mask B x H x W when the data set has
    masks), all tensors on `device`. The order of batches is `shard_batches`; each pass
    advances the epoch (set it with `set_epoch`, e.g. on resume).

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
        if dataset.image_cfg.color_augment:
            raise ValueError(
                "image_cfg.color_augment=True: the DALI path has no colour augmentation; "
                "use the torch loader"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        if not dali_available(device):
            raise ValueError(f"device {device}: DALI is not installed or sees no such GPU ({INSTALL_HINT})")
        if num_threads < 1:
            raise ValueError(f"num_threads must be positive, got {num_threads}")
        shard_batches(len(dataset), batch_size, shuffle, seed, 0, shard_id, num_shards, drop_last)  # validates them
        self.dataset = dataset
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.shard_id, self.num_shards = shard_id, num_shards
        self.device, self.num_threads = device, num_threads
        self.epoch = 0
        self._bad: set[int] = set()
        self._source = _Source(dataset)
        self._iterator: Any = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch (shuffled order) of the next pass."""
        self.epoch = epoch

    def _plan(self) -> list[list[int]]:
        batches = shard_batches(
            len(self.dataset), self.batch_size, self.shuffle, self.seed, self.epoch,
            self.shard_id, self.num_shards, self.drop_last,
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
            hash((self.seed, self.shard_id)) & 0x7FFF_FFFF,
            self.num_threads,
        )
        return DALIGenericIterator(
            pipeline, ["image", "spec", "index"], last_batch_policy=LastBatchPolicy.PARTIAL
        )

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
        raise ImportError(f"the DALI loader needs nvidia.dali ({INSTALL_HINT})")
    threads = num_threads if num_threads is not None else len(os.sched_getaffinity(0))
    return DALILoader(
        dataset, batch_size, shuffle, seed, shard_id, num_shards, torch.device(device), drop_last, threads
    )
