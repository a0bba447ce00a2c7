"""Where the sound comes from, on a video or an image of your own:
`python -m jsa_fast.localize --checkpoint C INPUT [--audio WAV] --out DIR [--fps 4]
[--map ca|iqr|ogl|obj] [--protocol field|released] [--alpha A] [--temperature T] [--ogl R18.pth]
[--batch-size 16] [--device cpu|cuda]`.

A video with sound: at each output time t = k / fps (k = 0, 1, ... while t is within the
clip) the frame on screen at t and the audio window of the model's training clip length
centred on t (zero-padded beyond the track's ends) go through the model. Writes
DIR/<stem>_heatmap.mp4 (the maps over the frames, at --fps, with the input's own audio
track), DIR/<stem>_maps.npy (T x H x W float32 in [0, 1], H x W the model's image size)
and DIR/<stem>_times.csv (index, time_s, and the source frame shown: source_frame,
source_time_s).

An image and --audio WAV: the map of the image with the WAV's middle clip (as evaluation
reads a data set's audio): DIR/<stem>_heatmap.png at the image's size and
DIR/<stem>_map.npy (H x W).

The map is ca^{a,v} (docs/model.md "Inference"), or the IQR map with --map iqr; with --ogl (a
local ImageNet ResNet-18 state dict) the OGL map (the default then) or the object map
alone (--map obj). --protocol chooses the upsampling to the model's image size, IQR's
alpha and the inference temperature as jsa_fast.evaluate does (field: bilinear, 0.6, 1;
released: bicubic, 0.4, 0.1); --upsample, --alpha, --temperature and --ogl-alpha override them.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from jsa_fast.checkpoint import load_trained_model
from jsa_fast.cli import ArgumentParser, bounded, command
from jsa_fast.config import RunConfig
from jsa_fast.data.audio import AudioConfig, load_audio, log_spectrogram, middle_clip
from jsa_fast.data.image import eval_transform, load_image
from jsa_fast.data.video import decode_audio, displayed_rgb, iter_frames, mono_resampled, probe_video, write_video
from jsa_fast.errors import DataError, UsageError
from jsa_fast.evaluation import add_protocol_arguments, load_object_saliency, protocol_from_args
from jsa_fast.maps import upsample_map
from jsa_fast.model import JSAModel, ObjectSaliency
from jsa_fast.protocol import PROTOCOLS, Protocol, scored_maps
from jsa_fast.runtime import autocast_context, output_lock, resolve_device, staged_outputs
from jsa_fast.viz import overlay_heatmap

__all__ = ["output_times", "centred_window", "Localizer", "localize_video", "localize_image", "main"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAPS = {"ca": "av", "iqr": "iqr", "ogl": "ogl", "obj": "obj"}  # --map -> jsa_fast.protocol.scored_maps' name
OVERLAY_ALPHA = 0.5


def output_times(duration_s: float, fps: float) -> np.ndarray:
    """k / fps for k = 0, 1, ... while within a clip of `duration_s` (at least one time)."""
    count = max(1, math.ceil(duration_s * fps - 1e-6))
    return np.arange(count) / fps


def centred_window(wave: Tensor, centre_s: float, num_samples: int, sample_rate: int) -> Tensor:
    """The `num_samples` of a 1-D wave centred on `centre_s`; zeros where the window
    reaches beyond the wave's ends."""
    start = round(centre_s * sample_rate) - num_samples // 2
    window = wave.new_zeros(num_samples)
    low, high = max(0, start), min(wave.numel(), start + num_samples)
    if high > low:
        window[low - start : high - start] = wave[low:high]
    return window


class Localizer:
    """A trained model that maps (image, audio clip) pairs to sound-source maps: `which`
    of `MAPS` under `protocol` (its upsampling, IQR alpha and temperature); "ogl" and
    "obj" need the object map's `saliency` network."""

    def __init__(
        self,
        model: JSAModel,
        cfg: RunConfig,
        device: torch.device,
        which: str = "ca",
        protocol: Protocol = PROTOCOLS["field"],
        saliency: ObjectSaliency | None = None,
        amp: str = "none",
    ) -> None:
        if which not in MAPS:
            raise ValueError(f"which must be one of {', '.join(MAPS)}, got {which!r}")
        if (which in ("ogl", "obj")) != (saliency is not None):
            raise ValueError(
                f"which={which!r} {'needs' if saliency is None else 'does not use'} a saliency network (the object map's ResNet-18)"
            )
        self.protocol, self.saliency = protocol, saliency
        self.model, self.cfg, self.device, self.which, self.amp = model, cfg, device, which, amp
        self.audio_cfg: AudioConfig = cfg.data.audio
        self.image_transform = eval_transform(cfg.data.image)

    @torch.no_grad()
    def maps(self, images: Sequence[Image.Image], clips: Sequence[Tensor]) -> np.ndarray:
        """B RGB images and B clips (1-D, audio_cfg.num_samples at its rate) -> B x S x S
        float32 maps in [0, 1], S the model's image size."""
        image = torch.stack([self.image_transform(picture) for picture in images]).to(self.device)
        spec = torch.stack([log_spectrogram(clip, self.audio_cfg) for clip in clips]).to(self.device)
        with autocast_context(self.device, self.amp):
            inference = self.model.infer(image, spec, self.protocol.temperature)
            obj = self.saliency(image) if self.saliency is not None else None
        maps = scored_maps(inference.ca, inference.ia, obj, tuple(image.shape[-2:]), self.protocol)
        return maps[MAPS[self.which]].float().clamp(0, 1).cpu().numpy()


def _overlay(rgb: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The S x S map stretched over an H x W x 3 uint8 picture."""
    stretched = upsample_map(torch.from_numpy(heatmap), tuple(rgb.shape[:2])).numpy()
    return overlay_heatmap(rgb, stretched, alpha=OVERLAY_ALPHA)


def localize_image(localizer: Localizer, image_path: Path, audio_path: Path, out: Path) -> tuple[Path, Path]:
    """Write out/<stem>_heatmap.png and out/<stem>_map.npy (out created if needed); return
    their paths."""
    picture = load_image(image_path)
    audio_cfg = localizer.audio_cfg
    clip = middle_clip(load_audio(audio_path, audio_cfg.sample_rate), audio_cfg.num_samples)
    (heatmap,) = localizer.maps([picture], [clip])
    out.mkdir(parents=True, exist_ok=True)
    finals = {"png": out / f"{image_path.stem}_heatmap.png", "npy": out / f"{image_path.stem}_map.npy"}
    with staged_outputs(finals) as staged:
        Image.fromarray(_overlay(np.asarray(picture), heatmap)).save(staged["png"], format="PNG")
        with staged["npy"].open("wb") as file:
            np.save(file, heatmap)
    return finals["png"], finals["npy"]


def _frames_at(path: Path, indices: Sequence[int]) -> Iterator[np.ndarray]:
    """The frames of the given (non-decreasing) indices, H x W x 3 uint8, in order."""
    wanted = iter(indices)
    target = next(wanted, None)
    for index, frame in enumerate(iter_frames(path)):
        if target is None:
            return
        if index == target:
            pixels = displayed_rgb(frame)
            while target == index:
                yield pixels
                target = next(wanted, None)
    if target is not None:
        raise DataError(f"{path}: frame {target} is listed by the container but does not decode")


def localize_video(
    localizer: Localizer, video: Path, out: Path, fps: float = 4.0, batch_size: int = 16
) -> dict[str, Path]:
    """Write out/<stem>_heatmap.mp4, _maps.npy and _times.csv (see the module's doc; out
    created if needed); return their paths by kind ("video", "maps", "times")."""
    probe = probe_video(video)
    if fps > probe.fps:  # more maps than frames would repeat each frame's map
        warnings.warn(f"--fps {fps:g} is above {video.name}'s {probe.fps:g} fps: one map per frame", stacklevel=2)
        fps = probe.fps
    audio_cfg = localizer.audio_cfg
    samples, rate = decode_audio(video)  # MissingStreamError (one line) for a silent video
    wave = mono_resampled(samples, rate, audio_cfg.sample_rate)
    times = output_times(probe.duration_s, fps)
    sources = [probe.index_at(t) for t in times]
    maps: list[np.ndarray] = []

    def overlays() -> Iterator[np.ndarray]:
        frames = _frames_at(video, sources)
        progress = tqdm(total=len(times), desc="localize", unit="frame", dynamic_ncols=True, disable=None)
        for start in range(0, len(times), batch_size):
            batch_times = times[start : start + batch_size]
            rgbs = [next(frames) for _ in batch_times]
            clips = [centred_window(wave, t, audio_cfg.num_samples, audio_cfg.sample_rate) for t in batch_times]
            heatmaps = localizer.maps([Image.fromarray(rgb) for rgb in rgbs], clips)
            maps.extend(heatmaps)
            progress.update(len(batch_times))
            yield from (_overlay(rgb, heatmap) for rgb, heatmap in zip(rgbs, heatmaps, strict=True))
        progress.close()

    out.mkdir(parents=True, exist_ok=True)
    paths = {
        kind: out / f"{video.stem}_{suffix}"
        for kind, suffix in (("video", "heatmap.mp4"), ("maps", "maps.npy"), ("times", "times.csv"))
    }
    with staged_outputs(paths) as staged:  # an interrupted run leaves an earlier result whole
        write_video(staged["video"], overlays(), fps, audio_from=video)
        with staged["maps"].open("wb") as file:
            np.save(file, np.stack(maps).astype(np.float32))
        rows = "".join(
            f"{k},{t:.6f},{index},{probe.frame_times[index]:.6f}\n"
            for k, (t, index) in enumerate(zip(times, sources, strict=True))
        )
        staged["times"].write_text("index,time_s,source_frame,source_time_s\n" + rows)
    return paths


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m jsa_fast.localize", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="a video with sound, or an image (with --audio)")
    parser.add_argument("--checkpoint", required=True, help="a last.pt written by jsa_fast.train")
    parser.add_argument("--audio", default=None, help="the WAV to localise in an image INPUT")
    parser.add_argument("--out", required=True, help="folder for the outputs")
    parser.add_argument("--fps", type=bounded(float, low=1e-3), default=4.0, help="maps per second of video")
    parser.add_argument(
        "--map",
        choices=tuple(MAPS),
        default=None,
        help="ca^{a,v} (default), IQR, OGL (default with --ogl) or the object map",
    )
    add_protocol_arguments(parser, scoring=False)
    parser.add_argument(
        "--ogl",
        default=None,
        metavar="R18.pth",
        help="a local torchvision ResNet-18 state dict: the OGL and object maps",
    )
    parser.add_argument("--batch-size", type=bounded(int, low=1), default=16)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument(
        "--amp", choices=("bf16", "fp16", "none"), default="none", help="autocast dtype (default: fp32, as evaluate)"
    )
    return parser


@command("jsa_fast.localize")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = Path(args.input)
    if source.is_dir():
        raise UsageError(f"{source} is a folder: give one video or image (localize takes one input)")
    if not source.is_file():
        raise UsageError(f"{source}: no such file")
    is_image = source.suffix.lower() in IMAGE_SUFFIXES
    if is_image and args.audio is None:
        raise UsageError(f"{source} is an image: give its sound with --audio WAV")
    if not is_image and args.audio is not None:
        raise UsageError(f"--audio applies to an image INPUT; {source} is taken as a video, whose own sound is used")
    which = args.map or ("ogl" if args.ogl is not None else "ca")
    if (which in ("ogl", "obj")) != (args.ogl is not None):
        raise UsageError(
            f"--map {which} {'needs' if args.ogl is None else 'does not use'} --ogl R18.pth (the object map's ResNet-18)"
        )
    out = Path(args.out)
    with output_lock(out):
        device = resolve_device(args.device)
        saliency = load_object_saliency(args.ogl, device) if args.ogl is not None else None
        trained = load_trained_model(args.checkpoint, device)
        localizer = Localizer(trained.model, trained.cfg, device, which, protocol_from_args(args), saliency, args.amp)
        if is_image:
            written = localize_image(localizer, source, Path(args.audio), out)
        else:
            written = tuple(localize_video(localizer, source, out, args.fps, args.batch_size).values())
        print("wrote " + ", ".join(map(str, written)))
        return 0


if __name__ == "__main__":
    sys.exit(main())
