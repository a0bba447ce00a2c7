"""`FusedJointSlotAttention`: the drop-in module that runs JSA on the fastest backend.

Parameters and state-dict keys are those of `jsa_fast.reference.JointSlotAttention`
(the class is a subclass and reads the same nn.Parameters), so
`fused.load_state_dict(reference.state_dict())` works both ways.

The Triton path runs both modalities' N iterations as one operator
(jsa_fast/kernels/joint_slot_attention.py), which folds the weights once per call:
at the paper's shapes JSA is bound by kernel launches, and folding removes per-iteration
products (K, V and Q are never formed; the GRU's input product reads the attention
context C directly) while stacking the two modalities' weights lets every product and
kernel serve both at once. The module keeps each image parameter and its audio twin side
by side in one storage, so that stacking them is a free view (`stacked`); its gradient
comes back as two views of one buffer, contiguous, which autograd hands to `.grad`
without a copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jsa_fast.kernels import INTERPRET, joint_slot_attention, registry
from jsa_fast.kernels.joint_slot_attention import PARAMETERS
from jsa_fast.reference import DIM, EPS, ITERS, MASK_PROB, MLP_HIDDEN, NUM_SLOTS, JointSlotAttention, JSAOutput

BACKENDS = ("auto", "triton", "torch")
BACKEND = "auto"  # the default, ModelConfig's too


def _side_by_side(first: Tensor, second: Tensor) -> bool:
    """Whether `second` directly follows `first` in one storage, both contiguous alike."""
    return (
        first.shape == second.shape
        and first.dtype == second.dtype
        and first.device == second.device
        and first.is_contiguous()
        and second.is_contiguous()
        and first.untyped_storage()._cdata == second.untyped_storage()._cdata  # one storage (fake tensors too)
        and second.storage_offset() == first.storage_offset() + first.numel()
    )


class _SideBySide(torch.autograd.Function):
    """(first, second) lying side by side -> their 2 x ... stack as a view; the gradient
    splits into two views of one buffer."""

    @staticmethod
    def forward(ctx, first: Tensor, second: Tensor) -> Tensor:  # noqa: ANN001
        return first.as_strided((2, *first.shape), (first.numel(), *first.stride()), first.storage_offset())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        return grad[0], grad[1]


def stacked(first: Tensor, second: Tensor) -> Tensor:
    """torch.stack([first, second]), a view without a copy when they lie side by side
    (in eager mode: a compiled graph cannot read storage addresses, and stacks)."""
    if not torch.compiler.is_compiling() and _side_by_side(first, second):
        return _SideBySide.apply(first, second)
    return torch.stack([first, second])


class FusedJointSlotAttention(JointSlotAttention):
    """Joint slot attention with a selectable backend (docs/api.md).

    backend: "auto" (the Triton kernels for CUDA tensors, the PyTorch reference path
    otherwise), "triton" (the kernels, also on CPU when TRITON_INTERPRET=1 was set before
    the kernels were imported) or "torch" (the reference path).

    forward(x_img: B x Lv x d, x_aud: B x La x d, mask_img, mask_aud: B x L bool or None)
    -> JSAOutput, as the reference. Under autocast the products run in the autocast dtype
    (the operator bypasses autocast, so the module casts the folded weights itself).
    """

    def __init__(
        self,
        dim: int = DIM,
        num_slots: int = NUM_SLOTS,
        iters: int = ITERS,
        mlp_hidden: int = MLP_HIDDEN,
        mask_prob: float = MASK_PROB,
        eps: float = EPS,
        backend: str = BACKEND,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(dim, num_slots, iters, mlp_hidden, mask_prob, eps)
        self.backend = backend
        self._pair_parameters()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # .to(), .cuda(), .half() ... give every parameter new storage: pair them again.
        super()._apply(fn, recurse)
        self._pair_parameters()
        return self

    def _pair_parameters(self) -> None:
        """Put each image parameter and its audio twin side by side in one storage."""
        with torch.no_grad():
            for name in PARAMETERS:
                image, audio = self.image.get_parameter(name), self.audio.get_parameter(name)
                if not _side_by_side(image, audio) and image.shape == audio.shape and image.dtype == audio.dtype:
                    pair = torch.stack([image.data, audio.data])
                    image.data, audio.data = pair[0], pair[1]

    def _uses_triton(self, x: Tensor) -> bool:
        if self.backend == "torch" or (self.backend == "auto" and not x.is_cuda):
            return False
        if not x.is_cuda and not INTERPRET and not registry.planning():
            raise RuntimeError(
                f"backend='triton' got {x.device} tensors: the Triton kernels need CUDA tensors, or "
                "TRITON_INTERPRET=1 set before jsa_fast is imported to run them on the CPU"
            )
        return True

    def _layer_norm_eps(self) -> tuple[float, float, float]:
        eps = tuple(
            getattr(branch, name).eps
            for branch in (self.image, self.audio)
            for name in ("norm_input", "norm_slots", "norm_pre_ff")
        )
        if eps[:3] != eps[3:]:
            raise ValueError(
                f"the fused path needs the same LayerNorm eps in both modalities, got {eps[:3]} and {eps[3:]}"
            )
        return eps[:3]

    def forward(
        self, x_img: Tensor, x_aud: Tensor, mask_img: Tensor | None = None, mask_aud: Tensor | None = None
    ) -> JSAOutput:
        if not self._uses_triton(x_img):
            return super().forward(x_img, x_aud, mask_img, mask_aud)
        mask_img, mask_aud = self.resolve_masks(x_img, x_aud, mask_img, mask_aud)
        if (mask_img is None) != (mask_aud is None):  # the operator takes both or neither
            mask_img = (
                torch.zeros(x_img.shape[:2], dtype=torch.bool, device=x_img.device) if mask_img is None else mask_img
            )
            mask_aud = (
                torch.zeros(x_aud.shape[:2], dtype=torch.bool, device=x_aud.device) if mask_aud is None else mask_aud
            )
        params = [stacked(self.image.get_parameter(name), self.audio.get_parameter(name)) for name in PARAMETERS]
        device_type = x_img.device.type
        compute_dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else self.slots_init.dtype
        )
        out = joint_slot_attention(
            x_img, x_aud, mask_img, mask_aud, self.slots_init.view(self.num_slots, self.dim), params, self.iters, self.eps,
            self._layer_norm_eps(), compute_dtype, x_img.dtype,
        )  # fmt: skip
        return JSAOutput(*out)
