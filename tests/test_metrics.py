"""Metrics against hand-computed values (EZ-VSL localisation, retrieval, AVSBench)."""

import math

import numpy as np
import pytest
import torch

from jsa_fast.metrics import LocalizationEvaluator, SegmentationEvaluator, cross_modal_retrieval, retrieval_recall

# 4 x 4 map holding 0..15 row by row, shifted and scaled so that the evaluator's min-max
# normalisation has work to do: normalised it is v / 15 for v = 0..15.
RAMP = 2.0 * np.arange(16, dtype=np.float64).reshape(4, 4) - 7.0
GT_ROWS_1_2 = np.zeros((4, 4))
GT_ROWS_1_2[1:3] = 1.0


def test_median_threshold_uses_index_floor_hw_over_2():
    # sorted[16 // 2] = 8 / 15, so values 8..15 (rows 2, 3) are positive.
    # intersection: row 2 = 4; sum(gt) = 8; false positives: row 3 = 4 -> 4 / 12.
    # (Index 7 would also take pixel 7 in row 1 and give 5 / 12.)
    ev = LocalizationEvaluator("median")
    assert ev.update(RAMP, GT_ROWS_1_2) == pytest.approx(1 / 3, abs=1e-12)


def test_fixed_threshold_on_normalised_map():
    # v / 15 >= 0.6 <=> v >= 9: pixels 9..15. In gt: 9, 10, 11 (3); outside gt: 12..15 (4).
    # cIoU = 3 / (8 + 4).
    ev = LocalizationEvaluator(0.6)
    assert ev.update(torch.from_numpy(RAMP), torch.from_numpy(GT_ROWS_1_2)) == pytest.approx(0.25, abs=1e-12)


def test_constant_map_is_left_as_it_is():
    # Median of a constant 0.3 map is 0.3: all 16 pixels positive -> 8 / (8 + 8).
    assert LocalizationEvaluator("median").update(np.full((4, 4), 0.3), GT_ROWS_1_2) == pytest.approx(0.5)
    # Not normalised to 0 (or NaN): 0.3 < 0.6 gives nothing, 0.7 >= 0.6 gives everything.
    assert LocalizationEvaluator(0.6).update(np.full((4, 4), 0.3), GT_ROWS_1_2) == 0.0
    assert LocalizationEvaluator(0.6).update(np.full((4, 4), 0.7), GT_ROWS_1_2) == pytest.approx(0.5)


def test_flickr_half_weights_in_gt():
    # gt: row 1 = 1, row 2 = 0.5. Median prediction: rows 2, 3.
    # intersection = 4 * 0.5 = 2; sum(gt) = 4 + 2 = 6; false positives only where
    # gt == 0, so row 3 = 4 (row 2 is not one) -> 2 / 10.
    gt = np.zeros((4, 4))
    gt[1], gt[2] = 1.0, 0.5
    assert LocalizationEvaluator().update(RAMP, gt) == pytest.approx(0.2, abs=1e-12)


def test_ap50_auc_mean_for_known_cious():
    ev = LocalizationEvaluator()
    ev.ciou = [0.1, 0.5, 0.72, 1.0]
    # Fraction with cIoU >= 0.05 i: i = 0..2 -> 1 (3 points), i = 3..10 -> 3/4 (8 points,
    # 0.05 * 10 == 0.5 exactly), i = 11..14 -> 1/2 (4), i = 15..20 -> 1/4 (6).
    # Trapezoid, spacing 0.05: 0.05 * (sum - (first + last) / 2)
    #   = 0.05 * (3 + 6 + 2 + 1.5 - (1 + 0.25) / 2) = 0.05 * 11.875 = 0.59375.
    summary = ev.summary()
    assert summary["ap50"] == 0.75
    assert summary["auc"] == pytest.approx(0.59375, abs=1e-12)
    assert summary["mean_ciou"] == pytest.approx(2.32 / 4, abs=1e-12)
    assert summary["n"] == 4


def test_auc_thresholds_are_ezvsl_products():
    # EZ-VSL compares with 0.05 * 3 = 0.15000000000000002, which a cIoU of 0.15 misses:
    # curve 1, 1, 1, 0, ..., 0 -> 0.05 * (3 - 1 / 2) = 0.125 (not 0.175).
    ev = LocalizationEvaluator()
    ev.ciou = [0.15]
    assert ev.summary()["auc"] == pytest.approx(0.125, abs=1e-12)


def test_localization_rejects_bad_input():
    ev = LocalizationEvaluator()
    with pytest.raises(ValueError, match="same shape"):
        ev.update(np.zeros((4, 4)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="no positive pixel"):
        ev.update(RAMP, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="gt must lie"):
        ev.update(RAMP, 2 * GT_ROWS_1_2)
    with pytest.raises(ValueError, match="threshold"):
        LocalizationEvaluator("mean")
    with pytest.raises(ValueError, match="at least one"):
        LocalizationEvaluator().summary()


def _unit(degrees: float, scale: float = 1.0) -> list[float]:
    return [scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))]


def test_retrieval_recall_hand_made():
    # Gallery at 0, 90, 180, 270 degrees with labels 0..3; the 90-degree item is 10x
    # longer, which cosine ignores (a dot product would put it first for query 0).
    gallery = torch.tensor([_unit(0), _unit(90, 10.0), _unit(180), _unit(270)])
    query = torch.tensor([_unit(10), _unit(95), _unit(175), _unit(280)])
    # q0 (label 1) ranks 0, 90, ... -> hit at rank 2; q1 (label 1) -> rank 1;
    # q2 (label 0) ranks 180, 90, 270, 0 -> rank 4; q3 (label 3) -> rank 1.
    recall = retrieval_recall(query, gallery, [1, 1, 0, 3], [0, 1, 2, 3], ks=(1, 2, 10))
    assert recall == {1: 0.5, 2: 0.75, 10: 1.0}  # 10 clamped to the 4 gallery items


def test_cross_modal_retrieval_directions():
    # Images at 0, 120, 240 degrees; audio at 0, 10, 240; labels 0, 1, 2.
    # a2i: audio 1 (10 deg) finds image 0 first -> R@1 = 2/3. i2a: image 1 (120 deg) is
    # nearest to audio 1 (110 deg away, the others 120) -> R@1 = 1. K >= 3 covers all.
    p_img = torch.tensor([_unit(0), _unit(120), _unit(240)])
    p_aud = torch.tensor([_unit(0), _unit(10), _unit(240)])
    result = cross_modal_retrieval(p_img, p_aud, torch.tensor([0, 1, 2]))
    assert result["r1_a2i"] == pytest.approx(2 / 3)
    assert result["r1_i2a"] == 1.0
    assert result["r5_a2i"] == result["r10_a2i"] == result["r5_i2a"] == result["r10_i2a"] == 1.0
    assert set(result) == {f"r{k}_{d}" for k in (1, 5, 10) for d in ("a2i", "i2a")}


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="one label per row"):
        retrieval_recall(torch.ones(3, 2), torch.ones(3, 2), [0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="N x d and M x d"):
        retrieval_recall(torch.ones(3, 2), torch.ones(3, 4), [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall(torch.ones(3, 2), torch.ones(3, 2), [0, 1, 2], [0, 1, 2], ks=(0,))


def test_segmentation_hand_computed():
    # Thresholds 0, 0.5, 1 - 1e-10.
    ev = SegmentationEvaluator(num_thresholds=3)
    pred = torch.tensor([[[0.9, 0.2], [0.5, 0.0]], [[1.0, 0.6], [0.2, 0.3]], [[0.7, 0.2], [0.1, 0.0]]])
    gt = torch.tensor([[[1, 0], [1, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    ev.update(pred, gt)
    # IoU (pred > 0.5): A {00} (0.5 is not > 0.5) vs {00, 10} = 1/2; B {00, 01} vs {00}
    # = 1/2; C has an empty mask: both-background pixels 3 of 4 = 3/4.
    # F = 1.3 P R / (0.3 P + R) per sample, C left out:
    #   t = 0:   A: P = 1/2, R = 1 -> 0.65 / 1.15;  B: P = 1/4, R = 1 -> 0.325 / 1.075
    #   t = 0.5: A: P = R = 1 -> 1;                 B: P = 1/2, R = 1 -> 0.65 / 1.15
    #   t ~ 1:   A: nothing predicted -> 0;         B: P = R = 1 -> 1
    # mean F: 0.434, (1 + 0.65 / 1.15) / 2 = 18 / 23, 0.5 -> max 18 / 23.
    # (F of the mean P and R would give 0.796; the mean of per-sample maxima 1.)
    summary = ev.summary()
    assert summary["miou"] == pytest.approx((0.5 + 0.5 + 0.75) / 3, abs=1e-12)
    assert summary["fscore"] == pytest.approx(18 / 23, abs=1e-12)


def test_segmentation_does_not_depend_on_batching():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(16, 8, 8, generator=gen)
    gt = (torch.rand(16, 8, 8, generator=gen) > 0.6).float()
    gt[3] = 0  # an empty mask, scored by IoU only
    whole, single = SegmentationEvaluator(), SegmentationEvaluator()
    whole.update(pred, gt)
    for p, g in zip(pred, gt):
        single.update(p.numpy(), g.numpy())
    assert whole.summary() == single.summary()
    assert len(single.iou) == 16


def test_segmentation_rejects_bad_input():
    ev = SegmentationEvaluator()
    with pytest.raises(ValueError, match="pred must lie"):
        ev.update(torch.full((2, 2), 1.5), torch.ones(2, 2))
    with pytest.raises(ValueError, match="binary"):
        ev.update(torch.zeros(2, 2), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="same shape|B x H x W"):
        ev.update(torch.zeros(2, 2), torch.zeros(1, 2, 2))
