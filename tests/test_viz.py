"""Overlays and loss-curve plots."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from jsa_fast.viz import OUTLINE_RGB, overlay_heatmap, plot_loss_curves, save_overlays


def test_overlay_unnormalises_a_tensor_image():
    # A zero ImageNet-normalised tensor is the mean colour: 255 * (0.485, 0.456, 0.406)
    # = (123.7, 116.3, 103.5) -> (124, 116, 104). alpha = 0 shows the image alone.
    out = overlay_heatmap(torch.zeros(3, 6, 5), torch.rand(6, 5), alpha=0.0)
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8
    assert (out == np.array([124, 116, 104], dtype=np.uint8)).all()


def test_overlay_heatmap_changes_pixels():
    image = np.full((10, 10, 3), 128, dtype=np.uint8)
    cold = overlay_heatmap(image, np.zeros((10, 10)))
    hot = overlay_heatmap(image, torch.ones(10, 10))
    assert not np.array_equal(cold, image) and not np.array_equal(cold, hot)
    # jet(0) is dark blue, jet(1) dark red.
    assert cold[0, 0, 2] > cold[0, 0, 0] and hot[0, 0, 0] > hot[0, 0, 2]


def test_overlay_outlines_boxes_and_gt_map():
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    heat = np.full((10, 10), 0.5)
    boxed = overlay_heatmap(image, heat, boxes=[(1, 1, 7, 7)])
    assert tuple(boxed[1, 1]) == OUTLINE_RGB and tuple(boxed[1, 7]) == OUTLINE_RGB
    assert tuple(boxed[4, 4]) != OUTLINE_RGB and tuple(boxed[9, 9]) != OUTLINE_RGB

    gt = np.zeros((10, 10))
    gt[2:6, 2:6] = 1.0
    outlined = overlay_heatmap(image, heat, gt_map=gt)
    assert tuple(outlined[2, 2]) == OUTLINE_RGB and tuple(outlined[5, 3]) == OUTLINE_RGB
    assert tuple(outlined[3, 3]) != OUTLINE_RGB and tuple(outlined[0, 0]) != OUTLINE_RGB


def test_overlay_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="heatmap"):
        overlay_heatmap(np.zeros((10, 10, 3), dtype=np.uint8), np.zeros((7, 7)))
    with pytest.raises(ValueError, match="image"):
        overlay_heatmap(np.zeros((10, 10, 3), dtype=np.float32), np.zeros((10, 10)))


def test_save_overlays_round_trip(tmp_path):
    pictures = [("a", np.full((4, 5, 3), 10, dtype=np.uint8)), ("b", np.full((4, 5, 3), 200, dtype=np.uint8))]
    paths = save_overlays(pictures, tmp_path / "viz", "av")
    assert [p.name for p in paths] == ["av_a.png", "av_b.png"]
    for path, (_, picture) in zip(paths, pictures):
        assert np.array_equal(np.asarray(Image.open(path)), picture)
    with pytest.raises(ValueError, match="name"):
        save_overlays([("../x", pictures[0][1])], tmp_path, "av")


def test_plot_loss_curves_writes_png(tmp_path):
    lines = []
    for step in range(1, 21):
        lines.append(
            {
                "kind": "step",
                "step": step,
                "epoch": step // 10,
                "loss": 2.0 / step,
                "loss_ctr": 1.0 / step,
                "loss_match": 0.01,
                "loss_div": 0.0,
                "loss_recon": 0.5,
            }
        )
    lines.append({"kind": "epoch", "step": 10, "epoch": 0, "loss": 0.3, "loss_ctr": 0.2})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = plot_loss_curves(metrics, tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = Image.open(out).size
    assert width > height > 0  # five panels: 3 columns, 2 rows


def test_plot_loss_curves_needs_loss_terms(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"kind": "epoch", "step": 1, "epoch": 0, "lr": 1.0, "loss": None}) + "\n")
    with pytest.raises(ValueError, match="no loss values"):
        plot_loss_curves(metrics, tmp_path / "loss.png")
