"""Training and evaluation end to end on a micro synthetic world: outputs, exact resume,
Ctrl-C, and the CLIs."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from jsa_fast import train as train_module
from jsa_fast.checkpoint import load_checkpoint, save_checkpoint
from jsa_fast.config import PRESETS, RunConfig, add_config_arguments, config_from_args, saved_config
from jsa_fast.data.datasets import epoch_batches
from jsa_fast.evaluate import main as evaluate_main
from jsa_fast.train import main as train_main, train

MICRO = PRESETS["tiny"].overridden(
    dim=16,
    mlp_hidden=32,
    encoder_width=4,
    image_size=64,
    train_resize=72,
    audio_seconds=0.5,
    n_fft=64,
    win_length=64,
    k=2,
    epochs=2,
    batch_size=4,
    num_workers=0,
    log_every=1,
)
MICRO_FLAGS = [
    "--dim",
    "16",
    "--mlp-hidden",
    "32",
    "--encoder-width",
    "4",
    "--image-size",
    "64",
    "--train-resize",
    "72",
    "--audio-seconds",
    "0.5",
    "--n-fft",
    "64",
    "--win-length",
    "64",
    "--k",
    "2",
    "--batch-size",
    "4",
    "--num-workers",
    "0",
    "--log-every",
    "1",
]


def run(cfg: RunConfig, world: Path, out: Path, resume: bool = False) -> dict[str, float]:
    return train(cfg, str(world), out, torch.device("cpu"), resume=resume)


def final_state(out: Path) -> dict:
    return load_checkpoint(out / "last.pt")


def assert_same_parameters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metric_lines(out: Path) -> list[tuple]:
    """What a run logged, less the timings."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [tuple((k, v) for k, v in r.items() if k != "samples_per_s") for r in records]


def test_training_writes_checkpoint_metrics_and_curves(world, tmp_path):
    means = run(MICRO, world, tmp_path)
    assert set(means) == {"loss", "loss_ctr", "loss_match", "loss_div", "loss_recon"}
    state = final_state(tmp_path)
    assert state["epoch"] == 2 and state["step"] == 4 and state["batch_in_epoch"] == 0
    assert saved_config(state["config"], "last.pt") == MICRO
    assert {"model", "optimizer", "scaler", "rng"} <= set(state)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["epoch"] for r in epochs] == [0, 1]
    for record in records:
        assert {
            "step",
            "epoch",
            "loss",
            "loss_ctr",
            "loss_match",
            "loss_div",
            "loss_recon",
            "lr",
            "samples_per_s",
        } <= set(record)
    assert epochs[1]["loss"] == pytest.approx(means["loss"])
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".last.pt.*"))  # no temporary checkpoint left behind


@pytest.mark.numeric
def test_resume_continues_exactly(world, tmp_path):
    straight = tmp_path / "straight"
    run(MICRO, world, straight)
    split = tmp_path / "split"
    run(MICRO.overridden(epochs=1), world, split)
    run(MICRO, world, split, resume=True)
    assert_same_parameters(final_state(straight)["model"], final_state(split)["model"])
    assert metric_lines(straight) == metric_lines(split)


def signalling_on_call(function, call: int, signum: int):
    """`function`, made to send this process `signum` when called the `call`-th time (and
    then to run as usual): a signal arriving in the middle of a step, a batch or a clip."""
    calls = 0

    def signalling(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            os.kill(os.getpid(), signum)
        return function(*args, **kwargs)

    return signalling


@pytest.mark.numeric
def test_ctrl_c_saves_and_resume_is_exact_mid_epoch(world, tmp_path, monkeypatch):
    cfg = MICRO.overridden(batch_size=3)  # 3 batches per epoch
    straight = tmp_path / "straight"
    run(cfg.overridden(num_workers=1), world, straight)
    interrupted = tmp_path / "interrupted"
    real_loss = train_module.jsa_loss
    monkeypatch.setattr(train_module, "jsa_loss", signalling_on_call(real_loss, 5, signal.SIGINT))  # Ctrl-C in step 5
    with pytest.raises(KeyboardInterrupt):
        run(cfg, world, interrupted)
    state = final_state(interrupted)  # the step in progress was finished first
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 2, 5)
    monkeypatch.setattr(train_module, "jsa_loss", real_loss)
    # Resume with a loader worker: augmentation depends on (seed, epoch, index) only.
    run(cfg.overridden(num_workers=1), world, interrupted, resume=True)
    assert_same_parameters(final_state(straight)["model"], final_state(interrupted)["model"])
    assert metric_lines(straight) == metric_lines(interrupted)


def test_resume_refuses_a_different_configuration(world, tmp_path):
    run(MICRO.overridden(epochs=1), world, tmp_path)
    with pytest.raises(ValueError, match="lr"):
        run(MICRO.overridden(lr=0.5), world, tmp_path, resume=True)


def test_epoch_batches_are_seeded_and_drop_the_last_partial_batch():
    first = epoch_batches(10, 4, seed=1, epoch=0, start=0)
    assert len(first) == 2 and all(len(b) == 4 for b in first)
    assert len(set(first[0] + first[1])) == 8
    assert first == epoch_batches(10, 4, seed=1, epoch=0, start=0)
    assert first != epoch_batches(10, 4, seed=1, epoch=1, start=0)
    assert epoch_batches(10, 4, seed=1, epoch=0, start=1) == first[1:]


def test_batch_larger_than_the_data_set_is_a_clear_error(world, tmp_path):
    with pytest.raises(ValueError, match="batch-size"):
        run(MICRO.overridden(batch_size=64), world, tmp_path)


def test_checkpoints_are_loaded_as_untrusted_input(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("arbitrary code",))

    torch.save({"model": {}, "config": {}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="safely"):
        load_checkpoint(tmp_path / "evil.pt")
    save_checkpoint({"weights": torch.ones(2)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="not a jsa-fast checkpoint"):
        load_checkpoint(tmp_path / "partial.pt")


def test_preset_overrides_from_the_command_line():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(
        ["--preset", "tiny", "--lr", "0.5", "--augment", "released", "--pretrained-image", "w.pth"]
    )
    cfg = config_from_args(args, default_preset="paper")
    assert cfg == PRESETS["tiny"].overridden(lr=0.5, augment="released", pretrained_image="w.pth")
    assert config_from_args(parser.parse_args([]), default_preset="paper") == PRESETS["paper"]
    assert config_from_args(parser.parse_args(["--pretrained", "r18.pth"]), "paper").optim.pretrained_image == "r18.pth"
    assert config_from_args(parser.parse_args(["--pretrained", "none"]), "paper").optim.pretrained_image == "none"


def test_paper_preset_is_the_paper():
    paper = PRESETS["paper"]
    # epochs None: 100 on the 10k subsets, 50 on 144k (released_epochs), as train_script.sh
    optim = paper.optim
    assert (optim.batch_size, optim.lr, optim.weight_decay, optim.epochs, optim.amp) == (256, 5e-5, 0.01, None, "fp16")
    assert (paper.data.image.augment, paper.data.audio.spec_augment) == ("released", True)
    model = paper.model
    assert (model.dim, model.num_slots, model.iters, model.mlp_hidden, model.spec_bins, model.spec_frames) == (
        512,
        2,
        5,
        1024,
        257,
        501,
    )
    assert model.image_grid == (7, 7) and model.audio_tokens == 16
    loss = paper.loss
    assert (loss.tau, loss.k, loss.weight_match, loss.weight_div, loss.weight_recon) == (0.03, 20, 100.0, 0.1, 0.1)


def test_train_and_evaluate_command_lines(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--data", str(world), "--out", str(out), "--preset", "tiny", "--epochs", "1", *MICRO_FLAGS]) == 0
    eval_dir = tmp_path / "eval"
    assert (
        evaluate_main(
            ["--checkpoint", str(out / "last.pt"), "--out", str(eval_dir), "--overlays", "3", "--num-workers", "0"]
        )
        == 0
    )
    results = json.loads((eval_dir / "eval.json").read_text())
    keys = {
        "ap50",
        "auc",
        "ap50_iqr",
        "auc_iqr",
        "r1_a2i",
        "r5_a2i",
        "r10_a2i",
        "r1_i2a",
        "r5_i2a",
        "r10_i2a",
        "n",
        "miou",
        "fscore",
    }
    assert keys <= set(results) and results["n"] == 6
    for key in keys - {"n"}:
        assert 0.0 <= results[key] <= 1.0, key
    assert len(list((eval_dir / "overlays").glob("*.png"))) == 3
    printed = capsys.readouterr().out
    assert "AP50" in printed and "R@1" in printed
    fixed = tmp_path / "fixed"
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(out / "last.pt"),
                "--out",
                str(fixed),
                "--threshold",
                "0.6",
                "--alpha",
                "0.4",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    assert json.loads((fixed / "eval.json").read_text())["threshold"] == 0.6


def test_evaluate_on_flickr_ground_truth(world, tmp_path):
    import shutil

    flickr = tmp_path / "flickr"
    shutil.copytree(world, flickr)
    (flickr / "test.json").unlink()  # leaves test.txt + Annotations/ (Flickr-SoundNet layout)
    shutil.rmtree(flickr / "masks")
    out = tmp_path / "run"
    run(MICRO.overridden(epochs=1), world, out)
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(out / "last.pt"),
                "--data",
                str(flickr),
                "--out",
                str(tmp_path / "eval"),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert results["n"] == 6 and 0.0 <= results["ap50"] <= 1.0
    assert results["r1_a2i"] is None and "miou" not in results  # Flickr carries no classes, no masks


def test_a_broken_file_is_reported_or_skipped(world, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(world, broken)
    (broken / "audio" / "train_000004.wav").write_bytes(b"not a wav file")
    with pytest.raises(ValueError, match="train_000004.wav"):
        run(MICRO.overridden(epochs=1), broken, tmp_path / "fail")
    train(MICRO.overridden(epochs=1), str(broken), tmp_path / "skip", torch.device("cpu"), on_bad_file="skip")
    assert final_state(tmp_path / "skip")["step"] == 2  # 9 usable items: 2 full batches of 4


def test_evaluate_with_the_dali_loader_on_cpu_matches_the_torch_loader(world, tmp_path):
    from jsa_fast.data.dali import dali_available

    if not dali_available("cpu"):
        pytest.skip("nvidia-dali-cuda130 is not installed (pip install -r requirements-dali.txt; `make test` does)")
    out = tmp_path / "run"
    run(MICRO.overridden(epochs=1), world, out)
    results = {}
    for loader in ("torch", "dali"):
        args = [
            "--checkpoint",
            str(out / "last.pt"),
            "--out",
            str(tmp_path / loader),
            "--num-workers",
            "0",
            "--device",
            "cpu",
        ]
        assert evaluate_main([*args, "--loader", loader]) == 0
        results[loader] = json.loads((tmp_path / loader / "eval.json").read_text())
    assert results["torch"]["n"] == results["dali"]["n"] == 6
    # Images differ by at most a few grey levels (DALI's resize vs PIL's): the metrics agree closely.
    for key in ("mean_ciou", "mean_ciou_iqr", "mean_ciou_centre_prior"):
        assert results["dali"][key] == pytest.approx(results["torch"][key], abs=0.05), key


def test_training_with_the_dali_loader_on_cpu(world, tmp_path):
    from jsa_fast.data.dali import dali_available

    if not dali_available("cpu"):
        pytest.skip("nvidia-dali-cuda130 is not installed (pip install -r requirements-dali.txt; `make test` does)")
    means = train(MICRO, str(world), tmp_path, torch.device("cpu"), loader="dali")
    assert final_state(tmp_path)["step"] == 4 and all(torch.isfinite(torch.tensor(v)) for v in means.values())
