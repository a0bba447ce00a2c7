"""The attention step of slot attention, fused: logits, softmax over slots, + eps, key
normalisation and the update read-out, forward and backward, in one pass over LN(x).

Symbols (SPEC.md): x = LN_in(tokens) (B x L x d), Q the queries (B x S x d), W_k, b_k
the key projection. K = x W_k^T + b_k never exists:

    M = K Q^T / sqrt(d) = x (Q W_k / sqrt(d))^T + (Q b_k / sqrt(d))^T = x G^T + c^T

with G = Q W_k / sqrt(d) (B x S x d, the `qk` argument) and c = Q b_k / sqrt(d)
(B x S). Neither does V = x W_v^T + b_v: the columns of Â sum to 1, so

    U = Â^T V = W_v (Â^T x) + b_v,

and the op returns the context C = Â^T x (B x S x d); the caller applies W_v to the
S rows of C, which is L/S times cheaper than forming V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.registry import INTERPRET, io_dtype, kernel_input, launcher, register_op

__all__ = ["slot_attention", "launch_config"]

# On a GPU: warps per program, and the BLOCK_L x BLOCK_S x BLOCK_D products one program
# holds in registers per pass. Checked by `python -m kernels.compile_check` (sm_90, no GPU
# needed, with a launch's specialisations): at Lv = 49 (BLOCK_L 64), S = 2 these take 80
# (bf16) and 111 (fp32) registers per thread in the forward, 80 and 108 in the backward,
# with no spills; 4 warps with 64-wide strips spill 192 bytes in the fp32 backward. A
# program holds all L keys, so registers bound L: no spills up to L = 512 in fp32, bf16
# and fp16 (255 registers there in the fp32 backward); fp64 (gradcheck only) spills at 512.
_GPU_NUM_WARPS = 8
_GPU_PRODUCTS = {"forward": 8192, "backward": 4096}


@triton.jit
def _normalised_attention(logits, mask_l, mask_s, eps):
    """P = softmax over slots of M (rows), A = P + eps on valid entries, Â = A / column
    sums of A. Returns P, Â and the column sums (1 on padded slots)."""
    logits = tl.where(mask_s[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    a = tl.where(mask_l[:, None] & mask_s[None, :], p + eps, 0.0)
    col = tl.where(mask_s, tl.sum(a, axis=0), 1.0)
    return p, a / col[None, :], col


@triton.jit
def _slot_attention_fwd_kernel(
    X, QK, C, ATTN, CTX, L, D, S, eps,
    BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):
    """One batch element per program.

    M = x G^T + c (L x S); Â = normalise_keys(softmax_slots(M) + eps) -> ATTN (L x S);
    C = Â^T x -> CTX (S x d). x is read twice, in BLOCK_D-wide column strips.
    """
    ACC = tl.float64 if FP64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_l = offs_l < L
    mask_s = offs_s < S
    x_rows = X + b * L * D + offs_l[:, None] * D
    q_rows = QK + b * S * D + offs_s[:, None] * D

    logits = tl.zeros([BLOCK_L, BLOCK_S], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        x = tl.load(x_rows + cols[None, :], mask=mask_l[:, None] & mask_d[None, :], other=0.0).to(ACC)
        q = tl.load(q_rows + cols[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0).to(ACC)
        logits += tl.sum(x[:, None, :] * q[None, :, :], axis=2)
    c = tl.load(C + b * S + offs_s, mask=mask_s, other=0.0).to(ACC)
    _, a_hat, _ = _normalised_attention(logits + c[None, :], mask_l, mask_s, eps)
    attn_ptrs = ATTN + b * L * S + offs_l[:, None] * S + offs_s[None, :]
    tl.store(attn_ptrs, a_hat.to(ATTN.dtype.element_ty), mask=mask_l[:, None] & mask_s[None, :])

    ctx_rows = CTX + b * S * D + offs_s[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        x = tl.load(x_rows + cols[None, :], mask=mask_l[:, None] & mask_d[None, :], other=0.0).to(ACC)
        ctx = tl.sum(a_hat[:, :, None] * x[:, None, :], axis=0)
        tl.store(ctx_rows + cols[None, :], ctx.to(CTX.dtype.element_ty), mask=mask_s[:, None] & mask_d[None, :])


@triton.jit
def _slot_attention_bwd_kernel(
    X, QK, C, G_ATTN, G_CTX, GX, GQK, GC, L, D, S, eps,
    BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):
    """One batch element per program; recomputes M, P and Â from x (nothing stored).

    dÂ = dATTN + x dC^T                                   (from C = Â^T x)
    dA[l,s] = (dÂ[l,s] - sum_l' dÂ[l',s] Â[l',s]) / sum_l' A[l',s]   (key normalisation)
    dM[l,s] = P[l,s] (dA[l,s] - sum_s' dA[l,s'] P[l,s'])   (softmax over slots)
    dx = Â dC + dM G,  dG = dM^T x,  dc = sum_l dM.
    """
    ACC = tl.float64 if FP64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_l = offs_l < L
    mask_s = offs_s < S
    mask_ls = mask_l[:, None] & mask_s[None, :]
    x_rows = X + b * L * D + offs_l[:, None] * D
    q_rows = QK + b * S * D + offs_s[:, None] * D
    gctx_rows = G_CTX + b * S * D + offs_s[:, None] * D

    logits = tl.zeros([BLOCK_L, BLOCK_S], dtype=ACC)
    g_hat = tl.zeros([BLOCK_L, BLOCK_S], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        mask_sd = mask_s[:, None] & mask_d[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask_l[:, None] & mask_d[None, :], other=0.0).to(ACC)
        q = tl.load(q_rows + cols[None, :], mask=mask_sd, other=0.0).to(ACC)
        g_ctx = tl.load(gctx_rows + cols[None, :], mask=mask_sd, other=0.0).to(ACC)
        logits += tl.sum(x[:, None, :] * q[None, :, :], axis=2)
        g_hat += tl.sum(x[:, None, :] * g_ctx[None, :, :], axis=2)
    c = tl.load(C + b * S + offs_s, mask=mask_s, other=0.0).to(ACC)
    p, a_hat, col = _normalised_attention(logits + c[None, :], mask_l, mask_s, eps)

    attn_offs = b * L * S + offs_l[:, None] * S + offs_s[None, :]
    g_hat += tl.load(G_ATTN + attn_offs, mask=mask_ls, other=0.0).to(ACC)
    g_a = (g_hat - tl.sum(g_hat * a_hat, axis=0)[None, :]) / col[None, :]
    g_a = tl.where(mask_ls, g_a, 0.0)
    # P is 0 on padded slots and dA is 0 on padded keys, so dM vanishes off the valid block.
    g_m = p * (g_a - tl.sum(g_a * p, axis=1)[:, None])
    tl.store(GC + b * S + offs_s, tl.sum(g_m, axis=0).to(GC.dtype.element_ty), mask=mask_s)

    gx_rows = GX + b * L * D + offs_l[:, None] * D
    gq_rows = GQK + b * S * D + offs_s[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        mask_ld = mask_l[:, None] & mask_d[None, :]
        mask_sd = mask_s[:, None] & mask_d[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask_ld, other=0.0).to(ACC)
        q = tl.load(q_rows + cols[None, :], mask=mask_sd, other=0.0).to(ACC)
        g_ctx = tl.load(gctx_rows + cols[None, :], mask=mask_sd, other=0.0).to(ACC)
        g_x = tl.sum(a_hat[:, :, None] * g_ctx[None, :, :] + g_m[:, :, None] * q[None, :, :], axis=1)
        g_q = tl.sum(g_m[:, :, None] * x[:, None, :], axis=0)
        tl.store(gx_rows + cols[None, :], g_x.to(GX.dtype.element_ty), mask=mask_ld)
        tl.store(gq_rows + cols[None, :], g_q.to(GQK.dtype.element_ty), mask=mask_sd)


def launch_config(length: int, dim: int, num_slots: int, dtype: torch.dtype, direction: str, interpret: bool = INTERPRET) -> dict:
    """Tile sizes and warps of one kernel launch: all L keys and S slots of one batch
    element at once, d in strips. direction: "forward" or "backward"."""
    block_l = triton.next_power_of_2(length)
    block_s = triton.next_power_of_2(num_slots)
    block_d = triton.next_power_of_2(dim)
    config = {"FP64": dtype == torch.float64}
    if not interpret:  # under the interpreter one strip is cheapest; on a GPU, registers bound it
        block_d = min(block_d, max(16, _GPU_PRODUCTS[direction] // (block_l * block_s)))
        config["num_warps"] = _GPU_NUM_WARPS
    return {"BLOCK_L": block_l, "BLOCK_S": block_s, "BLOCK_D": block_d} | config


def _check(x: Tensor, qk: Tensor, c: Tensor) -> None:
    if x.dim() != 3 or qk.dim() != 3 or c.dim() != 2:
        raise ValueError(f"slot_attention needs x: B x L x d, qk: B x S x d, c: B x S; got x {tuple(x.shape)}, qk {tuple(qk.shape)}, c {tuple(c.shape)}")
    batch, _, dim = x.shape
    if qk.shape[0] != batch or qk.shape[2] != dim or c.shape != qk.shape[:2]:
        raise ValueError(f"slot_attention: qk must be B x S x d and c B x S for x {tuple(x.shape)}; got qk {tuple(qk.shape)}, c {tuple(c.shape)}")


def _fwd_fake(x: Tensor, qk: Tensor, c: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    batch, length, _ = x.shape
    return x.new_empty(batch, length, qk.shape[1]), x.new_empty(qk.shape)


@register_op("jsa::slot_attention", _fwd_fake)
def _slot_attention_fwd(x: Tensor, qk: Tensor, c: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    batch, length, dim = x.shape
    num_slots = qk.shape[1]
    xk, qkk, ck = kernel_input(x), kernel_input(qk), kernel_input(c)
    buffer = io_dtype(x.dtype)
    attn = torch.empty(batch, length, num_slots, device=x.device, dtype=buffer)
    ctx = torch.empty(batch, num_slots, dim, device=x.device, dtype=buffer)
    launcher(_slot_attention_fwd_kernel)[(batch,)](
        xk, qkk, ck, attn, ctx, length, dim, num_slots, eps, **launch_config(length, dim, num_slots, xk.dtype, "forward")
    )
    return attn.to(x.dtype), ctx.to(x.dtype)


def _bwd_fake(
    x: Tensor, qk: Tensor, c: Tensor, g_attn: Tensor, g_ctx: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(qk), torch.empty_like(c)


@register_op("jsa::slot_attention_backward", _bwd_fake)
def _slot_attention_bwd(
    x: Tensor, qk: Tensor, c: Tensor, g_attn: Tensor, g_ctx: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    batch, length, dim = x.shape
    num_slots = qk.shape[1]
    xk = kernel_input(x)
    g_x = torch.empty(x.shape, device=x.device, dtype=io_dtype(x.dtype))
    g_qk = torch.empty(qk.shape, device=x.device, dtype=io_dtype(qk.dtype))
    g_c = torch.empty(c.shape, device=x.device, dtype=io_dtype(c.dtype))
    launcher(_slot_attention_bwd_kernel)[(batch,)](
        xk, kernel_input(qk), kernel_input(c), kernel_input(g_attn), kernel_input(g_ctx),
        g_x, g_qk, g_c, length, dim, num_slots, eps, **launch_config(length, dim, num_slots, xk.dtype, "backward")
    )
    return g_x.to(x.dtype), g_qk.to(qk.dtype), g_c.to(c.dtype)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library signature)
    x, qk, c, eps = inputs
    ctx.save_for_backward(x, qk, c)
    ctx.eps = eps


def _backward(ctx, g_attn: Tensor, g_ctx: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:  # noqa: ANN001
    x, qk, c = ctx.saved_tensors
    g_x, g_qk, g_c = _slot_attention_bwd(x, qk, c, g_attn, g_ctx, ctx.eps)
    return g_x, g_qk, g_c, None


_slot_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def slot_attention(x: Tensor, qk: Tensor, c: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Key-normalised slot attention and its context, fused (module docstring).

    x: B x L x d normalised tokens LN_in(x); qk: B x S x d, G = Q W_k / sqrt(d);
    c: B x S, Q b_k / sqrt(d); eps added after the softmax over slots.
    Returns Â: B x L x S (columns sum to 1 over the L keys) and C = Â^T x: B x S x d,
    in x's dtype. Differentiable in x, qk and c (hand-written backward that recomputes
    the attention instead of storing it).
    """
    _check(x, qk, c)
    return _slot_attention_fwd(x, qk, c, float(eps))
