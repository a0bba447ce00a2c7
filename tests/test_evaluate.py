"""Evaluation as the paper and the field run it (issue 15): OGL, the released protocol, the
inference temperature, items.csv, missing test files, --subset, the validation split and
T target / O off-target slots. One micro training (T = 2, O = 1, --val) serves the tests
that need a trained model."""

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models import resnet18

from jsa_fast.checkpoint import load_checkpoint
from jsa_fast.config import PRESETS, saved_config
from jsa_fast.data.datasets import AudioVisualDataset
from jsa_fast.evaluate import main as evaluate_main
from jsa_fast.evaluation import Validation
from jsa_fast.localize import main as localize_main
from jsa_fast.losses import LossConfig, jsa_loss
from jsa_fast.metrics import AUC_THRESHOLDS, LocalizationEvaluator
from jsa_fast.model import JSAModel, ModelConfig, ObjectSaliency
from jsa_fast.protocol import PROTOCOLS, scored_maps
from jsa_fast.train import main as train_main, train
from jsa_fast.viz import plot_loss_curves

MICRO = PRESETS["tiny"].overridden(
    dim=16, mlp_hidden=32, encoder_width=4, image_size=64, train_resize=72, audio_seconds=0.5,
    n_fft=64, win_length=64, k=2, epochs=2, batch_size=4, num_workers=0, log_every=1, targets=2, off_targets=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision ResNet-18 state dict with random weights (no ImageNet weights here)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("r18") / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def world(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's world with its six annotated items split: the first three are the
    validation split (val.json), the other three the test split (test.json)."""
    root = Path(shutil.copytree(world, tmp_path_factory.mktemp("split") / "world"))
    records = json.loads((root / "test.json").read_text())
    (root / "val.json").write_text(json.dumps(records[:3]))
    (root / "test.json").write_text(json.dumps(records[3:]))
    (root / "test.txt").unlink()  # the Flickr-style list names all six
    return root


@pytest.fixture(scope="module")
def trained(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one training of this module: T = 2, O = 1, best.pt by AP50 on val.json."""
    out = tmp_path_factory.mktemp("run")
    train(MICRO.overridden(val=str(world / "val.json")), str(world), out, torch.device("cpu"), overwrite=True)
    return out


def run_cli(argv, capsys):
    status = evaluate_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------------------------
# OGL: the object map of a ResNet-18 whose layer4 output is planted
# ---------------------------------------------------------------------------------


class Planted(nn.Module):
    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features.expand(x.shape[0], -1, -1, -1)


def test_ogl_object_map_and_combination_against_hand_computed_arrays(resnet18_weights):
    saliency = ObjectSaliency(resnet18_weights)
    torch.testing.assert_close(
        saliency.trunk.layer1[0].conv1.weight, torch.load(resnet18_weights)["layer1.0.conv1.weight"]
    )
    # layer4 output: 512 channels of alternating sign, |value| = M = [[0, 3], [6, 9]].
    signs = torch.tensor([(-1.0) ** c for c in range(512)]).view(1, 512, 1, 1)
    saliency.trunk.layer4 = Planted(signs * torch.tensor([[0.0, 3.0], [6.0, 9.0]]))
    with torch.no_grad():
        obj = saliency(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(obj, torch.tensor([[[0.0, 3.0], [6.0, 9.0]]] * 2))
    # Bilinear (align_corners=True) to 4 x 4: OBJ(i, j) = 2 i + j, normalised / 9. The AV
    # map [[0, 0], [0, 9]] upsamples to i j, normalised i j / 9. OGL (alpha 0.4):
    # norm(0.4 i j / 9 + 0.6 (2 i + j) / 9), from 0 at (0, 0) to 1 at (3, 3):
    # (0.4 i j + 1.2 i + 0.6 j) / 9.
    i, j = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    ca = torch.tensor([[[0.0, 0.0], [0.0, 9.0]]] * 2)
    maps = scored_maps(ca, torch.rand(2, 2, 2), obj, (4, 4), PROTOCOLS["field"])
    torch.testing.assert_close(maps["obj"], ((2 * i + j) / 9).expand(2, 4, 4))
    torch.testing.assert_close(maps["av"], (i * j / 9).expand(2, 4, 4))
    torch.testing.assert_close(maps["ogl"], ((0.4 * i * j + 1.2 * i + 0.6 * j) / 9).expand(2, 4, 4))


def test_ogl_weights_that_are_not_a_resnet18_are_one_line(trained, tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    status, _, err = run_cli(["--checkpoint", trained / "last.pt", "--ogl", garbage, "--out", tmp_path], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and f"--ogl {garbage}" in err


# ---------------------------------------------------------------------------------
# The released protocol against a transcription of the released code
# ---------------------------------------------------------------------------------


def _normalize_img(value):  # utils.normalize_img of InhoKim429/JSA
    vmin, vmax = value.min(), value.max()
    if not (vmax - vmin) == 0:
        value = (value - vmin) / (vmax - vmin)
    return value


def _released_cious(ca, ia, obj, gts, alpha=0.4, threshold=0.6):
    """test_model.py's validate_img_aud and utils.Evaluator.cal_CIOU, transcribed:
    bicubic (align_corners=False) to 224, normalize_img, pred >= 0.6, cIoU."""
    up = lambda grid: F.interpolate(grid[:, None], size=(224, 224), mode="bicubic", align_corners=False).numpy()
    heat_aud, heat_img, heat_obj = up(ca), up(ia), up(obj)
    cious = {"av": [], "iqr": [], "obj": [], "ogl": []}
    for n, gt in enumerate(gts):
        pred_aud = _normalize_img(heat_aud[n, 0])
        pred_img = _normalize_img(heat_img[n, 0])
        pred_obj = _normalize_img(heat_obj[n, 0])
        preds = {
            "av": pred_aud,
            "iqr": _normalize_img(pred_aud * alpha + pred_img * (1 - alpha)),
            "obj": pred_obj,
            "ogl": _normalize_img(pred_aud * alpha + pred_obj * (1 - alpha)),
        }
        for name, pred in preds.items():
            infer_map = np.zeros((224, 224))
            infer_map[pred >= threshold] = 1
            cious[name].append(np.sum(infer_map * gt) / (np.sum(gt) + np.sum(infer_map * (gt == 0))))
    return cious


def test_released_protocol_matches_a_transcription_of_the_released_code():
    generator = torch.Generator().manual_seed(0)
    count = 12
    ca, ia, obj = (torch.rand(count, 7, 7, generator=generator) for _ in range(3))
    gts = np.zeros((count, 224, 224))
    for n in range(count):
        x0, y0 = torch.randint(0, 120, (2,), generator=generator).tolist()
        side = int(torch.randint(40, 100, (1,), generator=generator))
        gts[n, y0 : y0 + side, x0 : x0 + side] = 1
    protocol = PROTOCOLS["released"]
    assert (protocol.upsample, protocol.threshold, protocol.alpha, protocol.ogl_alpha) == ("bicubic", 0.6, 0.4, 0.4)
    maps = scored_maps(ca, ia, obj, (224, 224), protocol)
    expected = _released_cious(ca, ia, obj, gts)
    for name, cious in expected.items():
        evaluator = LocalizationEvaluator(protocol.threshold)
        ours = [evaluator.update(maps[name][n], gts[n]) for n in range(count)]
        np.testing.assert_allclose(ours, cious, rtol=0, atol=1e-12, err_msg=name)
        # finalize_AP50, finalize_cIoU and sklearn's auc (a trapezoid) of finalize_AUC
        success = [np.sum(np.array(cious) >= 0.05 * i) / count for i in range(21)]
        summary = evaluator.summary()
        assert summary["ap50"] == np.mean(np.array(cious) >= 0.5)
        assert summary["mean_ciou"] == pytest.approx(np.mean(cious), abs=1e-12)
        assert summary["auc"] == pytest.approx(np.trapezoid(success, [0.05 * i for i in range(21)]), abs=1e-12)
    # The evaluator given the upsampling mode scores the 7 x 7 grid itself, as the protocol does.
    evaluator = LocalizationEvaluator(0.6, upsample="bicubic")
    np.testing.assert_allclose(
        [evaluator.update(ca[n], gts[n]) for n in range(count)], expected["av"], rtol=0, atol=1e-12
    )
    assert len(AUC_THRESHOLDS) == 21


# ---------------------------------------------------------------------------------
# The inference temperature, against the reference module
# ---------------------------------------------------------------------------------


def _micro_model(targets=1, backend="torch", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        dim=16, targets=targets, off_targets=1, iters=2, mlp_hidden=24, image_size=64, spec_bins=33, spec_frames=64, encoder_width=4,
        backend=backend,
    )  # fmt: skip
    return JSAModel(cfg).eval()


def test_temperature_scales_the_logits_of_the_inference_maps_only():
    model = _micro_model()
    image, spec = torch.randn(3, 3, 64, 64), torch.randn(3, 1, 33, 64)
    with torch.no_grad():
        tokens_img, tokens_aud = model.encode(image, spec)
        out = model.jsa(tokens_img, tokens_aud)  # the reference module (backend "torch")
        keys = model.jsa.image.to_k(model.jsa.image.norm_input(tokens_img))
        sharp, plain = model.infer(image, spec, temperature=0.1), model.infer(image, spec)

    def by_hand(queries, temperature):  # M = K Q^T / sqrt(d) x t; softmax over slots; + eps; over keys
        logits = torch.einsum("bld,bsd->bls", keys, queries) / math.sqrt(16) * temperature
        attention = logits.softmax(dim=-1) + 1e-8
        return (attention / attention.sum(dim=1, keepdim=True))[..., 0].reshape(3, 2, 2)

    torch.testing.assert_close(sharp.ca, by_hand(out.q_aud, 0.1))
    torch.testing.assert_close(sharp.ia, by_hand(out.q_img, 0.1))
    # At temperature 1 the maps are the module's own ca^{a,v} and ia^{v,v}.
    torch.testing.assert_close(plain.ca, out.ca_img.reshape(3, 2, 2))
    torch.testing.assert_close(plain.ia, out.ia_img.reshape(3, 2, 2))
    assert not torch.allclose(sharp.ca, plain.ca)
    # The slots (and so retrieval) do not see the temperature: the released code sharpens
    # only the maps read off the last iteration.
    torch.testing.assert_close(sharp.p_img, plain.p_img)
    torch.testing.assert_close(sharp.p_aud, F.normalize(out.slots_aud[:, 0], dim=-1))
    with pytest.raises(ValueError, match="temperature"):
        model.infer(image, spec, temperature=0.0)


def test_fused_module_gives_the_same_maps_at_any_temperature():
    reference, fused = _micro_model(targets=2), _micro_model(targets=2, backend="triton")
    fused.load_state_dict(reference.state_dict())
    image, spec = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 33, 64)
    with torch.no_grad():
        for temperature in (1.0, 0.1):
            for ours, theirs in zip(fused.infer(image, spec, temperature), reference.infer(image, spec, temperature)):
                torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------
# T target and O off-target slots
# ---------------------------------------------------------------------------------


def test_two_targets_one_off_target_reference_and_fused_agree_in_training():
    reference, fused = (_micro_model(targets=2, backend=b).train() for b in ("torch", "triton"))
    fused.load_state_dict(reference.state_dict())
    assert reference.jsa.slots_init.shape == (1, 3, 16)
    image, spec = torch.randn(4, 3, 64, 64), torch.randn(4, 1, 33, 64)
    masks = torch.rand(4, 4) < 0.3, torch.rand(4, 2) < 0.3
    losses = {}
    for name, model in (("reference", reference), ("fused", fused)):
        out = model(image, spec, *masks)
        assert out.target_ca_img.shape == (4, 4, 2) and out.target_ca_aud.shape == (4, 2, 2)
        losses[name] = jsa_loss(out, LossConfig(k=2))
        losses[name]["loss"].backward()
    for term in losses["reference"]:
        torch.testing.assert_close(losses["fused"][term], losses["reference"][term], rtol=1e-4, atol=1e-6)
    # Gradients compared as whole tensors: those of the query and slot-norm biases are 0
    # up to rounding (a bias shared by the slots leaves the softmax over them unchanged).
    for (name, p), q in zip(reference.named_parameters(), fused.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert (q.grad - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-6, name


def test_two_targets_one_off_target_train_and_best_pt_is_chosen_on_validation(trained, world, tmp_path):
    last, best = load_checkpoint(trained / "last.pt"), load_checkpoint(trained / "best.pt")
    assert last["model"]["jsa.slots_init"].shape == (1, 3, 16) and last["config"]["model"]["targets"] == 2
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    scores = [r for r in records if r["kind"] == "val"]
    assert [r["epoch"] for r in scores] == [0, 1]
    # best.pt: the first epoch of the highest (AP50, AUC) on val.json
    keyed = [(r["val_ap50"], r["val_auc"]) for r in scores]
    chosen = scores[keyed.index(max(keyed))]
    assert best["step"] == chosen["step"] and best["epoch"] == chosen["epoch"] + 1
    assert best["best_val"] == {key: chosen[key] for key in ("val_ap50", "val_auc", "val_mean_ciou")}
    # Its weights score exactly that on the validation split, and the test split, whatever
    # its labels say, does not enter: the same scores with other boxes and classes in test.json.
    cfg = MICRO.overridden(val=str(world / "val.json"))
    model = JSAModel(cfg.model)
    model.load_state_dict(best["model"])
    assert Validation(cfg, world).score(model, torch.device("cpu")) == best["best_val"]
    relabelled = tmp_path / "relabelled"
    shutil.copytree(world, relabelled, symlinks=True)
    tests = json.loads((world / "test.json").read_text())
    (relabelled / "test.json").write_text(
        json.dumps([{**r, "class": "other", "bbox": [[0.0, 0.0, 0.5, 0.5]]} for r in tests])
    )
    assert Validation(cfg, relabelled).score(model, torch.device("cpu")) == best["best_val"]


def test_loss_curves_draw_the_validation_scores(trained, tmp_path):
    # 5 loss panels and 3 validation panels: three rows of three (3.2 inches each, at
    # 100 dpi); without the validation lines two rows.
    assert Image.open(trained / "loss_curves.png").height == 960
    lines = [line for line in (trained / "metrics.jsonl").read_text().splitlines() if '"val"' not in line]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert Image.open(plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")).height == 640


def test_validation_split_leaves_the_test_split_out(world, tmp_path):
    clash = tmp_path / "clash.json"
    clash.write_text((world / "test.json").read_text())
    with pytest.raises(ValueError, match="test id"):
        Validation(MICRO.overridden(val=str(clash)), world)
    held = Validation(MICRO.overridden(val_fraction=0.3), world)
    held_ids = set(held.dataset.dataset.ids)
    assert len(held_ids) == 3 and held_ids.isdisjoint(held.train_ids) and all(i.startswith("train_") for i in held_ids)
    assert sorted(held_ids | set(held.train_ids)) == [f"train_{n:06d}" for n in range(10)]


# ---------------------------------------------------------------------------------
# The CLI: items.csv against eval.json, the protocol recorded, missing files, --subset
# ---------------------------------------------------------------------------------


def test_items_csv_rows_match_the_aggregates_of_eval_json(trained, world, resnet18_weights, tmp_path, capsys):
    status, printed, _ = run_cli(
        ["--checkpoint", trained / "best.pt", "--data", world, "--out", tmp_path, "--num-workers", 0,
         "--protocol", "released", "--ogl", resnet18_weights],
        capsys,
    )  # fmt: skip
    assert status == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert (results["protocol"], results["upsample"], results["threshold"], results["alpha"], results["temperature"]) == (
        "released", "bicubic", 0.6, 0.4, 0.1,
    )  # fmt: skip
    assert results["missing"] == 0 and results["n"] == 3 and list(results["by_threshold"]) == ["0.6", "median"]
    with (tmp_path / "items.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["id"] for row in rows] == ["test_000003", "test_000004", "test_000005"]
    for threshold, figures in results["by_threshold"].items():
        for name, suffix in (
            ("av", ""),
            ("iqr", "_iqr"),
            ("ogl", "_ogl"),
            ("obj", "_obj"),
            ("centre_prior", "_centre_prior"),
        ):
            cious = np.array([float(row[f"ciou_{name}@{threshold}"]) for row in rows])
            success = [np.mean(cious >= t) for t in AUC_THRESHOLDS]
            assert figures[f"ap50{suffix}"] == np.mean(cious >= 0.5)
            assert figures[f"mean_ciou{suffix}"] == pytest.approx(np.mean(cious), abs=1e-12)
            assert figures[f"auc{suffix}"] == pytest.approx(np.trapezoid(success, AUC_THRESHOLDS), abs=1e-12)
    assert {key: results[key] for key in results["by_threshold"]["0.6"]} == results["by_threshold"]["0.6"]
    for direction in ("a2i", "i2a"):
        ranks = np.array([int(row[f"rank_{direction}"]) for row in rows])
        for k in (1, 5, 10):
            assert results[f"r{k}_{direction}"] == np.mean((ranks >= 1) & (ranks <= k))
    assert all(0 <= float(row["area_av@median"]) <= 1 for row in rows)
    assert "OGL (0.4)" in printed and "threshold median" in printed and "threshold 0.6" in printed
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "overlays").iterdir()) == ["ca"] * 3 + ["ogl"] * 3


def test_missing_test_files_fail_naming_them_or_are_counted_with_skip(trained, world, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(world, root)
    (root / "audio" / "test_000004.wav").unlink()
    (root / "frames" / "test_000005.jpg").unlink()
    args = ["--checkpoint", trained / "last.pt", "--data", root, "--num-workers", 0, "--overlays", 0]
    status, _, err = run_cli([*args, "--out", tmp_path / "fail"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "test_000004.wav: missing" in err and "test_000005.jpg: missing" in err and "--on-missing skip" in err
    status, _, err = run_cli([*args, "--out", tmp_path / "skip", "--on-missing", "skip"], capsys)
    assert status == 0 and "2 test id(s) not on disk" in err
    results = json.loads((tmp_path / "skip" / "eval.json").read_text())
    assert results["missing"] == 2 and results["n"] == 1
    assert (tmp_path / "skip" / "missing.txt").read_text() == "test_000004\ntest_000005\n"


def test_subset_of_class_names_and_ids(trained, world, tmp_path, capsys):
    tests = json.loads((world / "test.json").read_text())
    subset = tmp_path / "subset.txt"
    subset.write_text(f"{tests[0]['class']}\n\n{tests[2]['file']}\n")
    expected = [r["file"] for r in tests if r["class"] == tests[0]["class"] or r["file"] == tests[2]["file"]]
    status, _, _ = run_cli(
        [
            "--checkpoint",
            trained / "last.pt",
            "--data",
            world,
            "--out",
            tmp_path,
            "--num-workers",
            0,
            "--subset",
            subset,
        ],
        capsys,
    )
    assert status == 0
    with (tmp_path / "items.csv").open() as file:
        assert [row["id"] for row in csv.DictReader(file)] == expected
    subset.write_text("no_such_class\n")
    status, _, err = run_cli(
        ["--checkpoint", trained / "last.pt", "--data", world, "--out", tmp_path, "--subset", subset], capsys
    )
    assert status == 2 and "no_such_class" in err


@pytest.mark.parametrize(
    "flags,culprit",
    [
        (["--temperature", "0"], "--temperature"),
        (["--threshold", "1.5"], "--threshold"),
        (["--upsample", "nearest"], "--upsample"),
        (["--protocol", "paper"], "--protocol"),
        (["--ogl-alpha", "2"], "--ogl-alpha"),
    ],
)
def test_bad_protocol_flags_are_one_line(flags, culprit, tmp_path, capsys):
    status, _, err = run_cli(["--checkpoint", tmp_path / "last.pt", *flags], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and culprit in err


# ---------------------------------------------------------------------------------
# localize takes the protocol's choices that apply to a map: upsampling, alpha, temperature, OGL
# ---------------------------------------------------------------------------------


def test_localize_makes_the_maps_evaluation_scores(trained, world, resnet18_weights, tmp_path, capsys):
    state = load_checkpoint(trained / "last.pt")
    cfg = saved_config(state["config"], "last.pt")
    model = JSAModel(cfg.model)
    model.load_state_dict(state["model"])
    model.eval()
    item = AudioVisualDataset(world, "test", cfg.data.image, cfg.data.audio)[0]
    protocol = dataclasses.replace(PROTOCOLS["released"], temperature=0.5)
    with torch.no_grad():
        image = item["image"][None]
        inference = model.infer(image, item["spec"][None], protocol.temperature)
        obj = ObjectSaliency(resnet18_weights)(image)
        expected = scored_maps(inference.ca, inference.ia, obj, (64, 64), protocol)["ogl"][0]
    name = item["id"]
    args = [
        "--checkpoint",
        trained / "last.pt",
        world / "frames" / f"{name}.jpg",
        "--audio",
        world / "audio" / f"{name}.wav",
        "--device",
        "cpu",
    ]
    assert (
        localize_main(
            [
                str(a)
                for a in [
                    *args,
                    "--out",
                    tmp_path,
                    "--protocol",
                    "released",
                    "--temperature",
                    "0.5",
                    "--ogl",
                    resnet18_weights,
                ]
            ]
        )
        == 0
    )
    np.testing.assert_allclose(np.load(tmp_path / f"{name}_map.npy"), expected.numpy(), rtol=0, atol=1e-5)
    for flags, culprit in ((["--map", "obj"], "--map obj needs --ogl"), (["--map", "iqr", "--ogl", resnet18_weights], "--map iqr does not use --ogl"),
                           (["--temperature", "0"], "--temperature")):  # fmt: skip
        assert localize_main([str(a) for a in [*args, "--out", tmp_path, *flags]]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and culprit in err


@pytest.mark.parametrize(
    "flags,culprit",
    [
        (["--targets", "0"], "--targets"),
        (["--off-targets", "x"], "--off-targets"),
        (["--val-fraction", "1"], "--val-fraction"),
        (["--val", "v.json", "--val-fraction", "0.1"], "give one"),
    ],
)
def test_bad_training_flags_are_one_line(flags, culprit, tmp_path, capsys):
    status = train_main(["--out", str(tmp_path / "run"), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and culprit in err
    assert not (tmp_path / "run").exists()


def test_a_validation_file_that_is_not_there_is_one_line(world, tmp_path, capsys):
    status = train_main(
        [
            "--data",
            str(world),
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--val",
            str(tmp_path / "none.json"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "none.json" in err
