"""The oracle: Joint Slot Attention, its losses and k-reciprocal masks in plain PyTorch.

Everything here mirrors the equations of the paper ("Improving Sound Source Localization
with Joint Slot Attention on Image and Audio", CVPR 2025) as restated in docs/model.md, with no
fusion tricks. Every kernel and op of the project is tested against this file.

Symbols: B batch, L tokens (Lv image, La audio), d width, S slots (2: target, off-target),
N iterations.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "JSAOutput",
    "ModalitySlotAttention",
    "JointSlotAttention",
    "check_jsa_inputs",
    "slot_attention",
    "k_reciprocal_mask",
    "check_k_reciprocal_inputs",
    "mutual_neighbour_mask",
    "pack_mask",
    "unpack_mask",
    "info_nce_loss",
    "match_loss",
    "divergence_loss",
    "reconstruction_loss",
]


class JSAOutput(NamedTuple):
    """What joint slot attention returns; shapes for B pairs, S slots, width d.

    slots_*: B x S x d, S_N.  q_*: B x S x d, Q_N (from S_{N-1}).
    attn_*: B x L x S, the key-normalised attention Â of the last iteration.
    ia_img: B x Lv, ia^{v,v}; ca_img: B x Lv, ca^{a,v} (audio queries on image keys);
    ia_aud: B x La, ia^{a,a}; ca_aud: B x La, ca^{v,a} (image queries on audio keys).
    """

    slots_img: Tensor
    slots_aud: Tensor
    q_img: Tensor
    q_aud: Tensor
    attn_img: Tensor
    attn_aud: Tensor
    ia_img: Tensor
    ca_img: Tensor
    ia_aud: Tensor
    ca_aud: Tensor

    @classmethod
    def from_last_iteration(
        cls,
        slots_img: Tensor,
        slots_aud: Tensor,
        q_img: Tensor,
        q_aud: Tensor,
        attn_img: Tensor,
        attn_aud: Tensor,
        cross_img: Tensor,
        cross_aud: Tensor,
        dtype: torch.dtype,
    ) -> JSAOutput:
        """Assemble the output in `dtype`; cross_img: B x Lv x S, Â of the audio queries on
        the image keys, cross_aud: B x La x S, Â of the image queries on the audio keys.
        The maps are the slot-0 (target) columns."""
        out = cls(
            slots_img, slots_aud, q_img, q_aud, attn_img, attn_aud,
            ia_img=attn_img[..., 0], ca_img=cross_img[..., 0], ia_aud=attn_aud[..., 0], ca_aud=cross_aud[..., 0],
        )  # fmt: skip
        return cls(*(t.to(dtype) for t in out))


def slot_attention(q: Tensor, k: Tensor, eps: float) -> Tensor:
    """Key-normalised slot attention Â (paper eq. 3-4).

    q: B x S x d queries, k: B x L x d keys -> B x L x S.
    M = K Q^T / sqrt(d); A = softmax over the S slots for every key; A += eps;
    Â = A / sum over keys of A, so each slot's column sums to 1.
    """
    logits = torch.einsum("bld,bsd->bls", k, q) / math.sqrt(q.shape[-1])
    attn = logits.softmax(dim=-1) + eps
    return attn / attn.sum(dim=1, keepdim=True)


class ModalitySlotAttention(nn.Module):
    """The parameters one modality owns (paper eq. 1-6); the initial slots are shared."""

    def __init__(self, dim: int, mlp_hidden: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim))
        self.norm_input = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_pre_ff = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, dim))

    def normalised_tokens(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """LN_in(x): x B x L x d tokens, mask B x L bool or None -> B x L x d.

        Masked tokens are replaced by the mask token before LayerNorm_in.
        """
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        return self.norm_input(x)

    def keys_values(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """x: B x L x d tokens, mask: B x L bool or None -> K, V: B x L x d."""
        x = self.normalised_tokens(x, mask)
        return self.to_k(x), self.to_v(x)

    def iterate(self, slots: Tensor, k: Tensor, v: Tensor, iters: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """Run N slot-attention iterations from S_0.

        slots: B x S x d (S_0), k, v: B x L x d -> (S_N, Q_N, Â_N) with Q_N, Â_N from
        the last iteration (Q_N is computed from S_{N-1}).
        """
        batch, num_slots, dim = slots.shape
        for _ in range(iters):
            q = self.to_q(self.norm_slots(slots))
            attn = slot_attention(q, k, eps)
            updates = torch.einsum("bls,bld->bsd", attn, v)
            slots_bar = self.gru(updates.reshape(-1, dim), slots.reshape(-1, dim)).reshape(batch, num_slots, dim)
            slots = slots_bar + self.mlp(self.norm_pre_ff(slots_bar))
        return slots, q, attn


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def check_jsa_inputs(x_img: Tensor, x_aud: Tensor, mask_img: Tensor | None, mask_aud: Tensor | None, dim: int) -> None:
    """Raise ValueError, naming the argument, for inputs the JSA modules cannot take."""
    for name, x in (("x_img", x_img), ("x_aud", x_aud)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must be B x L x d (3-D), got {_describe(x)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {_describe(x)}")
        if x.shape[-1] != dim:
            raise ValueError(f"{name} has width {x.shape[-1]} but the module has dim={dim} ({_describe(x)})")
        if x.shape[1] < 1:
            raise ValueError(f"{name} must hold at least one token, got {_describe(x)}")
    if x_img.shape[0] != x_aud.shape[0]:
        raise ValueError(f"x_img and x_aud must share the batch size, got {_describe(x_img)} and {_describe(x_aud)}")
    if x_img.device != x_aud.device:
        raise ValueError(f"x_img and x_aud must be on one device, got {x_img.device} and {x_aud.device}")
    for name, mask, x in (("mask_img", mask_img, x_img), ("mask_aud", mask_aud, x_aud)):
        if mask is None:
            continue
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            seen = _describe(mask) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"{name} must be a bool tensor, got {seen}")
        if mask.shape != x.shape[:2]:
            raise ValueError(f"{name} must be B x L = {tuple(x.shape[:2])}, got {_describe(mask)}")


# The paper's module sizes (docs/model.md "Shapes"), written here only: JointSlotAttention,
# FusedJointSlotAttention, SlotDecoder and ModelConfig (so the run's flags) take their
# defaults from these.
DIM = 512
NUM_SLOTS = 2
ITERS = 5
MLP_HIDDEN = 1024
MASK_PROB = 0.1
EPS = 1e-8


class JointSlotAttention(nn.Module):
    """Joint slot attention on image and audio tokens (paper Sec. 3.2), the reference.

    Shared learnable initial slots S_0 (1 x S x d) start one slot-attention loop per
    modality; the cross-modal maps are read off the last iteration.

    forward(x_img: B x Lv x d, x_aud: B x La x d, mask_img, mask_aud: B x L bool or None)
    -> JSAOutput. A mask marks tokens replaced by the modality's mask token; when None it
    is drawn Bernoulli(mask_prob) in training and is empty in eval.
    """

    def __init__(
        self,
        dim: int = DIM,
        num_slots: int = NUM_SLOTS,
        iters: int = ITERS,
        mlp_hidden: int = MLP_HIDDEN,
        mask_prob: float = MASK_PROB,
        eps: float = EPS,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("dim", dim, 1),
            ("num_slots", num_slots, 1),
            ("iters", iters, 1),
            ("mlp_hidden", mlp_hidden, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in [0, 1), got {mask_prob!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.dim, self.num_slots, self.iters = dim, num_slots, iters
        self.mlp_hidden, self.mask_prob, self.eps = mlp_hidden, mask_prob, eps
        self.slots_init = nn.Parameter(torch.randn(1, num_slots, dim))
        self.image = ModalitySlotAttention(dim, mlp_hidden)
        self.audio = ModalitySlotAttention(dim, mlp_hidden)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_slots={self.num_slots}, iters={self.iters}, mask_prob={self.mask_prob}, eps={self.eps}"

    def resolve_masks(
        self, x_img: Tensor, x_aud: Tensor, mask_img: Tensor | None, mask_aud: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Validate the inputs and draw the training masks that were not given."""
        check_jsa_inputs(x_img, x_aud, mask_img, mask_aud, self.dim)
        if self.training and self.mask_prob > 0:
            if mask_img is None:
                mask_img = torch.rand(x_img.shape[:2], device=x_img.device) < self.mask_prob
            if mask_aud is None:
                mask_aud = torch.rand(x_aud.shape[:2], device=x_aud.device) < self.mask_prob
        return mask_img, mask_aud

    def forward(
        self, x_img: Tensor, x_aud: Tensor, mask_img: Tensor | None = None, mask_aud: Tensor | None = None
    ) -> JSAOutput:
        mask_img, mask_aud = self.resolve_masks(x_img, x_aud, mask_img, mask_aud)
        compute_dtype = self.slots_init.dtype
        k_img, v_img = self.image.keys_values(x_img.to(compute_dtype), mask_img)
        k_aud, v_aud = self.audio.keys_values(x_aud.to(compute_dtype), mask_aud)
        slots_0 = self.slots_init.expand(x_img.shape[0], -1, -1)
        slots_img, q_img, attn_img = self.image.iterate(slots_0, k_img, v_img, self.iters, self.eps)
        slots_aud, q_aud, attn_aud = self.audio.iterate(slots_0, k_aud, v_aud, self.iters, self.eps)
        return JSAOutput.from_last_iteration(
            slots_img, slots_aud, q_img, q_aud, attn_img, attn_aud,
            cross_img=slot_attention(q_aud, k_img, self.eps), cross_aud=slot_attention(q_img, k_aud, self.eps),
            dtype=x_img.dtype,
        )  # fmt: skip


# ----------------------------------------------------------------------------------
# False-negative mitigation (paper eq. 12-13)
# ----------------------------------------------------------------------------------


def check_k_reciprocal_inputs(z_img: Tensor, z_aud: Tensor, k: int) -> None:
    """Raise ValueError, naming the argument and what was seen, for inputs k_reciprocal_mask
    cannot take: anything but two non-empty B x D float tensors of one shape on one device,
    or a k outside [1, B].

    Reads metadata only, so it costs no device sync and torch.compile traces it. Whether the
    values are finite needs the data: `mutual_neighbour_mask` and the C++ op check that
    where they read the rows.
    """
    for name, z in (("z_img", z_img), ("z_aud", z_aud)):
        if not isinstance(z, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be B x D (2-D), got {_describe(z)}")
        if not z.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {_describe(z)}")
        if z.shape[0] < 1 or z.shape[1] < 1:
            raise ValueError(f"{name} must be non-empty, got {_describe(z)}")
    if z_img.shape != z_aud.shape:
        raise ValueError(f"z_img and z_aud must have one shape, got {_describe(z_img)} and {_describe(z_aud)}")
    if z_img.device != z_aud.device:
        raise ValueError(f"z_img and z_aud must be on one device, got {z_img.device} and {z_aud.device}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= z_img.shape[0]:
        raise ValueError(f"k must be an integer in [1, B={z_img.shape[0]}], got {k!r}")


def _k_nearest(z: Tensor, k: int) -> Tensor:
    """z: B x D -> B x B bool, row i marks the k rows most cosine-similar to row i.

    Similarities are fp32 dot products of L2-normalised fp32 rows; the sample itself is
    included and ties go to the lower index (a stable descending sort).
    """
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
    neighbours = torch.zeros(sim.shape, dtype=torch.bool, device=z.device)
    return neighbours.scatter_(1, order, True)


def mutual_neighbour_mask(z_img: Tensor, z_aud: Tensor, k: int, *, check_finite: bool = True) -> Tensor:
    """`k_reciprocal_mask` for inputs that `check_k_reciprocal_inputs` accepted (callers
    that validated them already, as jsa_fast.ops does, call this to validate once).

    check_finite: raise ValueError, naming the argument, when a row is not finite in
    float32 (where the similarities are computed: a large float64 becomes inf there); both
    arguments' flags come back to the host in one read. Without it, such a row counts as a
    zero row, and nothing is read back.
    """
    with torch.no_grad():
        rows = (z_img.float(), z_aud.float())
        if check_finite:
            finite = torch.stack([torch.isfinite(r).all() for r in rows]).tolist()
            for name, z, ok in zip(("z_img", "z_aud"), (z_img, z_aud), finite, strict=True):
                if not ok:
                    raise ValueError(f"{name} holds values that are not finite in float32 ({_describe(z)})")
        else:
            rows = tuple(r.masked_fill(~torch.isfinite(r).all(1, keepdim=True), 0.0) for r in rows)
        n_img, n_aud = _k_nearest(rows[0], k), _k_nearest(rows[1], k)
        mask = n_img & n_img.T & n_aud & n_aud.T
        mask.fill_diagonal_(False)
    return mask


def k_reciprocal_mask(z_img: Tensor, z_aud: Tensor, k: int = 20) -> Tensor:
    """Predicted false negatives R (paper eq. 12-13).

    z_img, z_aud: B x D target slots (normalised inside) -> B x B bool, diagonal False.
    R = (N^v AND N^v^T) AND (N^a AND N^a^T), N^m the k-nearest-neighbour relation.
    """
    check_k_reciprocal_inputs(z_img, z_aud, k)
    return mutual_neighbour_mask(z_img, z_aud, k)


def pack_mask(mask: Tensor) -> Tensor:
    """B x C bool -> B x ceil(C / 32) int32 words: bit b of word w of row i is mask[i, 32 w + b].

    The packed form of k_reciprocal_mask(..., packed=True), 8x smaller than bools: 512 MiB
    instead of 4 GiB at B = 65,536. Padding bits are 0.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a 2-D bool tensor, got {_describe(mask)}")
    rows, columns = mask.shape
    padded = F.pad(mask, (0, -columns % 32)).reshape(rows, -(-columns // 32), 32).to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
    words = (padded * weights).sum(-1)
    # Bit 31 set means a negative int32: wrap the unsigned 32-bit value into range.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_mask(words: Tensor, columns: int) -> Tensor:
    """B x ceil(C / 32) int32 words (pack_mask's layout) -> B x C bool."""
    if words.dim() != 2 or words.dtype != torch.int32:
        raise ValueError(f"words must be a 2-D int32 tensor, got {_describe(words)}")
    if isinstance(columns, bool) or not isinstance(columns, int):
        raise ValueError(f"columns must be an int, got {columns!r}")
    if columns < 0 or -(-columns // 32) != words.shape[1]:
        raise ValueError(f"columns must need exactly {words.shape[1]} words of 32 bits, got {columns}")
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :columns].bool()


# ----------------------------------------------------------------------------------
# Losses (paper eq. 7-10)
# ----------------------------------------------------------------------------------


def info_nce_loss(
    p_img: Tensor,
    p_aud: Tensor,
    tau: float = 0.03,
    false_negatives: Tensor | None = None,
    directions: str = "sum",
) -> Tensor:
    """Symmetric InfoNCE on cosine similarity of target slots (paper eq. 7).

    p_img, p_aud: B x d target slots (normalised inside); false_negatives: B x B bool
    (pairs removed from both denominators; the diagonal is never removed).
    Each direction is a cross-entropy averaged over B; directions="sum" adds the two
    (eq. 7 and the released code), "mean" averages them.
    """
    if directions not in ("sum", "mean"):
        raise ValueError(f"directions must be 'sum' or 'mean', got {directions!r}")
    batch = p_img.shape[0]
    logits = F.normalize(p_img, dim=-1) @ F.normalize(p_aud, dim=-1).T / tau
    if false_negatives is not None:
        if false_negatives.shape != (batch, batch):
            raise ValueError(f"false_negatives must be B x B = {(batch, batch)}, got {tuple(false_negatives.shape)}")
        drop = false_negatives & ~torch.eye(batch, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(drop, float("-inf"))
    labels = torch.arange(batch, device=logits.device)
    loss = F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
    return loss if directions == "sum" else loss / 2


def match_loss(ca_img: Tensor, ia_img: Tensor, ca_aud: Tensor, ia_aud: Tensor) -> Tensor:
    """Cross-modal attention matching (paper eq. 8), as MSE with a stop-gradient.

    MSE(ca^{a,v}, sg(ia^{v,v})) + MSE(ca^{v,a}, sg(ia^{a,a})); maps are B x L.
    """
    return F.mse_loss(ca_img, ia_img.detach()) + F.mse_loss(ca_aud, ia_aud.detach())


def _slot_divergence(slots: Tensor) -> Tensor:
    """slots: B x S x d -> mean over the batch and ordered slot pairs i != j of relu(cos)."""
    num_slots = slots.shape[1]
    if num_slots < 2:
        return slots.new_zeros(())
    z = F.normalize(slots, dim=-1)
    cos = z @ z.transpose(1, 2)
    off_diagonal = ~torch.eye(num_slots, dtype=torch.bool, device=slots.device)
    return cos.relu()[:, off_diagonal].mean()


def divergence_loss(slots_img: Tensor, slots_aud: Tensor) -> Tensor:
    """Slot divergence (paper eq. 9): relu(cos(p, r)) per modality, averaged over the batch.

    slots_*: B x S x d. With S > 2 every ordered pair of distinct slots is averaged (as
    the released code does); with S = 2 this is exactly relu(cos(p, r)).
    """
    return _slot_divergence(slots_img) + _slot_divergence(slots_aud)


def reconstruction_loss(x_img: Tensor, recon_img: Tensor, x_aud: Tensor, recon_aud: Tensor) -> Tensor:
    """Slot reconstruction (paper eq. 10): MSE to the detached encoder tokens (B x L x d)."""
    return F.mse_loss(recon_img, x_img.detach()) + F.mse_loss(recon_aud, x_aud.detach())
