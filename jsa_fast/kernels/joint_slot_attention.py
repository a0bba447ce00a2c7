"""Joint slot attention's N iterations for both modalities as one operator, forward and
backward, built for a GPU that is bound by kernel launches at the paper's shapes.

What it computes is docs/model.md's JSA from the token masks, LN_in and the shared S_0 to S_N,
the last queries and the four attention maps. Its parameters come stacked over the two
modalities (2 x ..., image first, PARAMETERS' order). Every product is a Triton kernel
with what surrounds it fused in (jsa_fast/kernels/linear.py: LayerNorm prologues, bias,
ReLU, residual epilogues; the GRU and LayerNorm backwards as epilogues of the products
that feed them), reading operands of any dtype and strides and casting tiles in
registers, so that no bias copy, cast or separate elementwise launch is needed. Once per
call two weights are folded (d width, P = d + 1 padded to a multiple of 16 elements):

    w_logit  2 x d x P    W_q^T [W_k | b_k]:   G = s' w_logit (s' = LN_slots(S) with its affine)
    w_iv     2 x 3d x P   W_ih [W_v | b_v]:    the GRU's input product reads the context C

With them K, V and Q are never formed: the slot-dependent part of the logits is
[x̂ | 1] G^T (b_q only shifts every slot's logit of a key alike, which the softmax over
slots ignores), and U = Â^T V = W_v C + b_v because each slot's Â column sums to 1.

Forward, per iteration n = 1..N for both modalities at once (R = B S rows each; five
launches):

    G_n = LN_s(S_{n-1}) w_logit                 linear (LN prologue)
    C_n, [Â, ia, ca, Q]                         attention (jsa_fast/kernels/slot_attention.py)
    S̄, gates = GRU([C_n | S_{n-1}])             jsa_fast/kernels/gru.py (six products, no zero block)
    Y_n = relu(LN_ff(S̄) W_1^T + b_1)            linear (LN prologue, bias, ReLU)
    S_n = S̄ + Y_n W_2^T + b_2                   linear (bias, residual)

(the last iteration adds Q = LN_s(S_{N-1}) W_q^T + b_q and, for the cross-modal maps,
G' = Q [W_k | b_k] of the other modality). Kept for backward: the LN_in tokens, S_0..S_{N-1},
G_n, C_n, the gates r, z, n, Z_hn and Y_n of every iteration (recomputing the gates would
cost a GEMM as large as the forward's), the last Q and G', the folded weights.

Backward, per iteration (ten launches: five for the chain, five weight gradients
accumulated into their buffers, each with its bias gradient as an extra column):

    dY_n = (dS_n W_2) ⊙ [Y_n > 0]               linear (gate epilogue);  dW_2, db_2 += dS_n^T [Y_n | 1]
    dZ, dh_direct = GRU/LN_ff backward           gru_bwd (ds' = dY_n W_1 as its product);  dW_1, db_1 += dY_n^T [s'_n | 1]
    dC_n = dZ_i W_iv                            linear;  dW_iv, db_i += dZ_i^T [C_n | 1];  dW_hh, db_h += dZ_h^T [S_{n-1} | 1]
    dG_n, coefficients                          attention backward
    dS_{n-1} = LN_s backward(dG_n w_logit^T) + dZ_h W_hh + dh_direct     slot_norm_bwd;  dw_logit^T += dG_n^T s'

then one launch forms every token's gradient from the coefficients and LN_in's backward
(jsa_fast/kernels/layer_norm.py), and a few map the folded weights' gradients back to the
parameters. The LayerNorm affines' gradients are summed into one partial row per program
(scratch bounded by the grid) and reduced once.

Registered as `jsa_fast::joint_slot_attention` and `jsa_fast::joint_slot_attention_backward`
(kernels/registry.py: triton_op on a GPU, custom_op under TRITON_INTERPRET=1). The bodies
write only into whole buffers they allocate (a per-iteration slice is an offset), so that
Inductor's lowering of the triton_op has no view mutation to handle.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from jsa_fast.kernels.gru import gru_bwd_kernel, gru_fwd_kernel
from jsa_fast.kernels.layer_norm import (
    broadcast_slots_kernel,
    ln_in_fwd_kernel,
    slot_norm_bwd_kernel,
    token_grad_kernel,
)
from jsa_fast.kernels.linear import linear_kernel, tile_config
from jsa_fast.kernels.registry import interpreting, io_dtype, kernel_input, launcher, register_op
from jsa_fast.kernels.slot_attention import attention_bwd_kernel, attention_fwd_kernel

__all__ = ["joint_slot_attention", "PARAMETERS", "attention_config", "row_config", "padded"]

# The parameters each modality owns (ModalitySlotAttention's names), in the operator's order.
PARAMETERS = (
    "mask_token", "norm_input.weight", "norm_input.bias", "norm_slots.weight", "norm_slots.bias",
    "norm_pre_ff.weight", "norm_pre_ff.bias", "to_q.weight", "to_q.bias", "to_k.weight", "to_k.bias",
    "to_v.weight", "to_v.bias", "gru.weight_ih", "gru.weight_hh", "gru.bias_ih", "gru.bias_hh",
    "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
)  # fmt: skip

# On a GPU: row kernels take ROW_ELEMENTS elements a program, the kernels that hold whole
# rows of a product (GRU and LN_slots backward) ROW_COMPLETE_M rows with warps and pipeline
# stages by kernel and precision (half: bf16/fp16 products; full: fp32/fp64),
# the GRU forward GRU_TILE (BLOCK_M, BLOCK_N, BLOCK_K, warps) for its four accumulators,
# the attention kernels ATTENTION_PRODUCTS L x S x BLOCK_D products a strip, the
# token-gradient kernel TOKEN_PROGRAMS programs at most, d in strips of
# TOKEN_STRIP[precision] and TOKEN_STAGES pipeline stages; GPU_NUM_WARPS otherwise. Chosen with
# `python -m jsa_fast.kernels.compile_check`: no spills on sm_80, sm_90 and sm_100 in fp32,
# bf16, fp16 and the autocast mix at the paper's shape (B = 256 and 4,096).
GPU_NUM_WARPS = 8
ROW_ELEMENTS = 2048
ROW_COMPLETE_M = 16
ROW_COMPLETE = {  # (num_warps, num_stages)
    ("gru", "half"): (16, 3), ("gru", "full"): (8, 1), ("slot_norm", "half"): (8, 3), ("slot_norm", "full"): (8, 3),
}  # fmt: skip
GRU_TILE = (32, 64, 16, 8)
ATTENTION_PRODUCTS = {"forward": 8192, "backward": 4096}
TOKEN_PROGRAMS = 1024
TOKEN_STRIP = {"half": 64, "full": 16}
TOKEN_STAGES = 2
_DOT = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def padded(n: int) -> int:
    """n rounded up to a multiple of 16 elements (aligned rows for vector loads and cuBLAS)."""
    return -(-n // 16) * 16


def _interpret(interpret: bool | None) -> bool:
    return interpreting() if interpret is None else interpret


def row_config(dim: int, rows: int, interpret: bool | None = None) -> dict:
    """BLOCK_R rows of BLOCK_D (>= d) per program; under the interpreter, where a program
    costs the same whatever its size, as few programs as memory allows."""
    block_d = triton.next_power_of_2(dim)
    if _interpret(interpret):
        return {"BLOCK_R": min(triton.next_power_of_2(rows), max(1, 2**20 // block_d)), "BLOCK_D": block_d}
    return {"BLOCK_R": max(1, ROW_ELEMENTS // block_d), "BLOCK_D": block_d, "num_warps": GPU_NUM_WARPS}


def row_complete_config(
    rows: int, dim: int, k: int, kernel: str, full_precision: bool, interpret: bool | None = None
) -> dict:
    """BLOCK_M whole rows (BLOCK_D >= d) of a product over K in BLOCK_K steps; kernel:
    "gru" or "slot_norm" (ROW_COMPLETE)."""
    block_d = max(16, triton.next_power_of_2(dim))
    if _interpret(interpret):
        return {
            "BLOCK_M": max(16, min(64, triton.next_power_of_2(rows))),
            "BLOCK_D": block_d,
            "BLOCK_K": max(16, min(128, triton.next_power_of_2(k))),
        }
    warps, stages = ROW_COMPLETE[kernel, "full" if full_precision else "half"]
    return {"BLOCK_M": ROW_COMPLETE_M, "BLOCK_D": block_d, "BLOCK_K": 16, "num_warps": warps, "num_stages": stages}


def gru_config(rows: int, dim: int, interpret: bool | None = None) -> dict:
    """The GRU forward's tiles (GRU_TILE on a GPU; one tile under the interpreter)."""
    if _interpret(interpret):
        return tile_config(rows, dim, dim, True, True)
    block_m, block_n, block_k, warps = GRU_TILE
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}


def attention_config(
    l_img: int, l_aud: int, dim: int, num_slots: int, direction: str, last: bool, interpret: bool | None = None
) -> dict:
    """All keys of one item (BLOCK_L per modality) and its slots, d in strips; the last
    iteration's second set of logits halves the strip. direction: "forward" or "backward"."""
    block_img, block_aud, block_s, block_d = (triton.next_power_of_2(n) for n in (l_img, l_aud, num_slots, dim))
    config = {"BLOCK_L_IMG": block_img, "BLOCK_L_AUD": block_aud, "BLOCK_S": block_s}
    if _interpret(interpret):
        return config | {"BLOCK_D": block_d}
    budget = ATTENTION_PRODUCTS[direction] // (2 if last else 1)
    strip = min(block_d, max(4, budget // (max(block_img, block_aud) * block_s)))
    return config | {"BLOCK_D": strip, "num_warps": GPU_NUM_WARPS}


def token_config(
    l_img: int, l_aud: int, dim: int, n_coef: int, pairs: int, full_precision: bool, interpret: bool | None = None
) -> dict:
    """One (modality, item) pair's tokens at a time (BLOCK_L), d in strips of BLOCK_D, the
    coefficients in BLOCK_C columns; `programs` programs loop over the 2B pairs."""
    config = {
        "BLOCK_L": max(16, triton.next_power_of_2(max(l_img, l_aud))),
        "BLOCK_C": max(16, triton.next_power_of_2(n_coef)),
    }
    if _interpret(interpret):
        return config | {"BLOCK_D": max(16, triton.next_power_of_2(dim)), "programs": min(pairs, 2)}
    strip = TOKEN_STRIP["full" if full_precision else "half"]
    programs = min(pairs, TOKEN_PROGRAMS)
    return config | {"BLOCK_D": strip, "programs": programs, "num_warps": GPU_NUM_WARPS, "num_stages": TOKEN_STAGES}


class _Shapes:
    """Sizes of one call, read off its arguments."""

    def __init__(self, x_img: Tensor, x_aud: Tensor, slots_init: Tensor, params: list[Tensor], iters: int) -> None:
        self.batch, self.l_img, self.dim = x_img.shape
        self.l_aud = x_aud.shape[1]
        self.num_slots = slots_init.shape[0]
        self.hidden = params[PARAMETERS.index("mlp.0.weight")].shape[1]
        self.iters = iters
        self.rows = self.batch * self.num_slots
        self.tokens = self.batch * (self.l_img + self.l_aud)
        self.scale = 1.0 / math.sqrt(self.dim)
        self.width = padded(self.dim + 1)  # rows of G, G', w_logit, w_iv
        self.n_coef = 2 * self.num_slots * iters + self.num_slots  # per token: [Â_n | scale dM_n]..., scale dM'


# ----------------------------------------------------------------------------------
# The product launcher
# ----------------------------------------------------------------------------------


class Mat:
    """Operand of `linear`: a tensor read as 2 x rows x cols through strides (m, i, k), so
    that a transposed, sliced or modality-swapped operand needs no copy. `rows_per_item`
    and `item_stride` remap rows (row i at (i // rows_per_item) item_stride +
    (i % rows_per_item) row_stride)."""

    def __init__(
        self, t: Tensor, s_m: int, s_i: int, s_k: int, rows: int, cols: int, rows_per_item: int = 1,
        item_stride: int | None = None,
    ) -> None:  # fmt: skip
        self.t, self.s_m, self.s_i, self.s_k, self.rows, self.cols = t, s_m, s_i, s_k, rows, cols
        self.rows_per_item = rows_per_item
        self.item_stride = s_i if item_stride is None else item_stride

    @classmethod
    def of(cls, t: Tensor, transpose: bool = False) -> Mat:
        """A 2 x rows x cols tensor (its transpose if `transpose`)."""
        s_m, s_i, s_k = t.stride()
        rows, cols = t.shape[1:]
        return cls(t, s_m, s_k, s_i, cols, rows) if transpose else cls(t, s_m, s_i, s_k, rows, cols)

    def swapped(self) -> Mat:
        """The other modality's operand at each modality (image reads audio's)."""
        return Mat(self.t[1], -self.s_m, self.s_i, self.s_k, self.rows, self.cols, self.rows_per_item, self.item_stride)


class Vec:
    """A per-modality vector (2 x n) at strides (m, i)."""

    def __init__(self, t: Tensor, s_m: int | None = None, s_i: int = 1) -> None:
        self.t, self.s_m, self.s_i = t, t.stride(0) if s_m is None else s_m, s_i

    def swapped(self) -> Vec:
        return Vec(self.t[1], -self.s_m, self.s_i)


def linear(
    out: Tensor, a: Mat, b: Mat, dot: tl.dtype, *, out_offset: int = 0, out_strides: tuple[int, int, int] | None = None,
    out_img: Tensor | None = None, out_aud: Tensor | None = None, second: tuple[Mat, Mat] | None = None,
    b_extra: Vec | None = None, bias: Vec | None = None, outer: tuple[Vec, Vec] | None = None, relu: bool = False,
    residual: Mat | None = None, gate: Mat | None = None, accumulate: bool = False, bias_out: Tensor | None = None,
    a_norm: tuple[Vec, Vec, float] | None = None, b_norm: tuple[Tensor, Vec, Vec] | None = None, padded_to: int = 0,
) -> None:  # fmt: skip
    """out[m] (2 x M x N at out_strides, from element out_offset) = the epilogue of
    a[m] @ b[m] (+ second) (jsa_fast/kernels/linear.py). N = b's columns (+ 1 with b_extra,
    whose product goes to bias_out when given; columns N .. padded_to - 1 are zeroed).
    out_img/out_aud: the two modalities'
    output tensors instead of out (M x N, contiguous). a_norm: (γ, β, eps) of a LayerNorm
    on a's rows; b_norm: (statistics 2 x 2 x K, γ, β) of one on b's rows."""
    m_rows, k = a.rows, a.cols
    n_cols = b.cols + (1 if b_extra is not None else 0)
    s_c = out_strides or out.stride()[-3:]
    n_store = max(n_cols, padded_to)
    config = tile_config(m_rows, n_store, k, interpreting(), dot in (tl.float32, tl.float64))
    grid = (triton.cdiv(m_rows, config["BLOCK_M"]) * triton.cdiv(n_store, config["BLOCK_N"]), 2)
    a2, b2 = second if second is not None else (a, b)
    flops = 2 * 2 * m_rows * n_cols * (k + (a2.cols if second is not None else 0))
    z = Vec(out, 0, 0)
    aux = residual or gate or Mat(out, 0, 0, 0, 0, 0)
    ln_w, ln_b, eps = (
        a_norm if a_norm is not None else (b_norm[1], b_norm[2], 0.0) if b_norm is not None else (z, z, 0.0)
    )
    stats = b_norm[0] if b_norm is not None else out
    ax, bx2 = outer if outer is not None else (z, z)
    bx = b_extra or z
    bias = bias or z
    launcher(linear_kernel, flops)[grid](
        a.t, b.t, out, a2.t, b2.t, bias.t, ax.t, bx.t, bx2.t, aux.t, ln_w.t, ln_b.t, stats,
        out_aud if out_img is not None else out, bias_out if bias_out is not None else out,
        m_rows, n_cols, n_store, k, a2.cols, a.rows_per_item,
        a.s_m, a.item_stride, a.s_i, a.s_k, b.s_m, b.s_i, b.s_k, *s_c,
        a2.s_m, a2.s_i, a2.s_k, b2.s_m, b2.s_i, b2.s_k,
        bias.s_m, ax.s_m, ax.s_i, bx.s_m, bx.s_i, bx2.s_m, aux.s_m, aux.s_i, aux.s_k, ln_w.s_m,
        stats.stride(0), bias_out.stride(0) if bias_out is not None else 0, out_offset, eps,
        A_NORM=2 if a_norm is not None else 0, B_NORM=b_norm is not None, B_EXTRA=b_extra is not None,
        SECOND=second is not None, HAS_BIAS=bias is not z, OUTER=outer is not None, RELU=relu,
        AUX_MODE=1 if residual is not None else 2 if gate is not None else 0, ACCUMULATE=accumulate,
        C_EXTRA=bias_out is not None, SPLIT_C=out_img is not None, DOT=dot, **config,
    )  # fmt: skip


def _ones(like: Tensor) -> Vec:
    """A column of ones for `linear`'s b_extra (stride 0 over both axes)."""
    return Vec(torch.ones(1, dtype=like.dtype, device=like.device), 0, 0)


def _token_strides(x_img: Tensor, x_aud: Tensor, mask_img: Tensor | None, mask_aud: Tensor | None) -> list[int]:
    """x's (b, l, d) strides per modality, then the masks' (b, l) (0 without masks)."""
    masks = [*mask_img.stride(), *mask_aud.stride()] if mask_img is not None else [0, 0, 0, 0]
    return [*x_img.stride(), *x_aud.stride(), *masks]


def _mask_bytes(mask: Tensor | None, like: Tensor) -> Tensor:
    """A bool mask as the uint8 the kernels load (a view, any strides), or a placeholder."""
    return like if mask is None else mask.view(torch.uint8)


# ----------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------


def _forward_outputs(shapes: _Shapes, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """JSAOutput's fields, in its order, each its own tensor."""
    s, b, d = shapes.num_slots, shapes.batch, shapes.dim
    out = [torch.empty(shape, device=device, dtype=dtype) for shape in
           ((b, s, d), (b, s, d), (b, s, d), (b, s, d), (b, shapes.l_img, s), (b, shapes.l_aud, s))]  # fmt: skip
    for length in (shapes.l_img, shapes.l_img, shapes.l_aud, shapes.l_aud):  # ia_img, ca_img, ia_aud, ca_aud
        out.append(torch.empty(b, length, device=device, dtype=dtype))
    return out


def _saved_buffers(shapes: _Shapes, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """What the forward keeps for backward (module docstring): tokens (B (Lv + La) x d),
    slots S_0..S_{N-1} (2 x N x R x d), G (2 x N x R x P), C (2 x N x R x d), gates
    (2 x N x R x 4d), Y (2 x N x R x H), the last queries (2 x R x d) and their cross
    weights (2 x R x P), w_logit (2 x d x P), w_iv (2 x 3d x P)."""
    n, r, d, p = shapes.iters, shapes.rows, shapes.dim, shapes.width

    def new(*shape: int) -> Tensor:
        return torch.empty(shape, device=device, dtype=dtype)

    return [
        new(shapes.tokens, d), new(2, n, r, d), new(2, n, r, p), new(2, n, r, d), new(2, n, r, 4 * d),
        new(2, n, r, shapes.hidden), new(2, r, d), new(2, r, p), new(2, d, p), new(2, 3 * d, p),
    ]  # fmt: skip


def _forward_fake(
    x_img, x_aud, mask_img, mask_aud, slots_init, params, iters, eps, ln_eps, compute_dtype, out_dtype
) -> list[Tensor]:  # noqa: ANN001
    shapes = _Shapes(x_img, x_aud, slots_init, params, iters)
    return _forward_outputs(shapes, x_img.device, out_dtype) + _saved_buffers(
        shapes, x_img.device, io_dtype(compute_dtype)
    )


@register_op("jsa_fast::joint_slot_attention", _forward_fake)
def _forward(
    x_img: Tensor, x_aud: Tensor, mask_img: Tensor | None, mask_aud: Tensor | None, slots_init: Tensor,
    params: list[Tensor], iters: int, eps: float, ln_eps: list[float], compute_dtype: torch.dtype, out_dtype: torch.dtype,
) -> list[Tensor]:  # fmt: skip
    shapes = _Shapes(x_img, x_aud, slots_init, params, iters)
    dtype = io_dtype(compute_dtype)
    dot, fp64 = _DOT[dtype], dtype == torch.float64
    p = {name: kernel_input(t) for name, t in zip(PARAMETERS, params)}
    x_img, x_aud = (t.to(io_dtype(t.dtype)) for t in (x_img, x_aud))
    slots_init = kernel_input(slots_init)
    device, d, r, width = x_img.device, shapes.dim, shapes.rows, shapes.width
    outputs = _forward_outputs(shapes, device, io_dtype(out_dtype))
    slots_img, slots_aud, q_img, q_aud, attn_img, attn_aud, ia_img, ca_img, ia_aud, ca_aud = outputs
    saved = _saved_buffers(shapes, device, dtype)
    tokens, slots, logit_weights, context, gates, mlp, query, cross, w_logit, w_iv = saved
    s_bar = torch.empty(2, r, d, device=device, dtype=dtype)
    eps_in, eps_slots, eps_ff = ln_eps

    config = row_config(d, shapes.tokens)
    launcher(ln_in_fwd_kernel)[(triton.cdiv(shapes.tokens, config["BLOCK_R"]),)](
        x_img, x_aud, _mask_bytes(mask_img, x_img), _mask_bytes(mask_aud, x_img), p["mask_token"], p["norm_input.weight"],
        p["norm_input.bias"], tokens, shapes.batch * shapes.l_img, shapes.tokens, shapes.l_img, shapes.l_aud, d,
        *_token_strides(x_img, x_aud, mask_img, mask_aud), p["mask_token"].stride(0), p["norm_input.weight"].stride(0),
        eps_in, HAS_MASK=mask_img is not None, FP64=fp64, **config,
    )  # fmt: skip
    linear(w_logit, Mat.of(p["to_q.weight"], transpose=True), Mat.of(p["to_k.weight"]), dot,
           b_extra=Vec(p["to_k.bias"]), padded_to=width)  # fmt: skip
    linear(w_iv, Mat.of(p["gru.weight_ih"]), Mat.of(p["to_v.weight"]), dot, b_extra=Vec(p["to_v.bias"]),
           padded_to=width)  # fmt: skip
    config = row_config(d, 2 * r)
    launcher(broadcast_slots_kernel)[(triton.cdiv(2 * r, config["BLOCK_R"]),)](
        slots_init, slots, r, shapes.num_slots, d, slots.stride(0), BLOCK_R=config["BLOCK_R"], BLOCK_D=config["BLOCK_D"]
    )
    ln_slots = (Vec(p["norm_slots.weight"]), Vec(p["norm_slots.bias"]), eps_slots)
    w_mlp1, w_mlp2 = Mat.of(p["mlp.0.weight"], transpose=True), Mat.of(p["mlp.2.weight"], transpose=True)
    gru_tiles = gru_config(r, d)
    gru_grid = (triton.cdiv(r, gru_tiles["BLOCK_M"]) * triton.cdiv(d, gru_tiles["BLOCK_N"]), 2)
    for n in range(iters):
        last = n == iters - 1
        prev = Mat.of(slots[:, n])
        linear(logit_weights, prev, Mat.of(w_logit[..., : d + 1]), dot, a_norm=ln_slots, padded_to=width,
               out_offset=n * logit_weights.stride(1), out_strides=_skip_iteration(logit_weights))  # fmt: skip
        if last:
            linear(
                query, prev, Mat.of(p["to_q.weight"], transpose=True), dot, a_norm=ln_slots, bias=Vec(p["to_q.bias"])
            )
            # Each modality's queries on the other's keys: G' = Q [W_k | b_k] (image queries, audio keys first).
            linear(cross, Mat.of(query), Mat.of(p["to_k.weight"]).swapped(), dot, b_extra=Vec(p["to_k.bias"]).swapped(),
                   padded_to=width)  # fmt: skip
        config = attention_config(shapes.l_img, shapes.l_aud, d, shapes.num_slots, "forward", last)
        flops = 2 * 2 * shapes.tokens * shapes.num_slots * d * (3 if last else 2)
        launcher(attention_fwd_kernel, flops)[(2 * shapes.batch,)](
            tokens, logit_weights[:, n], cross, query, context, attn_img, attn_aud, ia_img, ia_aud, ca_img, ca_aud, q_img,
            q_aud, shapes.batch, shapes.l_img, shapes.l_aud, d, shapes.num_slots, logit_weights.stride(0), width,
            context.stride(0), d, n * context.stride(1), cross.stride(0), width, shapes.scale, eps, LAST=last, FP64=fp64,
            **config,
        )  # fmt: skip
        launcher(gru_fwd_kernel, 2 * 2 * r * d * 6 * d)[gru_grid](
            context[:, n], slots[:, n], w_iv, p["gru.weight_hh"], p["gru.bias_ih"], p["gru.bias_hh"], gates, s_bar, r, d,
            context.stride(0), d, slots.stride(0), d, w_iv.stride(0), width, p["gru.weight_hh"].stride(0),
            p["gru.bias_ih"].stride(0), gates.stride(0), 4 * d, n * gates.stride(1), DOT=dot, **gru_tiles,
        )  # fmt: skip
        linear(mlp, Mat.of(s_bar), w_mlp1, dot, a_norm=(Vec(p["norm_pre_ff.weight"]), Vec(p["norm_pre_ff.bias"]), eps_ff),
               bias=Vec(p["mlp.0.bias"]), relu=True, out_offset=n * mlp.stride(1), out_strides=_skip_iteration(mlp))  # fmt: skip
        if last:
            linear(slots_img, Mat.of(mlp[:, n]), w_mlp2, dot, bias=Vec(p["mlp.2.bias"]), residual=Mat.of(s_bar),
                   out_img=slots_img, out_aud=slots_aud, out_strides=(0, d, 1))  # fmt: skip
        else:
            linear(slots, Mat.of(mlp[:, n]), w_mlp2, dot, bias=Vec(p["mlp.2.bias"]), residual=Mat.of(s_bar),
                   out_offset=(n + 1) * slots.stride(1), out_strides=_skip_iteration(slots))  # fmt: skip
    return [o.to(out_dtype) for o in outputs] + saved  # o's own dtype but under the interpreter


def _skip_iteration(buffer: Tensor) -> tuple[int, int, int]:
    """(m, i, j) strides of a 2 x N x rows x cols buffer, its iteration chosen by an offset."""
    return buffer.stride(0), buffer.stride(2), buffer.stride(3)


# ----------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------

# What `_backward` returns after the inputs' gradients, one buffer per parameter but the
# LayerNorm affines and mask tokens, which come as one 2 x 7 x d buffer ("layer_norms":
# γ_ff, β_ff, γ_slots, β_slots, γ_in, β_in, mask token); `_to_parameter_grads` maps them.
_GRAD_BUFFERS = (
    "layer_norms", "to_q.weight", "to_q.bias", "to_k.weight", "to_k.bias", "to_v.weight", "to_v.bias",
    "gru.weight_ih", "gru.weight_hh", "gru.bias_ih", "gru.bias_hh", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
    "mlp.2.bias",
)  # fmt: skip
_LAYER_NORMS = ("norm_pre_ff.weight", "norm_pre_ff.bias", "norm_slots.weight", "norm_slots.bias", "norm_input.weight",
                "norm_input.bias", "mask_token")  # fmt: skip


def _grad_buffer_layout(params: list[Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each of _backward's parameter buffers."""
    p = dict(zip(PARAMETERS, params))
    dim = p["to_q.weight"].shape[-1]
    layer_norms = ((2, len(_LAYER_NORMS), dim), p["norm_input.weight"].dtype)
    return [layer_norms if name == "layer_norms" else (tuple(p[name].shape), p[name].dtype) for name in _GRAD_BUFFERS]


def _backward_fake(
    grads, x_img, x_aud, mask_img, mask_aud, slots_init, params, saved, iters, eps, ln_eps
) -> list[Tensor]:  # noqa: ANN001
    return [torch.empty_like(x_img), torch.empty_like(x_aud), torch.empty_like(slots_init)] + [
        torch.empty(shape, device=x_img.device, dtype=dtype) for shape, dtype in _grad_buffer_layout(params)
    ]


def _stacked_grads(pair: tuple[Tensor | None, Tensor | None], like: Tensor) -> Tensor | None:
    """The two modalities' output gradients as one 2 x rows x d tensor in their own dtype
    (the kernels cast on load; zeros for a missing one), or None when neither arrived."""
    if pair[0] is None and pair[1] is None:
        return None
    stacked = torch.stack([like.new_zeros(()).expand(like.shape) if g is None else g for g in pair])
    return stacked.view(2, -1, like.shape[-1])


@register_op("jsa_fast::joint_slot_attention_backward", _backward_fake)
def _backward(
    grads: list[Tensor | None], x_img: Tensor, x_aud: Tensor, mask_img: Tensor | None, mask_aud: Tensor | None,
    slots_init: Tensor, params: list[Tensor], saved: list[Tensor], iters: int, eps: float, ln_eps: list[float],
) -> list[Tensor]:  # fmt: skip
    """Gradients of x_img, x_aud, slots_init and the parameters (buffers in _GRAD_BUFFERS'
    order) from those of the forward's ten outputs (None where none arrived)."""
    shapes = _Shapes(x_img, x_aud, slots_init, params, iters)
    tokens, slots, logit_weights, context, gates, mlp, query, cross, w_logit, w_iv = saved
    dtype = slots.dtype
    dot, fp64 = _DOT[dtype], dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    p = {name: kernel_input(t) for name, t in zip(PARAMETERS, params)}
    pdtype = p["to_q.weight"].dtype
    x_io = [t.to(io_dtype(t.dtype)) for t in (x_img, x_aud)]
    grads = [None if g is None else g.to(io_dtype(g.dtype)).contiguous() for g in grads]
    g_slots_img, g_slots_aud, g_q_img, g_q_aud, g_attn_img, g_attn_aud, g_ia_img, g_ia_aud, g_ca_img, g_ca_aud = (
        grads[i] for i in (0, 1, 2, 3, 4, 5, 6, 8, 7, 9)
    )
    device, d, r, hid, width, s = x_img.device, shapes.dim, shapes.rows, shapes.hidden, shapes.width, shapes.num_slots
    eps_in, eps_slots, eps_ff = ln_eps

    def new(*shape: int, dtype: torch.dtype = dtype) -> Tensor:
        return torch.empty(shape, device=device, dtype=dtype)

    # dL/dS_n, two buffers taking turns; in the accumulation dtype (dS_0 is a sum over items)
    like = torch.empty(shapes.batch, s, d, device=device, dtype=acc)
    grad_s = _stacked_grads((g_slots_img, g_slots_aud), like)
    grad_s = like.new_zeros(2, r, d) if grad_s is None else grad_s
    grad_s_next = new(2, r, d, dtype=acc)
    g_query = _stacked_grads((g_q_img, g_q_aud), like)
    has = {
        "attn": g_attn_img is not None or g_attn_aud is not None,
        "ia": g_ia_img is not None or g_ia_aud is not None,
        "ca": g_ca_img is not None or g_ca_aud is not None,
    }
    # Each map's gradients go to the kernel as a pair: zeros for a missing half, the
    # tokens as a placeholder (never read) when both are missing.
    map_grads = {}
    for name, pair, extra in (("attn", (g_attn_img, g_attn_aud), (s,)), ("ia", (g_ia_img, g_ia_aud), ()),
                              ("ca", (g_ca_img, g_ca_aud), ())):  # fmt: skip
        map_grads[name] = [
            tokens if not has[name] else g if g is not None else tokens.new_zeros(shapes.batch, length, *extra)
            for g, length in zip(pair, (shapes.l_img, shapes.l_aud))
        ]

    grad_mlp, grad_gates, grad_direct, grad_logits = new(2, r, hid), new(2, r, 4 * d), new(2, r, d), new(2, r, width)
    grad_context, s_bar = new(2, iters, r, d), new(2, r, d)
    grad_cross = new(2, r, width)
    coef = new(shapes.tokens, shapes.n_coef)
    stats_ff, stats_slots, stats_last = new(2, 2, r), new(2, 2, r), new(2, 2, r)
    grad = {
        "mlp.2.weight": new(2, d, hid, dtype=pdtype), "mlp.2.bias": new(2, d, dtype=pdtype),
        "mlp.0.weight": new(2, hid, d, dtype=pdtype), "mlp.0.bias": new(2, hid, dtype=pdtype),
        "w_iv": new(2, 3 * d, d, dtype=pdtype), "gru.bias_ih": new(2, 3 * d, dtype=pdtype),
        "gru.weight_hh": new(2, 3 * d, d, dtype=pdtype), "gru.bias_hh": new(2, 3 * d, dtype=pdtype),
        "w_logit_t": new(2, d + 1, d, dtype=pdtype),
    }  # fmt: skip
    full_precision = dtype in (torch.float32, torch.float64)
    gru_rows = row_complete_config(r, d, hid, "gru", full_precision)
    norm_rows = row_complete_config(r, d, 3 * d, "slot_norm", full_precision)
    rc_grid = (triton.cdiv(r, gru_rows["BLOCK_M"]), 2)  # both kernels' (the same BLOCK_M): a partial row each
    tok_config = token_config(
        shapes.l_img, shapes.l_aud, d, shapes.n_coef, 2 * shapes.batch, dtype in (torch.float32, torch.float64)
    )
    token_programs = tok_config.pop("programs")
    partial = torch.zeros(max(rc_grid[0], token_programs), 2, len(_LAYER_NORMS), d, device=device, dtype=acc)
    ones = _ones(slots)
    ln_ff = (Vec(p["norm_pre_ff.weight"]), Vec(p["norm_pre_ff.bias"]))
    ln_slots = (Vec(p["norm_slots.weight"]), Vec(p["norm_slots.bias"]))
    w_kx = Mat.of(p["to_k.weight"], transpose=True).swapped()  # the other modality's W_k^T
    g_q_full = None  # dL/dQ of the last queries

    for n in reversed(range(iters)):
        last = first = n == iters - 1  # the first iteration walked back writes the weight gradients, the rest add
        h = Mat.of(slots[:, n])
        linear(grad_mlp, Mat.of(grad_s), Mat.of(p["mlp.2.weight"]), dot, gate=Mat.of(mlp[:, n]))
        linear(grad["mlp.2.weight"], Mat.of(grad_s, transpose=True), Mat.of(mlp[:, n]), dot, b_extra=ones,
               bias_out=grad["mlp.2.bias"], accumulate=not first)  # fmt: skip
        launcher(gru_bwd_kernel, 2 * 2 * r * hid * d)[rc_grid](
            grad_mlp, p["mlp.0.weight"], gates[:, n], slots[:, n], grad_s, p["norm_pre_ff.weight"], grad_gates, grad_direct,
            s_bar, stats_ff, partial, r, d, hid, grad_mlp.stride(0), p["mlp.0.weight"].stride(0), gates.stride(0), 4 * d,
            slots.stride(0), d, grad_s.stride(0), p["norm_pre_ff.weight"].stride(0), stats_ff.stride(0), partial.stride(0),
            partial.stride(1), eps_ff, DOT=dot, **gru_rows,
        )  # fmt: skip
        linear(grad["mlp.0.weight"], Mat.of(grad_mlp, transpose=True), Mat.of(s_bar), dot, b_extra=ones,
               b_norm=(stats_ff, *ln_ff), bias_out=grad["mlp.0.bias"], accumulate=not first)  # fmt: skip
        gates_in = Mat(grad_gates, grad_gates.stride(0), 4 * d, 1, r, 3 * d)  # dZ_r, dZ_z, dZ_in
        linear(grad_context, gates_in, Mat.of(w_iv[..., :d]), dot, out_offset=n * grad_context.stride(1),
               out_strides=_skip_iteration(grad_context))  # fmt: skip
        linear(grad["w_iv"], Mat(grad_gates, grad_gates.stride(0), 1, 4 * d, 3 * d, r), Mat.of(context[:, n]), dot,
               b_extra=ones, bias_out=grad["gru.bias_ih"], accumulate=not first)  # fmt: skip
        # dZ_r, dZ_z, dZ_hn: rows 0..2d-1 of the transpose, then 3d..4d-1
        hidden_gates_t = Mat(
            grad_gates, grad_gates.stride(0), 1, 4 * d, 3 * d, r, rows_per_item=2 * d, item_stride=3 * d
        )
        linear(grad["gru.weight_hh"], hidden_gates_t, h, dot, b_extra=ones, bias_out=grad["gru.bias_hh"],
               accumulate=not first)  # fmt: skip
        config = attention_config(shapes.l_img, shapes.l_aud, d, s, "backward", last)
        flops = 2 * 2 * shapes.tokens * s * d * (5 if last and has["ca"] else 3)
        launcher(attention_bwd_kernel, flops)[(2 * shapes.batch,)](
            tokens, logit_weights[:, n], cross, grad_context[:, n], *map_grads["attn"], *map_grads["ia"], *map_grads["ca"],
            grad_logits, grad_cross, coef, shapes.batch, shapes.l_img, shapes.l_aud, d, s, shapes.n_coef, 2 * s * n,
            logit_weights.stride(0), width, grad_context.stride(0), d, cross.stride(0), width, grad_logits.stride(0), width,
            shapes.scale, eps, LAST=last, HAS_G_ATTN=last and has["attn"], HAS_G_IA=last and has["ia"],
            HAS_G_CA=last and has["ca"], FP64=fp64, **config,
        )  # fmt: skip
        if last and (has["ca"] or g_query is not None):
            g_q_full = new(2, r, d, dtype=acc)
            if has["ca"]:  # G' = Q [W_k | b_k] of the other modality
                linear(g_q_full, Mat(grad_cross, grad_cross.stride(0), width, 1, r, d), w_kx, dot,
                       outer=(Vec(grad_cross[..., d], s_i=width), Vec(p["to_k.bias"]).swapped()),
                       residual=None if g_query is None else Mat.of(g_query))  # fmt: skip
            else:
                g_q_full = g_query
        target = grad_s_next
        stats = stats_last if last else stats_slots
        with_q = last and g_q_full is not None
        flops = 2 * 2 * r * d * (d + 1 + 3 * d + (d if with_q else 0))
        launcher(slot_norm_bwd_kernel, flops)[rc_grid](
            grad_logits, w_logit, g_q_full if with_q else grad_logits, p["to_q.weight"], grad_gates, p["gru.weight_hh"],
            grad_direct, slots[:, n], p["norm_slots.weight"], target, stats, partial, r, d, d + 1, grad_logits.stride(0),
            width, w_logit.stride(0), width, g_q_full.stride(0) if with_q else 0, p["to_q.weight"].stride(0), p["gru.weight_hh"].stride(0),
            slots.stride(0), d, p["norm_slots.weight"].stride(0), target.stride(0), stats.stride(0), partial.stride(0),
            partial.stride(1), eps_slots, LAST=with_q, DOT=dot, **norm_rows,
        )  # fmt: skip
        linear(grad["w_logit_t"], Mat(grad_logits, grad_logits.stride(0), 1, width, d + 1, r), h, dot,
               b_norm=(stats, *ln_slots), accumulate=not first)  # fmt: skip
        grad_s, grad_s_next = grad_s_next, grad_s

    grad_x_img, grad_x_aud = (
        torch.empty_like(x_io[0], memory_format=torch.contiguous_format),
        torch.empty_like(x_io[1], memory_format=torch.contiguous_format),
    )
    launcher(token_grad_kernel, 2 * 2 * shapes.tokens * shapes.n_coef * d)[(token_programs,)](
        x_io[0], x_io[1], _mask_bytes(mask_img, x_io[0]), _mask_bytes(mask_aud, x_io[0]), p["mask_token"],
        p["norm_input.weight"], coef, grad_context, logit_weights, cross, grad_x_img, grad_x_aud, partial, shapes.batch,
        shapes.l_img, shapes.l_aud, d, s, shapes.n_coef, 2 * s * iters, *_token_strides(x_io[0], x_io[1], mask_img, mask_aud),
        p["mask_token"].stride(0), p["norm_input.weight"].stride(0), grad_context.stride(0), grad_context.stride(1), d,
        logit_weights.stride(0), logit_weights.stride(1), width, cross.stride(0), width, partial.stride(0),
        partial.stride(1), eps_in, HAS_MASK=mask_img is not None, DOT=dot, **tok_config,
    )  # fmt: skip
    out = {"layer_norms": partial.sum(0).to(pdtype)}
    # W_q: w_logit = W_q^T [W_k | b_k] and Q = s' W_q^T + b_q
    grad_wl = grad["w_logit_t"]
    key_path = (Mat.of(p["to_k.weight"]), Mat(grad_wl, grad_wl.stride(0), d, 1, d, d))
    key_outer = (Vec(p["to_k.bias"]), Vec(grad_wl[:, d]))
    out["to_q.weight"] = new(2, d, d, dtype=pdtype)
    if g_q_full is not None:
        linear(out["to_q.weight"], Mat.of(g_q_full, transpose=True), Mat.of(slots[:, iters - 1]), dot, second=key_path,
               outer=key_outer, b_norm=(stats_last, *ln_slots))  # fmt: skip
        out["to_q.bias"] = g_q_full.sum(1).to(pdtype)
    else:
        linear(out["to_q.weight"], *key_path, dot, outer=key_outer)
        out["to_q.bias"] = torch.zeros_like(p["to_q.bias"])
    # [W_k | b_k]: through w_logit, and through the other modality's cross weights
    out["to_k.weight"], out["to_k.bias"] = new(2, d, d, dtype=pdtype), new(2, d, dtype=pdtype)
    cross_path = (
        (Mat.of(query, transpose=True).swapped(), Mat(grad_cross, grad_cross.stride(0), width, 1, r, d + 1).swapped())
        if has["ca"]
        else None
    )
    linear(out["to_k.weight"], Mat.of(p["to_q.weight"]), Mat(grad_wl, grad_wl.stride(0), 1, d, d, d), dot,
           b_extra=Vec(grad_wl[:, d]), second=cross_path, bias_out=out["to_k.bias"])  # fmt: skip
    # W_ih, W_v, b_v from w_iv = W_ih [W_v | b_v]
    out["gru.weight_ih"] = new(2, 3 * d, d, dtype=pdtype)
    linear(out["gru.weight_ih"], Mat.of(grad["w_iv"]), Mat.of(p["to_v.weight"], transpose=True), dot,
           outer=(Vec(grad["gru.bias_ih"]), Vec(p["to_v.bias"])))  # fmt: skip
    out["to_v.weight"], out["to_v.bias"] = new(2, d, d, dtype=pdtype), new(2, d, dtype=pdtype)
    linear(out["to_v.weight"], Mat.of(p["gru.weight_ih"], transpose=True), Mat.of(grad["w_iv"]), dot,
           b_extra=Vec(grad["gru.bias_ih"]), bias_out=out["to_v.bias"])  # fmt: skip
    for name in (
        "gru.weight_hh",
        "gru.bias_ih",
        "gru.bias_hh",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
    ):
        out[name] = grad[name]
    grad_s0 = grad_s.view(2 * shapes.batch, s, d).sum(0).to(slots_init.dtype)
    layout = _grad_buffer_layout(params)  # the parameters' own dtypes (fp32 buffers under the interpreter)
    return [grad_x_img.to(x_img.dtype), grad_x_aud.to(x_aud.dtype), grad_s0] + [
        out[name].to(dtype) for name, (_, dtype) in zip(_GRAD_BUFFERS, layout)
    ]


def _to_parameter_grads(buffers: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """_backward's parameter buffers -> one gradient per PARAMETERS entry (views)."""
    b = dict(zip(_GRAD_BUFFERS, buffers))
    layer_norms = b.pop("layer_norms")
    for i, name in enumerate(_LAYER_NORMS):
        b[name] = layer_norms[:, i]
    return [b[name].view(param.shape) for name, param in zip(PARAMETERS, params)]


# ----------------------------------------------------------------------------------
# Autograd and the public function
# ----------------------------------------------------------------------------------

_NUM_OUTPUTS = 10  # JSAOutput's fields; the rest of the forward's list is saved state


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library signature)
    x_img, x_aud, mask_img, mask_aud, slots_init, params, ctx.iters, ctx.eps, ctx.ln_eps, _, _ = inputs
    saved = output[_NUM_OUTPUTS:]
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)
    ctx.num_params = len(params)
    ctx.save_for_backward(x_img, x_aud, mask_img, mask_aud, slots_init, *params, *saved)


def _autograd_backward(ctx, grads) -> tuple:  # noqa: ANN001
    x_img, x_aud, mask_img, mask_aud, slots_init, *rest = ctx.saved_tensors
    params, saved = rest[: ctx.num_params], rest[ctx.num_params :]
    out = _backward(list(grads[:_NUM_OUTPUTS]), x_img, x_aud, mask_img, mask_aud, slots_init, params, saved,
                    ctx.iters, ctx.eps, ctx.ln_eps)  # fmt: skip
    grad_x_img, grad_x_aud, grad_slots_init, *buffers = out
    param_grads = _to_parameter_grads(buffers, params)
    return grad_x_img, grad_x_aud, None, None, grad_slots_init, param_grads, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def joint_slot_attention(
    x_img: Tensor, x_aud: Tensor, mask_img: Tensor | None, mask_aud: Tensor | None, slots_init: Tensor,
    params: list[Tensor], iters: int, eps: float, ln_eps: tuple[float, float, float],
    compute_dtype: torch.dtype, out_dtype: torch.dtype,
) -> list[Tensor]:  # fmt: skip
    """JSA's N iterations on both modalities (module docstring) -> JSAOutput's ten fields
    (slots, queries: B x S x d; Â: B x L x S; ia, ca: B x L) in out_dtype.

    x_img: B x Lv x d, x_aud: B x La x d; mask_*: B x L bool or None (both or neither);
    slots_init: S x d; params: each modality's parameters stacked (2 x ..., image
    first) in PARAMETERS' order; compute_dtype: the products' dtype (bf16 under
    autocast); ln_eps: the eps of LN_in, LN_slots and LN_ff. Any strides. Differentiable
    in x_img, x_aud, slots_init and params.
    """
    if (mask_img is None) != (mask_aud is None):
        raise ValueError("mask_img and mask_aud must be given together or not at all")
    if len(params) != len(PARAMETERS):
        raise ValueError(f"params must hold the {len(PARAMETERS)} stacked parameters {PARAMETERS}, got {len(params)}")
    out = _forward(
        x_img, x_aud, mask_img, mask_aud, slots_init, list(params), iters, eps, list(ln_eps), compute_dtype, out_dtype
    )
    return out[:_NUM_OUTPUTS]
