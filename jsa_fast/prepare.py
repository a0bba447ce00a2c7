"""Raw videos -> the data set layout the trainer reads: `python -m jsa_fast.prepare VIDEOS...
--out ROOT [--ids FILE] [--frame-time S | --frame-index N] [--seconds 10] [--sample-rate 16000]
[--audio-format pcm16|float] [--workers N] [--shard I/N] [--merge] [--no-train-txt]`.

VIDEOS are files, or folders searched recursively for .mp4/.mov/.m4v/.mkv/.webm/.avi (any
case; a broken link among them is a corrupt row); a clip's id
is its file's stem. Per clip:
- ROOT/frames/<id>.jpg: one frame, by default the middle one (index n // 2 of n frames,
  the frame at 5 s of a 10 s clip, where VGG-SS's boxes are), or the frame on screen at
  --frame-time seconds, or frame --frame-index (0-based); JPEG quality 95, 4:2:0, no
  metadata, the video's own size;
- ROOT/audio/<id>.wav: the audio track's channel average, resampled (torchaudio's sinc)
  to --sample-rate, --seconds of it centred on the frame (moved to lie inside the track
  where the track is long enough, the whole track where it is shorter); 16-bit PCM with
  the samples clipped to [-1, 1] (`--audio-format pcm16`, the default) or 32-bit float,
  which keeps them exactly (`float`).
ROOT/manifest.csv has one row per id (sorted): the status (ok, no-audio, no-video,
too-short: no frame at --frame-time or --frame-index, corrupt), the reason for any other than ok, the source, the video's duration, frame rate,
frame count and size, the frame taken and its time, the audio rate and channels before,
the rate after, and where the written audio starts and how long it is. ROOT/train.txt
lists the ok ids. --ids FILE (a train.txt, a VGG-SS json, or a csv: its `id` or `file`
column, VGGSound's `ytid,start,...` rows as ytid_<start:06d>, else the first column)
restricts the work to those ids; the ones without a video are rows with status no-video.

Re-runs are resumable and give the same bytes: each file is written to a temporary name
and renamed, each finished clip is appended to a journal (ROOT/.manifest*.journal) that
a re-run reads to skip the clips already done, and the settings are kept in
ROOT/prepare.json so that a re-run with other ones is refused. --shard I/N (I in
0..N-1) takes the ids whose hash falls in shard I and writes ROOT/manifest.part-I-of-N.csv;
`--merge --out ROOT` joins the N parts into manifest.csv and train.txt.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image
from tqdm import tqdm

from jsa_fast.cli import ArgumentParser, bounded, command, one_line
from jsa_fast.data.audio import SAMPLE_RATE
from jsa_fast.data.datasets import check_ids, read_id_list, read_vggss_json
from jsa_fast.data.video import (
    VIDEO_ERRORS,
    MissingStreamError,
    VideoProbe,
    decode_audio,
    decode_frame,
    mono_resampled,
    probe_video,
)
from jsa_fast.errors import DataError, UsageError
from jsa_fast.runtime import LOCK_NAME, output_lock, staged_outputs

__all__ = ["PrepareSettings", "prepare", "merge_parts", "read_ids", "shard_of", "main"]

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")  # any case
JPEG_QUALITY = 95
WAV_SUBTYPES = {"pcm16": "PCM_16", "float": "FLOAT"}
COLUMNS = (
    "id", "status", "reason", "source", "duration_s", "fps", "num_frames", "width", "height",
    "frame_index", "frame_time_s", "audio_rate_in", "audio_channels_in", "audio_rate_out",
    "audio_start_s", "audio_seconds",
)  # fmt: skip
SETTINGS_FILE = "prepare.json"
MANIFEST = "manifest.csv"
PART_PATTERN = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.csv")
# What decoding a broken file raises (PyAV, our checks, the OS, PIL/soundfile on write).
_CLIP_ERRORS = (*VIDEO_ERRORS, ValueError, OSError, RuntimeError, EOFError)

Row = dict[str, str]


@dataclass(frozen=True)
class PrepareSettings:
    """What decides a clip's output files (kept in ROOT/prepare.json).

    frame_time / frame_index: the frame taken (both None: the middle frame); seconds: the
    audio written around it (None: the whole track); audio_format: "pcm16" or "float".
    """

    frame_time: float | None = None
    frame_index: int | None = None
    seconds: float | None = 10.0
    sample_rate: int = SAMPLE_RATE
    audio_format: str = "pcm16"

    def __post_init__(self) -> None:
        if self.frame_time is not None and self.frame_index is not None:
            raise UsageError("--frame-time and --frame-index exclude each other")
        if (self.frame_time is not None and not self.frame_time >= 0) or (self.frame_index or 0) < 0:
            raise UsageError(f"the frame must be at a time or index >= 0, got {self.frame_time=} {self.frame_index=}")
        if (self.seconds is not None and not self.seconds > 0) or self.sample_rate < 1:
            raise UsageError(f"--seconds and --sample-rate must be positive, got {self.seconds} and {self.sample_rate}")
        if self.audio_format not in WAV_SUBTYPES:
            raise UsageError(f"--audio-format must be one of {sorted(WAV_SUBTYPES)}, got {self.audio_format!r}")


def shard_of(clip_id: str, num_shards: int) -> int:
    """The shard of an id: its SHA-1 modulo the shard count (the same on every machine,
    unlike Python's salted hash())."""
    return int.from_bytes(hashlib.sha1(clip_id.encode()).digest()[:8], "big") % num_shards


def _parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise UsageError(f"--shard must be I/N with 0 <= I < N (e.g. 0/8), got {text!r}")
    return int(match[1]), int(match[2])


def find_videos(inputs: Sequence[str | Path]) -> dict[str, Path]:
    """id (file stem) -> path of every video among `inputs`: files as given, folders
    searched recursively for VIDEO_SUFFIXES. UsageError for an input that does not exist
    or two videos with one stem."""
    paths: list[Path] = []
    for given in map(Path, inputs):
        if given.is_dir():
            paths += sorted(
                p for p in given.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and (p.is_file() or p.is_symlink())
            )  # a broken link is kept: its row says so
        elif given.is_file():
            paths.append(given)
        else:
            raise UsageError(f"{given}: no such file or folder")
    by_id: dict[str, list[Path]] = {}
    for path in paths:
        by_id.setdefault(path.stem, []).append(path)
    clashes = {name: found for name, found in by_id.items() if len(found) > 1}
    if clashes:
        name, found = next(iter(sorted(clashes.items())))
        raise UsageError(
            f"{len(clashes)} id(s) name several videos, e.g. {name}: {', '.join(map(str, found))} "
            "(ids are file stems; pass one of them)"
        )
    return {name: found[0] for name, found in sorted(by_id.items())}


def _csv_ids(path: Path) -> list[str]:
    rows = [row for row in csv.reader(io.StringIO(path.read_text(encoding="utf-8"))) if any(c.strip() for c in row)]
    if not rows:
        raise DataError(f"{path}: the csv names no ids (it is empty)")
    header = [cell.strip().lower() for cell in rows[0]]
    for column in ("id", "file"):
        if column in header:
            index = header.index(column)
            return [row[index].strip() for row in rows[1:] if len(row) > index]
    # VGGSound: ytid,start,label,split, with or without a header line
    body = rows[1:] if len(rows) > 1 and not (len(rows[0]) >= 2 and rows[0][1].strip().isdigit()) else rows
    if all(len(row) >= 2 and row[1].strip().isdigit() for row in body):
        return [f"{row[0].strip()}_{int(row[1]):06d}" for row in body]
    return [row[0].strip() for row in rows]


def read_ids(path: str | Path) -> list[str]:
    """The ids of an --ids file, in its order: a VGG-SS json (or a json list of ids), a csv
    (see the module's doc) or a text file of one id per line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--ids {path}: no such file")
    if path.suffix.lower() == ".json":
        entries = json.loads(path.read_text(encoding="utf-8"))
        ids = entries if isinstance(entries, list) and all(isinstance(e, str) for e in entries) else None
        ids = ids if ids is not None else [record[0] for record in read_vggss_json(path)]
    elif path.suffix.lower() == ".csv":
        ids = _csv_ids(path)
    else:
        return read_id_list(path)
    if not ids:
        raise DataError(f"{path}: names no ids")
    try:
        check_ids(ids, path)
    except ValueError as error:
        raise DataError(str(error)) from None
    return ids


def _number(value: float) -> str:
    """A float as the manifest writes it: at most 6 decimals, no trailing zeros."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary) then rename it to `path` (`staged_outputs`): a reader never sees half
    a file, and a write killed on the way leaves only a hidden temporary
    (.<name>.<random>.tmp), which the next run of its shard deletes."""
    with staged_outputs({"file": path}) as staged:
        write(staged["file"])


class _ClipProblem(Exception):
    """Why a clip cannot be prepared, as its manifest status and reason."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _frame_index(probe: VideoProbe, settings: PrepareSettings) -> int:
    """The index of the frame to take; a too-short problem when the video has no such frame."""
    if settings.frame_index is not None:
        if settings.frame_index >= probe.num_frames:
            raise _ClipProblem("too-short", f"no frame {settings.frame_index}: the video has {probe.num_frames}")
        return settings.frame_index
    if settings.frame_time is not None:
        if settings.frame_time > probe.duration_s:
            raise _ClipProblem(
                "too-short", f"no frame at {settings.frame_time:g} s: the video lasts {probe.duration_s:g} s"
            )
        return probe.index_at(settings.frame_time)
    return probe.num_frames // 2


def _audio_window(wave: np.ndarray, centre_s: float, seconds: float | None, rate: int) -> tuple[int, np.ndarray]:
    """(start sample, the samples): `seconds` of `wave` centred on `centre_s`, moved to lie
    inside the wave; the whole wave when it is shorter or seconds is None."""
    length = wave.shape[0] if seconds is None else min(wave.shape[0], round(seconds * rate))
    start = min(max(0, round(centre_s * rate) - length // 2), wave.shape[0] - length)
    return start, wave[start : start + length]


def prepare_clip(clip_id: str, source: Path | None, root: Path, settings: PrepareSettings) -> Row:
    """Write one clip's frame and audio (only when both can be made) and return its
    manifest row; a clip's failure is its row's status and reason, never an exception."""
    row = dict.fromkeys(COLUMNS, "") | {"id": clip_id, "source": "" if source is None else str(source)}
    if source is None:
        return row | {"status": "no-video", "reason": "no video with this id among the inputs"}
    if source.is_symlink() and not source.exists():
        return row | {"status": "corrupt", "reason": f"a broken link (to {os.readlink(source)})"}
    stage = "opening the file"
    try:
        probe = probe_video(source)
        row.update(
            duration_s=_number(probe.duration_s), fps=_number(probe.fps), num_frames=str(probe.num_frames),
            width=str(probe.width), height=str(probe.height),
            audio_rate_in=str(probe.audio_rate or ""), audio_channels_in=str(probe.audio_channels or ""),
        )  # fmt: skip
        if probe.listed_frames > probe.num_frames:
            raise _ClipProblem(
                "corrupt",
                f"truncated: its header lists {probe.listed_frames} frames, the file holds {probe.num_frames}",
            )
        index = _frame_index(probe, settings)
        frame_time = probe.frame_times[index]
        row.update(frame_index=str(index), frame_time_s=_number(frame_time))
        stage = "the audio track"
        samples, rate = decode_audio(source)
        if not np.isfinite(samples).all():
            raise _ClipProblem("corrupt", "the audio track decodes to samples that are not finite")
        if not samples.any():
            raise _ClipProblem("no-audio", "the audio track is silent (all samples 0)")
        wave = mono_resampled(samples, rate, settings.sample_rate).numpy()
        start, window = _audio_window(wave, frame_time, settings.seconds, settings.sample_rate)
        stage = f"frame {index}"
        pixels = decode_frame(source, index, None if probe.stamps is None else probe.stamps[index])
    except _ClipProblem as problem:
        return row | {"status": problem.status, "reason": problem.reason}
    except MissingStreamError as error:
        return row | {"status": f"no-{error.kind}", "reason": one_line(error).removeprefix(f"{source}: ")}
    except _CLIP_ERRORS as error:
        message = error.strerror if VIDEO_ERRORS and isinstance(error, VIDEO_ERRORS) else one_line(error)
        return row | {"status": "corrupt", "reason": f"{stage}: {message.removeprefix(f'{source}: ')}"}
    if settings.audio_format == "pcm16":
        window = np.clip(window, -1.0, 1.0)
    _write_atomically(
        root / "audio" / f"{clip_id}.wav",
        lambda path: soundfile.write(
            path, window, settings.sample_rate, subtype=WAV_SUBTYPES[settings.audio_format], format="WAV"
        ),
    )
    _write_atomically(
        root / "frames" / f"{clip_id}.jpg",
        lambda path: Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0"),
    )
    return row | {
        "status": "ok",
        "audio_rate_out": str(settings.sample_rate),
        "audio_start_s": _number(start / settings.sample_rate),
        "audio_seconds": _number(window.shape[0] / settings.sample_rate),
    }


def _prepare_item(item: tuple[str, Path | None], root: Path, settings: PrepareSettings) -> Row:
    return prepare_clip(item[0], item[1], root, settings)


def _read_rows(path: Path) -> list[Row]:
    """The rows of a manifest or journal (only the complete ones: a row is a line of all the
    columns)."""
    if not path.exists():
        return []
    rows = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
    return [row for row in rows if None not in row and None not in row.values() and list(row) == list(COLUMNS)]


def _complete_journal(path: Path) -> None:
    """Cut a torn last line (a run killed while appending it) off the journal, so that it
    can neither be read as a row nor run into the next one."""
    if path.exists():
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with path.open("r+b") as file:
                file.truncate(len(complete))


def _csv_text(rows: Iterable[Row], header: bool = True) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _write_outputs(root: Path, rows: Sequence[Row], manifest: Path, train_txt: bool) -> None:
    """The manifest (rows sorted by id) and, when asked, train.txt of the ok ids."""
    rows = sorted(rows, key=lambda row: row["id"])
    _write_text(manifest, _csv_text(rows))
    if train_txt:
        _write_text(root / "train.txt", "".join(f"{row['id']}\n" for row in rows if row["status"] == "ok"))


def _check_settings(root: Path, settings: PrepareSettings) -> None:
    """Record the settings in ROOT/prepare.json, or refuse a ROOT prepared with others (its
    files would mix two settings) or holding a data set that prepare did not write. Shards
    starting together may each write the file (the same bytes); each writes it before it
    makes frames/ and audio/, so their folders are never taken for a foreign data set."""
    path = root / SETTINGS_FILE
    wanted = json.dumps(dataclasses.asdict(settings), indent=1, sort_keys=True) + "\n"
    if not path.exists():
        if any((root / folder).exists() for folder in ("frames", "audio")):
            raise UsageError(
                f"--out {root} holds a data set that prepare did not write (no {SETTINGS_FILE}); use another --out"
            )
        # what prepare writes at the end, but did not write here: the user's own files
        theirs = sorted(
            name for name in (MANIFEST, "train.txt", *(p.name for p in root.glob("manifest.part-*.csv")))
            if (root / name).exists()
        )  # fmt: skip
        if theirs:
            raise UsageError(
                f"--out {root} holds {', '.join(theirs)}, which prepare did not write (no {SETTINGS_FILE}) and "
                "would replace; move them or use another --out"
            )
        _write_text(path, wanted)
    if path.read_text(encoding="utf-8") != wanted:
        raise UsageError(
            f"--out {root} was prepared with other settings ({path}: "
            f"{json.loads(path.read_text(encoding='utf-8'))}); use another --out"
        )


def _remove_stale_temporaries(root: Path, ids: set[str], manifest: Path) -> None:
    """Delete the hidden temporaries a killed run left for these ids and this manifest; not
    other shards', which may be writing theirs into the same ROOT right now."""
    for folder in ("frames", "audio"):
        for path in (root / folder).glob(".*.tmp"):
            if path.name[1:].rsplit(".", 3)[0] in ids:  # .<id>.<ext>.<random>.tmp
                path.unlink(missing_ok=True)
    for path in root.glob(f".{manifest.name}.*.tmp"):
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Summary:
    """What a run did: clips done now, clips skipped as done before (or the parts merged),
    the statuses of all its ids, the ids without a video, the manifest written."""

    prepared: int
    skipped: int
    statuses: dict[str, int]
    missing: list[str]
    manifest: Path
    merged_parts: int = 0

    def line(self) -> str:
        failed = sum(count for status, count in self.statuses.items() if status != "ok")
        kinds = ", ".join(f"{count} {status}" for status, count in sorted(self.statuses.items()) if status != "ok")
        done = (
            f"merged {self.merged_parts} parts"
            if self.merged_parts
            else f"{self.prepared} done now, {self.skipped} skipped as done before"
        )
        return (
            f"prepare: {self.statuses.get('ok', 0)} ok, {failed} failed{f' ({kinds})' if kinds else ''} "
            f"({done}); wrote {self.manifest}"
        )


def prepare(
    inputs: Sequence[str | Path],
    root: str | Path,
    settings: PrepareSettings = PrepareSettings(),
    ids_file: str | Path | None = None,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    train_txt: bool = True,
) -> Summary:
    """Prepare the clips of `inputs` (or those of `ids_file`) into `root`; see the module's
    doc. shard: (I, N) for the I-th of N shards (writes a manifest part, no train.txt)."""
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {root} is a file, not a folder")
    videos = find_videos(inputs)
    ids = read_ids(ids_file) if ids_file is not None else list(videos)
    if not ids:
        raise UsageError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) among the inputs {[str(p) for p in inputs]}")
    if shard is not None:
        ids = [clip_id for clip_id in ids if shard_of(clip_id, shard[1]) == shard[0]]
    tag = "" if shard is None else f".part-{shard[0]}-of-{shard[1]}"
    manifest = root / f"manifest{tag}.csv"
    journal_path = root / f".manifest{tag}.journal"
    root.mkdir(parents=True, exist_ok=True)
    _check_settings(root, settings)
    for folder in ("frames", "audio"):
        (root / folder).mkdir(exist_ok=True)

    wanted = set(ids)
    _remove_stale_temporaries(root, wanted, manifest)
    sources = {clip_id: videos.get(clip_id) for clip_id in ids}
    _complete_journal(journal_path)
    previous = _read_rows(manifest) + _read_rows(journal_path)
    left_out = sorted({row["id"] for row in previous} - wanted)
    if left_out:
        warnings.warn(
            f"{len(left_out)} id(s) of the previous run in {root} are not among this run's ({', '.join(left_out[:5])}"
            f"{', ...' if len(left_out) > 5 else ''}): {manifest.name}{'' if shard else ' and train.txt'} will "
            "list only this run's ids (their files stay)",
            stacklevel=2,
        )
    done = {
        row["id"]: row
        for row in previous
        if row["id"] in wanted
        and row["status"] == "ok"
        and row["source"] == str(sources[row["id"]])
        and (root / "frames" / f"{row['id']}.jpg").exists()
        and (root / "audio" / f"{row['id']}.wav").exists()
    }
    pending = [(clip_id, sources[clip_id]) for clip_id in ids if clip_id not in done]
    rows = dict(done)
    with journal_path.open("a", encoding="utf-8") as journal:
        if journal.tell() == 0:
            journal.write(_csv_text([]))
        work = partial(_prepare_item, root=root, settings=settings)
        with _pool(workers) as pool:
            results = pool.imap_unordered(work, pending) if pool is not None else map(work, pending)
            for row in tqdm(results, total=len(pending), desc="prepare", unit="clip", dynamic_ncols=True, disable=None):
                journal.write(_csv_text([row], header=False))
                journal.flush()
                rows[row["id"]] = row
    _write_outputs(root, list(rows.values()), manifest, train_txt and shard is None)
    journal_path.unlink()
    statuses = Counter(row["status"] for row in rows.values())
    missing = [clip_id for clip_id in ids if sources[clip_id] is None]
    return Summary(len(pending), len(done), dict(statuses), missing, manifest)


class _NoPool:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _pool(workers: int) -> Any:
    """A process pool of `workers` (None in-process for 1). Workers start from a fork
    server, not by forking this process, as the data loaders' do (see datasets.py); the
    server preloads what they decode with, not this module, which runpy runs as __main__."""
    if workers == 1:
        return _NoPool()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["jsa_fast.data.video"])
    # Ctrl-C reaches the whole process group: the workers leave it to this process, which
    # stops them (the pool's exit) and says so in one line.
    return context.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))


def merge_parts(root: str | Path, train_txt: bool = True) -> Summary:
    """Join ROOT/manifest.part-I-of-N.csv (all N of them) into manifest.csv and train.txt."""
    root = Path(root)
    parts = {}
    for path in sorted(root.glob("manifest.part-*-of-*.csv")) if root.is_dir() else []:
        match = PART_PATTERN.fullmatch(path.name)
        if match:
            parts[(int(match[1]), int(match[2]))] = path
    if not parts:
        raise UsageError(f"--merge: {root} holds no manifest.part-I-of-N.csv (run the shards first)")
    counts = sorted({n for _, n in parts})
    if len(counts) > 1:
        raise UsageError(f"--merge: {root} holds parts of different shard counts {counts}; keep one set")
    (count,) = counts
    absent = [i for i in range(count) if (i, count) not in parts]
    if absent:
        unfinished = [i for i in absent if (root / f".manifest.part-{i}-of-{count}.journal").exists()]
        note = f" (shards {unfinished} started but did not finish)" if unfinished else ""
        raise UsageError(f"--merge: {root} lacks the parts of shards {absent} of {count}{note}")
    rows = [row for key in sorted(parts) for row in _read_rows(parts[key])]
    repeated = sorted(name for name, n in Counter(row["id"] for row in rows).items() if n > 1)
    if repeated:
        raise DataError(f"--merge: ids in more than one part: {repeated[:10]}")
    manifest = root / MANIFEST
    _write_outputs(root, rows, manifest, train_txt)
    statuses = Counter(row["status"] for row in rows)
    missing = [row["id"] for row in rows if row["status"] == "no-video" and not row["source"]]
    return Summary(0, 0, dict(statuses), missing, manifest, merged_parts=count)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m jsa_fast.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("videos", nargs="*", help="video files, or folders searched for .mp4/.mkv/.webm/.avi")
    parser.add_argument("--out", required=True, help="the data set root to write")
    parser.add_argument("--ids", default=None, help="only these ids: a train.txt, a VGG-SS json or a csv")
    frame = parser.add_mutually_exclusive_group()
    frame.add_argument(
        "--frame-time", type=bounded(float, low=0), default=None, help="take the frame on screen at S seconds"
    )
    frame.add_argument("--frame-index", type=bounded(int, low=0), default=None, help="take frame N (0-based)")
    parser.add_argument(
        "--seconds", type=bounded(float, low=1e-3), default=PrepareSettings.seconds,
        help="audio around the frame, in seconds (default 10; the whole track when shorter)",
    )  # fmt: skip
    parser.add_argument("--whole-audio", action="store_true", help="write the whole audio track instead of --seconds")
    parser.add_argument("--sample-rate", type=bounded(int, low=1000), default=PrepareSettings.sample_rate)
    parser.add_argument("--audio-format", choices=sorted(WAV_SUBTYPES), default=PrepareSettings.audio_format,
                        help="pcm16: 16-bit, samples clipped to [-1, 1]; float: 32-bit float, exact")  # fmt: skip
    parser.add_argument("--workers", type=bounded(int, low=1), default=1, help="processes decoding clips")
    parser.add_argument(
        "--shard", type=str, default=None, help="I/N: prepare the I-th (0-based) of N shards of the ids"
    )
    parser.add_argument(
        "--merge", action="store_true", help="join ROOT's manifest parts into manifest.csv and train.txt"
    )
    parser.add_argument("--no-train-txt", dest="train_txt", action="store_false", help="do not write train.txt")
    return parser


@command("jsa_fast.prepare")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shard = _parse_shard(args.shard) if args.shard is not None else None
    if args.merge:
        if args.videos or args.shard or args.ids:
            raise UsageError("--merge takes only --out (and --no-train-txt): it joins the parts already written")
        with output_lock(Path(args.out)):
            summary = merge_parts(args.out, args.train_txt)
    else:
        if not args.videos:
            raise UsageError("name the videos (files or folders) to prepare, or --merge")
        settings = PrepareSettings(
            args.frame_time,
            args.frame_index,
            None if args.whole_audio else args.seconds,
            args.sample_rate,
            args.audio_format,
        )
        # Shards of one data set run at once, on one ROOT: each holds a lock of its own.
        lock_name = LOCK_NAME if shard is None else LOCK_NAME.replace(".lock", f".part-{shard[0]}-of-{shard[1]}.lock")
        with output_lock(Path(args.out), name=lock_name):
            summary = prepare(args.videos, args.out, settings, args.ids, args.workers, shard, args.train_txt)
    if summary.missing:
        listed = ", ".join(summary.missing[:10]) + (
            f" and {len(summary.missing) - 10} more" if len(summary.missing) > 10 else ""
        )
        print(
            f"prepare: {len(summary.missing)} id(s) have no video: {listed} (status no-video in {summary.manifest})",
            file=sys.stderr,
        )
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
