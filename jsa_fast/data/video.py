"""Videos through PyAV: what a file holds, its frames, its audio track, and writing H.264
video with sound.

Frames are returned as a player shows them: a stream's display rotation (a phone's
portrait clip is stored landscape with a rotation of -90 degrees) is applied. Times are
seconds from the video stream's first frame, for the audio too: a track that starts later
is preceded by silence, one that starts earlier loses what comes before the first frame
(the streams' start times, with the container's edit lists applied by the demuxer).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torchaudio.functional as AF
from torch import Tensor

try:
    import av
except ModuleNotFoundError:  # the [video] extra: what reads or writes a video says so when called
    av = None

__all__ = [
    "VIDEO_ERRORS",
    "pyav",
    "MissingStreamError",
    "VideoProbe",
    "probe_video",
    "iter_frames",
    "decode_frame",
    "displayed_rgb",
    "decode_audio",
    "mono_resampled",
    "write_video",
]

# What PyAV raises for a file it cannot read (none without PyAV).
VIDEO_ERRORS: tuple[type[Exception], ...] = (av.FFmpegError,) if av is not None else ()


def pyav() -> ModuleType:
    """PyAV, or ModuleNotFoundError (naming "av", which the command lines turn into the
    extra to install) where it is not installed."""
    if av is None:
        raise ModuleNotFoundError("reading and writing videos needs PyAV (the [video] extra)", name="av")
    return av


# Audio codecs that an MP4 file can hold as they are (copied packet for packet); any other
# track is decoded and encoded as AAC.
MP4_AUDIO_CODECS = frozenset({"aac", "mp3", "opus", "flac", "alac", "ac3", "eac3"})
# x264: visually lossless quality for overlays and synthetic scenes, a fast preset, and a
# key frame every 2 s, as streamed video has (a reader can then seek to a frame).
X264_OPTIONS = {"crf": "18", "preset": "veryfast"}
KEY_FRAME_SECONDS = 2


class MissingStreamError(ValueError):
    """A file without the stream asked for; `kind` is "video" or "audio"."""

    def __init__(self, path: str | Path, kind: str) -> None:
        super().__init__(f"{path}: the file has no {kind} stream")
        self.kind = kind


@dataclass(frozen=True)
class VideoProbe:
    """What a video holds, read from its container without decoding any frame.

    frame_times: presentation time of each frame in the file (sorted; its length is the
    frame count); stamps: the same as the container's timestamps (in the video stream's
    time base; None when it records none); listed_frames: the count the container's
    header states (0 when it states none; more than the file holds in a truncated file);
    duration_s: the container's duration (the frames' span when it records none);
    width x height: the frames as displayed (`rotation` applied); rotation: the
    counter-clockwise degrees (a multiple of 90) the stored frames are turned by for
    display; audio_rate / audio_channels: of the first audio stream, None when there is none.
    """

    frame_times: tuple[float, ...]
    stamps: tuple[int, ...] | None
    listed_frames: int
    fps: float
    duration_s: float
    width: int
    height: int
    rotation: int
    audio_rate: int | None
    audio_channels: int | None

    @property
    def num_frames(self) -> int:
        return len(self.frame_times)

    def index_at(self, time_s: float) -> int:
        """The frame on screen at `time_s`: the last one that starts at or before it (the
        first frame for earlier times)."""
        return max(0, bisect.bisect_right(self.frame_times, time_s + 1e-9) - 1)


def probe_video(path: str | Path) -> VideoProbe:
    """Stream facts of a video file; raises MissingStreamError without a video stream or
    frames, and PyAV's errors for a file it cannot read."""
    with pyav().open(str(path)) as container:
        if not container.streams.video:
            raise MissingStreamError(path, "video")
        stream = container.streams.video[0]
        stamps = [packet.pts for packet in container.demux(stream) if packet.size]
        if not stamps:
            raise MissingStreamError(path, "video")  # a stream with no frames in it
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if None in stamps or stream.time_base is None:
            if fps <= 0:
                raise ValueError(f"{path}: the video has neither frame times nor a frame rate")
            times, stamps = [index / fps for index in range(len(stamps))], None
        else:
            stamps.sort()
            times = [float((pts - stamps[0]) * stream.time_base) for pts in stamps]
            if fps <= 0:
                fps = (len(times) - 1) / times[-1] if times[-1] > 0 else 1.0
        frame_span = times[-1] + 1 / fps
        duration = container.duration / pyav().time_base if container.duration else frame_span
        audio = container.streams.audio[0] if container.streams.audio else None
        container.seek(0)
        first = next(container.decode(stream), None)
        rotation = _quarter_turns(first) * 90 if first is not None else 0
        width, height = (stream.height, stream.width) if rotation % 180 else (stream.width, stream.height)
        return VideoProbe(
            tuple(times),
            None if stamps is None else tuple(stamps),
            stream.frames,
            fps,
            duration,
            width,
            height,
            rotation,
            audio.rate if audio else None,
            audio.channels if audio else None,
        )


def _quarter_turns(frame: av.VideoFrame) -> int:
    """The frame's display rotation in counter-clockwise quarter turns, 0-3 (PyAV's
    `rotation`, from the stream's display matrix, rounded to a multiple of 90 degrees)."""
    return round(getattr(frame, "rotation", 0) / 90) % 4


def displayed_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as a player shows it: H x W x 3 uint8 RGB, its display rotation applied."""
    pixels = frame.to_ndarray(format="rgb24")
    turns = _quarter_turns(frame)
    return np.ascontiguousarray(np.rot90(pixels, k=turns)) if turns else pixels


def iter_frames(path: str | Path) -> Iterator[av.VideoFrame]:
    """The video's frames in presentation order (decoded lazily; convert the ones you keep
    with `displayed_rgb`)."""
    with pyav().open(str(path)) as container:
        if not container.streams.video:
            raise MissingStreamError(path, "video")
        yield from container.decode(video=0)


def decode_frame(path: str | Path, index: int, stamp: int | None = None) -> np.ndarray:
    """Frame `index` (0-based, presentation order) as H x W x 3 uint8 RGB, as displayed.

    With its timestamp (`VideoProbe.stamps[index]`) only the frames from the key frame
    before it are decoded (a seek); without one, or when the seek does not meet the frame
    exactly, every frame up to it."""
    if stamp is not None:
        with pyav().open(str(path)) as container:
            stream = container.streams.video[0]
            container.seek(stamp, stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts is None or frame.pts > stamp:
                    break
                if frame.pts == stamp:
                    return displayed_rgb(frame)
    decoded = 0
    for decoded, frame in enumerate(iter_frames(path), start=1):
        if decoded - 1 == index:
            return displayed_rgb(frame)
    raise ValueError(f"{path}: frame {index} asked for, but only {decoded} frame(s) decode")


def decode_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """The first audio stream, decoded: (C x N float32 samples, sample rate), sample 0 at
    the video's first frame (see the module's doc; a file without video: at the track's
    start).

    Raises MissingStreamError without an audio stream or when it decodes to no samples.
    """
    with pyav().open(str(path)) as container:
        if not container.streams.audio:
            raise MissingStreamError(path, "audio")
        stream = container.streams.audio[0]
        # Planar float at the stream's own rate and layout: a format conversion, no resampling.
        to_float = pyav().AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate)
        chunks = []
        audio_start = None
        for frame in container.decode(stream):
            if audio_start is None and frame.time is not None:
                audio_start = frame.time
            chunks += [converted.to_ndarray() for converted in to_float.resample(frame)]
        chunks += [converted.to_ndarray() for converted in to_float.resample(None)]
        if not chunks or sum(chunk.shape[1] for chunk in chunks) == 0:
            raise MissingStreamError(path, "audio")
        samples = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
        video_start = _video_start(container)
        if audio_start is None or video_start is None:
            return samples, stream.rate
        offset = round((audio_start - video_start) * stream.rate)
        if offset > 0:  # the track starts after the first frame: silence until it does
            samples = np.concatenate([np.zeros((samples.shape[0], offset), np.float32), samples], axis=1)
        elif offset < 0:  # it starts before: what precedes the first frame is no frame's sound
            samples = samples[:, -offset:]
        if samples.shape[1] == 0:
            raise MissingStreamError(path, "audio")
        return samples, stream.rate


def _video_start(container: av.container.InputContainer) -> float | None:
    """The first video frame's presentation time in seconds (None without video)."""
    if not container.streams.video:
        return None
    stream = container.streams.video[0]
    if stream.start_time is not None and stream.time_base is not None:
        return float(stream.start_time * stream.time_base)
    return None


def mono_resampled(samples: np.ndarray, rate: int, sample_rate: int) -> Tensor:
    """C x N samples at `rate` -> the channel average at `sample_rate`, 1-D float32.

    Resampled with torchaudio's windowed sinc in one thread, so that the result does not
    depend on the machine's thread count (the same bytes on every run and worker).
    """
    wave = torch.from_numpy(np.ascontiguousarray(samples)).float().mean(dim=0)
    if rate == sample_rate:
        return wave
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return AF.resample(wave, orig_freq=rate, new_freq=sample_rate)
    finally:
        torch.set_num_threads(threads)


def _aac_track(container: av.container.OutputContainer, samples: np.ndarray, rate: int) -> Callable[[], None]:
    """Add an AAC stream for C x N float samples to `container` (before anything is muxed,
    when the header is written); returns what encodes and muxes them."""
    layout = {1: "mono", 2: "stereo"}.get(samples.shape[0])
    if layout is None:  # more channels need a layout we cannot infer: keep a stereo mix
        samples, layout = np.repeat(samples.mean(axis=0, keepdims=True), 2, axis=0), "stereo"
    stream = container.add_stream("aac", rate=rate, layout=layout)

    def mux() -> None:
        frame = pyav().AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.float32), format="fltp", layout=layout
        )
        frame.sample_rate, frame.pts = rate, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)

    return mux


def _copied_track(container: av.container.OutputContainer, source: str | Path) -> Callable[[], None]:
    """Add `source`'s first audio track to `container`: its packets as they are when MP4 can
    hold its codec, else decoded and encoded as AAC. Returns what muxes them."""
    with pyav().open(str(source)) as reader:
        if not reader.streams.audio:
            raise MissingStreamError(source, "audio")
        track = reader.streams.audio[0]
        if track.codec_context.name not in MP4_AUDIO_CODECS:
            return _aac_track(container, *decode_audio(source))
        stream = container.add_stream_from_template(track)

    def mux() -> None:
        with pyav().open(str(source)) as reader:
            for packet in reader.demux(reader.streams.audio[0]):
                if packet.dts is None:  # the demuxer's empty flush packet
                    continue
                packet.stream = stream
                container.mux(packet)

    return mux


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float,
    audio: tuple[np.ndarray, int] | None = None,
    audio_from: str | Path | None = None,
) -> int:
    """Write an MP4: `frames` (H x W x 3 uint8, all one size; an odd side loses its last
    pixel row or column, as H.264's 4:2:0 needs even sides) as H.264 at `fps`, and sound:
    `audio` = (C x N float32 samples in [-1, 1], rate) encoded as AAC, or the audio track of
    the file `audio_from`. Returns the number of frames written."""
    if audio is not None and audio_from is not None:
        raise ValueError("give audio or audio_from, not both")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{path}: no frames to write")
    with pyav().open(str(path), "w", format="mp4") as container:
        options = X264_OPTIONS | {"g": str(max(1, round(KEY_FRAME_SECONDS * fps)))}
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.pix_fmt = "yuv420p"
        stream.height, stream.width = (side - side % 2 for side in first.shape[:2])
        mux_audio = None
        if audio is not None:
            mux_audio = _aac_track(container, *audio)
        elif audio_from is not None:
            mux_audio = _copied_track(container, audio_from)
        count = 0
        for count, pixels in enumerate(itertools.chain([first], frames), start=1):
            frame = pyav().VideoFrame.from_ndarray(
                np.ascontiguousarray(pixels[: stream.height, : stream.width]), format="rgb24"
            )
            frame.pts = count - 1  # in the stream's time base of 1 / fps
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        if mux_audio is not None:
            mux_audio()
    return count
