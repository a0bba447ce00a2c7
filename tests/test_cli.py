"""The command lines under bad input and faults (issue 14): each case ends in one line on
stderr naming the culprit, exit 2 for bad input (1 for a run that had to stop), no
traceback, and the run that was there before intact.

The cases call each CLI's `main` in-process: the same code path, without the
interpreter's start-up, which costs seconds. The contract as a shell sees it (exit status,
one line, no traceback) is checked through `python -m ...` in a subprocess once per CLI
and status: train's bad flag (2), evaluate's bad boxes (2) and the full disk (1)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from test_train import MICRO, MICRO_FLAGS, signalling_on_call

from jsa_fast.checkpoint import load_checkpoint, non_finite_tensors
from jsa_fast.cli import DEBUG_ENV
from jsa_fast.data import datasets as datasets_module
from jsa_fast.data.datasets import epoch_batches
from jsa_fast.errors import UsageError
from jsa_fast.evaluate import main as evaluate_main
from jsa_fast.localize import main as localize_main
from jsa_fast.prepare import main as prepare_main
from jsa_fast.runtime import LOCK_NAME, MetricsLog, output_lock
from jsa_fast.train import main as train_main, train

REPOSITORY = Path(__file__).resolve().parents[1]
N_TRAIN, BATCH, SEED = 10, 4, 0  # MICRO: 2 full batches of 4 per epoch, 2 items left over


# ---------------------------------------------------------------- helpers


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m jsa_fast.<module> ARGS` from the repository root (with this process's
    thread count, so that its arithmetic is the in-process runs' to the bit)."""
    command = [sys.executable, "-m", f"jsa_fast.{module}", *args]
    environment = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300, env=environment)


def error_line(stderr: str, status: int, returncode: int, *culprits: str) -> str:
    """The one error line of a CLI's stderr, checked: exit status, exactly one
    `<prog>: error:` line, no traceback, each culprit named in that line."""
    assert returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, stderr[-3000:]
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


def in_process(main, args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """A CLI's main called with ARGS: its exit status and stderr."""
    capsys.readouterr()
    status = main(args)
    return status, capsys.readouterr().err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_files(out: Path) -> dict[str, str]:
    """Digests of a run folder's last.pt and metrics.jsonl."""
    return {name: digest(out / name) for name in ("last.pt", "metrics.jsonl")}


def strict_records(path: Path) -> list[dict]:
    """metrics.jsonl as strict JSON (a bare NaN or Infinity is an error)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "samples_per_s"} for record in records]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--device", "cpu", "--preset", "tiny", *MICRO_FLAGS, *extra]


def item_of_epoch_batch(epoch: int, batch: int) -> str:
    """The id of the first item of batch `batch` of epoch `epoch` (0-based) of MICRO."""
    return f"train_{epoch_batches(N_TRAIN, BATCH, SEED, epoch, 0)[batch][0]:06d}"


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# ---------------------------------------------------------------- shared runs (the world: conftest's)


@pytest.fixture(scope="module")
def good_run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch MICRO run (step 2), to be copied before use."""
    out = tmp_path_factory.mktemp("good") / "run"
    train(MICRO.overridden(epochs=1), str(world), out, torch.device("cpu"))
    return out


@pytest.fixture(scope="module")
def straight_run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MICRO's two epochs in one go: what a resumed good_run must end as."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(MICRO, str(world), out, torch.device("cpu"))
    return out


@pytest.fixture(scope="module")
def nan_world(world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The world with NaN in 100 samples (in the middle clip, which DALI decodes alone) of
    the WAV of the first item of epoch 1's first batch (so that a resumed epoch 2 reads
    it), written as float samples."""
    root = Path(shutil.copytree(world, tmp_path_factory.mktemp("nan") / "world"))
    name = item_of_epoch_batch(1, 0)
    path = root / "audio" / f"{name}.wav"
    samples, rate = soundfile.read(path, dtype="float32")
    middle = len(samples) // 2
    samples[middle : middle + 100] = np.nan
    soundfile.write(path, samples, rate, subtype="FLOAT")
    return root, name


# ---------------------------------------------------------------- 1. NaN in a WAV


def test_1_a_wav_holding_nan_stops_naming_it_and_keeps_the_run(good_run, nan_world, tmp_path, capsys):
    root, name = nan_world
    out = copy_run(good_run, tmp_path)
    before = run_files(out)
    status, err = in_process(train_main, ["--out", str(out), "--resume", "--epochs", "2", "--data", str(root)], capsys)
    line = error_line(err, 2, status, f"{name}.wav", "not finite")
    assert line.startswith("jsa_fast.train: error: ")
    assert digest(out / "last.pt") == before["last.pt"]
    # The good run's lines are kept; what the stopped epoch logged is dropped by the next --resume.
    assert (out / "metrics.jsonl").read_text().startswith((good_run / "metrics.jsonl").read_text())


@pytest.mark.parametrize("k", ["0", "2"])
def test_1_with_or_without_the_k_reciprocal_filter_nothing_trains_on_nan(nan_world, tmp_path, capsys, k):
    root, name = nan_world
    out = tmp_path / "fresh"
    status, err = in_process(train_main, train_args(root, out, "--epochs", "2", "--k", k), capsys)
    error_line(err, 2, status, f"{name}.wav", "not finite")
    if (out / "last.pt").exists():  # epoch 1 did not read the file; what it saved is finite
        assert non_finite_tensors(load_checkpoint(out / "last.pt")["model"]) == []


def test_1_the_dali_loader_finds_the_nan_wav_too(nan_world, tmp_path, capsys):
    from jsa_fast.data.dali import dali_available

    if not dali_available("cpu"):
        pytest.skip("nvidia-dali-cuda130 is not installed (pip install -r requirements-dali.txt; `make test` does)")
    root, name = nan_world
    args = train_args(root, tmp_path / "dali", "--epochs", "2", "--loader", "dali")
    status, err = in_process(train_main, args, capsys)
    error_line(err, 2, status, f"{name}.wav", "not finite")


# ---------------------------------------------------------------- 2. runs shorter than --log-every


def test_2_a_run_shorter_than_log_every_finishes_and_draws_its_epoch(world, tmp_path, capsys):
    out = tmp_path / "short"
    status, err = in_process(train_main, train_args(world, out, "--epochs", "1", "--log-every", "5"), capsys)
    assert status == 0, err[-3000:]
    records = strict_records(out / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["epoch"]  # 2 steps, none logged
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_checkpoint(out / "last.pt")["step"] == 2


def test_2_zero_epochs_is_refused_when_parsed(world, tmp_path, capsys):
    status, err = in_process(train_main, train_args(world, tmp_path / "zero", "--epochs", "0"), capsys)
    error_line(err, 2, status, "--epochs", "got 0")
    assert not (tmp_path / "zero").exists()


def test_2_a_resume_with_nothing_left_to_train_says_so(good_run, tmp_path, capsys):
    out = copy_run(good_run, tmp_path)
    before = run_files(out)
    capsys.readouterr()
    assert train_main(["--out", str(out), "--resume"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert run_files(out) == before
    (out / "metrics.jsonl").unlink()
    assert train_main(["--out", str(out), "--resume"]) == 0
    assert "loss curves not drawn" in capsys.readouterr().out


# ---------------------------------------------------------------- 3. boxes that give no ground truth


@pytest.fixture(scope="module")
def bad_boxes(world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The world with test.json boxes in pixels, inverted and under a pixel at 64 x 64."""
    root = Path(shutil.copytree(world, tmp_path_factory.mktemp("boxes") / "world"))
    entries = json.loads((root / "test.json").read_text())
    for entry, box in zip(entries, ([10, 20, 40, 50], [0.5, 0.5, 0.2, 0.9], [0.5, 0.5, 0.505, 0.9])):
        entry["bbox"] = [box]
    (root / "test.json").write_text(json.dumps(entries))
    return root, [entry["file"] for entry in entries[:3]]


def evaluate_args(run: Path, data: Path, out: Path) -> list[str]:
    """Evaluate RUN's last.pt on DATA into OUT, in this process's loader."""
    return ["--checkpoint", str(run / "last.pt"), "--data", str(data), "--out", str(out), "--num-workers", "0"]


def test_3_bad_boxes_are_listed_together_before_the_model_runs(good_run, bad_boxes, tmp_path):
    root, bad_ids = bad_boxes
    result = cli("evaluate", *evaluate_args(good_run, root, tmp_path / "eval"))
    line = error_line(result.stderr, 2, result.returncode, "test.json", *bad_ids)
    assert "look like pixels" in line and "not ordered" in line and "covers no pixel at 64 x 64" in line
    assert not (tmp_path / "eval").exists()  # it stopped before the model ran


def test_3_skip_evaluates_the_items_with_good_boxes(good_run, bad_boxes, tmp_path, capsys):
    root, bad_ids = bad_boxes
    args = evaluate_args(good_run, root, tmp_path / "eval")
    with pytest.warns(UserWarning, match="skipping 3 id") as caught:
        status, err = in_process(evaluate_main, [*args, "--on-bad-file", "skip"], capsys)
    assert status == 0, err
    assert all(name in str(caught[0].message) for name in bad_ids)
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["n"] == 3


# ---------------------------------------------------------------- 4. a run folder is never overwritten


def test_4_an_out_that_holds_a_run_is_refused_without_resume(good_run, world, tmp_path, capsys):
    out = copy_run(good_run, tmp_path)
    before = run_files(out)
    status, err = in_process(train_main, train_args(world, out, "--epochs", "1"), capsys)
    error_line(err, 2, status, str(out), "--resume", "--overwrite")
    assert run_files(out) == before


def test_4_overwrite_starts_over(good_run, world, tmp_path, capsys):
    out = copy_run(good_run, tmp_path)
    (out / "metrics.jsonl").write_text('{"kind": "step", "step": 99, "epoch": 0, "loss": 1.0}\n')
    status, err = in_process(train_main, train_args(world, out, "--epochs", "1", "--overwrite"), capsys)
    assert status == 0, err
    assert [r["step"] for r in strict_records(out / "metrics.jsonl")] == [1, 2, 2]


def test_4_resume_refuses_other_training_items_unless_allowed(good_run, world, tmp_path, capsys):
    out = copy_run(good_run, tmp_path)
    before = run_files(out)
    other = Path(shutil.copytree(world, tmp_path / "other"))
    (other / "train.txt").write_text("".join(f"train_{i:06d}\n" for i in range(N_TRAIN - 1)))
    status, err = in_process(train_main, ["--out", str(out), "--resume", "--epochs", "2", "--data", str(other)], capsys)
    error_line(err, 2, status, "--resume", str(other), "9 now, 10 then", "--allow-changes")
    assert run_files(out) == before
    status, err = in_process(
        train_main, ["--out", str(out), "--resume", "--epochs", "2", "--data", str(other), "--allow-changes"], capsys
    )
    assert status == 0, err
    assert load_checkpoint(out / "last.pt")["data_fingerprint"]["items"] == N_TRAIN - 1


def test_4_resume_refuses_flags_that_change_the_model_or_loss(good_run, tmp_path, capsys):
    out = copy_run(good_run, tmp_path)
    before = run_files(out)
    status, err = in_process(
        train_main, ["--out", str(out), "--resume", "--epochs", "2", "--tau", "0.5", "--preset", "tiny"], capsys
    )
    # --preset tiny brings tiny's dim 64 back over the run's 16: named as well
    error_line(err, 2, status, "--tau 0.03 then, 0.5 now", "--dim 16 then, 64 now", "--allow-changes")
    assert run_files(out) == before


def test_4_resume_takes_the_configuration_and_data_from_the_checkpoint(good_run, straight_run, tmp_path, capsys):
    """No --data, --preset or MICRO flag on the resume: it continues exactly as a straight run."""
    out = copy_run(good_run, tmp_path)
    status, err = in_process(train_main, ["--out", str(out), "--resume", "--epochs", "2"], capsys)
    assert status == 0, err
    resumed, reference = load_checkpoint(out / "last.pt"), load_checkpoint(straight_run / "last.pt")
    assert resumed["config"] == reference["config"]
    for key, value in reference["model"].items():
        assert torch.equal(resumed["model"][key], value), key


# ---------------------------------------------------------------- 5. skipping shrinks a batch below k


def test_5_a_batch_that_skipping_made_smaller_than_k_still_trains(nan_world, tmp_path, capsys, monkeypatch):
    root, name = nan_world
    # Training decodes every file before its first step and drops this one there; a file
    # that goes bad after that check (e.g. rewritten on disk) is skipped when read, which
    # is what shrinks a batch: the check is left out to make that happen here.
    import jsa_fast.train as train_module

    monkeypatch.setattr(train_module, "FullDecode", lambda *args, **kwargs: None)
    out = tmp_path / "skip"
    with pytest.warns(UserWarning, match=f"{name}.wav"):
        status, err = in_process(
            train_main, train_args(root, out, "--epochs", "2", "--k", "4", "--on-bad-file", "skip"), capsys
        )
    assert status == 0, err[-3000:]
    assert err.count("k-reciprocal k 4 -> 3") == 1  # stated once
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 4 and non_finite_tensors(state["model"]) == []


# ---------------------------------------------------------------- 6. flags checked when parsed


def test_6_a_zero_batch_size_is_named_when_parsed(world, tmp_path):
    result = cli("train", *train_args(world, tmp_path / "out", "--batch-size", "0"))
    error_line(result.stderr, 2, result.returncode, "--batch-size must be an integer >= 1, got 0")
    assert not (tmp_path / "out").exists()


def test_6_cuda_graphs_on_a_cpu_are_refused_in_one_line(world, tmp_path, capsys):
    status, err = in_process(train_main, train_args(world, tmp_path / "out", "--compile", "reduce-overhead"), capsys)
    error_line(err, 2, status, "--compile reduce-overhead", "needs a CUDA device, got cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--log-every", "0"], "--log-every must be an integer >= 1, got 0"),
        (["--batch-size", "-8"], "--batch-size must be an integer >= 1, got -8"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--k", "9", "--batch-size", "8"], "--k (9) must be <= --batch-size (8)"),
        (["--num-workers", "-1"], "--num-workers must be an integer >= 0, got -1"),
        (["--mask-prob", "1.5"], "--mask-prob must be a number in [0, 1], got 1.5"),
        (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
        (["--amp", "fp8"], "--amp must be one of bf16, fp16, none, got 'fp8'"),
        (["--audio-seconds", "0.001"], "too few for n_fft 64"),
        (["--overwrite", "--resume"], "give one of them"),
        (["--allow-changes"], "--allow-changes only applies to --resume"),
    ],
)
def test_6_bad_training_flags_are_named_before_any_work(world, tmp_path, capsys, flags, named):
    status, err = in_process(train_main, train_args(world, tmp_path / "out", *flags), capsys)
    error_line(err, 2, status, named)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
        (["--alpha", "2"], "argument --alpha: must be a finite number in [0, 1], got '2'"),
        (["--overlays", "-1"], "argument --overlays: must be an integer >= 0, got '-1'"),
        (["--threshold", "high"], "argument --threshold: must be 'median' or a number in [0, 1], got 'high'"),
    ],
)
def test_6_bad_evaluation_flags_are_named_when_parsed(good_run, capsys, flags, named):
    status, err = in_process(evaluate_main, ["--checkpoint", str(good_run / "last.pt"), *flags], capsys)
    error_line(err, 2, status, named)


# ---------------------------------------------------------------- 7. every CLI error is one line


def test_7_a_missing_file_is_one_line_naming_it(world, tmp_path, capsys):
    root = Path(shutil.copytree(world, tmp_path / "world"))
    (root / "audio" / "train_000003.wav").unlink()
    (root / "frames" / "train_000007.jpg").write_bytes(b"not a jpeg")
    status, err = in_process(train_main, train_args(root, tmp_path / "out"), capsys)
    error_line(
        err, 2, status, "2 data problem(s)", "train_000003.wav: missing", "train_000007.jpg: not a readable image"
    )
    assert not (tmp_path / "out").exists()


def test_7_other_bad_input_is_one_line_too(world, good_run, tmp_path, capsys):
    no_list = Path(shutil.copytree(world, tmp_path / "no_list"))
    (no_list / "train.txt").unlink()
    status, err = in_process(train_main, train_args(no_list, tmp_path / "a"), capsys)
    error_line(err, 2, status, "train.txt: list file not found")

    status, err = in_process(train_main, train_args(world, tmp_path / "b", "--batch-size", "16", "--k", "2"), capsys)
    error_line(err, 2, status, "--batch-size 16 exceeds the 10 usable training items")

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    status, err = in_process(train_main, train_args(world, a_file), capsys)
    error_line(err, 2, status, f"--out {a_file} is a file, not a folder")

    status, err = in_process(train_main, train_args(tmp_path / "nowhere", tmp_path / "c"), capsys)
    error_line(err, 2, status, "nowhere is not a folder")

    status, err = in_process(train_main, ["--out", str(tmp_path / "d"), "--resume"], capsys)
    error_line(err, 2, status, "holds no last.pt to continue from")

    status, err = in_process(evaluate_main, ["--checkpoint", str(tmp_path / "missing.pt")], capsys)
    error_line(err, 2, status, "missing.pt does not exist")
    status, err = in_process(evaluate_main, ["--checkpoint", str(tmp_path)], capsys)
    error_line(err, 2, status, "is a folder, not a checkpoint file")

    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    status, err = in_process(evaluate_main, ["--checkpoint", str(tmp_path / "garbage.pt")], capsys)
    error_line(err, 2, status, "garbage.pt cannot be read safely")

    diverged = load_checkpoint(good_run / "last.pt")
    diverged["model"]["jsa.image.to_q.weight"].fill_(float("nan"))
    torch.save(diverged, tmp_path / "nan.pt")
    status, err = in_process(evaluate_main, ["--checkpoint", str(tmp_path / "nan.pt")], capsys)
    error_line(err, 2, status, "nan.pt holds non-finite weights")


@pytest.mark.parametrize(
    ("case", "culprit"),
    [
        ("half the weights", "tensor(s) missing, e.g. "),
        ("an extra weight", "1 tensor(s) unknown here, e.g. extra.weight"),
        ("weights a list", "holds model weights of type list, not tensors by name"),
        ("dim 32 over dim-16 weights", "of another shape, e.g. "),
        ("config a string", "holds a configuration of type str, not a mapping"),
        ("config empty", "its weights do not fit its configuration"),
    ],
)
def test_a_checkpoint_whose_weights_do_not_fit_its_configuration_is_one_line(
    good_run, world, tmp_path, capsys, case, culprit
):
    """#24 item 7: evaluate and localize load a model through one function, which names
    the checkpoint and what does not fit (exit 2, no traceback)."""
    state = load_checkpoint(good_run / "last.pt")
    if case == "half the weights":
        names = sorted(state["model"])
        state["model"] = {name: state["model"][name] for name in names[: len(names) // 2]}
    elif case == "an extra weight":
        state["model"]["extra.weight"] = torch.zeros(2)
    elif case == "weights a list":
        state["model"] = list(state["model"].values())
    elif case == "dim 32 over dim-16 weights":
        assert state["config"]["model"]["dim"] == 16
        state["config"]["model"]["dim"] = 32
    elif case == "config a string":
        state["config"] = "tiny"
    else:
        state["config"] = {}
    checkpoint = tmp_path / "bad.pt"
    torch.save(state, checkpoint)
    status, err = in_process(evaluate_main, ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval")], capsys)
    error_line(err, 2, status, f"checkpoint {checkpoint}", culprit)
    image, audio = world / "frames" / "test_000000.jpg", world / "audio" / "test_000000.wav"
    arguments = [str(image), "--audio", str(audio), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "maps")]
    status, err = in_process(localize_main, arguments, capsys)
    error_line(err, 2, status, f"checkpoint {checkpoint}", culprit)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "maps").exists()


def test_7_debug_shows_the_traceback(world, tmp_path, capsys, monkeypatch):
    args = train_args(world, tmp_path / "out", "--batch-size", "0")
    status, err = in_process(train_main, [*args, "--debug"], capsys)
    assert status == 2 and "Traceback" in err and err.rstrip().endswith("got 0")
    monkeypatch.setenv(DEBUG_ENV, "1")
    status, err = in_process(train_main, args, capsys)
    assert status == 2 and "Traceback" in err


@pytest.mark.parametrize(
    "value,shown",
    [("1", True), ("true", True), ("On", True), ("0", False), ("false", False), ("no", False), ("", False)],
)
def test_7_debug_environment_values(world, tmp_path, capsys, monkeypatch, value, shown):
    # JSA_FAST_DEBUG=false must not turn tracebacks on (it did: any value but "" and "0" did).
    monkeypatch.setenv(DEBUG_ENV, value)
    status, err = in_process(train_main, train_args(world, tmp_path / "out", "--batch-size", "0"), capsys)
    assert status == 2 and ("Traceback" in err) == shown


# ---------------------------------------------------------------- 8. interrupted writes, full disk, resumed metrics


def test_8_a_resume_after_kill_9_drops_stale_temporaries_and_repeats_no_step(good_run, straight_run, tmp_path, capsys):
    """What a kill -9 in epoch 2 leaves: the epoch-1 checkpoint, a half-written temporary
    checkpoint, and metrics of step 3 plus a torn line of step 4. The resume removes the
    temporary, drops those lines, and ends exactly as a straight two-epoch run."""
    straight = straight_run
    out = copy_run(good_run, tmp_path)
    stale = out / ".last.pt.kx81bq2e.tmp"
    stale.write_bytes(os.urandom(4096))
    straight_lines = (straight / "metrics.jsonl").read_text().splitlines(keepends=True)
    with (out / "metrics.jsonl").open("a") as metrics:
        metrics.write(straight_lines[3] + straight_lines[4][:40])  # step 3, half of step 4

    capsys.readouterr()
    assert train_main(["--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert "dropped 2 line(s)" in capsys.readouterr().out
    assert not stale.exists()
    records = strict_records(out / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [
        ("step", 1),
        ("step", 2),
        ("epoch", 2),
        ("step", 3),
        ("step", 4),
        ("epoch", 4),
    ]
    assert without_timings(records) == without_timings(strict_records(straight / "metrics.jsonl"))
    resumed, reference = load_checkpoint(out / "last.pt")["model"], load_checkpoint(straight / "last.pt")["model"]
    assert all(torch.equal(resumed[key], value) for key, value in reference.items())


def _user_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _user_namespaces(), reason="needs `unshare -r -m` (user and mount namespaces) to mount a tmpfs")
def test_8_a_full_disk_says_so_and_keeps_last_pt(good_run, tmp_path):
    """A real full disk: the run folder on a 4 MiB tmpfs, mounted in a private mount
    namespace, filled up before the resume; its epoch-end checkpoint cannot be written."""
    mount = tmp_path / "disk"
    mount.mkdir()
    out = mount / "run"
    script = f"""
        set -e
        mount -t tmpfs -o size=4m tmpfs {mount}
        cp -r {good_run} {out}
        dd if=/dev/zero of={mount}/filler bs=4096 2>/dev/null || true
        truncate -s -64K {mount}/filler  # room for the run's lock and log lines, not a checkpoint
        set +e
        {sys.executable} -m jsa_fast.train --out {out} --resume --epochs 2 2>{tmp_path}/stderr
        echo $? > {tmp_path}/status
        cp {out}/last.pt {out}/metrics.jsonl {tmp_path}/
        ls -a {out} > {tmp_path}/listing
    """
    environment = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    subprocess.run(
        ["unshare", "-r", "-m", "bash", "-c", script], cwd=REPOSITORY, check=True, timeout=300, env=environment
    )
    stderr = (tmp_path / "stderr").read_text()
    status = int((tmp_path / "status").read_text())
    error_line(stderr, 1, status, "no space left on the device", "last.pt", "the previous last.pt is unchanged")
    assert digest(tmp_path / "last.pt") == digest(good_run / "last.pt")
    assert not [name for name in (tmp_path / "listing").read_text().split() if name.endswith(".tmp")]
    strict_records(tmp_path / "metrics.jsonl")


def test_8_metrics_are_strict_json(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"kind": "step", "step": 1, "loss": float("nan"), "lr": float("inf"), "samples_per_s": 3.5})
    assert strict_records(log.path) == [{"kind": "step", "step": 1, "loss": None, "lr": None, "samples_per_s": 3.5}]


# ---------------------------------------------------------------- a non-finite loss


def test_a_diverging_run_stops_before_overwriting_last_pt(good_run, tmp_path, capsys):
    out = copy_run(good_run, tmp_path)
    before = run_files(out)
    status, err = in_process(
        train_main,
        ["--out", str(out), "--resume", "--epochs", "2", "--k", "0", "--lr", "1e30", "--allow-changes"],
        capsys,
    )
    batch = [f"train_{i:06d}" for i in epoch_batches(N_TRAIN, BATCH, SEED, 1, 0)[1]]
    line = error_line(err, 1, status, "step 4 (epoch 2)", ", ".join(batch), "not finite", "--lr")
    assert f"{out / 'last.pt'} is unchanged (step 2, 1 epoch(s) done)" in line
    assert digest(out / "last.pt") == before["last.pt"]
    strict_records(out / "metrics.jsonl")


def test_a_non_finite_model_is_never_saved(world, tmp_path, capsys, monkeypatch):
    """A last step whose loss was finite but whose update broke a weight: the epoch-end
    checkpoint refuses to write it."""
    import jsa_fast.train as train_module

    real_step, calls = train_module.train_step, []

    def step_breaking_a_weight_at_step_2(loss_fn, optimizer, *args):
        terms = real_step(loss_fn, optimizer, *args)
        calls.append(1)
        if len(calls) == 2:
            optimizer.param_groups[0]["params"][0].data.fill_(float("inf"))
        return terms

    monkeypatch.setattr(train_module, "train_step", step_breaking_a_weight_at_step_2)
    out = tmp_path / "run"
    status, err = in_process(train_main, train_args(world, out, "--epochs", "1"), capsys)
    error_line(err, 1, status, "after step 2 the model holds non-finite values", "no last.pt was written")
    assert not (out / "last.pt").exists()


def _lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "command": "python -m jsa_fast.train --out x",
        "started": 0,
    }
    path = folder / LOCK_NAME
    path.write_text(json.dumps(record) + "\n")
    return path


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_an_out_folder_is_owned_by_one_run_at_a_time(good_run, world, tmp_path, capsys):
    """#24 items 3 and 8: while a live process holds --out (here: this test's own PID),
    train, evaluate, prepare and localize refuse it in one line, exit 2, and leave the
    folder as it was; a lock whose process is gone is taken over, said once."""
    held = tmp_path / "held"
    lock = _lock(held, os.getpid())
    before = sorted(p.name for p in held.iterdir())
    image, audio = world / "frames" / "test_000000.jpg", world / "audio" / "test_000000.wav"
    checkpoint = str(good_run / "last.pt")
    runs = {
        "train": (train_main, train_args(world, held)),
        "evaluate": (evaluate_main, ["--checkpoint", checkpoint, "--out", str(held)]),
        "prepare": (prepare_main, [str(world / "frames"), "--out", str(held)]),
        "localize": (
            localize_main,
            [str(image), "--audio", str(audio), "--checkpoint", checkpoint, "--out", str(held)],
        ),
    }
    for name, (main, arguments) in runs.items():
        status, err = in_process(main, arguments, capsys)
        error_line(err, 2, status, f"--out {held} is in use by another run (PID {os.getpid()}", f"delete {lock}")
        assert sorted(p.name for p in held.iterdir()) == before, name

    stale = tmp_path / "stale"
    _lock(stale, _dead_pid())
    status, err = in_process(evaluate_main, ["--checkpoint", checkpoint, "--out", str(stale)], capsys)
    assert status == 0, err
    assert err.count("taking over the lock of a run that is gone") == 1
    assert (stale / "eval.json").is_file() and not (stale / LOCK_NAME).exists()

    other_host = tmp_path / "other_host"
    _lock(other_host, _dead_pid(), host="another-machine")
    status, err = in_process(evaluate_main, ["--checkpoint", checkpoint, "--out", str(other_host)], capsys)
    error_line(err, 2, status, "is in use by another run", "on another-machine")


def _hold_for_a_second(folder: str, start, results) -> None:
    """One of several runs started together: take `folder`'s lock, hold it 1 s, report."""
    import contextlib
    import io

    start.wait()
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), output_lock(Path(folder)):
            time.sleep(1.0)
        results.put(("held", said.getvalue()))
    except UsageError as error:
        results.put(("refused", f"{error}\n{said.getvalue()}"))


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_runs_started_at_the_same_moment_get_the_folder_one_at_a_time(tmp_path, stale):
    """#24 items 3 and 8 with real processes: four runs released by one barrier onto a free
    --out, or onto one a dead run still holds, exactly one holds it; the others are refused
    naming the holder; the dead run's lock is removed and said so once (by the run that
    removed it, which another may beat to the folder)."""
    folder = tmp_path / "out"
    if stale:
        _lock(folder, _dead_pid())
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(4), context.Queue()
    runs = [context.Process(target=_hold_for_a_second, args=(str(folder), start, results)) for _ in range(4)]
    for run in runs:
        run.start()
    outcomes = [results.get(timeout=120) for _ in runs]
    for run in runs:
        run.join(timeout=60)
    assert sorted(kind for kind, _ in outcomes) == ["held", "refused", "refused", "refused"], outcomes
    for kind, text in outcomes:
        if kind == "refused":
            assert "is in use by another run" in text or "at the same time" in text or "being taken" in text, text
    said = "".join(text for _, text in outcomes).count("taking over the lock of a run that is gone")
    assert said == int(stale), outcomes
    assert not folder.exists() or not list(folder.iterdir())  # the lock gone, nothing set aside left behind


def test_sigterm_saves_the_step_and_exits_143(world, tmp_path, capsys, monkeypatch):
    """#24 item 6: SIGTERM (a scheduler's notice) during training is handled as Ctrl-C: the
    step in progress finishes, last.pt is saved there, one line, exit 143; --resume then
    ends where an uninterrupted run ends."""
    import jsa_fast.train as train_module

    real_loss = train_module.jsa_loss
    monkeypatch.setattr(train_module, "jsa_loss", signalling_on_call(real_loss, 3, signal.SIGTERM))  # in step 3
    out = tmp_path / "run"
    two_epochs = train_args(world, out, "--epochs", "2")  # 2 steps each
    status, err = in_process(train_main, two_epochs, capsys)
    assert status == 143, err
    lines = err.strip().splitlines()
    assert lines[-1] == "jsa_fast.train: terminated (SIGTERM)" and "Traceback" not in err
    assert any(line.startswith("SIGTERM: saving after this step") for line in lines)
    state = load_checkpoint(out / "last.pt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 1, 1)
    assert not (out / LOCK_NAME).exists()
    monkeypatch.setattr(train_module, "jsa_loss", real_loss)
    assert train_main([*two_epochs, "--resume"]) == 0
    assert (load_checkpoint(out / "last.pt")["step"], load_checkpoint(out / "last.pt")["epoch"]) == (4, 2)


def test_a_test_id_naming_another_folder_is_refused_before_evaluating(good_run, world, tmp_path, capsys):
    """#24 item 10: a test.json id like ../x is refused when test.json is read, in one line,
    before any evaluation runs and with nothing written."""
    data = Path(shutil.copytree(world, tmp_path / "world"))
    entries = json.loads((data / "test.json").read_text())
    entries[1]["file"] = "../x"
    (data / "test.json").write_text(json.dumps(entries))
    out = tmp_path / "eval"
    arguments = ["--checkpoint", str(good_run / "last.pt"), "--data", str(data), "--out", str(out)]
    status, err = in_process(evaluate_main, arguments, capsys)
    error_line(err, 2, status, "test.json: ids must be single words without '/'", "'../x'")
    assert not out.exists()


def test_a_truncated_jpeg_is_named_with_the_other_bad_files_before_the_first_step(world, tmp_path, capsys, monkeypatch):
    """#24 item 12: a JPEG cut to its first 700 bytes (its header still opens) and an empty
    WAV are named together in one line before any step, exit 2; --on-bad-file skip trains
    without them; on unchanged files a second run decodes nothing (the clean result is
    cached by the data set's fingerprint, under JSA_FAST_CACHE)."""
    monkeypatch.setenv("JSA_FAST_CACHE", str(tmp_path / "cache"))
    root = Path(shutil.copytree(world, tmp_path / "world"))
    jpeg = root / "frames" / "train_000005.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:700])
    soundfile.write(root / "audio" / "train_000002.wav", np.zeros(0, np.float32), 16000)
    status, err = in_process(train_main, train_args(root, tmp_path / "out", "--epochs", "1"), capsys)
    error_line(err, 2, status, "2 data problem(s)", "train_000002.wav: the audio file holds no samples",
               "train_000005.jpg: cannot decode")  # fmt: skip
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").rglob("decoded-*"))

    with pytest.warns(UserWarning, match=r"skipping 2 id\(s\).*train_000005.jpg: cannot decode"):
        status, err = in_process(
            train_main, train_args(root, tmp_path / "skip", "--epochs", "1", "--on-bad-file", "skip"), capsys
        )
    assert status == 0, err
    clean = tmp_path / "clean"
    assert train_main(train_args(world, clean, "--epochs", "1")) == 0
    assert len(list((tmp_path / "cache" / "decoded").glob("decoded-*"))) == 1

    def never(*args, **kwargs):
        raise AssertionError("an unchanged data set was decoded again")

    monkeypatch.setattr(datasets_module, "decode_problems", never)
    assert train_main(train_args(world, clean, "--epochs", "1", "--overwrite")) == 0
