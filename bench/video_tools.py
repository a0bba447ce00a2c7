"""Benchmark the video tools: `python bench/video_tools.py [--clips 64] [--seconds 10]
[--size 360] [--workers 1 2] [--localize-fps 4 25] [--preset tiny] [--device cpu|cuda]
[--json PATH]`.

prepare: clips/s of `jsa_fast.prepare` (the middle frame and 10 s of 16 kHz audio per
clip) on --clips copies of one synthetic moving clip (H.264 + AAC at 25 fps, --size
square pixels, --seconds long, as a VGGSound clip), for each --workers, timed from the
call to the manifest, after a first run on one clip whose time is reported apart as the
start-up (with --workers > 1, the worker pool's fork server importing the package).
localize: frames/s of `jsa_fast.localize` on that clip for each --localize-fps (decode,
audio windows, model, overlays, H.264 encoding, all included; after an untimed warm-up
run), with a model of --preset (random weights: the speed does not depend on them) or
--checkpoint. Rows give items per wall second and per CPU second (one process), and the record the
machine's load average, as the CPUs may be shared.
Small smoke test: `--clips 2 --seconds 1 --size 64 --workers 1 --localize-fps 4`.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from jsa_fast.checkpoint import (
    load_trained_model,  # noqa: E402
    save_checkpoint,  # noqa: E402
)
from jsa_fast.config import PRESETS  # noqa: E402
from jsa_fast.data.synth import render_moving_clip, write_moving_clip  # noqa: E402
from jsa_fast.localize import Localizer, localize_video  # noqa: E402
from jsa_fast.model import JSAModel  # noqa: E402
from jsa_fast.prepare import PrepareSettings, prepare  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process (the workers of a pool, forked by its fork server, are not
    counted: per CPU second is given for one worker only)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def random_checkpoint(preset: str, path: Path) -> Path:
    cfg = PRESETS[preset]
    save_checkpoint({"model": JSAModel(cfg.model).state_dict(), "config": cfg.to_dict()}, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=360)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--localize-fps", type=float, nargs="+", default=[4.0, 25.0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--checkpoint", default=None, help="time this model instead of a random --preset one")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="video-tools-bench-") as scratch:
        work = Path(scratch)
        clip = render_moving_clip(seed=0, image_size=args.size, seconds=args.seconds, fps=25)
        videos = work / "videos"
        write_moving_clip(clip, videos / "clip_0000.mp4")
        (videos / "clip_0000.csv").unlink()
        for index in range(1, args.clips):
            shutil.copyfile(videos / "clip_0000.mp4", videos / f"clip_{index:04d}.mp4")
        for workers in args.workers:
            # A first run on one clip starts the worker processes' fork server (it imports
            # torch and the package once per process): timed apart as the start-up.
            began = time.perf_counter()
            prepare([videos / "clip_0000.mp4"], work / f"start-up-{workers}", PrepareSettings(), workers=workers)
            start_up = time.perf_counter() - began
            began, cpu = time.perf_counter(), cpu_seconds()
            summary = prepare([videos], work / f"prepared-{workers}", PrepareSettings(), workers=workers)
            seconds, cpu = time.perf_counter() - began, cpu_seconds() - cpu
            assert summary.statuses == {"ok": args.clips}, summary.statuses
            rows.append({"tool": "prepare", "workers": workers, "items": args.clips, "seconds": seconds,
                         "per_s": args.clips / seconds, "per_cpu_s": args.clips / cpu if workers == 1 else None, "start_up_s": start_up})  # fmt: skip
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(args.preset, work / "model.pt")
        trained = load_trained_model(checkpoint, device)
        localizer = Localizer(trained.model, trained.cfg, device)
        localize_video(
            localizer, videos / "clip_0000.mp4", work / "warm-up", 1.0, args.batch_size
        )  # first calls' set-up
        for fps in args.localize_fps:
            began, cpu = time.perf_counter(), cpu_seconds()
            paths = localize_video(
                localizer, videos / "clip_0000.mp4", work / f"localized-{fps:g}", fps, args.batch_size
            )
            seconds, cpu = time.perf_counter() - began, cpu_seconds() - cpu
            frames = np.load(paths["maps"], mmap_mode="r").shape[0]
            rows.append({"tool": "localize", "fps": fps, "items": frames, "seconds": seconds, "per_s": frames / seconds,
                         "per_cpu_s": frames / cpu})  # fmt: skip
    print_table(rows, ["tool", "workers", "fps", "items", "seconds", "per_s", "per_cpu_s", "start_up_s"])
    # The machine's load: these CPUs are shared, and a loaded machine's wall times are long.
    config = {k: v for k, v in vars(args).items() if k != "json"} | {
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    print(f"wrote {write_results('video_tools', device, config, rows, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
