"""Metrics against hand-computed values (EZ-VSL localisation, retrieval, AVSBench)."""

import math

import numpy as np
import pytest
import torch

from jsa_fast.maps import upsample_map
from jsa_fast.metrics import (
    LocalizationEvaluator,
    SegmentationEvaluator,
    cross_modal_retrieval,
    first_match_ranks,
    recall_at,
    retrieval_recall,
)

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
    # Not only the evaluator against itself: both equal AVSBench's definition written out
    # sample by sample (_avsbench_by_hand, below).
    miou, fscore = _avsbench_by_hand(pred.numpy(), gt.numpy())
    assert whole.summary() == {"miou": pytest.approx(miou, abs=MIOU_ATOL), "fscore": pytest.approx(fscore, abs=F_ATOL)}


def test_segmentation_rejects_bad_input():
    ev = SegmentationEvaluator()
    with pytest.raises(ValueError, match="pred must lie"):
        ev.update(torch.full((2, 2), 1.5), torch.ones(2, 2))
    with pytest.raises(ValueError, match="binary"):
        ev.update(torch.zeros(2, 2), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="same shape|B x H x W"):
        ev.update(torch.zeros(2, 2), torch.zeros(1, 2, 2))


# ----------------------------------------------------------------------------------
# Issue #24: maps that are not square, the defaults evaluate runs with, partial recall,
# retrieval without a same-class item and with ties, float64 and half inputs, each
# against values computed by hand or by a slow implementation written out here.
# ----------------------------------------------------------------------------------

# 4 x 6 map holding 0..23 row by row (normalised: v / 23); gt: the last two columns.
RAMP_4X6 = np.arange(24, dtype=np.float64).reshape(4, 6)
GT_COLUMNS_4_5 = np.zeros((4, 6))
GT_COLUMNS_4_5[:, 4:] = 1.0


def test_localization_non_square_median_and_area():
    # sorted[24 // 2] = 12 / 23: rows 2 and 3 (12 pixels) are positive. In gt: 4 of them
    # (columns 4, 5 of rows 2, 3); sum(gt) = 8; false positives 12 - 4 = 8 -> 4 / 16.
    ev = LocalizationEvaluator()
    assert ev.update(RAMP_4X6, GT_COLUMNS_4_5) == pytest.approx(0.25, abs=1e-12)
    assert ev.area == [0.5]
    # Transposed map and gt (6 x 4): the same pixels, the same score.
    assert ev.update(RAMP_4X6.T, GT_COLUMNS_4_5.T) == pytest.approx(0.25, abs=1e-12)
    # Fixed 0.6: v / 23 >= 0.6 <=> v >= 13.8: 10 pixels (14..23), 4 of them in gt.
    fixed = LocalizationEvaluator(0.6)
    assert fixed.update(RAMP_4X6, GT_COLUMNS_4_5) == pytest.approx(4 / (8 + 6), abs=1e-12)
    assert fixed.area == [pytest.approx(10 / 24, abs=1e-15)]


def test_localization_upsamples_a_non_square_grid_to_the_gt_shape():
    # 2 x 3 grid v = 3 r + c to a 3 x 5 gt (bilinear, align_corners=True): output (i, j)
    # samples (i / 2, j / 2), so its value is 3 i / 2 + j / 2 (all exact in float32):
    #   [0, .5, 1, 1.5, 2], [1.5, 2, 2.5, 3, 3.5], [3, 3.5, 4, 4.5, 5].
    # Sorted, index 15 // 2 = 7 holds 2.5: the 8 pixels >= 2.5 are positive. gt = the
    # last row (5 pixels, all positive) -> 5 / (5 + 3); area 8 / 15.
    grid = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    gt = torch.zeros(3, 5)
    gt[2] = 1
    ev = LocalizationEvaluator(upsample="bilinear")
    assert ev.update(grid, gt) == pytest.approx(5 / 8, abs=1e-12)
    assert ev.area == [pytest.approx(8 / 15, abs=1e-15)]
    # Upsampled the other way round (H and W swapped), the grid would not fit the gt.
    assert ev.update(grid.T, gt.T) == pytest.approx(5 / 8, abs=1e-12)
    # Bicubic (the released code's): as scoring the map upsampled first in that mode
    # (`upsample_map` is checked against a slow bicubic in test_maps.py). A fixed cut, as
    # the median makes every area about one half.
    gen = torch.Generator().manual_seed(21)
    coarse, mask = torch.rand(3, 4, generator=gen), (torch.rand(7, 5, generator=gen) > 0.5).float()
    scores = {}
    for mode in ("bicubic", "bilinear"):
        ev_mode, ev_first = LocalizationEvaluator(0.6, upsample=mode), LocalizationEvaluator(0.6)
        scores[mode] = (ev_mode.update(coarse, mask), ev_mode.area[0])
        assert scores[mode] == (ev_first.update(upsample_map(coarse, (7, 5), mode), mask), ev_first.area[0])
    assert scores["bicubic"] != scores["bilinear"]  # the modes make different maps here
    # A pred of gt's shape is scored as it is; only H x W maps are upsampled.
    assert ev.update(RAMP_4X6, GT_COLUMNS_4_5) == pytest.approx(0.25, abs=1e-12)
    with pytest.raises(ValueError, match="H x W maps"):
        ev.update(torch.zeros(1, 2, 3), gt)
    with pytest.raises(ValueError, match="H x W maps"):
        LocalizationEvaluator().update(grid, gt)  # no upsample: shapes must agree


def test_localization_float64_keeps_its_precision_and_half_becomes_float32():
    # 1 + v 1e-9: distinct in float64 (the ramp, cIoU 1 / 4), one constant in float32
    # (spacing 1.2e-7 near 1): all 24 pixels positive -> 8 / (8 + 16).
    fine = 1.0 + 1e-9 * RAMP_4X6
    assert LocalizationEvaluator().update(fine, GT_COLUMNS_4_5) == pytest.approx(0.25, abs=1e-12)
    assert LocalizationEvaluator().update(fine.astype(np.float32), GT_COLUMNS_4_5) == pytest.approx(1 / 3, abs=1e-12)
    # float64 values beyond float32's range are scored, not turned into inf.
    assert LocalizationEvaluator().update(1e300 * RAMP_4X6, GT_COLUMNS_4_5) == pytest.approx(0.25, abs=1e-12)
    for dtype in (torch.float16, torch.bfloat16):
        # 0..23 are exact in both; the scores equal the float32 ones.
        ev = LocalizationEvaluator(0.6)
        assert ev.update(torch.from_numpy(RAMP_4X6).to(dtype), torch.from_numpy(GT_COLUMNS_4_5).to(dtype)) == (
            LocalizationEvaluator(0.6).update(RAMP_4X6.astype(np.float32), GT_COLUMNS_4_5)
        )
    # Integer and bool inputs are read as numbers.
    as_ints = LocalizationEvaluator().update(RAMP_4X6.astype(np.int64), GT_COLUMNS_4_5.astype(bool))
    assert as_ints == pytest.approx(0.25, abs=1e-12)


def test_localization_rejects_more_bad_input():
    with pytest.raises(ValueError, match="numpy array or a torch tensor"):
        LocalizationEvaluator().update(RAMP_4X6.tolist(), GT_COLUMNS_4_5)
    for bad in (np.nan, np.inf):
        pred = RAMP_4X6.copy()
        pred[1, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            LocalizationEvaluator().update(pred, GT_COLUMNS_4_5)
    with pytest.raises(ValueError, match="gt must lie"):
        LocalizationEvaluator().update(RAMP_4X6, -GT_COLUMNS_4_5)
    for threshold in (True, float("inf"), float("nan"), None, "0.6"):
        with pytest.raises(ValueError, match="threshold"):
            LocalizationEvaluator(threshold)
    for threshold in (0, 1, 0.6, np.float32(0.25)):
        assert LocalizationEvaluator(threshold).threshold == threshold
    with pytest.raises(ValueError, match="upsample"):
        LocalizationEvaluator(upsample="nearest")


def _ranks_by_hand(similarity: np.ndarray, query_labels, gallery_labels) -> list[int]:
    """For each query, scan the gallery by decreasing similarity, ties by index; 0 when
    no item has the query's label."""
    ranks = []
    for i, label in enumerate(query_labels):
        order = sorted(range(len(gallery_labels)), key=lambda j: (-similarity[i, j], j))
        ranks.append(next((r + 1 for r, j in enumerate(order) if gallery_labels[j] == label), 0))
    return ranks


def test_retrieval_query_without_a_same_class_item_is_a_miss_at_every_k():
    gallery = torch.tensor([_unit(0), _unit(90), _unit(180)])
    query = torch.tensor([_unit(5), _unit(85), _unit(200)])
    # q0 (label 1): 0 deg (label 0), then 90 (label 1) -> rank 2; q1 (label 9): no
    # item of label 9 -> 0; q2 (label 2): 180 is nearest -> rank 1.
    ranks = first_match_ranks(query, gallery, [1, 9, 2], [0, 1, 2])
    assert ranks.tolist() == [2, 0, 1]
    # q1 is a miss at every K, K beyond the 3 items included.
    assert recall_at(ranks, ks=(1, 2, 3, 50)) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3, 50: 2 / 3}
    assert retrieval_recall(query, gallery, [1, 9, 2], [0, 1, 2], ks=(1, 50)) == {1: 1 / 3, 50: 2 / 3}
    assert recall_at(np.array([0, 0]), ks=(1,)) == {1: 0.0}


def test_retrieval_ties_go_to_the_lower_index():
    # Items 0 and 1 point the same way (cosine ties whatever their lengths), so do 2 and 3.
    gallery = torch.tensor([_unit(0), _unit(0, 3.0), _unit(90, 2.0), _unit(90)])
    gallery_labels = [5, 7, 7, 5]
    query = torch.tensor([_unit(0), _unit(0), _unit(90), _unit(90), _unit(45)])
    # q0 (7): item 0 (5) first, then 1 -> 2. q1 (5): item 0 -> 1. q2 (5): item 2 (7),
    # then 3 -> 2. q3 (7): 1. q4 (5) at 45 deg ties all four: 0 (label 5) -> 1.
    query_labels = [7, 5, 5, 7, 5]
    ranks = first_match_ranks(query, gallery, query_labels, gallery_labels)
    assert ranks.tolist() == [2, 1, 2, 1, 1]
    # A larger tie, where an unstable sort could reorder: 200 identical items, the first
    # of label 1 at index 137.
    many = torch.ones(200, 3)
    labels = np.zeros(200, dtype=np.int64)
    labels[[137, 150, 199]] = 1
    assert first_match_ranks(torch.ones(1, 3), many, [1], labels).tolist() == [138]
    # Against the slow ranking on random rows with repeated directions (many ties).
    # Rows of 4 entries +-1 among 8, times powers of two: their norms are powers of two,
    # normalised entries +-1/2, so every cosine (a multiple of 1/4) is exact and equal
    # cosines are exact ties in any order of summation.
    gen = torch.Generator().manual_seed(22)
    patterns = torch.zeros(6, 8, dtype=torch.float64)
    for row in patterns:
        row[torch.randperm(8, generator=gen)[:4]] = torch.randint(0, 2, (4,), generator=gen).double() * 2 - 1
    scales = 2.0 ** torch.randint(-2, 3, (30, 1), generator=gen)
    gal = patterns[torch.randint(0, 6, (30,), generator=gen)] * scales
    qry = patterns[torch.randint(0, 6, (12,), generator=gen)]
    g_labels, q_labels = torch.randint(0, 5, (30,), generator=gen), torch.randint(0, 6, (12,), generator=gen)
    similarity = ((qry / 2) @ (gal / gal.norm(dim=1, keepdim=True)).T).numpy()
    assert np.array_equal(similarity * 4, np.round(similarity * 4))  # exact quarters
    expected = _ranks_by_hand(similarity, q_labels.tolist(), g_labels.tolist())
    assert first_match_ranks(qry, gal, q_labels, g_labels).tolist() == expected
    assert 0 in expected  # label 5 has no gallery item: some query misses


def test_retrieval_float64_precision_is_kept():
    # g0 and g1 differ by 1e-12 in one entry: equal in float32 (a tie: g0, label 0,
    # first), distinct in float64, where g1 (label 1) is nearer to q -> rank 1.
    gallery = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 1e-12]], dtype=torch.float64)
    query = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    assert first_match_ranks(query, gallery, [1], [0, 1]).tolist() == [1]
    assert first_match_ranks(query.float(), gallery.float(), [1], [0, 1]).tolist() == [2]
    # Half types are read as float32 (their values exactly).
    for dtype in (torch.float16, torch.bfloat16):
        q, g = torch.tensor([[1.0, 0.5]], dtype=dtype), torch.tensor([[1.0, 0.0], [0.5, 0.25]], dtype=dtype)
        assert first_match_ranks(q, g, [3], [3, 4]).tolist() == [2]  # g1 is parallel to q
    # float64 rows past float32's range are fine; labels may be strings, or a tensor
    # straight from a model.
    big = torch.tensor([[1e100, 0.0], [0.0, 1e100]], dtype=torch.float64)
    assert first_match_ranks(big, big, ["a", "b"], ["b", "a"]).tolist() == [2, 2]
    labels = torch.tensor([0.0, 1.0], requires_grad=True)
    assert first_match_ranks(big, big, labels, labels).tolist() == [1, 1]


def test_retrieval_rejects_more_bad_input():
    with pytest.raises(ValueError, match="N x d and M x d"):
        retrieval_recall(torch.ones(3), torch.ones(3, 2), [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="N x d and M x d"):
        retrieval_recall(torch.ones(3, 2), torch.ones(0, 2), [0, 1, 2], [])
    with pytest.raises(ValueError, match="one label per row"):
        retrieval_recall(torch.ones(3, 2), torch.ones(3, 2), [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="one label per row"):
        retrieval_recall(torch.ones(2, 2), torch.ones(2, 2), [[0], [1]], [0, 1])
    with pytest.raises(ValueError, match="numpy array or a torch tensor"):
        retrieval_recall([[1.0, 0.0]], torch.ones(1, 2), [0], [0])
    for ks in ((1, 2.5), (-1,), ("1",)):
        with pytest.raises(ValueError, match="ks"):
            recall_at(np.array([1]), ks)
    with pytest.raises(ValueError, match="at least one query"):
        recall_at(np.array([], dtype=np.int64))
    # The default K: 1, 5 and 10.
    assert recall_at(np.array([1, 5, 6, 10, 11, 0])) == {1: 1 / 6, 5: 2 / 6, 10: 4 / 6}
    assert retrieval_recall(torch.ones(1, 2), torch.ones(1, 2), [0], [0]) == {1: 1.0, 5: 1.0, 10: 1.0}


def _avsbench_by_hand(preds, gts, num_thresholds=255):
    """AVSBench's mask_iou and Eval_Fmeasure (_eval_pr) written out sample by sample and
    threshold by threshold in float64: (mIoU, F-score). Threshold i is
    i (1 - 1e-10) / (num_thresholds - 1); beta^2 = 0.3; a sample with an empty mask has
    IoU = (background in both) / (all pixels) and no F; F-score = max over thresholds of
    the mean over samples of F."""
    ious, curves = [], []
    for p, g in zip(preds, gts):
        p, g = np.asarray(p, dtype=np.float64), np.asarray(g) > 0
        fg = p > 0.5
        ious.append((fg & g).sum() / (fg | g).sum() if g.any() else (~fg & ~g).sum() / g.size)
        if not g.any():
            continue
        curve = []
        for i in range(num_thresholds):
            predicted = p >= i * (1 - 1e-10) / (num_thresholds - 1)
            tp = (predicted & g).sum()
            precision, recall = tp / (predicted.sum() + 1e-20), tp / (g.sum() + 1e-20)
            denom = 0.3 * precision + recall
            curve.append(1.3 * precision * recall / denom if denom > 0 else 0.0)
        curves.append(curve)
    return float(np.mean(ious)), float(np.max(np.mean(curves, axis=0))) if curves else 0.0


# Tolerances against _avsbench_by_hand. F: both sides divide the same integer counts in
# float64 and average <= 40 samples, each step within 2^-53 relative of values <= 1:
# below 1e-14, so 1e-12. mIoU: the evaluator divides int64 counts with torch's true
# division, whose result is float32 (2^-24 relative, 6e-8): 1e-7.
F_ATOL, MIOU_ATOL = 1e-12, 1e-7

# 3 x 4 sample (H != W) whose best F has precision and recall both below 1:
#   gt fg = (0, 0), (0, 1), (1, 1); by decreasing pred: 0.9 bg, 0.8 bg, 0.7 fg, 0.6 fg,
#   0.45 bg, ... For a threshold in (0.45, 0.6]: 4 predicted, 2 true -> P = 1/2, R = 2/3,
#   F = 1.3 (1/3) / (0.15 + 2/3) = 26/49. Other cuts: 3 predicted -> 1/3; 5 -> P = 2/5,
#   R = 2/3 -> 52/118; all 12 -> P = 1/4, R = 1 -> 13/43; the three fg need all of
#   them down to 0.2 (9 predicted) -> P = 1/3, R = 1 -> 13/33. Max 26/49 ~ 0.531.
#   IoU at pred > 0.5: predicted {0.9, 0.8, 0.7, 0.6}, 2 in gt; union 4 + 3 - 2 -> 2/5.
PARTIAL_PRED = [[0.7, 0.2, 0.9, 0.1], [0.0, 0.6, 0.8, 0.3], [0.4, 0.1, 0.2, 0.45]]
PARTIAL_GT = [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("num_thresholds", [3, 255])
def test_segmentation_partial_recall_non_square(num_thresholds):
    ev = SegmentationEvaluator(num_thresholds)
    ev.update(torch.tensor(PARTIAL_PRED), torch.tensor(PARTIAL_GT))
    assert ev.summary() == {"miou": pytest.approx(0.4, abs=MIOU_ATOL), "fscore": pytest.approx(26 / 49, abs=F_ATOL)}
    # Transposed (4 x 3): the same pixels, the same scores.
    transposed = SegmentationEvaluator(num_thresholds)
    transposed.update(torch.tensor(PARTIAL_PRED).T[None], torch.tensor(PARTIAL_GT).T[None])
    assert transposed.summary() == ev.summary()
    assert ev.summary()["fscore"] == pytest.approx(_avsbench_by_hand([PARTIAL_PRED], [PARTIAL_GT], num_thresholds)[1])


def test_segmentation_defaults_are_avsbench_255_thresholds_and_beta2_03():
    # Two pixels: background 0.00393, foreground 0.00394. The default grid's threshold 1 is
    # (1 - 1e-10) / 254 = 0.0039370 (between them): P = R = 1 there -> F = 1. With 256
    # thresholds the grid steps from 1/255 = 0.0039216 (below both: F = 1.3 * 0.5 /
    # (0.15 + 1) = 13/23) to 2/255 (above both: 0), with 254 from 0 to 1/253 = 0.0039526.
    pred, gt = torch.tensor([[0.00393, 0.00394]], dtype=torch.float64), torch.tensor([[0, 1]])
    results = {}
    for n in (None, 254, 255, 256):
        ev = SegmentationEvaluator() if n is None else SegmentationEvaluator(n)
        ev.update(pred, gt)
        results[n] = ev.summary()["fscore"]
    assert results == {None: 1.0, 254: pytest.approx(13 / 23), 255: 1.0, 256: pytest.approx(13 / 23)}
    # beta^2 = 0.3: F of P = 1/2, R = 1 is 1.3 * 0.5 / (0.3 * 0.5 + 1) = 13/23 (beta^2 = 1
    # would give 2/3). One pixel of each at 0.5: every threshold up to 0.5 takes both.
    ev = SegmentationEvaluator()
    ev.update(torch.tensor([[0.5, 0.5]]), torch.tensor([[1, 0]]))
    assert ev.summary()["fscore"] == pytest.approx(13 / 23, abs=F_ATOL)


def test_segmentation_last_threshold_is_one_minus_1e10():
    # A foreground pixel at 1.0 is still predicted at the last threshold (1 - 1e-10), where
    # the background pixel at 0.9999 is not: F = 1. A foreground pixel at 1 - 1.5e-10
    # (float64) is below it: the best cut keeps both pixels, F = 13/23.
    for fg_value, expected in ((1.0, 1.0), (1 - 1.5e-10, 13 / 23)):
        ev = SegmentationEvaluator()
        ev.update(torch.tensor([[0.9999, fg_value]], dtype=torch.float64), torch.tensor([[0, 1]]))
        assert ev.summary()["fscore"] == pytest.approx(expected, abs=F_ATOL)


def test_segmentation_random_non_square_batches_against_avsbench_by_hand():
    gen = torch.Generator().manual_seed(23)
    pred = torch.rand(12, 5, 7, generator=gen)
    gt = (torch.rand(12, 5, 7, generator=gen) > 0.7).long()
    gt[[2, 9]] = 0  # empty masks: IoU of the background, no F
    pred[4] = 0.5  # a constant map at the mIoU cut
    miou, fscore = _avsbench_by_hand(pred.numpy(), gt.numpy())
    for dtype in (torch.float32, torch.float64):
        ev = SegmentationEvaluator()
        ev.update(pred[:5].to(dtype), gt[:5])
        ev.update(pred[5].to(dtype), gt[5])  # one H x W map
        ev.update(pred[6:].to(dtype).numpy(), gt[6:].numpy())
        summary = ev.summary()
        assert len(ev.iou) == 12
        assert summary["miou"] == pytest.approx(miou, abs=MIOU_ATOL)
        assert summary["fscore"] == pytest.approx(fscore, abs=F_ATOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_segmentation_half_inputs_are_scored_at_their_values(dtype):
    gen = torch.Generator().manual_seed(24)
    pred = torch.rand(4, 3, 5, generator=gen).to(dtype)
    gt = (torch.rand(4, 3, 5, generator=gen) > 0.5).to(dtype)
    ev = SegmentationEvaluator()
    ev.update(pred, gt)
    miou, fscore = _avsbench_by_hand(pred.double().numpy(), gt.double().numpy())
    assert ev.summary() == {"miou": pytest.approx(miou, abs=MIOU_ATOL), "fscore": pytest.approx(fscore, abs=F_ATOL)}


def test_segmentation_without_any_mask_scores_f_zero():
    # Every mask empty: no F (AVSBench's 0); IoU = background in both / all pixels:
    # [0.2, 0.7, 0.1] -> 2/3, [0.6, 0.9] x 2 rows... -> 0 of 4 below the cut -> 0.
    ev = SegmentationEvaluator()
    ev.update(torch.tensor([[0.2, 0.7, 0.1]]), torch.zeros(1, 3))
    ev.update(torch.tensor([[[0.6, 0.9], [0.51, 1.0]]]), torch.zeros(1, 2, 2))
    assert ev.summary() == {"miou": pytest.approx(1 / 3, abs=MIOU_ATOL), "fscore": 0.0}


def test_segmentation_rejects_more_bad_input():
    ev = SegmentationEvaluator()
    # One pixel out of [0, 1] among valid ones, below or above.
    for bad in (-0.25, 1.25):
        with pytest.raises(ValueError, match="pred must lie"):
            ev.update(torch.tensor([[0.5, bad, 0.0], [1.0, 0.5, 0.5]]), torch.ones(2, 3))
    with pytest.raises(ValueError, match="B x H x W"):
        ev.update(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3))
    with pytest.raises(ValueError, match="B x H x W"):
        ev.update(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="B x H x W"):
        ev.update(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="non-finite"):
        ev.update(torch.full((2, 3), float("nan")), torch.ones(2, 3))
    for bad in (1, 0, 2.0, "255"):
        with pytest.raises(ValueError, match="num_thresholds"):
            SegmentationEvaluator(bad)
    two = SegmentationEvaluator(2)  # thresholds 0 and 1 - 1e-10
    two.update(torch.tensor([[0.3, 1.0]]), torch.tensor([[0, 1]]))
    assert two.summary()["fscore"] == 1.0
    with pytest.raises(ValueError, match="at least one"):
        SegmentationEvaluator().summary()
