"""The attention step of joint slot attention for both modalities in one launch: logits,
softmax over slots, + eps, key normalisation and the update read-out, forward and
backward, one program per (modality, batch element), each holding all its keys.

Symbols (docs/model.md): x̂ = LN_in(tokens) (L x d), s̃ = LN_slots(S_{n-1}) without its affine
(S x d). Neither K nor Q is formed: the logits' slot-dependent part is

    K Q^T / sqrt(d) ≡ (x̂ W_k^T + b_k) W_q' s̃^T / sqrt(d) = [x̂ | 1] G^T / sqrt(d),
    G = s̃ W_q'^T [W_k | b_k]   (S x (d + 1), the `G` rows: g = G[:, :d], c = G[:, d]),

with W_q' = W_q diag(γ_s); terms that depend on the token alone (b_q, β_s) cancel in the
softmax over slots. The columns of Â sum to 1, so U = Â^T V = W_v C + b_v with the
context C = Â^T x̂ (S x d): V is not formed either, the GRU's input product reads C.

Forward, per program: M = scale (x̂ g^T + c), P = softmax over slots of M, A = P + eps,
Â = A / column sums of A; C = Â^T x̂. On the last iteration (LAST) the program also
reads the other modality's queries' cross weights G' (from Q' [W_k | b_k] of this
modality's keys) and writes ca = slot 0 of their Â', the own Â and its slot-0 column ia,
and copies the final queries Q into the outputs, so that the cross-modal maps cost no
launch and no context.

Backward, per program: dM from dÂ (= x̂ dC^T + the maps' gradients), dG = scale dM^T
[x̂ | 1]; the token gradient is left as coefficients (Â and scale dM of each iteration, the
cross map's scale dM') that jsa_fast/kernels/layer_norm.py's token_grad_kernel multiplies
by the slot rows once, after the last iteration, instead of an fp32 read-modify-write of
every token's gradient per iteration.

The tokens of both modalities are one stack [B Lv image rows; B La audio rows]; the
per-slot rows (G, C, ...) are 2 x R stacks, R = B S, row b S + s for slot s of item b,
at the strides given (a slice of a per-iteration buffer is read in place). Each modality
has its own BLOCK_L (the audio's 16 keys do not idle three quarters of a 64-key block).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["attention_fwd_kernel", "attention_bwd_kernel"]


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
def _softmax_key_norm_backward(g_hat, p, a_hat, col, mask_ls):
    """dL/dM from dL/dÂ (g_hat) through the key normalisation and the softmax over slots:
    dA = (dÂ - sum_l dÂ Â) / colsum(A);  dM = P (dA - sum_s dA P)."""
    g_a = (g_hat - tl.sum(g_hat * a_hat, axis=0)[None, :]) / col[None, :]
    g_a = tl.where(mask_ls, g_a, 0.0)
    return p * (g_a - tl.sum(g_a * p, axis=1)[:, None])


@triton.jit
def _column_zero(t, offs_s):
    """Slot 0 of a BLOCK_L x BLOCK_S tile -> BLOCK_L."""
    return tl.sum(tl.where(offs_s[None, :] == 0, t, 0.0), axis=1)


@triton.jit
def _store_by_modality(IMG, AUD, modality, offsets, value, mask):
    tl.store(IMG + offsets, value.to(IMG.dtype.element_ty), mask=mask & (modality == 0))
    tl.store(AUD + offsets, value.to(AUD.dtype.element_ty), mask=mask & (modality == 1))


@triton.jit
def _load_by_modality(IMG, AUD, modality, offsets, mask, ACC: tl.constexpr):
    return tl.load(IMG + offsets, mask=mask & (modality == 0), other=0.0).to(ACC) + tl.load(
        AUD + offsets, mask=mask & (modality == 1), other=0.0
    ).to(ACC)


@triton.jit
def _attention_fwd(
    X, G, GX, Q, CTX, ATTN_IMG, ATTN_AUD, IA_IMG, IA_AUD, CA_IMG, CA_AUD, Q_IMG, Q_AUD,
    modality, b, length, first_token, batch, D, S, s_g_m, s_g_r, s_ctx_m, s_ctx_r, ctx_off, s_gx_m, s_gx_r, scale, eps,
    LAST: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    offs_l = tl.arange(0, BLOCK_L)
    offs_s = tl.arange(0, BLOCK_S)
    slot_rows = b * S + offs_s
    mask_l, mask_s = offs_l < length, offs_s < S
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = X + (first_token + offs_l)[:, None] * D
    g_rows = G + modality * s_g_m + slot_rows[:, None] * s_g_r
    # The cross weights of the other modality's queries for these keys.
    gx_rows = GX + (1 - modality) * s_gx_m + slot_rows[:, None] * s_gx_r

    logits = tl.zeros([BLOCK_L, BLOCK_S], dtype=ACC)
    logits_x = tl.zeros([BLOCK_L, BLOCK_S], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        x = tl.load(x_rows + cols[None, :], mask=mask_l[:, None] & mask_d[None, :], other=0.0).to(ACC)
        g = tl.load(g_rows + cols[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0).to(ACC)
        logits += tl.sum(x[:, None, :] * g[None, :, :], axis=2)
        if LAST:
            gx = tl.load(gx_rows + cols[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0).to(ACC)
            logits_x += tl.sum(x[:, None, :] * gx[None, :, :], axis=2)
    c = tl.load(G + modality * s_g_m + slot_rows * s_g_r + D, mask=mask_s, other=0.0).to(ACC)
    _, a_hat, _ = _normalised_attention(scale * (logits + c[None, :]), mask_l, mask_s, eps)

    ctx_rows = CTX + ctx_off + modality * s_ctx_m + slot_rows[:, None] * s_ctx_r
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        x = tl.load(x_rows + cols[None, :], mask=mask_l[:, None] & mask_d[None, :], other=0.0).to(ACC)
        ctx = tl.sum(a_hat[:, :, None] * x[:, None, :], axis=0)
        tl.store(ctx_rows + cols[None, :], ctx.to(CTX.dtype.element_ty), mask=mask_s[:, None] & mask_d[None, :])

    if LAST:
        attn_offs = (b * length + offs_l)[:, None] * S + offs_s[None, :]
        _store_by_modality(ATTN_IMG, ATTN_AUD, modality, attn_offs, a_hat, mask_l[:, None] & mask_s[None, :])
        _store_by_modality(IA_IMG, IA_AUD, modality, b * length + offs_l, _column_zero(a_hat, offs_s), mask_l)
        cx = tl.load(GX + (1 - modality) * s_gx_m + slot_rows * s_gx_r + D, mask=mask_s, other=0.0).to(ACC)
        _, a_cross, _ = _normalised_attention(scale * (logits_x + cx[None, :]), mask_l, mask_s, eps)
        _store_by_modality(CA_IMG, CA_AUD, modality, b * length + offs_l, _column_zero(a_cross, offs_s), mask_l)
        q_rows = Q + modality * batch * S * D + slot_rows[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            mask_sd = mask_s[:, None] & (cols < D)[None, :]
            q = tl.load(q_rows + cols[None, :], mask=mask_sd, other=0.0)
            _store_by_modality(Q_IMG, Q_AUD, modality, slot_rows[:, None] * D + cols[None, :], q, mask_sd)


@triton.jit
def attention_fwd_kernel(
    X, G, GX, Q, CTX, ATTN_IMG, ATTN_AUD, IA_IMG, IA_AUD, CA_IMG, CA_AUD, Q_IMG, Q_AUD,
    batch, l_img, l_aud, D, S, s_g_m, s_g_r, s_ctx_m, s_ctx_r, ctx_off, s_gx_m, s_gx_r, scale, eps,
    LAST: tl.constexpr, BLOCK_L_IMG: tl.constexpr, BLOCK_L_AUD: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """One (modality, item) per program (module docstring): Â from G, C = Â^T x̂ -> CTX.

    X: token stack x d; G: rows of >= d + 1 (modality at s_g_m, row at s_g_r); CTX:
    rows at s_ctx_m / s_ctx_r from element ctx_off on. LAST: GX (the cross weights of each modality's queries,
    at s_gx_m / s_gx_r) and Q (2 x R x d) are read, and Â, ia, ca and Q written to the
    per-modality outputs (B x L x S, B x L, B x L, B x S x d).
    """
    ACC = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    modality = (pid // batch).to(tl.int64)
    b = (pid % batch).to(tl.int64)
    if modality == 0:
        _attention_fwd(
            X, G, GX, Q, CTX, ATTN_IMG, ATTN_AUD, IA_IMG, IA_AUD, CA_IMG, CA_AUD, Q_IMG, Q_AUD, modality, b, l_img,
            b * l_img, batch, D, S, s_g_m, s_g_r, s_ctx_m, s_ctx_r, ctx_off, s_gx_m, s_gx_r, scale, eps, LAST, BLOCK_L_IMG, BLOCK_S,
            BLOCK_D, ACC,
        )  # fmt: skip
    else:
        _attention_fwd(
            X, G, GX, Q, CTX, ATTN_IMG, ATTN_AUD, IA_IMG, IA_AUD, CA_IMG, CA_AUD, Q_IMG, Q_AUD, modality, b, l_aud,
            batch * l_img + b * l_aud, batch, D, S, s_g_m, s_g_r, s_ctx_m, s_ctx_r, ctx_off, s_gx_m, s_gx_r, scale, eps, LAST,
            BLOCK_L_AUD, BLOCK_S, BLOCK_D, ACC,
        )  # fmt: skip


@triton.jit
def _attention_bwd(
    X, G, GX, G_CTX, G_ATTN_IMG, G_ATTN_AUD, G_IA_IMG, G_IA_AUD, G_CA_IMG, G_CA_AUD, GRAD_G, GRAD_GX, COEF,
    modality, b, length, first_token, D, S, n_coef, coef_col, s_g_m, s_g_r, s_gctx_m, s_gctx_r, s_gx_m, s_gx_r,
    s_dg_m, s_dg_r, scale, eps,
    LAST: tl.constexpr, HAS_G_ATTN: tl.constexpr, HAS_G_IA: tl.constexpr, HAS_G_CA: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    offs_l = tl.arange(0, BLOCK_L)
    offs_s = tl.arange(0, BLOCK_S)
    slot_rows = b * S + offs_s
    mask_l, mask_s = offs_l < length, offs_s < S
    mask_ls = mask_l[:, None] & mask_s[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = X + (first_token + offs_l)[:, None] * D
    g_rows = G + modality * s_g_m + slot_rows[:, None] * s_g_r
    gx_rows = GX + (1 - modality) * s_gx_m + slot_rows[:, None] * s_gx_r
    gctx_rows = G_CTX + modality * s_gctx_m + slot_rows[:, None] * s_gctx_r

    logits = tl.zeros([BLOCK_L, BLOCK_S], dtype=ACC)
    logits_x = tl.zeros([BLOCK_L, BLOCK_S], dtype=ACC)
    g_hat = tl.zeros([BLOCK_L, BLOCK_S], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        mask_sd = mask_s[:, None] & mask_d[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask_l[:, None] & mask_d[None, :], other=0.0).to(ACC)
        g = tl.load(g_rows + cols[None, :], mask=mask_sd, other=0.0).to(ACC)
        g_ctx = tl.load(gctx_rows + cols[None, :], mask=mask_sd, other=0.0).to(ACC)
        logits += tl.sum(x[:, None, :] * g[None, :, :], axis=2)
        g_hat += tl.sum(x[:, None, :] * g_ctx[None, :, :], axis=2)
        if LAST and HAS_G_CA:
            gx = tl.load(gx_rows + cols[None, :], mask=mask_sd, other=0.0).to(ACC)
            logits_x += tl.sum(x[:, None, :] * gx[None, :, :], axis=2)
    c = tl.load(G + modality * s_g_m + slot_rows * s_g_r + D, mask=mask_s, other=0.0).to(ACC)
    p, a_hat, col = _normalised_attention(scale * (logits + c[None, :]), mask_l, mask_s, eps)
    map_offs = b * length + offs_l
    if LAST and HAS_G_ATTN:
        g_hat += _load_by_modality(
            G_ATTN_IMG, G_ATTN_AUD, modality, map_offs[:, None] * S + offs_s[None, :], mask_ls, ACC
        )
    if LAST and HAS_G_IA:
        g_ia = _load_by_modality(G_IA_IMG, G_IA_AUD, modality, map_offs, mask_l, ACC)
        g_hat += tl.where(offs_s[None, :] == 0, g_ia[:, None], 0.0)
    g_m = scale * _softmax_key_norm_backward(g_hat, p, a_hat, col, mask_ls)
    dg_start = GRAD_G + modality * s_dg_m + slot_rows * s_dg_r
    tl.store(dg_start + D, tl.sum(g_m, axis=0).to(GRAD_G.dtype.element_ty), mask=mask_s)
    coef = COEF + (first_token + offs_l)[:, None] * n_coef + coef_col + offs_s[None, :]
    tl.store(coef, a_hat.to(COEF.dtype.element_ty), mask=mask_ls)
    tl.store(coef + S, g_m.to(COEF.dtype.element_ty), mask=mask_ls)

    g_mx = tl.zeros([BLOCK_L, BLOCK_S], dtype=ACC)
    cross = (1 - modality) * s_gx_m + slot_rows * s_gx_r
    if LAST and HAS_G_CA:
        cx = tl.load(GX + cross + D, mask=mask_s, other=0.0).to(ACC)
        p_x, a_x, col_x = _normalised_attention(scale * (logits_x + cx[None, :]), mask_l, mask_s, eps)
        g_ca = _load_by_modality(G_CA_IMG, G_CA_AUD, modality, map_offs, mask_l, ACC)
        g_mx = scale * _softmax_key_norm_backward(
            tl.where(offs_s[None, :] == 0, g_ca[:, None], 0.0), p_x, a_x, col_x, mask_ls
        )
        tl.store(GRAD_GX + cross + D, tl.sum(g_mx, axis=0).to(GRAD_GX.dtype.element_ty), mask=mask_s)
    if LAST:  # the cross map's coefficients, zero when it got no gradient
        cross_coef = COEF + (first_token + offs_l)[:, None] * n_coef + (n_coef - S) + offs_s[None, :]
        tl.store(cross_coef, g_mx.to(COEF.dtype.element_ty), mask=mask_ls)

    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        mask_sd = mask_s[:, None] & mask_d[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask_l[:, None] & mask_d[None, :], other=0.0).to(ACC)
        tl.store(
            dg_start[:, None] + cols[None, :],
            tl.sum(g_m[:, :, None] * x[:, None, :], axis=0).to(GRAD_G.dtype.element_ty),
            mask=mask_sd,
        )
        if LAST and HAS_G_CA:
            tl.store(
                (GRAD_GX + cross)[:, None] + cols[None, :],
                tl.sum(g_mx[:, :, None] * x[:, None, :], axis=0).to(GRAD_GX.dtype.element_ty),
                mask=mask_sd,
            )


@triton.jit
def attention_bwd_kernel(
    X, G, GX, G_CTX, G_ATTN_IMG, G_ATTN_AUD, G_IA_IMG, G_IA_AUD, G_CA_IMG, G_CA_AUD, GRAD_G, GRAD_GX, COEF,
    batch, l_img, l_aud, D, S, n_coef, coef_col, s_g_m, s_g_r, s_gctx_m, s_gctx_r, s_gx_m, s_gx_r, s_dg_m, s_dg_r,
    scale, eps,
    LAST: tl.constexpr, HAS_G_ATTN: tl.constexpr, HAS_G_IA: tl.constexpr, HAS_G_CA: tl.constexpr,
    BLOCK_L_IMG: tl.constexpr, BLOCK_L_AUD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    FP64: tl.constexpr,
):  # fmt: skip
    """Backward of attention_fwd_kernel, one (modality, item) per program; recomputes M,
    P and Â from x̂ and G (nothing stored). With dC = G_CTX (rows at s_gctx_*):

    dÂ = dATTN + [dia on slot 0] + x̂ dC^T      (LAST: the outputs' gradients)
    dM = _softmax_key_norm_backward(dÂ)
    dG = scale dM^T [x̂ | 1] -> GRAD_G (rows at s_dg_m / s_dg_r)
    COEF[token, coef_col:] = [Â | scale dM], the token gradient's coefficients.

    LAST: the cross map's dÂ' = [dca on slot 0] gives dG' for the OTHER modality's
    queries' rows of GRAD_GX (rows as GX) and COEF's last S columns, scale dM'.
    """
    ACC = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    modality = (pid // batch).to(tl.int64)
    b = (pid % batch).to(tl.int64)
    if modality == 0:
        _attention_bwd(
            X, G, GX, G_CTX, G_ATTN_IMG, G_ATTN_AUD, G_IA_IMG, G_IA_AUD, G_CA_IMG, G_CA_AUD, GRAD_G, GRAD_GX, COEF,
            modality, b, l_img, b * l_img, D, S, n_coef, coef_col, s_g_m, s_g_r, s_gctx_m, s_gctx_r, s_gx_m, s_gx_r,
            s_dg_m, s_dg_r, scale, eps, LAST, HAS_G_ATTN, HAS_G_IA, HAS_G_CA, BLOCK_L_IMG, BLOCK_S, BLOCK_D, ACC,
        )  # fmt: skip
    else:
        _attention_bwd(
            X, G, GX, G_CTX, G_ATTN_IMG, G_ATTN_AUD, G_IA_IMG, G_IA_AUD, G_CA_IMG, G_CA_AUD, GRAD_G, GRAD_GX, COEF,
            modality, b, l_aud, batch * l_img + b * l_aud, D, S, n_coef, coef_col, s_g_m, s_g_r, s_gctx_m, s_gctx_r,
            s_gx_m, s_gx_r, s_dg_m, s_dg_r, scale, eps, LAST, HAS_G_ATTN, HAS_G_IA, HAS_G_CA, BLOCK_L_AUD, BLOCK_S,
            BLOCK_D, ACC,
        )  # fmt: skip
