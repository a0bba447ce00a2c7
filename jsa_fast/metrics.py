"""Evaluation metrics: localisation (cIoU, AP50, AUC), retrieval (Recall@K), AVSBench
segmentation (mIoU, F-score).

Localisation follows the field's evaluator, EZ-VSL (stoneMo/EZ-VSL, ``utils.py``
``Evaluator`` and ``test.py``): the map is min-max normalised (a constant map is left as
it is), binarised at ``pred >= threshold`` where the median threshold is
``sort(map.flatten())[int(H * W * 0.5)]``, and
``cIoU = sum(pred * gt) / (sum(gt) + sum(pred * (gt == 0)))``. AP50 is the fraction of
samples with cIoU >= 0.5; AUC is ``sklearn.metrics.auc`` (a trapezoid) of the fraction
of samples with cIoU >= 0.05 * i over the 21 points 0.05 * i, i = 0..20.

Segmentation follows AVSBench (OpenNLPLab/AVSBench, ``avs_scripts/avs_s4/utils/utility.py``
``mask_iou``, ``_eval_pr``, ``Eval_Fmeasure``), applied to maps already in [0, 1]
instead of logits; see ``SegmentationEvaluator``.

The maps these score are made in `jsa_fast.maps`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from jsa_fast.maps import UPSAMPLE_MODES, minmax_normalize, upsample_map

ArrayLike = np.ndarray | torch.Tensor

# EZ-VSL computes its thresholds as 0.05 * i; the same products keep ties (e.g. a cIoU
# of exactly 0.15 against 0.15000000000000002) decided as the published evaluator does.
AUC_THRESHOLDS = 0.05 * np.arange(21)
FSCORE_BETA2 = 0.3


def _as_float(x: ArrayLike, name: str) -> torch.Tensor:
    """A CPU copy of a numpy array or torch tensor, checked to be finite.

    float32 and float64 keep their precision, so that a float32 map is normalised and
    thresholded exactly as EZ-VSL does (in float32: ties at the median depend on it);
    half types become float32, integers and bools float64.
    """
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    t = torch.as_tensor(x).detach().cpu()
    if t.dtype != torch.float64:
        t = t.to(torch.float32 if t.is_floating_point() else torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds non-finite values")
    return t


class LocalizationEvaluator:
    """cIoU per sample; AP50, AUC and mean cIoU over the data set (EZ-VSL's definitions).

    threshold: "median" (the median of each normalised map) or a fixed number (the
    released JSA code uses 0.6). upsample: None (pred must have gt's shape) or a mode of
    `upsample_map` ("bilinear": the field's, "bicubic": the released code's) in which a
    pred of another shape, e.g. the 7 x 7 token grid, is brought to gt's shape first.
    Per-sample cIoUs are kept in ``self.ciou``, the fractions of pixels predicted
    positive (the released code's "infer ratio") in ``self.area``.
    """

    def __init__(self, threshold: Literal["median"] | float = "median", upsample: str | None = None) -> None:
        is_number = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
        if threshold != "median" and not (is_number and np.isfinite(threshold)):
            raise ValueError(f"threshold must be 'median' or a finite number, got {threshold!r}")
        if upsample is not None and upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be None or one of {sorted(UPSAMPLE_MODES)}, got {upsample!r}")
        self.threshold = threshold
        self.upsample = upsample
        self.ciou: list[float] = []
        self.area: list[float] = []

    def update(self, pred: ArrayLike, gt: ArrayLike) -> float:
        """Score one sample and return its cIoU.

        pred: H x W map, any range (min-max normalised here; with `upsample`, any h x w
        map, upsampled to H x W first). gt: H x W in [0, 1] (Flickr consensus maps hold
        0, 0.5, 1) with at least one positive pixel.
        """
        pred_t, gt_t = _as_float(pred, "pred"), _as_float(gt, "gt").double()
        if self.upsample is not None and pred_t.dim() == 2 == gt_t.dim() and pred_t.shape != gt_t.shape:
            pred_t = upsample_map(pred_t, tuple(gt_t.shape), self.upsample)
        if pred_t.dim() != 2 or pred_t.shape != gt_t.shape:
            raise ValueError(
                f"pred and gt must be H x W maps of the same shape, got "
                f"pred {tuple(pred_t.shape)} and gt {tuple(gt_t.shape)}"
            )
        if gt_t.min() < 0 or gt_t.max() > 1:
            raise ValueError(f"gt must lie in [0, 1], got [{gt_t.min().item()}, {gt_t.max().item()}]")
        if gt_t.sum() == 0:
            raise ValueError("gt has no positive pixel, so cIoU is undefined")
        norm = minmax_normalize(pred_t)
        if self.threshold == "median":
            cut = norm.flatten().sort().values[norm.numel() // 2]
        else:
            cut = self.threshold
        binary = (norm >= cut).to(torch.float64)
        ciou = (binary * gt_t).sum() / (gt_t.sum() + (binary * (gt_t == 0)).sum())
        self.ciou.append(ciou.item())
        self.area.append(binary.mean().item())
        return self.ciou[-1]

    def summary(self) -> dict[str, float | int]:
        """{"ap50": fraction with cIoU >= 0.5, "auc": 21-point trapezoid area,
        "mean_ciou": mean cIoU, "n": number of samples}."""
        if not self.ciou:
            raise ValueError("summary() needs at least one update()")
        cious = np.asarray(self.ciou)
        success = np.array([np.mean(cious >= t) for t in AUC_THRESHOLDS])
        return {
            "ap50": float(np.mean(cious >= 0.5)),
            "auc": float(np.trapezoid(success, AUC_THRESHOLDS)),
            "mean_ciou": float(np.mean(cious)),
            "n": len(self.ciou),
        }


def _label_array(labels: Sequence | ArrayLike, name: str) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one label per row, got shape {array.shape}")
    return array


def first_match_ranks(
    query: ArrayLike, gallery: ArrayLike, query_labels: Sequence | ArrayLike, gallery_labels: Sequence | ArrayLike
) -> np.ndarray:
    """For each query, the rank (1-based) of the first same-label item in the gallery,
    ranked by cosine similarity to the query (descending, ties to the lower index); 0
    when the gallery holds no item of its label.

    query: N x d, gallery: M x d; labels: one int (or string) per row. Returns N ints.
    """
    q, g = _as_float(query, "query").double(), _as_float(gallery, "gallery").double()
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(
            f"query and gallery must be N x d and M x d (M >= 1), got {tuple(q.shape)} and {tuple(g.shape)}"
        )
    q_labels = _label_array(query_labels, "query_labels")
    g_labels = _label_array(gallery_labels, "gallery_labels")
    if len(q_labels) != q.shape[0] or len(g_labels) != g.shape[0]:
        raise ValueError(
            f"need one label per row: {len(q_labels)} query_labels for {q.shape[0]} "
            f"queries, {len(g_labels)} gallery_labels for {g.shape[0]} items"
        )
    similarity = F.normalize(q, dim=1) @ F.normalize(g, dim=1).T
    ranking = torch.argsort(similarity, dim=1, descending=True, stable=True).numpy()
    same_label = g_labels[ranking] == q_labels[:, None]  # N x M, in ranked order
    return np.where(same_label.any(axis=1), same_label.argmax(axis=1) + 1, 0)


def recall_at(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@K from `first_match_ranks`: the fraction of queries whose first same-label
    item ranks within the top K (a K beyond the gallery takes all of it)."""
    if not all(isinstance(k, numbers.Integral) and k >= 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    if len(ranks) == 0:
        raise ValueError("recall_at needs the ranks of at least one query")
    found = ranks > 0
    return {k: float(np.mean(found & (ranks <= k))) for k in ks}


def retrieval_recall(
    query: ArrayLike,
    gallery: ArrayLike,
    query_labels: Sequence | ArrayLike,
    gallery_labels: Sequence | ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Recall@K: the fraction of queries with a same-label item among their top K.

    query: N x d, gallery: M x d; the gallery is ranked by cosine similarity to each
    query (descending, ties to the lower index). Labels: one int (or string) per row.
    K larger than M is clamped to M. Returns {k: fraction} for each k in ks.
    """
    return recall_at(first_match_ranks(query, gallery, query_labels, gallery_labels), ks)


def cross_modal_retrieval(
    p_img: ArrayLike, p_aud: ArrayLike, labels: Sequence | ArrayLike, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K both ways between paired image and audio target representations (N x d
    each). Returns {"r{k}_a2i": ..., "r{k}_i2a": ...}; a2i ranks images for audio queries.
    """
    a2i = retrieval_recall(p_aud, p_img, labels, labels, ks)
    i2a = retrieval_recall(p_img, p_aud, labels, labels, ks)
    return {**{f"r{k}_a2i": v for k, v in a2i.items()}, **{f"r{k}_i2a": v for k, v in i2a.items()}}


class SegmentationEvaluator:
    """AVSBench mIoU and F-score (beta^2 = 0.3), accumulated over the whole data set.

    AVSBench scores logits after a sigmoid; here pred is a map already in [0, 1]
    (min-max normalised), so the same cut points apply to it directly: mIoU binarises
    at pred > 0.5 (AVSBench's ``sigmoid(logit) > 0.5``), and the F-score sweeps
    ``pred >= t`` over num_thresholds points linspace(0, 1 - 1e-10). As in AVSBench,
    a sample whose mask is empty scores IoU = (pixels where both are background) /
    (all pixels), and is left out of the F-score. The F-score is AVSBench's: per-sample
    F at each threshold, averaged over samples, maximum over thresholds. AVSBench
    averages that per batch and then over batches; here it is averaged over all
    samples at once, so the result does not depend on the batching.
    """

    def __init__(self, num_thresholds: int = 255) -> None:
        if not (isinstance(num_thresholds, numbers.Integral) and num_thresholds >= 2):
            raise ValueError(f"num_thresholds must be an int >= 2, got {num_thresholds!r}")
        self.thresholds = torch.linspace(0, 1 - 1e-10, num_thresholds, dtype=torch.float64)
        self.iou: list[float] = []
        self._f_curves: list[torch.Tensor] = []  # per update: (samples with a mask) x T

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """pred: B x H x W or H x W maps in [0, 1]; gt: binary masks of the same shape."""
        p, g = _as_float(pred, "pred").double(), _as_float(gt, "gt")
        if p.dim() not in (2, 3) or p.shape != g.shape:
            raise ValueError(
                f"pred and gt must both be H x W or B x H x W, got pred {tuple(p.shape)} and gt {tuple(g.shape)}"
            )
        if p.min() < 0 or p.max() > 1:
            raise ValueError(f"pred must lie in [0, 1], got [{p.min().item()}, {p.max().item()}]")
        if not ((g == 0) | (g == 1)).all():
            raise ValueError("gt must be a binary mask holding only 0 and 1")
        p, g = p.reshape(-1, p.shape[-2] * p.shape[-1]), g.reshape(-1, g.shape[-2] * g.shape[-1]) > 0
        num_pixels = p.shape[1]
        fg = p > 0.5
        empty = ~g.any(dim=1)
        inter = torch.where(empty, (~fg & ~g).sum(1), (fg & g).sum(1))
        union = torch.where(empty, num_pixels, (fg | g).sum(1))  # never 0
        self.iou.extend((inter / union).tolist())

        # Counts of pixels >= each threshold, from sorted rows; background pixels of the
        # mask are moved below every threshold to count the true positives.
        thresholds = self.thresholds.expand(p.shape[0], -1).contiguous()
        predicted = num_pixels - torch.searchsorted(p.sort(dim=1).values, thresholds)
        masked = torch.where(g, p, torch.full_like(p, -1.0)).sort(dim=1).values
        true_pos = (num_pixels - torch.searchsorted(masked, thresholds)).to(torch.float64)
        precision = true_pos / (predicted + 1e-20)
        recall = true_pos / (g.sum(1, keepdim=True) + 1e-20)
        denom = FSCORE_BETA2 * precision + recall
        fscore = torch.where(denom > 0, (1 + FSCORE_BETA2) * precision * recall / denom, 0.0)
        self._f_curves.append(fscore[~empty])

    def summary(self) -> dict[str, float]:
        """{"miou": mean IoU over samples, "fscore": max over thresholds of the mean F}.

        fscore is 0 when no sample has a non-empty mask (AVSBench's value).
        """
        if not self.iou:
            raise ValueError("summary() needs at least one update()")
        curves = torch.cat(self._f_curves)
        fscore = curves.mean(dim=0).max().item() if len(curves) else 0.0
        return {"miou": float(np.mean(self.iou)), "fscore": fscore}
