"""One batched matrix product with the prologues and epilogues joint slot attention needs,
so that each product and what surrounds it is one launch (no bias copies, no separate
bias, ReLU, residual or LayerNorm launches, no casts of the operands).

For each modality m (the grid's second axis; image 0, audio 1) and an M x N tile:

    C[m] = epilogue( prologue(A[m]) @ B[m]  (+ A2[m] @ B2[m]) )

- A (M x K) and B (K x N) of any dtype and strides (a transposed operand is a stride
  swap); tiles are cast to the product's dtype (DOT) in registers and accumulated in
  fp32 (fp64 for DOT fp64). A's rows may be `rows_per_item` slot rows of one item
  apart (row i at (i // rows_per_item) sa_b + (i % rows_per_item) sa_s), so that the
  shared initial slots S_0 (S x d) serve every item with sa_b = 0.
- A_NORM: each A row (all K entries) is normalised first, (a - μ) / σ with the biased
  variance (LayerNorm without affine); A_NORM == 2 applies the affine γ a + β (LN_W,
  LN_B, per modality). Two extra passes over the row, cheap beside the product.
- B_NORM: B's rows are normalised with the given statistics (mean, 1/σ per K row:
  STATS m x 2 x K), then the affine LN_W, LN_B over B's columns: the LayerNorm output a
  weight gradient multiplies, recomputed instead of kept.
- B_EXTRA: B's last column (N - 1) is the vector BX (K) instead of B's: [W_k | b_k], or
  a column of ones whose product is a bias gradient.
- A second product A2 @ B2 (K2) accumulates into the same tile.
- Epilogue, in this order: + BIAS (N), + the rank-one OUTER AX ⊗ BX2 (M, N), RELU, AUX_MODE 1: + AUX (a residual), AUX_MODE 2:
  times (AUX > 0) (a ReLU's backward), ACCUMULATE: + C. C_EXTRA: column N - 1 goes to
  the vector CX instead of C (a bias gradient beside its weight's). SPLIT_C: modality 0
  to C, 1 to C1 (two output tensors). C is written from element c_off on: a slice of a
  per-iteration buffer is passed as the whole buffer and an offset, never as a view.
  Columns N .. N_STORE - 1 are written as zeros (the padding of aligned rows).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["linear_kernel", "dot_tile", "tile_config"]


# GPU tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by the products' precision:
# half precision runs on tensor cores; fp32 and fp64 products in IEEE precision are FMA
# loops whose operands live in registers, so their tiles are smaller. Chosen with
# `python -m jsa_fast.kernels.compile_check` (no spills on sm_80, sm_90 and sm_100).
GPU_TILES = {"half": (64, 64, 32, 8, 2), "full": (32, 64, 16, 8, 3)}


def tile_config(m: int, n: int, k: int, interpret: bool, full_precision: bool) -> dict:
    """Tile sizes of an M x N x K product: GPU_TILES on a GPU; under the interpreter, where
    a program costs about the same whatever its size, one tile as large as the problem
    (capped, at least 16 for tl.dot)."""
    if interpret:
        return {
            "BLOCK_M": max(16, min(128, triton.next_power_of_2(m))),
            "BLOCK_N": max(16, min(128, triton.next_power_of_2(n))),
            "BLOCK_K": max(16, min(128, triton.next_power_of_2(k))),
        }
    block_m, block_n, block_k, warps, stages = GPU_TILES["full" if full_precision else "half"]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}


@triton.jit
def dot_tile(acc, a, b, DOT: tl.constexpr):
    """acc + a @ b with both tiles cast to DOT (fp32 and fp64 products in IEEE precision:
    the reference's fp32 products are not TF32)."""
    if DOT == tl.float32 or DOT == tl.float64:
        return tl.dot(a.to(DOT), b.to(DOT), acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        return tl.dot(a.to(DOT), b.to(DOT), acc)


@triton.jit
def _row_statistics(A, a_rows, mask_m, K, sa_k, eps, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean and 1/σ of BLOCK_M rows of K entries (two passes: centred variance)."""
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.zeros([a_rows.shape[0]], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        a = tl.load(A + a_rows[:, None] + cols[None, :] * sa_k, mask=mask_m[:, None] & (cols < K)[None, :], other=0.0)
        total += tl.sum(a.to(ACC), axis=1)
    mean = total / K
    squares = tl.zeros([a_rows.shape[0]], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        in_k = mask_m[:, None] & (cols < K)[None, :]
        a = tl.load(A + a_rows[:, None] + cols[None, :] * sa_k, mask=in_k, other=0.0).to(ACC)
        centred = tl.where(in_k, a - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, axis=1)
    return mean, 1.0 / tl.sqrt(squares / K + eps)


@triton.jit
def linear_kernel(
    A, B, C, A2, B2, BIAS, AX, BX, BX2, AUX, LN_W, LN_B, STATS, C1, CX,
    M, N, N_STORE, K, K2, rows_per_item,
    sa_m, sa_b, sa_s, sa_k, sb_m, sb_k, sb_n, sc_m, sc_i, sc_j,
    sa2_m, sa2_i, sa2_k, sb2_m, sb2_k, sb2_n,
    s_bias_m, s_ax_m, s_ax_i, s_bx_m, s_bx_k, s_bx2_m, s_aux_m, s_aux_i, s_aux_j, s_ln_m, s_stats_m, s_cx_m,
    c_off, ln_eps,
    A_NORM: tl.constexpr, B_NORM: tl.constexpr, B_EXTRA: tl.constexpr, SECOND: tl.constexpr,
    HAS_BIAS: tl.constexpr, OUTER: tl.constexpr, RELU: tl.constexpr,
    AUX_MODE: tl.constexpr, ACCUMULATE: tl.constexpr, C_EXTRA: tl.constexpr, SPLIT_C: tl.constexpr,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[m] tile (pid 0) of modality m (pid 1); module docstring."""
    ACC: tl.constexpr = tl.float64 if DOT == tl.float64 else tl.float32
    m = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N_STORE, BLOCK_N)
    pid_m = tl.program_id(0) // tiles_n
    pid_n = tl.program_id(0) % tiles_n
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m, mask_n = rows < M, cols < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = m * sa_m + (rows // rows_per_item) * sa_b + (rows % rows_per_item) * sa_s
    A_m = A + a_rows
    if A_NORM > 0:
        mean, rstd = _row_statistics(A, a_rows, mask_m, K, sa_k, ln_eps, ACC, BLOCK_K)
    b_cols = cols if B_EXTRA == 0 else tl.where(cols < N - 1, cols, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        a = tl.load(A_m[:, None] + ks[None, :] * sa_k, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(ACC)
        if A_NORM > 0:
            a = tl.where(mask_k[None, :], (a - mean[:, None]) * rstd[:, None], 0.0)
            if A_NORM == 2:
                gamma = tl.load(LN_W + m * s_ln_m + ks, mask=mask_k, other=0.0).to(ACC)
                beta = tl.load(LN_B + m * s_ln_m + ks, mask=mask_k, other=0.0).to(ACC)
                a = tl.where(mask_k[None, :], a * gamma[None, :] + beta[None, :], 0.0)
        in_b = mask_k[:, None] & mask_n[None, :]
        b = tl.load(B + m * sb_m + ks[:, None] * sb_k + b_cols[None, :] * sb_n, mask=in_b, other=0.0).to(ACC)
        if B_NORM:
            b_mean = tl.load(STATS + m * s_stats_m + ks, mask=mask_k, other=0.0).to(ACC)
            b_rstd = tl.load(STATS + m * s_stats_m + K + ks, mask=mask_k, other=0.0).to(ACC)
            gamma = tl.load(LN_W + m * s_ln_m + cols, mask=mask_n, other=0.0).to(ACC)
            beta = tl.load(LN_B + m * s_ln_m + cols, mask=mask_n, other=0.0).to(ACC)
            b = (b - b_mean[:, None]) * b_rstd[:, None] * gamma[None, :] + beta[None, :]
            b = tl.where(in_b, b, 0.0)
        if B_EXTRA:
            extra = tl.load(BX + m * s_bx_m + ks * s_bx_k, mask=mask_k, other=0.0).to(ACC)
            b = tl.where((cols == N - 1)[None, :], extra[:, None], b)
        acc = dot_tile(acc, a, b, DOT)
    if SECOND:
        for k0 in range(0, K2, BLOCK_K):
            ks = k0 + offs_k
            mask_k = ks < K2
            a = tl.load(
                A2 + m * sa2_m + rows[:, None] * sa2_i + ks[None, :] * sa2_k,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            b = tl.load(
                B2 + m * sb2_m + ks[:, None] * sb2_k + cols[None, :] * sb2_n,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = dot_tile(acc, a, b, DOT)

    if HAS_BIAS:
        acc += tl.load(BIAS + m * s_bias_m + cols, mask=mask_n, other=0.0).to(ACC)[None, :]
    if OUTER:
        left = tl.load(AX + m * s_ax_m + rows * s_ax_i, mask=mask_m, other=0.0).to(ACC)
        right = tl.load(BX2 + m * s_bx2_m + cols, mask=mask_n, other=0.0).to(ACC)
        acc += left[:, None] * right[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    mask = mask_m[:, None] & (cols < N_STORE)[None, :]
    if AUX_MODE > 0:
        aux = tl.load(AUX + m * s_aux_m + rows[:, None] * s_aux_i + cols[None, :] * s_aux_j, mask=mask, other=0.0)
        if AUX_MODE == 1:
            acc += aux.to(ACC)
        else:
            acc = tl.where(aux > 0, acc, 0.0)
    if C_EXTRA:
        extra_col = cols == N - 1
        c_ptrs = CX + m * s_cx_m + rows[:, None] + 0 * cols[None, :]
        extra_mask = mask & extra_col[None, :]
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=extra_mask, other=0.0).to(ACC)
        tl.store(c_ptrs, acc.to(CX.dtype.element_ty), mask=extra_mask)
        mask = mask & ~extra_col[None, :]
    c_offs = c_off + rows[:, None] * sc_i + cols[None, :] * sc_j
    if SPLIT_C:
        if m == 0:
            tl.store(C + c_offs, acc.to(C.dtype.element_ty), mask=mask)
        else:
            tl.store(C1 + c_offs, acc.to(C1.dtype.element_ty), mask=mask)
    else:
        c_ptrs = C + m * sc_m + c_offs
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=mask, other=0.0).to(ACC)
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)
