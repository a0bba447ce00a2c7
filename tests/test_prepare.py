"""python -m jsa_fast.prepare on a folder of small videos built here with PyAV: layout,
manifest statuses, the frame taken, the WAVs, determinism, resume, shards + merge, and the
trainer and evaluator reading the result."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from PIL import Image
from test_train import MICRO_FLAGS, signalling_on_call

from jsa_fast import prepare as prepare_module
from jsa_fast.evaluate import main as evaluate_main
from jsa_fast.prepare import main as prepare_main, read_ids, shard_of
from jsa_fast.train import main as train_main

SECONDS = 0.5  # audio written per clip: 8000 samples at 16 kHz
TONE_AMPLITUDE = 0.5


def frame_colour(index: int) -> tuple[int, int, int]:
    """The colour of frame `index` of every test video: its index, readable after lossy
    coding (12 grey levels apart in two channels)."""
    return 10 + 12 * index, 250 - 12 * index, 128


def index_of_colour(pixels: np.ndarray) -> int:
    mean = pixels.reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.abs(mean - frame_colour(i)).sum() for i in range(20)]))


# id: (container format, suffix, video codec, audio codec or None, fps, (width, height),
#      frames, audio rate, channels, tone Hz)
CLIPS = {
    "clip_a": ("mp4", ".mp4", "libx264", "aac", 25, (64, 48), 20, 44100, 1, 440.0),
    "clip_b": ("matroska", ".mkv", "libx264", "flac", 10, (80, 60), 15, 48000, 2, 660.0),
    "clip_c": ("webm", ".webm", "libvpx-vp9", "libopus", 12, (96, 96), 18, 48000, 2, 550.0),
    "clip_d": ("avi", ".avi", "mpeg4", "pcm_s16le", 15, (72, 56), 16, 22050, 1, 770.0),
    "clip_e": ("mp4", ".mp4", "libx264", "aac", 20, (64, 64), 12, 16000, 1, 880.0),
    "silent_film": ("mp4", ".mp4", "libx264", None, 25, (64, 48), 10, 0, 0, 0.0),
    "truncated": ("mp4", ".mp4", "libx264", "aac", 20, (64, 48), 20, 16000, 1, 440.0),
    "not_listed": ("mp4", ".mp4", "libx264", "aac", 20, (64, 48), 8, 16000, 1, 440.0),
}
OK_IDS = ["clip_a", "clip_b", "clip_c", "clip_d", "clip_e"]
IDS = [*OK_IDS, "silent_film", "truncated", "sound_only", "ghost"]  # ghost: no video anywhere


def write_clip(
    path: Path,
    fmt: str,
    vcodec: str,
    acodec: str | None,
    fps: int,
    size: tuple[int, int],
    frames: int,
    rate: int,
    channels: int,
    tone_hz: float,
) -> None:
    """Frames coloured by their index; a tone (the right channel at half the left's level)."""
    # faststart: the index comes first, so a cut file still opens and shows its truncation
    options = {"movflags": "faststart"} if fmt == "mp4" else {}
    with av.open(str(path), "w", format=fmt, options=options) as container:
        video = container.add_stream(vcodec, rate=fps, options={"g": "4"})  # key frames often: the frame is sought
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        layout = "mono" if channels == 1 else "stereo"
        audio = container.add_stream(acodec, rate=rate, layout=layout) if acodec else None
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(
                np.full((size[1], size[0], 3), frame_colour(index), np.uint8), format="rgb24"
            )
            frame.pts = index
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if audio is not None:
            t = np.arange(round(frames / fps * rate)) / rate
            tone = TONE_AMPLITUDE * np.sin(2 * np.pi * tone_hz * t)
            samples = np.stack([tone, tone / 2][:channels]).astype(np.float32)
            chunk = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
            chunk.sample_rate, chunk.pts = rate, 0
            for packet in [*audio.encode(chunk), *audio.encode(None)]:
                container.mux(packet)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for clip_id, (fmt, suffix, *rest) in CLIPS.items():
        sub = folder / ("nested" if clip_id == "clip_c" else "")  # folders are searched recursively
        sub.mkdir(exist_ok=True)
        write_clip(sub / f"{clip_id}{suffix}", fmt, *rest)
    whole = (folder / "truncated.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) * 6 // 10])
    with av.open(str(folder / "sound_only.mp4"), "w", format="mp4") as container:  # no video stream
        stream = container.add_stream("aac", rate=16000, layout="mono")
        chunk = av.AudioFrame.from_ndarray(np.full((1, 8000), 0.1, np.float32), format="fltp", layout="mono")
        chunk.sample_rate, chunk.pts = 16000, 0
        for packet in [*stream.encode(chunk), *stream.encode(None)]:
            container.mux(packet)
    (folder / "notes.txt").write_text("not a video\n")
    (folder / "ids.txt").write_text("".join(f"{clip_id}\n" for clip_id in IDS))
    return folder


def run(videos: Path, out: Path, *flags: str) -> int:
    return prepare_main(
        [str(videos), "--out", str(out), "--ids", str(videos / "ids.txt"), "--seconds", str(SECONDS), *flags]
    )


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def manifest(root: Path) -> dict[str, dict[str, str]]:
    with (root / "manifest.csv").open() as file:
        return {row["id"]: row for row in csv.DictReader(file)}


@pytest.fixture(scope="module")
def prepared(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared") / "root"
    assert run(videos, root) == 0
    return root


def test_layout_statuses_and_reasons(prepared: Path) -> None:
    rows = manifest(prepared)
    assert list(rows) == sorted(IDS)  # one row per listed id, sorted; not_listed is left out
    assert {clip_id: rows[clip_id]["status"] for clip_id in IDS} == {
        **dict.fromkeys(OK_IDS, "ok"), "silent_film": "no-audio", "truncated": "corrupt",
        "sound_only": "no-video", "ghost": "no-video",
    }  # fmt: skip
    assert rows["silent_film"]["reason"] == "the file has no audio stream"
    assert rows["truncated"]["reason"].startswith("truncated: its header lists 20 frames, the file holds ")
    assert rows["sound_only"]["reason"] == "the file has no video stream"
    assert rows["ghost"]["reason"] == "no video with this id among the inputs" and rows["ghost"]["source"] == ""
    assert all(rows[clip_id]["reason"] == "" for clip_id in OK_IDS)
    assert (prepared / "train.txt").read_text().split() == OK_IDS
    assert sorted(p.stem for p in (prepared / "frames").iterdir()) == OK_IDS
    assert sorted(p.stem for p in (prepared / "audio").iterdir()) == OK_IDS
    assert rows["clip_c"]["source"].endswith("nested/clip_c.webm")


def test_manifest_describes_each_video(prepared: Path) -> None:
    rows = manifest(prepared)
    for clip_id in OK_IDS:
        _, _, _, _, fps, (width, height), frames, rate, channels, _ = CLIPS[clip_id]
        row = rows[clip_id]
        assert (float(row["fps"]), int(row["num_frames"]), int(row["width"]), int(row["height"])) == (
            fps,
            frames,
            width,
            height,
        )
        assert abs(float(row["duration_s"]) - frames / fps) < 0.1, row
        assert (int(row["audio_rate_in"]), int(row["audio_channels_in"]), int(row["audio_rate_out"])) == (
            rate,
            channels,
            16000,
        )
        assert int(row["frame_index"]) == frames // 2  # the middle frame by default
        assert float(row["frame_time_s"]) == pytest.approx(frames // 2 / fps, abs=1e-6)
        assert float(row["audio_seconds"]) == SECONDS
        # the window is centred on the frame, moved inside the track at the ends
        start = float(row["frame_time_s"]) - SECONDS / 2
        assert float(row["audio_start_s"]) == pytest.approx(max(0.0, start), abs=1e-4), row


def test_the_frame_taken_is_the_asked_one(prepared: Path, videos: Path, tmp_path: Path) -> None:
    for clip_id in OK_IDS:
        with Image.open(prepared / "frames" / f"{clip_id}.jpg") as image:
            assert image.size == CLIPS[clip_id][5]
            assert index_of_colour(np.asarray(image)) == CLIPS[clip_id][6] // 2, clip_id
    assert run(videos, tmp_path / "by_time", "--frame-time", "0.55") == 0
    assert run(videos, tmp_path / "by_index", "--frame-index", "11") == 0
    by_time, by_index = manifest(tmp_path / "by_time"), manifest(tmp_path / "by_index")
    for clip_id in OK_IDS:
        fps, frames = CLIPS[clip_id][4], CLIPS[clip_id][6]
        with Image.open(tmp_path / "by_time" / "frames" / f"{clip_id}.jpg") as image:
            # the frame on screen at 0.55 s; a clip shorter than that has none
            assert index_of_colour(np.asarray(image)) == int(0.55 * fps + 1e-9) == int(by_time[clip_id]["frame_index"])
        if frames > 11:
            with Image.open(tmp_path / "by_index" / "frames" / f"{clip_id}.jpg") as image:
                assert index_of_colour(np.asarray(image)) == 11
        else:
            assert by_index[clip_id]["status"] == "too-short"  # #24 item 11: it has a video
            assert by_index[clip_id]["reason"] == f"no frame 11: the video has {frames}"


def test_wavs_are_mono_at_the_rate_asked_and_keep_the_tone(prepared: Path) -> None:
    for clip_id in OK_IDS:
        info = soundfile.info(str(prepared / "audio" / f"{clip_id}.wav"))
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (
            16000,
            1,
            round(SECONDS * 16000),
            "PCM_16",
        )
        wave, _ = soundfile.read(str(prepared / "audio" / f"{clip_id}.wav"))
        peak_hz = np.argmax(np.abs(np.fft.rfft(wave * np.hanning(len(wave))))) * 16000 / len(wave)
        assert abs(peak_hz - CLIPS[clip_id][9]) <= 4, (clip_id, peak_hz)
        channels = CLIPS[clip_id][8]
        level = TONE_AMPLITUDE * (0.75 if channels == 2 else 1.0)  # the channel average
        assert np.sqrt(2 * np.mean(wave**2)) == pytest.approx(level, rel=0.1), clip_id


def test_float_wavs_and_the_whole_track(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "float"
    assert prepare_main([str(videos / "clip_d.avi"), "--out", str(out), "--audio-format", "float", "--whole-audio",
                         "--sample-rate", "8000"]) == 0  # fmt: skip
    info = soundfile.info(str(out / "audio" / "clip_d.wav"))
    assert (info.samplerate, info.subtype) == (8000, "FLOAT")
    samples_in = round(16 / 15 * 22050)  # PCM in AVI: the track as written, resampled (torchaudio's length)
    assert info.frames == math.ceil(samples_in * 8000 / 22050)


def test_two_runs_give_the_same_bytes_in_any_worker_count(prepared: Path, videos: Path, tmp_path: Path) -> None:
    assert run(videos, tmp_path / "again", "--workers", "2") == 0
    assert files(tmp_path / "again") == files(prepared)


def test_a_run_in_place_skips_what_is_done(prepared: Path, videos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = files(prepared)
    assert run(videos, prepared) == 0
    captured = capsys.readouterr()
    assert (
        "prepare: 5 ok, 4 failed (1 corrupt, 1 no-audio, 2 no-video) (4 done now, 5 skipped as done before)"
        in captured.out
    )
    assert "1 id(s) have no video: ghost" in captured.err
    assert files(prepared) == before


def test_resume_after_an_interrupted_run(prepared: Path, videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "resumed"
    real_prepare_clip = prepare_module.prepare_clip
    calls = []

    def interrupted_on_the_fourth(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_prepare_clip(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "prepare_clip", interrupted_on_the_fourth)
    assert run(videos, out) == 130
    monkeypatch.undo()
    assert not (out / "manifest.csv").exists() and not (out / "train.txt").exists()
    journal = out / ".manifest.journal"
    assert len(journal.read_text().splitlines()) == 1 + 3  # the header and the three clips done
    # What a kill -9 leaves: a torn journal line, a temporary being written, and a frame
    # whose clip was not finished (its audio and its journal row missing).
    with journal.open("a") as file:
        file.write("clip_e,ok,,/some")
    (out / "frames" / ".clip_e.jpg.4242.tmp").write_bytes(b"half a jpeg")
    (out / "frames" / "clip_e.jpg").write_bytes(b"stale")
    capsys.readouterr()
    assert run(videos, out) == 0
    assert "(6 done now, 3 skipped as done before)" in capsys.readouterr().out
    assert files(out) == files(prepared)


def test_shards_and_merge_give_the_single_run(prepared: Path, videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    shards = 3
    assert {shard_of(clip_id, shards) for clip_id in IDS} == set(range(shards))  # every shard has work
    for index in range(shards):
        assert run(videos, out, "--shard", f"{index}/{shards}") == 0
        part = out / f"manifest.part-{index}-of-{shards}.csv"
        with part.open() as file:
            assert {row["id"] for row in csv.DictReader(file)} == {i for i in IDS if shard_of(i, shards) == index}
    assert not (out / "manifest.csv").exists()
    assert prepare_main(["--merge", "--out", str(out)]) == 0
    merged = files(out)
    parts = {name for name in merged if name.startswith("manifest.part-")}
    assert len(parts) == shards
    assert {name: data for name, data in merged.items() if name not in parts} == files(prepared)


def test_merge_refuses_a_missing_part(
    prepared: Path, videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "half"
    assert run(videos, out, "--shard", "1/2") == 0
    capsys.readouterr()
    assert prepare_main(["--merge", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"jsa_fast.prepare: error: --merge: {out} lacks the parts of shards [0] of 2"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard", "3/3"], "--shard must be I/N with 0 <= I < N"),
        (["--frame-time", "1", "--frame-index", "2"], "not allowed with argument"),
        (["--ids", "missing.txt"], "--ids missing.txt: no such file"),
        (["--workers", "0"], "--workers: must be an integer >= 1, got '0'"),
    ],
)
def test_bad_flags_end_in_one_line(videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                                   message: str) -> None:  # fmt: skip
    assert prepare_main([str(videos), "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jsa_fast.prepare: error: ") and message in err[0], err


def test_other_settings_or_a_foreign_data_set_are_not_overwritten(prepared: Path, videos: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    before = files(prepared)
    assert run(videos, prepared, "--sample-rate", "8000") == 2
    assert "was prepared with other settings" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    (foreign / "frames").mkdir(parents=True)
    assert run(videos, foreign) == 2
    assert "holds a data set that prepare did not write" in capsys.readouterr().err
    assert files(prepared) == before
    # #24 item 4: a folder holding only the user's own train.txt is not replaced
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "train.txt").write_text("my_own_split\n")
    assert run(videos, theirs) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jsa_fast.prepare: error: --out {theirs} holds train.txt, which prepare did not write "
                   "(no prepare.json) and would replace; move them or use another --out"]  # fmt: skip
    assert files(theirs) == {"train.txt": b"my_own_split\n"}


def test_id_lists_in_every_format(tmp_path: Path) -> None:
    (tmp_path / "vggss.json").write_text(json.dumps([{"file": "a_000010", "class": "dog", "bbox": [[0, 0, 1, 1]]}]))
    (tmp_path / "plain.json").write_text(json.dumps(["x", "y"]))
    (tmp_path / "vggsound.csv").write_text("---g-f_I2yQ,1,people marching,test\nabc,30,dog barking,train\n")
    (tmp_path / "header.csv").write_text("label,file\ndog,p\ncat,q\n")
    (tmp_path / "list.txt").write_text("m\n\nn\n")
    assert read_ids(tmp_path / "vggss.json") == ["a_000010"]
    assert read_ids(tmp_path / "plain.json") == ["x", "y"]
    assert read_ids(tmp_path / "vggsound.csv") == ["---g-f_I2yQ_000001", "abc_000030"]
    assert read_ids(tmp_path / "header.csv") == ["p", "q"]
    assert read_ids(tmp_path / "list.txt") == ["m", "n"]
    (tmp_path / "twice.csv").write_text("id\nm\nm\n")
    with pytest.raises(ValueError, match="more than once"):
        read_ids(tmp_path / "twice.csv")
    # #24 items 10-11: VGGSound's csv with a header line; ids that would name other folders
    (tmp_path / "vggsound_header.csv").write_text("ytid,start,label,split\nabc,30,dog barking,train\n")
    assert read_ids(tmp_path / "vggsound_header.csv") == ["abc_000030"]
    for name, text in (("up.txt", "../x\n"), ("up.csv", "id\n..\\x\n"), ("up.json", json.dumps(["a/b"]))):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="ids must be single words without"):
            read_ids(tmp_path / name)


def test_phone_clips_broken_links_and_frames_past_the_end(tmp_path: Path) -> None:
    """#24 item 11: .mov and .MOV files in a folder are prepared, a broken link among them is
    a corrupt row saying so, and a --frame-time past a clip's end is too-short, not no-video."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_clip(videos / "lower.mov", "mov", "libx264", "aac", 10, (64, 48), 10, 16000, 1, 440.0)
    write_clip(videos / "upper.MOV", "mov", "libx264", "aac", 10, (64, 48), 30, 16000, 1, 440.0)
    (videos / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    out = tmp_path / "root"
    assert prepare_main([str(videos), "--out", str(out), "--frame-time", "2", "--seconds", "0.5"]) == 0
    rows = manifest(out)
    assert {clip_id: row["status"] for clip_id, row in rows.items()} == {
        "lower": "too-short", "upper": "ok", "gone": "corrupt",
    }  # fmt: skip
    assert rows["lower"]["reason"] == "no frame at 2 s: the video lasts 1 s"
    assert rows["gone"]["reason"] == f"a broken link (to {tmp_path / 'nowhere.mp4'})"


def test_train_and_evaluate_run_on_the_result(prepared: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(prepared, root)
    boxes = {"clip_a": [0.1, 0.1, 0.9, 0.9], "clip_b": [0.0, 0.2, 0.7, 1.0], "clip_c": [0.3, 0.0, 1.0, 0.8]}
    (root / "test.json").write_text(
        json.dumps([{"file": i, "class": f"c{n % 2}", "bbox": [box]} for n, (i, box) in enumerate(boxes.items())])
    )
    micro = ["--preset", "tiny", *MICRO_FLAGS, "--epochs", "1"]
    assert train_main(["--data", str(root), "--out", str(tmp_path / "run"), "--device", "cpu", *micro]) == 0
    assert evaluate_main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--data", str(root), "--out",
                          str(tmp_path / "eval"), "--device", "cpu", "--num-workers", "0"]) == 0  # fmt: skip
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert results["n"] == 3 and 0 <= results["ap50"] <= 1


def test_a_run_with_fewer_ids_says_what_it_leaves_out(prepared: Path, videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "fewer"
    shutil.copytree(prepared, out)
    (tmp_path / "two.txt").write_text("clip_a\nclip_b\n")
    with pytest.warns(
        UserWarning, match=r"7 id\(s\) of the previous run in .* list only this run's ids \(their files stay\)"
    ):
        assert (
            prepare_main(
                [str(videos), "--out", str(out), "--ids", str(tmp_path / "two.txt"), "--seconds", str(SECONDS)]
            )
            == 0
        )
    assert list(manifest(out)) == ["clip_a", "clip_b"] and (out / "train.txt").read_text().split() == [
        "clip_a",
        "clip_b",
    ]
    assert (out / "frames" / "clip_c.jpg").exists()


def write_phone_clip(path: Path, rotation: int, audio_start_s: float, tones: list[tuple[float, float]]) -> None:
    """A 4 s, 10 fps clip stored 64 x 48 with a white top-left quarter, a display rotation
    of `rotation` degrees (counter-clockwise, PyAV's sign) and an AAC track starting at
    `audio_start_s` that plays each (Hz, seconds) of `tones` in turn."""
    rate, fps = 16000, 10
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:24, :32] = 255
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps, options={"g": "4"})
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.set_display_rotation(rotation)
        audio = container.add_stream("aac", rate=rate, layout="mono")
        for index in range(4 * fps):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        wave = np.concatenate([0.5 * np.sin(2 * np.pi * hz * np.arange(round(s * rate)) / rate) for hz, s in tones])
        chunk = av.AudioFrame.from_ndarray(wave[None].astype(np.float32), format="fltp", layout="mono")
        chunk.sample_rate, chunk.pts = rate, round(audio_start_s * rate)
        for packet in [*audio.encode(chunk), *audio.encode(None)]:
            container.mux(packet)


def peak_hz(wave: np.ndarray, rate: int = 16000) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(wave * np.hanning(len(wave))))) * rate / len(wave))


def test_frames_as_displayed_and_audio_on_the_frames_time_axis(tmp_path: Path) -> None:
    """#24 items 1 and 2: a phone's portrait clip (stored landscape, rotation -90) is
    written as a player shows it, 48 wide and 64 high with the white quarter at the top
    right; a track that starts 2 s into the clip is cut around the chosen frame (2.2 s:
    1.95-2.45 s, the track's first 0.45 s, 440 Hz), not 2 s later (880 Hz)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_phone_clip(videos / "portrait.mp4", -90, 0.0, [(660.0, 4.0)])
    write_phone_clip(videos / "late_audio.mp4", 0, 2.0, [(440.0, 0.5), (880.0, 1.5)])
    out = tmp_path / "root"
    assert prepare_main([str(videos), "--out", str(out), "--frame-time", "2.2", "--seconds", "0.5"]) == 0
    rows = manifest(out)
    assert (rows["portrait"]["width"], rows["portrait"]["height"]) == ("48", "64")
    frame = np.asarray(Image.open(out / "frames" / "portrait.jpg").convert("L"), dtype=np.float32)
    assert frame.shape == (64, 48)
    assert frame[4:28, 28:44].mean() > 200 and frame[36:60, 4:20].mean() < 50  # top right white, bottom left black
    assert frame[4:28, 4:20].mean() < 50  # the stored top left is not where it was
    assert float(rows["late_audio"]["frame_time_s"]) == pytest.approx(2.2, abs=1e-6)
    assert float(rows["late_audio"]["audio_start_s"]) == pytest.approx(1.95, abs=1e-6)
    wave, rate = soundfile.read(str(out / "audio" / "late_audio.wav"))
    assert abs(peak_hz(wave, rate) - 440.0) <= 4
    portrait, _ = soundfile.read(str(out / "audio" / "portrait.wav"))
    assert abs(peak_hz(portrait, rate) - 660.0) <= 4


def test_sigterm_stops_in_one_line_and_a_rerun_finishes(
    videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """#24 item 6: SIGTERM while the second clip is prepared ends in one line, exit 143, no
    temporary left in ROOT and no lock; the clips done are kept and a rerun finishes the
    rest (the same bytes as an uninterrupted run)."""
    out = tmp_path / "root"
    real = prepare_module.prepare_clip
    monkeypatch.setattr(prepare_module, "prepare_clip", signalling_on_call(real, 2, signal.SIGTERM))  # in clip 2
    capsys.readouterr()
    assert run(videos, out) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "jsa_fast.prepare: terminated (SIGTERM)"
    assert not [path for path in out.rglob("*") if path.name.endswith(".tmp") or path.name.endswith(".lock")]
    monkeypatch.setattr(prepare_module, "prepare_clip", real)
    assert run(videos, out) == 0
    reference = tmp_path / "reference"
    assert run(videos, reference) == 0
    assert files(out) == files(reference)


def test_workers_run_quietly_and_ctrl_c_stops_them_in_one_line(videos: Path, tmp_path: Path) -> None:
    """#24 item 9: `--workers 2` prints no RuntimeWarning; Ctrl-C (SIGINT to the whole
    process group, as a terminal sends it) ends in one line, exit 130, with no worker
    traceback, and a rerun finishes the clips."""
    many = tmp_path / "many"
    many.mkdir()
    source = videos / "clip_a.mp4"
    for index in range(40):
        shutil.copy(source, many / f"copy_{index:02d}.mp4")
    command = [sys.executable, "-m", "jsa_fast.prepare", str(many), "--workers", "2", "--seconds", "0.5"]
    quiet = subprocess.run([*command, "--out", str(tmp_path / "quiet")], capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and "Warning" not in quiet.stderr, quiet.stderr
    out = tmp_path / "stopped"
    # A terminal's foreground job starts with Ctrl-C's default action; a job started in the
    # background (`pytest &`, CI under `cmd &`) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: the run would finish as if never interrupted.
    process = subprocess.Popen(
        [*command, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    journal = out / ".manifest.journal"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 3:  # the header and two clips
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "jsa_fast.prepare: interrupted", err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Warning" not in err, err
    assert subprocess.run([*command, "--out", str(out)], capture_output=True, timeout=600).returncode == 0
    assert manifest(out).keys() == manifest(tmp_path / "quiet").keys()
