"""`FusedJointSlotAttention`: the drop-in module that runs JSA on the fastest backend.

Parameters and state-dict keys are those of `jsa_fast.reference.JointSlotAttention`, so
`fused.load_state_dict(reference.state_dict())` works both ways.
"""

from __future__ import annotations

from jsa_fast.reference import JointSlotAttention

BACKENDS = ("auto", "triton", "torch")
_TRITON_ISSUE = "Fused Triton kernels for joint slot attention, forward and backward, with benchmark"


class FusedJointSlotAttention(JointSlotAttention):
    """Joint slot attention with a selectable backend (API.md).

    backend: "auto" (Triton kernels for CUDA tensors once they exist, the PyTorch path
    otherwise), "triton" or "torch". Until the Triton kernels land, "auto" and "torch"
    run the reference path and "triton" raises NotImplementedError.

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
        if backend == "triton":
            raise NotImplementedError(f"backend='triton' is not available yet: it lands with the issue '{_TRITON_ISSUE}'")
        super().__init__(dim, num_slots, iters, mlp_hidden, mask_prob, eps)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
