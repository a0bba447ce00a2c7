"""The training objective L_total = L_ctr + l1 L_match + l2 L_div + l3 L_recon (paper eq. 11).

The terms themselves are the reference functions of `jsa_fast.reference`; this module
weights them and computes the false-negative mask with the fastest available op. Under
data parallelism the contrastive term and the mask take the whole global batch (see
`jsa_fast.distributed`).

With T target and O off-target slots (docs/model.md "Target and off-target slots"; the paper gives no formula,
this is ours) the contrastive term, the false-negative mask and retrieval take the target
representation (the mean of the T L2-normalised target slots), L_match averages over the
T target slots' maps, and L_div over the T x O (target, off-target) pairs. T = O = 1 is
the paper's objective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from jsa_fast.model import ModelOutput, target_embedding
from jsa_fast.ops import k_reciprocal_mask
from jsa_fast.reference import info_nce_loss, match_loss, reconstruction_loss
from jsa_fast.settings import check_fields, integer, number, one_of, setting

__all__ = ["LossConfig", "DIRECTIONS", "jsa_loss", "k_reciprocal_mask_unchecked", "target_divergence"]

DIRECTIONS = ("sum", "mean")  # how the two InfoNCE directions combine


@dataclass(frozen=True)
class LossConfig:
    """Loss hyper-parameters; defaults are the paper's (docs/model.md).

    directions: "sum" adds the two InfoNCE directions (eq. 7, the released code),
    "mean" averages them. k: 0 disables false-negative mitigation.
    """

    tau: float = setting(0.03, "InfoNCE temperature", number(0, include_low=False))
    k: int = setting(20, "k-reciprocal neighbours of the false-negative mask (0: no mitigation)", integer(0))
    weight_match: float = setting(100.0, "weight of L_match", number(0))
    weight_div: float = setting(0.1, "weight of L_div", number(0))
    weight_recon: float = setting(0.1, "weight of L_recon", number(0))
    directions: str = setting("sum", "InfoNCE directions: sum (the released code) or mean", one_of(DIRECTIONS))

    def __post_init__(self) -> None:
        check_fields(self)


def target_divergence(slots: Tensor, targets: int) -> Tensor:
    """L_div of one modality: relu(cos(target slot, off-target slot)) averaged over the
    batch and the T x O (target, off-target) pairs. slots: B x S x d, the first `targets`
    of them targets. With T = O = 1 this is the paper's relu(cos(p, r)) (eq. 9)."""
    if not 1 <= targets < slots.shape[1]:
        raise ValueError(f"targets must be in [1, S - 1] = [1, {slots.shape[1] - 1}], got {targets!r}")
    z = F.normalize(slots, dim=-1)
    return (z[:, :targets] @ z[:, targets:].transpose(1, 2)).relu().mean()


def k_reciprocal_mask_unchecked(z_img: Tensor, z_aud: Tensor, k: int) -> Tensor:
    """`k_reciprocal_mask` without its finiteness check, a host read (a device sync every
    step on CUDA). A target slot that is not finite needs no check here: it makes L_ctr,
    and so the loss, not finite, which training detects (naming the step; under fp16 the
    scaler skips such a step, and training stops when skipped steps keep coming)."""
    return k_reciprocal_mask(z_img, z_aud, k, check_finite=False)


def jsa_loss(
    out: ModelOutput,
    cfg: LossConfig,
    *,
    gather: Callable[[Tensor], Tensor] | None = None,
    false_negative_mask: Callable[[Tensor, Tensor, int], Tensor] = k_reciprocal_mask_unchecked,
) -> dict[str, Tensor]:
    """All loss terms of one batch from the model's output (slots B x S x d, tokens and
    their reconstructions B x L x d, the T target slots' cross-modal maps B x L x T).

    gather: maps this process's b x d target slots to the global batch's B x d
    (`jsa_fast.distributed.gather_with_grad`); L_ctr and the false-negative mask R are then
    computed over the global batch, the other terms over the local one. None: b = B.
    false_negative_mask: the op computing R (the reference's, for benchmarks).
    Returns {"loss", "loss_ctr", "loss_match", "loss_div", "loss_recon"} (scalars).
    """
    jsa = out.jsa
    targets = out.target_ca_img.shape[-1]
    p_img, p_aud = target_embedding(jsa.slots_img, targets), target_embedding(jsa.slots_aud, targets)
    if gather is not None:
        p_img, p_aud = gather(p_img), gather(p_aud)
    false_negatives = None
    if cfg.k > 0:
        batch = p_img.shape[0]
        if cfg.k > batch:
            raise ValueError(f"LossConfig.k={cfg.k} exceeds the batch size {batch}; lower k or raise the batch size")
        false_negatives = false_negative_mask(p_img.detach(), p_aud.detach(), cfg.k)
    terms = {
        "loss_ctr": info_nce_loss(p_img.float(), p_aud.float(), cfg.tau, false_negatives, cfg.directions),
        "loss_match": match_loss(
            out.target_ca_img.float(),
            jsa.attn_img[..., :targets].float(),
            out.target_ca_aud.float(),
            jsa.attn_aud[..., :targets].float(),
        ),  # fmt: skip
        "loss_div": target_divergence(jsa.slots_img.float(), targets)
        + target_divergence(jsa.slots_aud.float(), targets),
        "loss_recon": reconstruction_loss(
            out.tokens_img.float(), out.recon_img.float(), out.tokens_aud.float(), out.recon_aud.float()
        ),
    }
    terms["loss"] = (
        terms["loss_ctr"]
        + cfg.weight_match * terms["loss_match"]
        + cfg.weight_div * terms["loss_div"]
        + cfg.weight_recon * terms["loss_recon"]
    )
    return terms
