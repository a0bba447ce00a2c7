"""The GRU update of joint slot attention with the products that feed it, forward and
backward, one launch each way per iteration.

Symbols (torch.nn.GRUCell, gate order r, z, n; docs/model.md): input U = W_v C + b_v, hidden
h = S_{n-1}. The GRU's input weights are folded with W_v once per call,
W_iv = W_ih W_v (3d x d) and b_iv = W_ih b_v (jsa_fast/kernels/joint_slot_attention.py), so
that the input product reads the attention context C directly:

    Z_r  = C W_iv,r^T + h W_hh,r^T + b_iv,r + b_ih,r + b_hh,r      (likewise Z_z)
    Z_in = C W_iv,n^T + b_iv,n + b_ih,n,     Z_hn = h W_hh,n^T + b_hh,n
    r = sigmoid(Z_r),  z = sigmoid(Z_z),  n = tanh(Z_in + r Z_hn),
    S̄ = (1 - z) n + z h.

Forward (`gru_fwd_kernel`): six tile products (no product with a zero block) and the
gates in the epilogue; r, z, n and Z_hn are kept for backward, S̄ goes on to the MLP.

Backward (`gru_bwd_kernel`), for BLOCK_M whole rows: ds' = dY W_1 (dY: the MLP's
pre-ReLU gradient), then LN_ff's backward with its affine (s̄ = (S̄ - μ) / σ, s' = γ s̄ + β:
ds̄ = γ ds', dγ += ds' s̄, dβ += ds', summed into this program's partial row), then

    dS̄ = dS_n + (ds̄ - mean(ds̄) - s̄ mean(ds̄ s̄)) / σ
    dZ_in = dS̄ (1 - z)(1 - n^2),  dZ_hn = dZ_in r,  dZ_r = dZ_in Z_hn r (1 - r),
    dZ_z = dS̄ (h - n) z (1 - z),  dh (direct) = dS̄ z,

and μ, 1/σ of every row for the weight gradient of W_1 (which recomputes s').
"""

from __future__ import annotations

import triton
import triton.language as tl

from jsa_fast.kernels.linear import dot_tile

__all__ = ["gru_fwd_kernel", "gru_bwd_kernel"]


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # libdevice is absent under the interpreter
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _blend(gates, h_rows, mask, D, ACC: tl.constexpr):
    """S̄ = n + z (h - n) from the kept gates [r | z | n | Z_hn] and h."""
    z = tl.load(gates + D, mask=mask, other=0.0).to(ACC)
    n = tl.load(gates + 2 * D, mask=mask, other=0.0).to(ACC)
    h = tl.load(h_rows, mask=mask, other=0.0).to(ACC)
    return tl.where(mask, n + z * (h - n), 0.0)


@triton.jit
def gru_fwd_kernel(
    CTX, H, W_IV, W_HH, B_IH, B_HH, GATES, S_BAR,
    R, D, s_ctx_m, s_ctx_r, s_h_m, s_h_r, s_wiv_m, s_wiv_r, s_whh_m, s_bias_m, s_gates_m, s_gates_r, gates_off,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One BLOCK_M x BLOCK_N tile of S̄ and the gates (module docstring) for modality pid 1.

    CTX: C rows (s_ctx_m, s_ctx_r); H: h rows (s_h_m, s_h_r); W_IV: W_iv rows of
    s_wiv_r >= d + 1 elements, column d holding b_iv; W_HH: 2 x 3d x d; B_IH, B_HH: 2 x 3d;
    GATES: rows of [r | z | n | Z_hn] (4d, at s_gates_m / s_gates_r, from element
    gates_off on); S_BAR: 2 x R x d.
    """
    ACC: tl.constexpr = tl.float64 if DOT == tl.float64 else tl.float32
    m = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(D, BLOCK_N)
    rows = ((tl.program_id(0) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = ((tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m, mask_n = rows < R, cols < D
    offs_k = tl.arange(0, BLOCK_K)
    acc_r = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_z = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_in = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_hn = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    w_iv = W_IV + m * s_wiv_m + cols[None, :] * s_wiv_r
    w_hh = W_HH + m * s_whh_m + cols[None, :] * D
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < D
        in_a = mask_m[:, None] & mask_k[None, :]
        in_b = mask_k[:, None] & mask_n[None, :]
        c = tl.load(CTX + m * s_ctx_m + rows[:, None] * s_ctx_r + ks[None, :], mask=in_a, other=0.0)
        h = tl.load(H + m * s_h_m + rows[:, None] * s_h_r + ks[None, :], mask=in_a, other=0.0)
        acc_r = dot_tile(acc_r, c, tl.load(w_iv + ks[:, None], mask=in_b, other=0.0), DOT)
        acc_z = dot_tile(acc_z, c, tl.load(w_iv + D * s_wiv_r + ks[:, None], mask=in_b, other=0.0), DOT)
        acc_in = dot_tile(acc_in, c, tl.load(w_iv + 2 * D * s_wiv_r + ks[:, None], mask=in_b, other=0.0), DOT)
        acc_r = dot_tile(acc_r, h, tl.load(w_hh + ks[:, None], mask=in_b, other=0.0), DOT)
        acc_z = dot_tile(acc_z, h, tl.load(w_hh + D * D + ks[:, None], mask=in_b, other=0.0), DOT)
        acc_hn = dot_tile(acc_hn, h, tl.load(w_hh + 2 * D * D + ks[:, None], mask=in_b, other=0.0), DOT)

    bias_offs = m * s_bias_m + cols
    b_iv = W_IV + m * s_wiv_m + cols * s_wiv_r + D  # column d: W_ih b_v
    bias_r = (
        tl.load(b_iv, mask=mask_n, other=0.0).to(ACC)
        + tl.load(B_IH + bias_offs, mask=mask_n, other=0.0).to(ACC)
        + tl.load(B_HH + bias_offs, mask=mask_n, other=0.0).to(ACC)
    )
    bias_z = (
        tl.load(b_iv + D * s_wiv_r, mask=mask_n, other=0.0).to(ACC)
        + tl.load(B_IH + bias_offs + D, mask=mask_n, other=0.0).to(ACC)
        + tl.load(B_HH + bias_offs + D, mask=mask_n, other=0.0).to(ACC)
    )
    bias_in = tl.load(b_iv + 2 * D * s_wiv_r, mask=mask_n, other=0.0).to(ACC) + tl.load(
        B_IH + bias_offs + 2 * D, mask=mask_n, other=0.0
    ).to(ACC)
    bias_hn = tl.load(B_HH + bias_offs + 2 * D, mask=mask_n, other=0.0).to(ACC)
    r = _sigmoid(acc_r + bias_r[None, :])
    z = _sigmoid(acc_z + bias_z[None, :])
    pre_hn = acc_hn + bias_hn[None, :]
    n = _tanh(acc_in + bias_in[None, :] + r * pre_hn)
    mask = mask_m[:, None] & mask_n[None, :]
    h = tl.load(H + m * s_h_m + rows[:, None] * s_h_r + cols[None, :], mask=mask, other=0.0).to(ACC)
    gates = GATES + gates_off + m * s_gates_m + rows[:, None] * s_gates_r + cols[None, :]
    ty = GATES.dtype.element_ty
    tl.store(gates, r.to(ty), mask=mask)
    tl.store(gates + D, z.to(ty), mask=mask)
    tl.store(gates + 2 * D, n.to(ty), mask=mask)
    tl.store(gates + 3 * D, pre_hn.to(ty), mask=mask)
    tl.store(
        S_BAR + m * R * D + rows[:, None] * D + cols[None, :], (n + z * (h - n)).to(S_BAR.dtype.element_ty), mask=mask
    )


@triton.jit
def gru_bwd_kernel(
    DY, W1, GATES, H, G_S, LN_W, G_Z, G_H, S_BAR, STATS, PARTIAL,
    R, D, HID, s_dy_m, s_w1_m, s_gates_m, s_gates_r, s_h_m, s_h_r, s_gs_m, s_ln_m, s_stats_m, s_partial_p, s_partial_m,
    eps,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dZ and the direct dh for BLOCK_M whole rows of modality pid 1 (module docstring).

    DY: 2 x R x H pre-ReLU gradients (s_dy_m); W1: 2 x H x d; GATES, H as in the forward;
    G_S: dS_n, 2 x R x d (s_gs_m); LN_W: γ_ff (2 x d). Writes G_Z (2 x R x 4d), G_H and
    S_BAR (S̄, 2 x R x d each), STATS (μ then 1/σ, 2 x 2 x R at s_stats_m) and adds ds' s̄ and ds' to rows 0 and
    1 of PARTIAL[pid 0, m] (rows of d, programs at s_partial_p, modalities at s_partial_m).
    """
    ACC: tl.constexpr = tl.float64 if DOT == tl.float64 else tl.float32
    m = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_m, mask_d = rows < R, cols < D
    mask = mask_m[:, None] & mask_d[None, :]
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for k0 in range(0, HID, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < HID
        dy = tl.load(
            DY + m * s_dy_m + rows[:, None] * HID + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        w1 = tl.load(
            W1 + m * s_w1_m + ks[:, None] * D + cols[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0
        )
        acc = dot_tile(acc, dy, w1, DOT)

    # Few whole-row tiles live at once (registers): the gates are read again where needed.
    gates = GATES + m * s_gates_m + rows[:, None] * s_gates_r + cols[None, :]
    h_rows = H + m * s_h_m + rows[:, None] * s_h_r + cols[None, :]
    s_bar = _blend(gates, h_rows, mask, D, ACC)
    mean = tl.sum(s_bar, axis=1) / D
    centred = tl.where(mask, s_bar - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    s_norm = centred * rstd[:, None]
    tl.store(S_BAR + m * R * D + rows[:, None] * D + cols[None, :], s_bar.to(S_BAR.dtype.element_ty), mask=mask)
    partial = PARTIAL + pid.to(tl.int64) * s_partial_p + m * s_partial_m + cols
    tl.store(partial, tl.load(partial, mask=mask_d, other=0.0) + tl.sum(acc * s_norm, axis=0), mask=mask_d)
    tl.store(partial + D, tl.load(partial + D, mask=mask_d, other=0.0) + tl.sum(acc, axis=0), mask=mask_d)
    g_norm = acc * tl.load(LN_W + m * s_ln_m + cols, mask=mask_d, other=0.0).to(ACC)[None, :]
    mean_g = tl.sum(g_norm, axis=1) / D
    mean_gy = tl.sum(g_norm * s_norm, axis=1) / D
    g_bar = tl.where(mask, (g_norm - mean_g[:, None] - s_norm * mean_gy[:, None]) * rstd[:, None], 0.0)
    g_bar += tl.load(G_S + m * s_gs_m + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
    gz = G_Z + m * R * 4 * D + rows[:, None] * 4 * D + cols[None, :]
    ty = G_Z.dtype.element_ty
    z = tl.load(gates + D, mask=mask, other=0.0).to(ACC)
    tl.store(G_H + m * R * D + rows[:, None] * D + cols[None, :], (g_bar * z).to(G_H.dtype.element_ty), mask=mask)
    n = tl.load(gates + 2 * D, mask=mask, other=0.0).to(ACC)
    h = tl.load(h_rows, mask=mask, other=0.0).to(ACC)
    tl.store(gz + D, (g_bar * (h - n) * z * (1.0 - z)).to(ty), mask=mask)
    g_in = g_bar * (1.0 - z) * (1.0 - n * n)
    tl.store(gz + 2 * D, g_in.to(ty), mask=mask)
    r = tl.load(gates, mask=mask, other=0.0).to(ACC)
    tl.store(gz + 3 * D, (g_in * r).to(ty), mask=mask)
    pre_hn = tl.load(gates + 3 * D, mask=mask, other=0.0).to(ACC)
    tl.store(gz, (g_in * pre_hn * r * (1.0 - r)).to(ty), mask=mask)
    tl.store(STATS + m * s_stats_m + rows, mean.to(STATS.dtype.element_ty), mask=mask_m)
    tl.store(STATS + m * s_stats_m + R + rows, rstd.to(STATS.dtype.element_ty), mask=mask_m)
