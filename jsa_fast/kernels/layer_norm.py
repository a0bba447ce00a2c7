"""Row-wise LayerNorm kernels of joint slot attention, forward and backward.

Three LayerNorms act on whole d-wide rows (docs/model.md):
- LN_in on the tokens, after the training mask swaps masked tokens for the modality's
  mask token: x̂ = γ_in (x - μ) / σ + β_in, one pass over both modalities' tokens;
- LN_slots on the slots S_{n-1}, fused with the residual that produces them,
  S_n = S̄ + MLP(...): the kernel gets S̄ and the MLP's last product and writes S_n and
  its normalisation s̃_n = (S_n - μ) / σ (the affine γ_s, β_s is folded into the
  weights that read s̃, jsa_fast/fused.py);
- LN_ff lives in jsa_fast/kernels/gru.py, fused with the GRU gates that produce its input.

Every normalisation is recomputed from its input in backward (μ and σ are d-wide sums,
cheaper to redo than to keep). With y = (x - μ) / σ and g = dL/dy, the input gradient is

    dL/dx = (g - mean(g) - y mean(g y)) / σ.

Rows of the slot kernels are those of a (2, R) stack, modality first (R = B S), each
modality's rows at `stride_m` from the other's, so that a slice of a per-iteration buffer
(2, N, R, ...) is read in place.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "normalise", "normalise_backward", "row_offsets",
    "ln_in_fwd_kernel", "ln_in_bwd_kernel", "residual_norm_kernel", "slot_norm_bwd_kernel",
]  # fmt: skip


@triton.jit
def normalise(x, mask_d, D, eps):
    """x: BLOCK_R x BLOCK_D rows (0 beyond D) -> ((x - μ) / σ, 1 / σ), biased variance."""
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(mask_d[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    return centred * rstd[:, None], rstd


@triton.jit
def normalise_backward(g, y, rstd, mask_d, D):
    """dL/dx of y = normalise(x) from g = dL/dy (module docstring)."""
    mean_g = tl.sum(g, axis=1) / D
    mean_gy = tl.sum(g * y, axis=1) / D
    return tl.where(mask_d[None, :], (g - mean_g[:, None] - y * mean_gy[:, None]) * rstd[:, None], 0.0)


@triton.jit
def row_offsets(rows, rows_per_m, stride_m, stride_r):
    """Element offsets of rows of a (2, rows_per_m) stack: modality at stride_m, row at stride_r."""
    rows = rows.to(tl.int64)
    return (rows // rows_per_m) * stride_m + (rows % rows_per_m) * stride_r


@triton.jit
def _masked_tokens(X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, rows, cols, n_img_rows, n_rows, D,
                   HAS_MASK: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Rows of the token stack [image tokens; audio tokens] (B Lv + B La rows of d), the
    masked ones replaced by their modality's mask token -> (x, is_img, masked, valid)."""
    valid = rows < n_rows
    is_img = rows < n_img_rows
    mask_d = cols < D
    img_rows = tl.where(is_img, rows, 0).to(tl.int64)
    aud_rows = tl.where(is_img, 0, rows - n_img_rows).to(tl.int64)
    in_img = (valid & is_img)[:, None] & mask_d[None, :]
    in_aud = (valid & ~is_img)[:, None] & mask_d[None, :]
    x = tl.load(X_IMG + img_rows[:, None] * D + cols[None, :], mask=in_img, other=0.0).to(ACC)
    x += tl.load(X_AUD + aud_rows[:, None] * D + cols[None, :], mask=in_aud, other=0.0).to(ACC)
    masked = rows < 0
    if HAS_MASK:
        flag = tl.load(MASK_IMG + img_rows, mask=valid & is_img, other=0) + tl.load(
            MASK_AUD + aud_rows, mask=valid & ~is_img, other=0
        )
        masked = flag != 0
        modality = tl.where(is_img, 0, 1).to(tl.int64)
        token = tl.load(
            TOKEN + modality[:, None] * D + cols[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0
        ).to(ACC)
        x = tl.where(masked[:, None], token, x)
    return x, is_img, masked, valid


@triton.jit
def ln_in_fwd_kernel(
    X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, W, B, OUT, n_img_rows, n_rows, D, eps,
    HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """x̂ = γ_in^m (x - μ) / σ + β_in^m for BLOCK_R rows of the token stack (x the mask
    token where masked; m the row's modality; W, B: 2 x d) -> OUT (n_rows x d)."""
    ACC = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    x, is_img, _, valid = _masked_tokens(
        X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, rows, cols, n_img_rows, n_rows, D, HAS_MASK, ACC
    )
    y, _ = normalise(x, mask_d, D, eps)
    affine = tl.where(is_img, 0, D).to(tl.int64)[:, None] + cols[None, :]
    gamma = tl.load(W + affine, mask=mask_d[None, :], other=0.0).to(ACC)
    beta = tl.load(B + affine, mask=mask_d[None, :], other=0.0).to(ACC)
    out = OUT + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out, (y * gamma + beta).to(OUT.dtype.element_ty), mask=valid[:, None] & mask_d[None, :])


@triton.jit
def ln_in_bwd_kernel(
    X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, W, G_OUT, GX_IMG, GX_AUD, PARTIAL, n_img_rows, n_rows, D, eps,
    HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """Backward of ln_in_fwd_kernel for BLOCK_R rows, from g = dL/dx̂ (G_OUT, n_rows x d).

    dL/dx = normalise_backward(γ_in g) goes to GX_IMG / GX_AUD, or, for a masked row, to
    the mask token (and 0 to x). PARTIAL[program] (3 x 2 x d) gets this program's sums
    per modality of g y (dγ_in), g (dβ_in) and the masked rows' dL/dx (mask token).
    """
    ACC = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    x, is_img, masked, valid = _masked_tokens(
        X_IMG, X_AUD, MASK_IMG, MASK_AUD, TOKEN, rows, cols, n_img_rows, n_rows, D, HAS_MASK, ACC
    )
    y, rstd = normalise(x, mask_d, D, eps)
    in_rows = valid[:, None] & mask_d[None, :]
    g = tl.load(G_OUT + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=in_rows, other=0.0).to(ACC)
    gamma = tl.load(
        W + tl.where(is_img, 0, D).to(tl.int64)[:, None] + cols[None, :], mask=mask_d[None, :], other=0.0
    ).to(ACC)
    gx = normalise_backward(g * gamma, y, rstd, mask_d, D)

    img_rows = tl.where(is_img, rows, 0).to(tl.int64)
    aud_rows = tl.where(is_img, 0, rows - n_img_rows).to(tl.int64)
    gx_out = tl.where(masked[:, None], 0.0, gx)
    tl.store(
        GX_IMG + img_rows[:, None] * D + cols[None, :],
        gx_out.to(GX_IMG.dtype.element_ty),
        mask=in_rows & is_img[:, None],
    )
    tl.store(
        GX_AUD + aud_rows[:, None] * D + cols[None, :],
        gx_out.to(GX_AUD.dtype.element_ty),
        mask=in_rows & ~is_img[:, None],
    )

    base = PARTIAL + pid.to(tl.int64) * 6 * D + cols
    row_modality = tl.where(is_img, 0, 1)
    for modality in tl.static_range(2):
        mine = (row_modality == modality)[:, None] & in_rows
        tl.store(base + modality * D, tl.sum(tl.where(mine, g * y, 0.0), axis=0), mask=mask_d)
        tl.store(base + (2 + modality) * D, tl.sum(tl.where(mine, g, 0.0), axis=0), mask=mask_d)
        tl.store(base + (4 + modality) * D, tl.sum(tl.where(mine & masked[:, None], gx, 0.0), axis=0), mask=mask_d)


@triton.jit
def residual_norm_kernel(
    S_BAR, Y, BIAS, S_OUT, S_NORM, SLOTS_IMG, SLOTS_AUD, n_rows, rows_per_m, S, stride_out_m, stride_out_r,
    stride_norm_m, D, eps, MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """The slots of one iteration and their LN_slots normalisation, for BLOCK_R rows.

    MODE 0 (S_0): S = S_BAR[r mod S] (the shared initial slots, S x d) for every row.
    MODE 1: S_n = S_BAR + Y + BIAS[m] (S̄, the MLP's last product, b_2; 2 x R x d).
    Both write S (S_OUT, rows at stride_out_m / stride_out_r) and s̃ = normalise(S)
    (S_NORM, rows contiguous in each modality, modality at stride_norm_m).
    MODE 2 (S_N): S_N as in MODE 1 into the outputs SLOTS_IMG / SLOTS_AUD (R x d each).
    """
    ACC = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    valid = rows < n_rows
    in_rows = valid[:, None] & mask_d[None, :]
    modality = (rows // rows_per_m).to(tl.int64)
    r = (rows % rows_per_m).to(tl.int64)
    flat = rows.to(tl.int64)[:, None] * D + cols[None, :]
    if MODE == 0:
        s = tl.load(S_BAR + (r % S)[:, None] * D + cols[None, :], mask=in_rows, other=0.0).to(ACC)
    else:
        s = tl.load(S_BAR + flat, mask=in_rows, other=0.0).to(ACC) + tl.load(Y + flat, mask=in_rows, other=0.0).to(ACC)
        s += tl.load(BIAS + modality[:, None] * D + cols[None, :], mask=in_rows, other=0.0).to(ACC)
    if MODE == 2:
        out = r[:, None] * D + cols[None, :]
        tl.store(SLOTS_IMG + out, s.to(SLOTS_IMG.dtype.element_ty), mask=in_rows & (modality == 0)[:, None])
        tl.store(SLOTS_AUD + out, s.to(SLOTS_AUD.dtype.element_ty), mask=in_rows & (modality == 1)[:, None])
    else:
        s_out = S_OUT + (modality * stride_out_m + r * stride_out_r)[:, None] + cols[None, :]
        tl.store(s_out, s.to(S_OUT.dtype.element_ty), mask=in_rows)
        y, _ = normalise(s, mask_d, D, eps)
        norm_out = S_NORM + (modality * stride_norm_m + r * D)[:, None] + cols[None, :]
        tl.store(norm_out, y.to(S_NORM.dtype.element_ty), mask=in_rows)


@triton.jit
def slot_norm_bwd_kernel(
    G_NORM, S_PREV, G_DIRECT, G_HIDDEN, G_OUT, n_rows, rows_per_m, stride_s_m, stride_s_r, stride_gh_r, stride_out_m, D, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """dL/dS_{n-1} for BLOCK_R rows, the sum of its three uses in iteration n:

        G_OUT = G_DIRECT + G_HIDDEN + normalise_backward(G_NORM; S_{n-1})

    (the GRU blend's z dL/dS̄, the GRU's hidden product, LN_slots behind the logits and
    queries). S_PREV: S_{n-1} rows (stride_s_m, stride_s_r); G_HIDDEN: rows at stride_gh_r
    (a column slice); G_NORM, G_DIRECT: 2 x R x d; G_OUT: rows contiguous per modality,
    modality at stride_out_m.
    """
    ACC = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    in_rows = (rows < n_rows)[:, None] & mask_d[None, :]
    modality = (rows // rows_per_m).to(tl.int64)
    r = (rows % rows_per_m).to(tl.int64)
    flat = rows.to(tl.int64)[:, None] * D + cols[None, :]
    s = tl.load(S_PREV + (modality * stride_s_m + r * stride_s_r)[:, None] + cols[None, :], mask=in_rows, other=0.0).to(
        ACC
    )
    y, rstd = normalise(s, mask_d, D, eps)
    g = normalise_backward(tl.load(G_NORM + flat, mask=in_rows, other=0.0).to(ACC), y, rstd, mask_d, D)
    g += tl.load(G_DIRECT + flat, mask=in_rows, other=0.0).to(ACC)
    g += tl.load(
        G_HIDDEN + (modality * rows_per_m * stride_gh_r + r * stride_gh_r)[:, None] + cols[None, :],
        mask=in_rows,
        other=0.0,
    ).to(ACC)
    tl.store(
        G_OUT + (modality * stride_out_m + r * D)[:, None] + cols[None, :], g.to(G_OUT.dtype.element_ty), mask=in_rows
    )
