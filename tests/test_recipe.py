"""The released training recipe around the model (issue 17): the image encoder's start
(--pretrained PATH | none, recorded in the checkpoint), fp16 with a GradScaler (skipped
steps counted), fp32 evaluation unless asked, and the epochs by the data's size."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_train import MICRO, MICRO_FLAGS
from torchvision.models import resnet18

from jsa_fast import evaluate as evaluate_module, evaluation as evaluation_module, train as train_module
from jsa_fast.checkpoint import load_checkpoint
from jsa_fast.config import PRESETS, released_epochs
from jsa_fast.errors import RunError
from jsa_fast.train import main as train_main, train

FP16 = MICRO.overridden(amp="fp16")


def records(out: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [record for record in lines if record["kind"] == kind]


def test_the_paper_preset_refuses_to_start_without_a_pretrained_choice(tmp_path, capsys):
    assert PRESETS["paper"].optim.pretrained_image is None and PRESETS["tiny"].optim.pretrained_image == "none"
    status = train_main(["--data", str(tmp_path), "--out", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1
    assert "resnet18-f37072fd.pth" in lines[0] and "IMAGENET1K_V1" in lines[0]
    assert "--pretrained PATH/resnet18-f37072fd.pth" in lines[0] and "--pretrained none" in lines[0]
    assert not (tmp_path / "run").exists()


def test_the_paper_recipe_from_an_imagenet_file_is_recorded(world, tmp_path, capsys):
    # A torchvision ResNet-18 state dict (random weights, the IMAGENET1K_V1 file's layout),
    # at the paper's encoder width; the rest of the model micro, one epoch, fp16 on the CPU.
    torch.manual_seed(0)
    weights = tmp_path / "resnet18-f37072fd.pth"
    torch.save(resnet18(weights=None).state_dict(), weights)
    out = tmp_path / "run"
    flags = [
        "--data",
        str(world),
        "--out",
        str(out),
        "--device",
        "cpu",
        *MICRO_FLAGS,
        "--encoder-width",
        "64",
        "--epochs",
        "1",
        "--no-compile",
    ]
    assert train_main([*flags, "--pretrained", str(weights)]) == 0
    printed = capsys.readouterr().out
    assert "released augmentation; fp16" in printed and "unused: fc.bias, fc.weight" in printed
    state = load_checkpoint(out / "last.pt")
    assert state["config"]["optim"]["amp"] == "fp16" and state["config"]["data"]["image"]["augment"] == "released"
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert state["encoder_start"] == {
        "image": {"weights": str(weights), "sha256": sha256, "tensors": 120, "unused": ["fc.bias", "fc.weight"]},
        "audio": {"weights": "random"},
    }
    # A resume takes the weights from last.pt: the file may be gone; the record stays.
    weights.unlink()
    assert train_main(["--out", str(out), "--resume", "--epochs", "2", "--device", "cpu"]) == 0
    assert load_checkpoint(out / "last.pt")["encoder_start"] == state["encoder_start"]
    # GradScaler's first scale (2^16) overflows this trunk's fp16 gradients: skipped, counted.
    counts = [record["skipped_steps"] for record in records(out, "epoch")]
    assert (
        len(counts) == 2
        and counts == sorted(counts)
        and counts[-1] == load_checkpoint(out / "last.pt")["skipped_steps"]
    )


def test_fp16_skips_and_counts_steps_whose_loss_or_gradients_overflow(world, tmp_path, monkeypatch):
    # 15 steps: GradScaler's first scale (2^16) overflows this model's fp16 gradients, so it
    # halves the scale on the first steps, each skipped; step 12 is then made infinite.
    cfg = FP16.overridden(batch_size=2, k=2, epochs=3)
    real_loss, calls = train_module.jsa_loss, {"n": 0}

    def infinite_twelfth_loss(out, loss_cfg, **options):
        terms = real_loss(out, loss_cfg, **options)
        calls["n"] += 1
        return terms | {"loss": terms["loss"] * math.inf} if calls["n"] == 12 else terms

    monkeypatch.setattr(train_module, "jsa_loss", infinite_twelfth_loss)
    means = train(cfg, str(world), tmp_path, torch.device("cpu"))
    steps = records(tmp_path, "step")
    scales = [65536.0] + [line["grad_scale"] for line in steps]
    skipped = [0] + [line["skipped_steps"] for line in steps]
    for step in range(1, len(scales)):  # a step counts as skipped exactly when the scale backs off
        assert skipped[step] - skipped[step - 1] == (scales[step] < scales[step - 1]), step
    assert skipped[12] == skipped[11] + 1 and steps[11]["loss"] is None  # the infinite step
    assert 1 < skipped[-1] < 15 and steps[-1]["loss"] is not None  # it trains once calibrated
    assert all(math.isfinite(value) for value in means.values())  # skipped steps are left out
    assert load_checkpoint(tmp_path / "last.pt")["skipped_steps"] == skipped[-1]


def test_fp16_stops_when_every_step_overflows(world, tmp_path, monkeypatch):
    real_loss = train_module.jsa_loss
    monkeypatch.setattr(
        train_module, "jsa_loss", lambda out, cfg, **o: (t := real_loss(out, cfg, **o)) | {"loss": t["loss"] * math.nan}
    )
    with pytest.raises(
        RunError, match=r"fp16 steps keep overflowing \(17 skipped, loss scale now 0\.5\); try --amp bf16"
    ):
        train(FP16.overridden(batch_size=2, k=2, epochs=4), str(world), tmp_path, torch.device("cpu"))
    state = load_checkpoint(tmp_path / "last.pt")  # the third epoch's end: its model never changed
    assert (state["step"], state["skipped_steps"]) == (15, 15)
    assert records(tmp_path, "epoch")[0]["loss"] is None  # no step of the epoch trained


@pytest.fixture(scope="module")
def fp16_epoch(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP16's first epoch (step 2), read only: copy it to continue it."""
    out = tmp_path_factory.mktemp("fp16") / "run"
    train(FP16.overridden(epochs=1), str(world), out, torch.device("cpu"))
    return out


def test_fp16_resume_is_exact(world, fp16_epoch, tmp_path):
    straight, split = tmp_path / "straight", Path(shutil.copytree(fp16_epoch, tmp_path / "split"))
    train(FP16, str(world), straight, torch.device("cpu"))
    train(FP16, str(world), split, torch.device("cpu"), resume=True)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert a["scaler"] == b["scaler"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_evaluation_runs_in_fp32_unless_asked(fp16_epoch, tmp_path, monkeypatch):
    used = []
    real = evaluation_module.autocast_context
    monkeypatch.setattr(
        evaluation_module, "autocast_context", lambda device, amp: used.append(amp) or real(device, amp)
    )
    common = ["--checkpoint", str(fp16_epoch / "last.pt"), "--num-workers", "0", "--overlays", "0", "--device", "cpu"]
    assert evaluate_module.main([*common, "--out", str(tmp_path / "fp32")]) == 0
    assert set(used) == {"none"}  # the run trained in fp16
    used.clear()
    assert evaluate_module.main([*common, "--out", str(tmp_path / "bf16"), "--amp", "bf16"]) == 0
    assert set(used) == {"bf16"}


def test_epochs_follow_the_data_size_as_the_released_scripts():
    assert PRESETS["paper"].optim.epochs is None and PRESETS["tiny"].optim.epochs == 10
    assert released_epochs(10_000) == 100 and released_epochs(144_000) == 50  # train_script.sh
    assert released_epochs(37_999) == 100 and released_epochs(38_000) == 50
