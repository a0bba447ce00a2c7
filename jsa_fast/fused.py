"""`FusedJointSlotAttention`: the drop-in module that runs JSA on the fastest backend.

Parameters and state-dict keys are those of `jsa_fast.reference.JointSlotAttention`
(the class is a subclass and reads the same nn.Parameters), so
`fused.load_state_dict(reference.state_dict())` works both ways.

The Triton path computes, per modality and for n = 1..N (SPEC.md), without ever forming
K or V (kernels/slot_attention.py):

    x = LN_in(tokens, masked)                     once, B x L x d
    Q = W_q LN_slots(S_{n-1}) + b_q               B*S rows, cuBLAS
    G = Q W_k / sqrt(d),  c = Q b_k / sqrt(d)     B*S rows, cuBLAS
    Â, C = slot_attention(x, G, c)                Triton: one pass over x
    U = W_v C + b_v                               = Â^T V, columns of Â sum to 1
    S̄ = GRUCell(U, S_{n-1})                       cuBLAS GEMMs + Triton gate epilogue
    S_n = S̄ + MLP(LN_ff(S̄))

and the cross-modal maps of the last iteration with the other modality's queries on
this modality's x (ca^{a,v} = slot 0 of slot_attention(x_v, Q^a W_k^v / sqrt(d), ...)).
Autograd runs through all N iterations into S_0 and every parameter; the two Triton ops
carry hand-written backwards that recompute instead of storing.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from jsa_fast.reference import JointSlotAttention, JSAOutput, ModalitySlotAttention
from kernels import INTERPRET, gru_gates, slot_attention

BACKENDS = ("auto", "triton", "torch")


def _attend(branch: ModalitySlotAttention, q: Tensor, x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """q: B x S x d queries on the keys K = branch.to_k(x) of x: B x L x d normalised
    tokens -> (Â: B x L x S, C = Â^T x: B x S x d)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qk = q @ (branch.to_k.weight * scale)
    c = q @ (branch.to_k.bias * scale)
    return slot_attention(x, qk, c, eps)


def _iterate(
    branch: ModalitySlotAttention, slots: Tensor, x: Tensor, iters: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """N iterations from slots = S_0 (B x S x d) on x = LN_in(tokens) (B x L x d)
    -> (S_N, Q_N, Â_N), as `ModalitySlotAttention.iterate` of the reference."""
    batch, num_slots, dim = slots.shape
    gru = branch.gru
    for _ in range(iters):
        q = branch.to_q(branch.norm_slots(slots))
        attn, context = _attend(branch, q, x, eps)
        updates = branch.to_v(context).reshape(-1, dim)
        hidden = slots.reshape(-1, dim)
        gates_in = F.linear(updates, gru.weight_ih, gru.bias_ih)
        gates_hidden = F.linear(hidden, gru.weight_hh, gru.bias_hh)
        slots_bar = gru_gates(gates_in, gates_hidden, hidden).reshape(batch, num_slots, dim)
        slots = slots_bar + branch.mlp(branch.norm_pre_ff(slots_bar))
    return slots, q, attn


class FusedJointSlotAttention(JointSlotAttention):
    """Joint slot attention with a selectable backend (API.md).

    backend: "auto" (the Triton kernels for CUDA tensors, the PyTorch reference path
    otherwise), "triton" (the kernels, also on CPU when TRITON_INTERPRET=1 was set before
    the kernels were imported) or "torch" (the reference path).

    forward(x_img: B x Lv x d, x_aud: B x La x d, mask_img, mask_aud: B x L bool or None)
    -> JSAOutput, as the reference.
    """

    def __init__(
        self,
        dim: int = 512,
        num_slots: int = 2,
        iters: int = 5,
        mlp_hidden: int = 1024,
        mask_prob: float = 0.1,
        eps: float = 1e-8,
        backend: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(dim, num_slots, iters, mlp_hidden, mask_prob, eps)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def _uses_triton(self, x: Tensor) -> bool:
        if self.backend == "torch" or (self.backend == "auto" and not x.is_cuda):
            return False
        if not x.is_cuda and not INTERPRET:
            raise RuntimeError(
                f"backend='triton' got {x.device} tensors: the Triton kernels need CUDA tensors, or "
                "TRITON_INTERPRET=1 set before jsa_fast is imported to run them on the CPU"
            )
        return True

    def forward(
        self, x_img: Tensor, x_aud: Tensor, mask_img: Tensor | None = None, mask_aud: Tensor | None = None
    ) -> JSAOutput:
        if not self._uses_triton(x_img):
            return super().forward(x_img, x_aud, mask_img, mask_aud)
        mask_img, mask_aud = self.resolve_masks(x_img, x_aud, mask_img, mask_aud)
        compute_dtype = self.slots_init.dtype
        tokens_img = self.image.normalised_tokens(x_img.to(compute_dtype), mask_img)
        tokens_aud = self.audio.normalised_tokens(x_aud.to(compute_dtype), mask_aud)
        slots_0 = self.slots_init.expand(x_img.shape[0], -1, -1)
        slots_img, q_img, attn_img = _iterate(self.image, slots_0, tokens_img, self.iters, self.eps)
        slots_aud, q_aud, attn_aud = _iterate(self.audio, slots_0, tokens_aud, self.iters, self.eps)
        return JSAOutput.from_last_iteration(
            slots_img, slots_aud, q_img, q_aud, attn_img, attn_aud,
            cross_img=_attend(self.image, q_aud, tokens_img, self.eps)[0],
            cross_aud=_attend(self.audio, q_img, tokens_aud, self.eps)[0],
            dtype=x_img.dtype,
        )  # fmt: skip
