"""The GRUCell gate epilogue, fused: the gate nonlinearities and the blend, forward and
backward, after the two GEMMs (left to cuBLAS) that produce the gate pre-activations.

Symbols (torch.nn.GRUCell, gate order r, z, n): input U, hidden h (R x d rows, R = B*S),
gi = U W_ih^T + b_ih and gh = h W_hh^T + b_hh (R x 3d), then

    r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = tanh(gi_n + r * gh_n),
    h' = (1 - z) * n + z * h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.registry import INTERPRET, io_dtype, kernel_input, launcher, register_op

__all__ = ["gru_gates", "launch_config"]


@triton.jit
def _gates(GI, GH, H, offs, mask, D, ACC: tl.constexpr):
    """Loads one block of elements (flat index over R x d) -> r, z, n, gh_n, h."""
    row = offs // D
    gate = row * 3 * D + offs % D
    gi_r = tl.load(GI + gate, mask=mask, other=0.0).to(ACC)
    gi_z = tl.load(GI + gate + D, mask=mask, other=0.0).to(ACC)
    gi_n = tl.load(GI + gate + 2 * D, mask=mask, other=0.0).to(ACC)
    gh_r = tl.load(GH + gate, mask=mask, other=0.0).to(ACC)
    gh_z = tl.load(GH + gate + D, mask=mask, other=0.0).to(ACC)
    gh_n = tl.load(GH + gate + 2 * D, mask=mask, other=0.0).to(ACC)
    h = tl.load(H + offs, mask=mask, other=0.0).to(ACC)
    r = tl.sigmoid(gi_r + gh_r)
    z = tl.sigmoid(gi_z + gh_z)
    n = 2.0 * tl.sigmoid(2.0 * (gi_n + r * gh_n)) - 1.0  # tanh; libdevice is absent under the interpreter
    return r, z, n, gh_n, h, gate


@triton.jit
def _gru_fwd_kernel(GI, GH, H, OUT, N, D, BLOCK: tl.constexpr, FP64: tl.constexpr):
    """h' = n + z * (h - n), elementwise over the N = R*d elements."""
    ACC = tl.float64 if FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    r, z, n, gh_n, h, gate = _gates(GI, GH, H, offs, mask, D, ACC)
    tl.store(OUT + offs, (n + z * (h - n)).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gru_bwd_kernel(GI, GH, H, G_OUT, G_GI, G_GH, G_H, N, D, BLOCK: tl.constexpr, FP64: tl.constexpr):
    """Recomputes the gates from gi, gh, h. With dh' the incoming gradient:
    dn_pre = dh' (1 - z) (1 - n^2)  -> d gi_n, and d gh_n = dn_pre * r;
    dr_pre = dn_pre gh_n r (1 - r)  -> d gi_r = d gh_r;
    dz_pre = dh' (h - n) z (1 - z)  -> d gi_z = d gh_z;
    dh = dh' z.
    """
    ACC = tl.float64 if FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    r, z, n, gh_n, h, gate = _gates(GI, GH, H, offs, mask, D, ACC)
    g = tl.load(G_OUT + offs, mask=mask, other=0.0).to(ACC)
    g_n = g * (1.0 - z) * (1.0 - n * n)
    g_r = g_n * gh_n * r * (1.0 - r)
    g_z = g * (h - n) * z * (1.0 - z)
    ty = G_GI.dtype.element_ty
    tl.store(G_GI + gate, g_r.to(ty), mask=mask)
    tl.store(G_GI + gate + D, g_z.to(ty), mask=mask)
    tl.store(G_GI + gate + 2 * D, g_n.to(ty), mask=mask)
    tl.store(G_GH + gate, g_r.to(ty), mask=mask)
    tl.store(G_GH + gate + D, g_z.to(ty), mask=mask)
    tl.store(G_GH + gate + 2 * D, (g_n * r).to(ty), mask=mask)
    tl.store(G_H + offs, (g * z).to(G_H.dtype.element_ty), mask=mask)


def launch_config(numel: int, dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """BLOCK elements per program (one program under the interpreter, where every
    program costs the same whatever its size)."""
    block = triton.next_power_of_2(numel) if interpret else 1024
    return {"BLOCK": block, "FP64": dtype == torch.float64}


def _fwd_fake(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    return torch.empty_like(h)


@register_op("jsa::gru_gates", _fwd_fake)
def _gru_fwd(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    numel, dim = h.numel(), h.shape[1]
    out = torch.empty(h.shape, device=h.device, dtype=io_dtype(h.dtype))
    config = launch_config(numel, h.dtype)
    launcher(_gru_fwd_kernel)[(triton.cdiv(numel, config["BLOCK"]),)](
        kernel_input(gi), kernel_input(gh), kernel_input(h), out, numel, dim, **config
    )
    return out.to(h.dtype)


def _bwd_fake(gi: Tensor, gh: Tensor, h: Tensor, g_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(gi), torch.empty_like(gh), torch.empty_like(h)


@register_op("jsa::gru_gates_backward", _bwd_fake)
def _gru_bwd(gi: Tensor, gh: Tensor, h: Tensor, g_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    numel, dim = h.numel(), h.shape[1]
    buffer = io_dtype(h.dtype)
    g_gi = torch.empty(gi.shape, device=h.device, dtype=buffer)
    g_gh = torch.empty(gh.shape, device=h.device, dtype=buffer)
    g_h = torch.empty(h.shape, device=h.device, dtype=buffer)
    config = launch_config(numel, h.dtype)
    launcher(_gru_bwd_kernel)[(triton.cdiv(numel, config["BLOCK"]),)](
        kernel_input(gi), kernel_input(gh), kernel_input(h), kernel_input(g_out), g_gi, g_gh, g_h, numel, dim, **config
    )
    return g_gi.to(gi.dtype), g_gh.to(gh.dtype), g_h.to(h.dtype)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library signature)
    ctx.save_for_backward(*inputs)


def _backward(ctx, g_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
    return _gru_bwd(*ctx.saved_tensors, g_out)


_gru_fwd.register_autograd(_backward, setup_context=_setup_context)


def gru_gates(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """GRUCell output h' from its gate pre-activations (module docstring).

    gi, gh: R x 3d (gates r, z, n), h: R x d -> h': R x d in h's dtype; fp32 (fp64 for
    fp64) inside. Differentiable in gi, gh and h.
    """
    if h.dim() != 2 or gi.shape != (h.shape[0], 3 * h.shape[1]) or gh.shape != gi.shape:
        raise ValueError(f"gru_gates needs gi, gh: R x 3d and h: R x d; got gi {tuple(gi.shape)}, gh {tuple(gh.shape)}, h {tuple(h.shape)}")
    return _gru_fwd(gi, gh, h)
