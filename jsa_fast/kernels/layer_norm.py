"""LayerNorm kernels of joint slot attention, with the products around them, forward and
backward.

- LN_in on the tokens, after the training mask swaps masked tokens for the modality's
  mask token: x̂ = γ_in (x - μ) / σ + β_in, one pass over both modalities' tokens, read
  with any strides (`ln_in_fwd_kernel`).
- Its backward (`token_grad_kernel`) first forms dL/dx̂ of every token from what the
  attention backward left per iteration, instead of accumulating an fp32 token gradient
  across iterations: with Â_n, scale dM_n (and, on the last iteration, scale dM' of the
  other modality's queries) as the coefficients of each token,

      dx̂ = Σ_n (Â_n dC_n + scale dM_n g_n) + scale dM' g',

  one small product per item; then dL/dx = (γ dx̂ - mean(γ dx̂) - y mean(γ dx̂ y)) / σ with
  y = (x - μ) / σ, or the mask token's gradient for a masked token; dγ_in, dβ_in and the
  mask tokens' gradients are summed into a partial row per program (a fixed grid: scratch
  bounded by the grid, not by B).
- LN_slots' backward (`slot_norm_bwd_kernel`) with the products that feed it: for BLOCK_M
  whole rows, ds' = dG w_logit^T (+ dQ W_q on the last iteration), the hidden product
  dh = dZ_h W_hh, then dL/dS_{n-1} = dh + dh_direct + (γ ds' - ...) / σ.

LN_ff lives in jsa_fast/kernels/gru.py, beside the GRU gates that produce its input.
"""

from __future__ import annotations

import triton
import triton.language as tl

from jsa_fast.kernels.linear import dot_tile

__all__ = ["ln_in_fwd_kernel", "token_grad_kernel", "slot_norm_bwd_kernel", "broadcast_slots_kernel"]


@triton.jit
def _token_rows(
    rows, n_img_rows, l_img, l_aud, sx_img_b, sx_img_l, sx_aud_b, sx_aud_l, sm_img_b, sm_img_l, sm_aud_b, sm_aud_l
):
    """Element offsets of token rows of the stack [B Lv image rows; B La audio rows] in
    their own tensors (x and mask), and whether each is an image row."""
    is_img = rows < n_img_rows
    img = tl.where(is_img, rows, 0)
    aud = tl.where(is_img, 0, rows - n_img_rows)
    x_off = tl.where(
        is_img,
        (img // l_img) * sx_img_b + (img % l_img) * sx_img_l,
        (aud // l_aud) * sx_aud_b + (aud % l_aud) * sx_aud_l,
    )
    mask_off = tl.where(
        is_img,
        (img // l_img) * sm_img_b + (img % l_img) * sm_img_l,
        (aud // l_aud) * sm_aud_b + (aud % l_aud) * sm_aud_l,
    )
    return is_img, x_off, mask_off


@triton.jit
def _masked_rows(X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, is_img, x_off, mask_off, valid, cols, mask_d, sx_img_d,
                 sx_aud_d, s_token_m, HAS_MASK: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Token rows (the mask token where masked) -> (x, masked)."""
    in_img = (valid & is_img)[:, None] & mask_d[None, :]
    in_aud = (valid & ~is_img)[:, None] & mask_d[None, :]
    x = tl.load(X_IMG + x_off[:, None] + cols[None, :] * sx_img_d, mask=in_img, other=0.0).to(ACC)
    x += tl.load(X_AUD + x_off[:, None] + cols[None, :] * sx_aud_d, mask=in_aud, other=0.0).to(ACC)
    masked = valid != valid
    if HAS_MASK:
        flag = tl.load(MASK_IMG + mask_off, mask=valid & is_img, other=0) + tl.load(
            MASK_AUD + mask_off, mask=valid & ~is_img, other=0
        )
        masked = flag != 0
        modality = tl.where(is_img, 0, 1).to(tl.int64)
        token = tl.load(
            TOKEN + modality[:, None] * s_token_m + cols[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0
        ).to(ACC)
        x = tl.where(masked[:, None], token, x)
    return x, masked


@triton.jit
def _normalise(x, mask_d, D, eps):
    """x: rows (0 beyond D) -> ((x - μ) / σ, 1 / σ), biased variance."""
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(mask_d[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    return centred * rstd[:, None], rstd


@triton.jit
def ln_in_fwd_kernel(
    X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, W, B, OUT, n_img_rows, n_rows, l_img, l_aud, D,
    sx_img_b, sx_img_l, sx_img_d, sx_aud_b, sx_aud_l, sx_aud_d, sm_img_b, sm_img_l, sm_aud_b, sm_aud_l, s_token_m, s_w_m,
    eps, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """x̂ = γ_in^m (x - μ) / σ + β_in^m for BLOCK_R rows of the token stack (x the mask
    token where masked; m the row's modality; W, B: 2 x d at s_w_m) -> OUT (n_rows x d).
    x and the masks are read with their own strides (b, l, d)."""
    ACC = tl.float64 if FP64 else tl.float32
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    valid = rows < n_rows
    is_img, x_off, mask_off = _token_rows(rows, n_img_rows, l_img, l_aud, sx_img_b, sx_img_l, sx_aud_b, sx_aud_l,
                                          sm_img_b, sm_img_l, sm_aud_b, sm_aud_l)  # fmt: skip
    x, _ = _masked_rows(X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, is_img, x_off, mask_off, valid, cols, mask_d,
                        sx_img_d, sx_aud_d, s_token_m, HAS_MASK, ACC)  # fmt: skip
    y, _ = _normalise(x, mask_d, D, eps)
    affine = tl.where(is_img, 0, s_w_m).to(tl.int64)[:, None] + cols[None, :]
    gamma = tl.load(W + affine, mask=mask_d[None, :], other=0.0).to(ACC)
    beta = tl.load(B + affine, mask=mask_d[None, :], other=0.0).to(ACC)
    tl.store(
        OUT + rows[:, None] * D + cols[None, :],
        (y * gamma + beta).to(OUT.dtype.element_ty),
        mask=valid[:, None] & mask_d[None, :],
    )


@triton.jit
def _token_grad_strip(COEF, ROWS_C, ROWS_G, ROWS_X, coef_rows, t_mask, cols, mask_d, item_rows, n_coef, S, NS2,
                      s_rc_n, s_rc_r, s_rg_n, s_rg_r, s_rx_r, DOT: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """dx̂ for the tokens of one item and BLOCK_D columns: their coefficients (L x n_coef:
    per iteration Â then scale dM over the S slots, then the cross-modal scale dM')
    times the matching rows (dC_n, g_n of this modality's slot rows, g' of the other's)."""
    kk = tl.arange(0, BLOCK_C)
    coef = tl.load(
        COEF + coef_rows[:, None] * n_coef + kk[None, :], mask=t_mask[:, None] & (kk < n_coef)[None, :], other=0.0
    )
    n = kk // (2 * S)
    kind = (kk % (2 * S)) // S
    s = kk % S
    in_k = kk < n_coef
    is_cross = kk >= NS2
    row_c = n * s_rc_n + (item_rows + s) * s_rc_r
    row_g = n * s_rg_n + (item_rows + s) * s_rg_r
    row_x = (item_rows + (kk - NS2)) * s_rx_r  # the other modality's queries of the same item
    want_c = in_k & ~is_cross & (kind == 0)
    want_g = in_k & ~is_cross & (kind == 1)
    want_x = in_k & is_cross
    m_c = want_c[:, None] & mask_d[None, :]
    m_g = want_g[:, None] & mask_d[None, :]
    m_x = want_x[:, None] & mask_d[None, :]
    rows = tl.load(ROWS_C + tl.where(want_c, row_c, 0)[:, None] + cols[None, :], mask=m_c, other=0.0)
    rows += tl.load(ROWS_G + tl.where(want_g, row_g, 0)[:, None] + cols[None, :], mask=m_g, other=0.0)
    rows += tl.load(ROWS_X + tl.where(want_x, row_x, 0)[:, None] + cols[None, :], mask=m_x, other=0.0)
    ACC: tl.constexpr = tl.float64 if DOT == tl.float64 else tl.float32
    return dot_tile(tl.zeros([coef.shape[0], cols.shape[0]], dtype=ACC), coef, rows, DOT)


@triton.jit
def token_grad_kernel(
    X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, W, COEF, ROWS_C, ROWS_G, ROWS_X, GX_IMG, GX_AUD, PARTIAL,
    batch, l_img, l_aud, D, S, n_coef, NS2,
    sx_img_b, sx_img_l, sx_img_d, sx_aud_b, sx_aud_l, sx_aud_d, sm_img_b, sm_img_l, sm_aud_b, sm_aud_l, s_token_m, s_w_m,
    s_rc_m, s_rc_n, s_rc_r, s_rg_m, s_rg_n, s_rg_r, s_rx_m, s_rx_r, s_partial_p, s_partial_m, eps,
    HAS_MASK: tl.constexpr, DOT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dL/dx (module docstring) for the items pid, pid + grid, ... of the 2B (modality, item)
    pairs: all tokens of an item, d in strips. Adds dγ_in, dβ_in and the masked tokens'
    dL/dx to rows 4, 5, 6 of this program's PARTIAL[pid, m]. COEF: token stack x n_coef;
    ROWS_C: dC (2 x N x R x d at s_rc_*), ROWS_G: G (2 x N x R x (>= d) at s_rg_*),
    ROWS_X: the cross weights G' (2 x R x (>= d))."""
    ACC: tl.constexpr = tl.float64 if DOT == tl.float64 else tl.float32
    pid = tl.program_id(0)
    offs_l = tl.arange(0, BLOCK_L).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    n_img_rows = batch * l_img
    for pair in range(pid, 2 * batch, tl.num_programs(0)):
        m = (pair // batch).to(tl.int64)
        b = (pair % batch).to(tl.int64)
        length = tl.where(m == 0, l_img, l_aud)
        first = tl.where(m == 0, b * l_img, n_img_rows + b * l_aud)
        t_mask = offs_l < length
        rows = first + offs_l
        is_img, x_off, mask_off = _token_rows(rows, n_img_rows, l_img, l_aud, sx_img_b, sx_img_l, sx_aud_b, sx_aud_l,
                                              sm_img_b, sm_img_l, sm_aud_b, sm_aud_l)  # fmt: skip
        item_rows = b * S
        rows_c = ROWS_C + m * s_rc_m
        rows_g = ROWS_G + m * s_rg_m
        rows_x = ROWS_X + (1 - m) * s_rx_m
        # x's statistics (the mask token where masked)
        total = tl.zeros([BLOCK_L], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            x, _ = _masked_rows(X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, is_img, x_off, mask_off, t_mask, cols, cols < D,
                                sx_img_d, sx_aud_d, s_token_m, HAS_MASK, ACC)  # fmt: skip
            total += tl.sum(x, axis=1)
        mean = total / D
        squares = tl.zeros([BLOCK_L], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            mask_d = cols < D
            x, _ = _masked_rows(X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, is_img, x_off, mask_off, t_mask, cols, mask_d,
                                sx_img_d, sx_aud_d, s_token_m, HAS_MASK, ACC)  # fmt: skip
            centred = tl.where(t_mask[:, None] & mask_d[None, :], x - mean[:, None], 0.0)
            squares += tl.sum(centred * centred, axis=1)
        rstd = 1.0 / tl.sqrt(squares / D + eps)
        # dx̂, the row sums of the normalisation's backward, dγ_in and dβ_in
        sum_g = tl.zeros([BLOCK_L], dtype=ACC)
        sum_gy = tl.zeros([BLOCK_L], dtype=ACC)
        partial = PARTIAL + pid.to(tl.int64) * s_partial_p + m * s_partial_m
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            mask_d = cols < D
            in_rows = t_mask[:, None] & mask_d[None, :]
            x, _ = _masked_rows(X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, is_img, x_off, mask_off, t_mask, cols, mask_d,
                                sx_img_d, sx_aud_d, s_token_m, HAS_MASK, ACC)  # fmt: skip
            y = tl.where(in_rows, (x - mean[:, None]) * rstd[:, None], 0.0)
            g_hat = _token_grad_strip(COEF, rows_c, rows_g, rows_x, rows, t_mask, cols, mask_d, item_rows, n_coef, S,
                                      NS2, s_rc_n, s_rc_r, s_rg_n, s_rg_r, s_rx_r, DOT, BLOCK_C)  # fmt: skip
            g_hat = tl.where(in_rows, g_hat, 0.0)
            g = g_hat * tl.load(W + m * s_w_m + cols, mask=mask_d, other=0.0).to(ACC)[None, :]
            sum_g += tl.sum(g, axis=1)
            sum_gy += tl.sum(g * y, axis=1)
            gamma_row = partial + 4 * D + cols
            tl.store(gamma_row, tl.load(gamma_row, mask=mask_d, other=0.0) + tl.sum(g_hat * y, axis=0), mask=mask_d)
            beta_row = partial + 5 * D + cols
            tl.store(beta_row, tl.load(beta_row, mask=mask_d, other=0.0) + tl.sum(g_hat, axis=0), mask=mask_d)
        mean_g = sum_g / D
        mean_gy = sum_gy / D
        # dL/dx, or the mask token's
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            mask_d = cols < D
            in_rows = t_mask[:, None] & mask_d[None, :]
            x, masked = _masked_rows(X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, is_img, x_off, mask_off, t_mask, cols,
                                     mask_d, sx_img_d, sx_aud_d, s_token_m, HAS_MASK, ACC)  # fmt: skip
            y = tl.where(in_rows, (x - mean[:, None]) * rstd[:, None], 0.0)
            g_hat = _token_grad_strip(COEF, rows_c, rows_g, rows_x, rows, t_mask, cols, mask_d, item_rows, n_coef, S,
                                      NS2, s_rc_n, s_rc_r, s_rg_n, s_rg_r, s_rx_r, DOT, BLOCK_C)  # fmt: skip
            g = g_hat * tl.load(W + m * s_w_m + cols, mask=mask_d, other=0.0).to(ACC)[None, :]
            gx = tl.where(in_rows, (g - mean_g[:, None] - y * mean_gy[:, None]) * rstd[:, None], 0.0)
            token_row = partial + 6 * D + cols
            tl.store(
                token_row,
                tl.load(token_row, mask=mask_d, other=0.0) + tl.sum(tl.where(masked[:, None], gx, 0.0), axis=0),
                mask=mask_d,
            )
            gx = tl.where(masked[:, None], 0.0, gx)
            out = (b * l_img + offs_l)[:, None] * D + cols[None, :]
            if m == 0:
                tl.store(GX_IMG + out, gx.to(GX_IMG.dtype.element_ty), mask=in_rows)
            else:
                out = (b * l_aud + offs_l)[:, None] * D + cols[None, :]
                tl.store(GX_AUD + out, gx.to(GX_AUD.dtype.element_ty), mask=in_rows)


@triton.jit
def slot_norm_bwd_kernel(
    DG, W_LOGIT, DQ, W_Q, DZ, W_HH, G_DIRECT, S_PREV, LN_W, G_OUT, STATS, PARTIAL,
    R, D, KG, s_dg_m, s_dg_r, s_wl_m, s_wl_r, s_dq_m, s_wq_m, s_whh_m, s_s_m, s_s_r, s_ln_m, s_out_m, s_stats_m,
    s_partial_p, s_partial_m, eps,
    LAST: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dL/dS_{n-1} for BLOCK_M whole rows of modality pid 1 (module docstring):

        ds' = dG w_logit^T (K = KG = d + 1)  [+ dQ W_q, LAST]
        dS_{n-1} = dZ_h W_hh + G_DIRECT + (γ ds' - mean - s̃ mean(γ ds' s̃)) / σ

    with dZ_h = the r, z and Z_hn blocks of dZ (2 x R x 4d) and s̃ = LN_slots(S_{n-1})
    without affine. Adds ds' s̃ and ds' to rows 2 and 3 of PARTIAL[pid 0, m]; writes μ,
    1/σ of S_{n-1} to STATS (2 x 2 x R at s_stats_m) for the weight gradients.
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
    for k0 in range(0, KG, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < KG
        dg = tl.load(
            DG + m * s_dg_m + rows[:, None] * s_dg_r + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        w = tl.load(
            W_LOGIT + m * s_wl_m + cols[None, :] * s_wl_r + ks[:, None],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = dot_tile(acc, dg, w, DOT)
    if LAST:
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            mask_k = ks < D
            dq = tl.load(
                DQ + m * s_dq_m + rows[:, None] * D + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
            )
            w = tl.load(
                W_Q + m * s_wq_m + ks[:, None] * D + cols[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0
            )
            acc = dot_tile(acc, dq, w, DOT)
    hidden = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for k0 in range(0, 3 * D, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < 3 * D
        gate_cols = tl.where(ks < 2 * D, ks, ks + D)  # r, z, then Z_hn (skipping Z_in)
        dz = tl.load(
            DZ + m * R * 4 * D + rows[:, None] * 4 * D + gate_cols[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = tl.load(
            W_HH + m * s_whh_m + ks[:, None] * D + cols[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0
        )
        hidden = dot_tile(hidden, dz, w, DOT)

    s = tl.load(S_PREV + m * s_s_m + rows[:, None] * s_s_r + cols[None, :], mask=mask, other=0.0).to(ACC)
    mean = tl.sum(s, axis=1) / D
    centred = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    s_norm = centred * rstd[:, None]
    partial = PARTIAL + pid.to(tl.int64) * s_partial_p + m * s_partial_m + cols
    tl.store(
        partial + 2 * D, tl.load(partial + 2 * D, mask=mask_d, other=0.0) + tl.sum(acc * s_norm, axis=0), mask=mask_d
    )
    tl.store(partial + 3 * D, tl.load(partial + 3 * D, mask=mask_d, other=0.0) + tl.sum(acc, axis=0), mask=mask_d)
    g = acc * tl.load(LN_W + m * s_ln_m + cols, mask=mask_d, other=0.0).to(ACC)[None, :]
    mean_g = tl.sum(g, axis=1) / D
    mean_gy = tl.sum(g * s_norm, axis=1) / D
    grad = tl.where(mask, (g - mean_g[:, None] - s_norm * mean_gy[:, None]) * rstd[:, None], 0.0)
    grad += hidden + tl.load(G_DIRECT + m * R * D + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
    tl.store(G_OUT + m * s_out_m + rows[:, None] * D + cols[None, :], grad.to(G_OUT.dtype.element_ty), mask=mask)
    tl.store(STATS + m * s_stats_m + rows, mean.to(STATS.dtype.element_ty), mask=mask_m)
    tl.store(STATS + m * s_stats_m + R + rows, rstd.to(STATS.dtype.element_ty), mask=mask_m)


@triton.jit
def broadcast_slots_kernel(S0, OUT, R, S, D, s_out_m, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[m, r] = S0[r mod S] for both modalities: the shared initial slots as the first
    iteration's rows (S0: S x d; OUT rows of d at s_out_m)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < 2 * R)[:, None] & (cols < D)[None, :]
    s = tl.load(S0 + ((rows % R) % S)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    out = OUT + ((rows // R) * s_out_m + (rows % R) * D)[:, None] + cols[None, :]
    tl.store(out, s.to(OUT.dtype.element_ty), mask=mask)
