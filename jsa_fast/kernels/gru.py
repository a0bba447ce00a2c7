"""The GRU update of joint slot attention fused with LN_ff, forward and backward, after the
one GEMM that produces all gate pre-activations.

Symbols (torch.nn.GRUCell, gate order r, z, n; docs/model.md): input U = W_v C + b_v, hidden
h = S_{n-1}. The GRU's input weights are folded with W_v (jsa_fast/fused.py), so a single
product of [C | h] (R x 2d) with a block weight gives, per row, Z = [Z_r | Z_z | Z_in | Z_hn]
(R x 4d), biases included:

    Z_r = gi_r + gh_r,  Z_z = gi_z + gh_z,  Z_in = gi_n,  Z_hn = gh_n,
    r = sigmoid(Z_r),  z = sigmoid(Z_z),  n = tanh(Z_in + r Z_hn),
    S̄ = (1 - z) n + z h,     s̄ = (S̄ - μ) / σ   (LN_ff, its affine folded into W_1).

Backward, with dS̄ = dS_n (the MLP's residual) + normalise_backward(ds̄):

    dZ_in = dS̄ (1 - z)(1 - n^2),  dZ_hn = dZ_in r,  dZ_r = dZ_in Z_hn r (1 - r),
    dZ_z = dS̄ (h - n) z (1 - z),  dh (direct) = dS̄ z.

Rows are those of a 2 x R stack (jsa_fast/kernels/layer_norm.py), BLOCK_R at a time.
"""

from __future__ import annotations

import triton
import triton.language as tl

from jsa_fast.kernels.layer_norm import normalise, normalise_backward, row_offsets

__all__ = ["gru_fwd_kernel", "gru_bwd_kernel"]


@triton.jit
def _gates(Z, H, rows, cols, n_rows, rows_per_m, stride_z_m, stride_h_m, stride_h_r, D, ACC: tl.constexpr):
    """Loads Z and h for BLOCK_R rows -> r, z, n, Z_hn, h, S̄, the Z row offsets and the mask."""
    in_rows = (rows < n_rows)[:, None] & (cols < D)[None, :]
    z_row = Z + row_offsets(rows, rows_per_m, stride_z_m, 4 * D)[:, None] + cols[None, :]
    pre_r = tl.load(z_row, mask=in_rows, other=0.0).to(ACC)
    pre_z = tl.load(z_row + D, mask=in_rows, other=0.0).to(ACC)
    pre_in = tl.load(z_row + 2 * D, mask=in_rows, other=0.0).to(ACC)
    pre_hn = tl.load(z_row + 3 * D, mask=in_rows, other=0.0).to(ACC)
    h = tl.load(
        H + row_offsets(rows, rows_per_m, stride_h_m, stride_h_r)[:, None] + cols[None, :], mask=in_rows, other=0.0
    ).to(ACC)
    r = tl.sigmoid(pre_r)
    z = tl.sigmoid(pre_z)
    n = 2.0 * tl.sigmoid(2.0 * (pre_in + r * pre_hn)) - 1.0  # tanh; libdevice is absent under the interpreter
    return r, z, n, pre_hn, h, n + z * (h - n), z_row, in_rows


@triton.jit
def gru_fwd_kernel(
    Z, H, S_BAR, S_NORM, n_rows, rows_per_m, stride_z_m, stride_h_m, stride_h_r, D, eps,
    STORE_BAR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """S̄ and s̄ = LN_ff(S̄) without affine for BLOCK_R rows (module docstring).

    Z: rows of 4d (modality at stride_z_m); H: h rows (stride_h_m, stride_h_r);
    S_BAR (when STORE_BAR), S_NORM: 2 x rows_per_m x d, contiguous.
    """
    ACC = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    _, _, _, _, _, s_bar, _, in_rows = _gates(
        Z, H, rows, cols, n_rows, rows_per_m, stride_z_m, stride_h_m, stride_h_r, D, ACC
    )
    flat = rows.to(tl.int64)[:, None] * D + cols[None, :]
    if STORE_BAR:
        tl.store(S_BAR + flat, s_bar.to(S_BAR.dtype.element_ty), mask=in_rows)
    s_norm, _ = normalise(s_bar, cols < D, D, eps)
    tl.store(S_NORM + flat, s_norm.to(S_NORM.dtype.element_ty), mask=in_rows)


@triton.jit
def gru_bwd_kernel(
    Z, H, G_NORM, G_S, G_Z, G_H, n_rows, rows_per_m, stride_z_m, stride_h_m, stride_h_r, stride_gs_m, stride_gz_m, D, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """dZ (G_Z: rows of 4d, modality at stride_gz_m) and the direct dh (G_H: 2 x R x d) for
    BLOCK_R rows from ds̄ (G_NORM: 2 x R x d) and dS_n (G_S: rows of d, modality at
    stride_gs_m), recomputing the gates, S̄ and its normalisation (module docstring)."""
    ACC = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    r, z, n, pre_hn, h, s_bar, _, in_rows = _gates(
        Z, H, rows, cols, n_rows, rows_per_m, stride_z_m, stride_h_m, stride_h_r, D, ACC
    )
    s_norm, rstd = normalise(s_bar, mask_d, D, eps)
    flat = rows.to(tl.int64)[:, None] * D + cols[None, :]
    g_bar = normalise_backward(tl.load(G_NORM + flat, mask=in_rows, other=0.0).to(ACC), s_norm, rstd, mask_d, D)
    g_bar += tl.load(
        G_S + row_offsets(rows, rows_per_m, stride_gs_m, D)[:, None] + cols[None, :], mask=in_rows, other=0.0
    ).to(ACC)
    g_in = g_bar * (1.0 - z) * (1.0 - n * n)
    g_r = g_in * pre_hn * r * (1.0 - r)
    g_z = g_bar * (h - n) * z * (1.0 - z)
    gz_row = G_Z + row_offsets(rows, rows_per_m, stride_gz_m, 4 * D)[:, None] + cols[None, :]
    ty = G_Z.dtype.element_ty
    tl.store(gz_row, g_r.to(ty), mask=in_rows)
    tl.store(gz_row + D, g_z.to(ty), mask=in_rows)
    tl.store(gz_row + 2 * D, g_in.to(ty), mask=in_rows)
    tl.store(gz_row + 3 * D, (g_in * r).to(ty), mask=in_rows)
    tl.store(G_H + flat, (g_bar * z).to(G_H.dtype.element_ty), mask=in_rows)
