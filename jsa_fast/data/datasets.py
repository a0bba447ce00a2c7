"""The audio-visual data set of docs/api.md's layout, its bad-file policy and a reproducible loader.

ROOT/frames/<id>.jpg (or ROOT/videos/<id>.mp4), ROOT/audio/<id>.wav, ROOT/train.txt, and for
the test split ROOT/test.json (VGG-SS) or ROOT/test.txt + ROOT/Annotations/<id>.xml
(Flickr-SoundNet), optionally ROOT/masks/<id>.png (AVSBench).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import soundfile
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from jsa_fast.data.audio import AudioConfig, mask_spectrogram, wav_to_spectrogram
from jsa_fast.data.groundtruth import (
    flickr_box_problem,
    flickr_gt_map,
    load_mask,
    read_flickr_boxes,
    vggss_box_problem,
    vggss_gt_map,
)
from jsa_fast.data.image import ImageConfig, eval_transform, load_image, train_transform
from jsa_fast.data.video import VIDEO_ERRORS, pyav
from jsa_fast.errors import DataError
from jsa_fast.seeds import SeedDomain, derived_seed

# What decoders raise on a broken file (PIL: OSError/SyntaxError, soundfile: RuntimeError,
# PyAV: FFmpegError, ours: ValueError).
_DECODE_ERRORS = (OSError, RuntimeError, ValueError, EOFError, SyntaxError, *VIDEO_ERRORS)
MAX_LISTED = 20  # problems a message lists in full; `BadFilesError.problems` holds them all


class BadFilesError(DataError):
    """Files of a data set that are missing, do not decode or hold unusable content.

    `problems` holds (path, reason) pairs; the one-line message lists the first MAX_LISTED
    and counts the rest. The message-only constructor lets DataLoader workers re-raise it
    in the main process.
    """

    def __init__(self, message: str, problems: Sequence[tuple[Path, str]] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)

    @classmethod
    def from_problems(cls, problems: Sequence[tuple[Path, str]]) -> BadFilesError:
        listing = "; ".join(f"{path}: {reason}" for path, reason in problems[:MAX_LISTED])
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        return cls(f"{len(problems)} data problem(s): {listing}{more}", problems)


@dataclass(frozen=True)
class _Entry:
    id: str
    image_path: Path
    audio_path: Path
    label: int
    boxes: tuple[tuple[float, ...], ...]  # VGG-SS: fractions; Flickr: 256 x 256 pixels; train: ()
    mask_path: Path | None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: list file not found") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from error


def _check_unique_ids(ids: Sequence[str], path: Path) -> None:
    repeated = sorted(name for name, count in Counter(ids).items() if count > 1)
    if repeated:
        raise ValueError(f"{path}: ids listed more than once: {repeated}")


def check_ids(ids: Sequence[str], path: Path) -> None:
    """ValueError naming `path` when an id is no plain file name (an id names files inside
    the data set's folders: a path separator, whitespace, "." or ".." would reach outside
    them or split) or is listed twice."""
    malformed = [
        name for name in ids if not name or name in (".", "..") or any(c in "/\\" or c.isspace() for c in name)
    ]
    if malformed:
        raise ValueError(f"{path}: ids must be single words without '/', '\\', or '..', got {malformed[:10]}")
    _check_unique_ids(ids, path)


def read_id_list(path: Path) -> list[str]:
    """Ids of a train.txt / test.txt, one per line (blank lines ignored), in file order."""
    ids = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path}: the list file names no ids (it is empty)")
    check_ids(ids, path)
    return ids


def _is_box(box: Any) -> bool:
    return (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in box)
    )


def read_vggss_json(path: Path) -> list[tuple[str, str, tuple[tuple[float, ...], ...]]]:
    """(id, class name, boxes) per entry of a VGG-SS test.json, in file order."""
    try:
        entries = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: must be a non-empty JSON list of {{file, class, bbox}} objects")
    records = []
    for index, entry in enumerate(entries):
        valid = (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and entry["file"].strip()
            and isinstance(entry.get("class"), str)
            and isinstance(entry.get("bbox"), list)
            and entry["bbox"]
            and all(_is_box(box) for box in entry["bbox"])
        )
        if not valid:
            raise ValueError(
                f"{path}: entry {index} must be {{'file': str, 'class': str, "
                f"'bbox': [[x0, y0, x1, y1], ...]}}, got {entry!r}"
            )
        boxes = tuple(tuple(float(c) for c in box) for box in entry["bbox"])
        records.append((entry["file"].strip(), entry["class"], boxes))
    check_ids([record[0] for record in records], path)
    return records


# Header probes: each returns why the file is unusable, or None. Any exception a library
# raises while opening a file means just that, hence the broad catches.
def _probe_image(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # noqa: BLE001
        return f"not a readable image ({error})"
    return None


def _probe_video(path: Path) -> str | None:
    try:
        with pyav().open(str(path)) as container:
            if not container.streams.video:
                return "the file has no video stream"
    except Exception as error:  # noqa: BLE001
        return f"not a readable video ({error})"
    return None


def _probe_audio(path: Path) -> str | None:
    try:
        info = soundfile.info(str(path))
    except Exception as error:  # noqa: BLE001
        return f"not a readable audio file ({error})"
    return None if info.frames > 0 else "the audio file holds no samples"


def _decode(path: Path, read: Callable[[Path], Any]) -> Any:
    try:
        return read(path)
    except _DECODE_ERRORS as error:
        # Our content checks (DataError) name the file themselves: keep their reason alone.
        reason = str(error).removeprefix(f"{path}: ") if isinstance(error, DataError) else f"cannot decode ({error})"
        raise BadFilesError.from_problems([(path, reason)]) from error


class AudioVisualDataset(Dataset):
    """Image-audio pairs of one split of a data set in docs/api.md's layout.

    An item is a dict: image 3 x H x W float32 (H = W = image_cfg.size), spec 1 x F x T
    float32 (the train split augmented as image_cfg.augment and audio_cfg.spec_augment
    say, drawing from torch's global RNG), id str, label int (index into `classes`; -1 when unknown: train split, Flickr),
    and for the test split gt H x W float32 (VGG-SS union map in {0, 1} or Flickr consensus
    map in {0, 0.5, 1}) plus mask H x W float32 in {0, 1} when ROOT/masks/ has them.

    Every listed id's files are checked at construction (exist, headers open), and so
    are the test split's boxes (inside the image, ordered, covering a pixel of the gt
    map); content is checked as it is read (samples finite and not all 0, masks with a
    foreground pixel). on_bad_file:
    "fail" raises one BadFilesError listing every problem; "skip" drops those ids and warns
    once with the full list. A file that fails to decode later raises BadFilesError naming
    it ("fail") or makes __getitem__ return None with a warning ("skip"; batch with
    `collate_skip_none`).

    subset: ids or class names; only the listed items of those ids or classes are kept
    (ValueError for a name that is neither). ground_truth: for the test split, a VGG-SS
    style JSON to read instead of ROOT/test.json (a validation split). on_missing: what
    an id whose image or audio file is not on disk gets, "fail" (BadFilesError naming
    them) or "skip" (dropped without a warning, listed in `missing` for the caller to
    report); None treats it as any bad file. full_decode: every file decoded in full once
    here (`FullDecode`), its problems named with the others.
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "test"],
        image_cfg: ImageConfig = ImageConfig(),
        audio_cfg: AudioConfig = AudioConfig(),
        on_bad_file: Literal["fail", "skip"] = "fail",
        *,
        subset: Collection[str] | None = None,
        ground_truth: str | Path | None = None,
        on_missing: Literal["fail", "skip"] | None = None,
        full_decode: FullDecode | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if on_bad_file not in ("fail", "skip"):
            raise ValueError(f"on_bad_file must be 'fail' or 'skip', got {on_bad_file!r}")
        if on_missing not in (None, "fail", "skip"):
            raise ValueError(f"on_missing must be None, 'fail' or 'skip', got {on_missing!r}")
        if ground_truth is not None and split != "test":
            raise ValueError(f"ground_truth is a test split's annotation file, got it for split {split!r}")
        self.root = Path(root)
        self.split = split
        self.image_cfg = image_cfg
        self.audio_cfg = audio_cfg
        self.on_bad_file = on_bad_file
        self._image_transform = train_transform(image_cfg) if split == "train" else eval_transform(image_cfg)

        problems: dict[str, list[tuple[Path, str]]] = {}
        self.classes: list[str] = []
        self.gt_format: Literal["vggss", "flickr"] | None = None
        self._vggss_json = Path(ground_truth) if ground_truth is not None else self.root / "test.json"
        if split == "train":
            records = [(name, -1, ()) for name in read_id_list(self.root / "train.txt")]
        elif ground_truth is not None or self._vggss_json.exists():
            self.gt_format = "vggss"
            vggss = read_vggss_json(self._vggss_json)
            self.classes = sorted({class_name for _, class_name, _ in vggss})
            class_index = {name: index for index, name in enumerate(self.classes)}
            records = [(name, class_index[class_name], boxes) for name, class_name, boxes in vggss]
        elif (self.root / "test.txt").exists():
            self.gt_format = "flickr"
            records = []
            for name in read_id_list(self.root / "test.txt"):
                xml_path = self.root / "Annotations" / f"{name}.xml"
                try:
                    boxes = tuple(read_flickr_boxes(xml_path))
                except (OSError, ValueError) as error:
                    boxes = ()
                    problems[name] = [(xml_path, f"bad annotation ({error})")]
                records.append((name, -1, boxes))
        else:
            raise FileNotFoundError(
                f"{self.root}: the test split needs test.json (VGG-SS) or test.txt with "
                "Annotations/<id>.xml (Flickr-SoundNet); neither exists"
            )

        if subset is not None:
            records = self._subset(records, subset)
        mask_paths = self._find_masks([name for name, _, _ in records])
        entries = []
        for name, label, boxes in records:
            entry, entry_problems = self._probe_entry(name, label, boxes, mask_paths.get(name))
            entry_problems = self._box_problems(name, boxes) + entry_problems
            if entry_problems:
                problems.setdefault(name, []).extend(entry_problems)
            elif name not in problems:
                entries.append(entry)
        if full_decode is not None:
            decoded = _decoded_problems(entries, split, audio_cfg, image_cfg.size, full_decode)
            for name, found in decoded.items():
                problems.setdefault(name, []).extend(found)
            entries = [entry for entry in entries if entry.id not in decoded]
        self.missing = [  # ids with a file not on disk, when on_missing decides about them
            name for name, _, _ in records
            if on_missing is not None and any(reason.startswith("missing") for _, reason in problems.get(name, ()))
        ]  # fmt: skip
        missing = set(self.missing)
        troubled = [name for name, _, _ in records if name in problems]  # in list-file order
        fatal = [name for name in troubled if (on_missing if name in missing else on_bad_file) == "fail"]
        if fatal:
            raise BadFilesError.from_problems([p for name in fatal for p in problems[name]])
        bad = [name for name in troubled if name not in missing]
        if bad:
            error = BadFilesError.from_problems([p for name in bad for p in problems[name]])
            warnings.warn(f"skipping {len(bad)} id(s) of {self.root}: {error}", stacklevel=2)
        if not entries:
            raise DataError(f"{self.root}: no usable {split} items remain")
        self._entries = tuple(entries)

    def _subset(self, records: list[tuple[str, int, tuple]], subset: Collection[str]) -> list[tuple[str, int, tuple]]:
        """The records whose id or class name is in `subset`; ValueError naming the names
        that are neither an id nor a class of this split."""
        names = set(subset)
        unknown = names - {name for name, _, _ in records} - set(self.classes)
        if unknown:
            raise ValueError(
                f"the subset names {len(unknown)} id(s) or class(es) not in the {self.split} split of {self.root}: {sorted(unknown)[:MAX_LISTED]}"
            )
        return [r for r in records if r[0] in names or (r[1] >= 0 and self.classes[r[1]] in names)]

    def _box_problems(self, name: str, boxes: tuple) -> list[tuple[Path, str]]:
        """(annotation file, reason) for each box of test item `name` that gives no
        ground-truth region on image_cfg.size x image_cfg.size (see `vggss_box_problem`)."""
        if self.gt_format == "vggss":
            source, find_problem = self._vggss_json, vggss_box_problem
        elif self.gt_format == "flickr":
            source, find_problem = self.root / "Annotations" / f"{name}.xml", flickr_box_problem
        else:
            return []
        reasons = (find_problem(box, self.image_cfg.size) for box in boxes)
        return [(source, f"item {name}: {reason}") for reason in reasons if reason]

    def _find_masks(self, ids: Sequence[str]) -> dict[str, Path]:
        """ROOT/masks/<id>.png of every test id, or {} when there are none."""
        if self.split != "test":
            return {}
        paths = {name: self.root / "masks" / f"{name}.png" for name in ids}
        present = {name: path for name, path in paths.items() if path.exists()}
        missing = [name for name in ids if name not in present]
        if present and missing:
            raise ValueError(f"{self.root / 'masks'}: masks exist for some test ids but not for {missing}")
        return present

    def _probe_entry(
        self, name: str, label: int, boxes: tuple, mask_path: Path | None
    ) -> tuple[_Entry, list[tuple[Path, str]]]:
        problems = []
        image_path = self.root / "frames" / f"{name}.jpg"
        video_path = self.root / "videos" / f"{name}.mp4"
        if image_path.exists():
            reason = _probe_image(image_path)
        elif video_path.exists():
            image_path, reason = video_path, _probe_video(video_path)
        else:
            reason = f"missing (no {video_path} either)"
        if reason:
            problems.append((image_path, reason))
        audio_path = self.root / "audio" / f"{name}.wav"
        reason = _probe_audio(audio_path) if audio_path.exists() else "missing"
        if reason:
            problems.append((audio_path, reason))
        if mask_path is not None and (reason := _probe_image(mask_path)):
            problems.append((mask_path, reason))
        return _Entry(name, image_path, audio_path, label, boxes, mask_path), problems

    @property
    def ids(self) -> list[str]:
        """Ids of the items, in list-file order (bad ones dropped under on_bad_file='skip')."""
        return [entry.id for entry in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        entry = self._entries[index]
        try:
            return self._load(entry)
        except BadFilesError as error:
            if self.on_bad_file == "fail":
                raise
            warnings.warn(f"skipping {entry.id}: {error}", stacklevel=2)
            return None

    def _load(self, entry: _Entry) -> dict[str, Any]:
        image = self._image_transform(_decode(entry.image_path, load_image))
        spec = _decode(entry.audio_path, lambda path: wav_to_spectrogram(path, self.audio_cfg))
        if self.split == "train" and self.audio_cfg.spec_augment:
            spec = mask_spectrogram(spec, self.audio_cfg)
        return {"image": image, "spec": spec, **self.annotations(entry)}

    @property
    def entries(self) -> tuple[_Entry, ...]:
        """The items' file paths and annotations, in `ids` order (read-only)."""
        return self._entries

    def annotations(self, entry: _Entry) -> dict[str, Any]:
        """What an item holds besides its image and spec: id, label, and for the test
        split gt (and mask when the data set has masks), both H x W float32."""
        item: dict[str, Any] = {"id": entry.id, "label": entry.label}
        if self.split == "test":
            size = self.image_cfg.size
            make_map = vggss_gt_map if self.gt_format == "vggss" else flickr_gt_map
            item["gt"] = make_map(entry.boxes, size)
            if entry.mask_path is not None:
                item["mask"] = _decode(entry.mask_path, lambda path: load_mask(path, size))
        return item


@dataclass(frozen=True)
class FullDecode:
    """Decode every file of a data set once, in full, when it is opened (what only decoding
    shows, e.g. a truncated JPEG, is then named with the other problems rather than hours
    into training). workers: processes (0: this one); cache_dir: where a clean result is
    remembered by the data set's fingerprint (paths, sizes, modification times, the clip's
    settings), so that a rerun on unchanged files decodes nothing; progress: a bar."""

    workers: int = 0
    cache_dir: Path | None = None
    progress: bool = True


def _decoded_problems(
    entries: Sequence[_Entry], split: str, audio_cfg: AudioConfig, size: int, how: FullDecode
) -> dict[str, list[tuple[Path, str]]]:
    """{id: problems} of the entries whose files do not decode in full (`decode_problems`)."""
    digest = hashlib.sha256(repr((split, audio_cfg, size)).encode())
    for entry in entries:
        for path in (entry.image_path, entry.audio_path, entry.mask_path):
            if path is not None:
                stat = path.stat()
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    marker = None if how.cache_dir is None else Path(how.cache_dir) / f"decoded-{digest.hexdigest()[:32]}"
    if marker is not None and marker.exists():
        return {}
    check = partial(decode_problems, audio_cfg=audio_cfg, size=size)
    pool = _worker_context().Pool(how.workers) if how.workers > 0 else None
    try:
        results = pool.imap(check, entries, chunksize=16) if pool is not None else map(check, entries)
        progress = None if how.progress else True  # None: a bar when stderr is a terminal
        found = list(tqdm(results, total=len(entries), desc=f"decode {split}", unit="item", disable=progress))
    finally:
        if pool is not None:
            pool.terminate()
    problems = {entry.id: listed for entry, listed in zip(entries, found, strict=True) if listed}
    if not problems and marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{len(entries)} {split} items decoded without a problem\n")
    return problems


def decode_problems(entry: _Entry, audio_cfg: AudioConfig, size: int) -> list[tuple[Path, str]]:
    """(path, reason) of each file of `entry` that does not decode in full or holds unusable
    content, as reading it for training would find (no augmentation drawn)."""
    problems = []
    reads = [(entry.image_path, lambda path: load_image(path).load()),
             (entry.audio_path, lambda path: wav_to_spectrogram(path, audio_cfg))]  # fmt: skip
    if entry.mask_path is not None:
        reads.append((entry.mask_path, lambda path: load_mask(path, size)))
    for path, read in reads:
        try:
            _decode(path, read)
        except BadFilesError as error:
            problems += error.problems
    return problems


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of an epoch's items: a function of (seed, epoch) alone, shared by
    every loader (PyTorch, DALI) and process count so that runs are comparable and
    resumable."""
    generator = torch.Generator().manual_seed(derived_seed(SeedDomain.EPOCH_ORDER, seed, epoch))
    return torch.randperm(num_items, generator=generator).tolist()


def epoch_batches(
    num_items: int,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    *,
    shuffle: bool = True,
    drop_last: bool = True,
    shard: int = 0,
    num_shards: int = 1,
) -> list[list[int]]:
    """Item indices of an epoch's batches, from batch `start` on: the one batch plan of both
    loaders (PyTorch, DALI) and of training.

    The epoch's order (`epoch_order`, or 0 .. num_items - 1 without shuffle) is cut into
    global batches of `batch_size`; the last partial one is dropped when drop_last, else
    kept, and under several shards filled up to a multiple of num_shards from the order's
    start (as DistributedSampler does). Shard `shard` of `num_shards` (a process's rank)
    takes its contiguous batch_size / num_shards slice of each global batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, num_shards), got shard {shard} of {num_shards}")
    if batch_size % num_shards:
        raise ValueError(f"batch_size {batch_size} cannot be split evenly over {num_shards} shards")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    order = epoch_order(num_items, seed, epoch) if shuffle else list(range(num_items))
    count = num_items // batch_size if drop_last else -(-num_items // batch_size)
    batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(start, count)]
    if num_shards == 1:
        return batches
    if batches and len(batches[-1]) % num_shards:
        filler = itertools.islice(itertools.cycle(order), num_shards - len(batches[-1]) % num_shards)
        batches[-1] = batches[-1] + list(filler)
    return [batch[shard * len(batch) // num_shards : (shard + 1) * len(batch) // num_shards] for batch in batches]


class EpochSeededDataset(Dataset):
    """Makes each item a function of (domain, seed, epoch, index) alone: ITEM_AUGMENT for
    training, VALIDATION_AUGMENT for a held-out split.

    The item's random draws run on a forked RNG, so they neither depend on nor disturb
    the process's RNG (saved in checkpoints). This is what lets --resume be exact from
    any batch, with any number of loader workers.
    """

    def __init__(self, dataset: Dataset, seed: int, domain: SeedDomain = SeedDomain.ITEM_AUGMENT) -> None:
        self.dataset, self.seed, self.domain, self.epoch = dataset, seed, domain, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        threads = torch.get_num_threads()
        # One thread, as in a loader worker: the FFT's rounding depends on the thread count.
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derived_seed(self.domain, self.seed, self.epoch, index))
                return self.dataset[index]
        finally:
            torch.set_num_threads(threads)


def collate_skip_none(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """default_collate over the items that are not None; None when every item was dropped.

    Batched: image B x 3 x H x W, spec B x 1 x F x T, id list of str, label B int64,
    gt / mask B x H x W.
    """
    items = [item for item in batch if item is not None]
    return default_collate(items) if items else None


def _worker_context() -> Any:
    """Loader workers start from a fork server, not by forking this process: a fork
    inherits the state of every library's threads here, and after DALI's decoders have run
    in this process (bench/loader.py runs DALI, then this loader) forked workers were seen
    to crash. The server imports torch and the data path once, so workers start quickly."""
    context = torch.multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "jsa_fast.data"])
    return context


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool,
    *,
    epoch: int = 0,
    start: int = 0,
    shard: int = 0,
    num_shards: int = 1,
) -> DataLoader:
    """A DataLoader over the batches `epoch_batches` plans for epoch `epoch` of `seed` (from
    batch `start`, shard `shard` of `num_shards`: the batches of DALILoader and of the
    training loop). Its workers' RNG seeds come from its own generator, seeded by
    (seed, epoch): never from the process RNG, which a mid-epoch resume restores to another
    point.

    Batches go through `collate_skip_none`, so a batch may be None (all items dropped).
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    batches = epoch_batches(
        len(dataset),
        batch_size,
        seed,
        epoch,
        start,
        shuffle=shuffle,
        drop_last=drop_last,
        shard=shard,
        num_shards=num_shards,
    )  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        generator=torch.Generator().manual_seed(derived_seed(SeedDomain.LOADER_WORKERS, seed, epoch)),
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        multiprocessing_context=_worker_context() if num_workers > 0 else None,
    )
