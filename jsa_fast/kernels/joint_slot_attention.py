"""Joint slot attention's N iterations for both modalities as one operator, forward and
backward, built for a GPU that is bound by kernel launches at the paper's shapes.

What it computes is docs/model.md's JSA from the token masks, LN_in and the shared S_0 to S_N,
the last queries and the four attention maps. Its parameters come stacked over the two
modalities (2 x ..., image first, PARAMETERS' order). Once per call they are folded
(`fold`, shapes for width d and MLP width H):

    w_q      2 x d x d       W_q' = W_q diag(γ_slots)
    key      2 x d x (d+1)   [W_k | b_k]
    w_logit  2 x d x (d+1)   W_q'^T [W_k | b_k]: G = s̃ w_logit (jsa_fast/kernels/slot_attention.py)
    b_query  2 x d           W_q β_slots + b_q:  Q = s̃ W_q'^T + b_query
    w_gru    2 x 4d x 2d     [C | h] w_gru^T + b_gru = [Z_r | Z_z | Z_in | Z_hn] (jsa_fast/kernels/gru.py),
             W_ih W_v folded in: [[W_iv,r W_hh,r] [W_iv,z W_hh,z] [W_iv,n 0] [0 W_hh,n]]
    b_gru    2 x 4d          [b_iv,r + b_hh,r | b_iv,z + b_hh,z | b_iv,n | b_hh,n], b_iv = W_ih b_v + b_ih
    w_mlp1   2 x H x d       W_1 diag(γ_ff);  b_mlp1  2 x H   W_1 β_ff + b_1

Per iteration n = 1..N, for both modalities at once (R = B S rows each; eight launches):

    G = s̃_{n-1} w_logit                       GEMM (bmm over the two modalities)
    C, [Â, ia, ca, Q]                          Triton, jsa_fast/kernels/slot_attention.py
    Z = [C | S_{n-1}] w_gru^T + b_gru           GEMM
    S̄, s̄ = GRU gates, LN_ff                   Triton, jsa_fast/kernels/gru.py
    Y = relu(s̄ w_mlp1^T + b_mlp1)             GEMM + relu
    S_n = S̄ + Y W_2^T + b_2, s̃_n               GEMM + Triton, jsa_fast/kernels/layer_norm.py

(the last iteration adds Q = s̃_{N-1} W_q'^T + b_query and, for the cross-modal maps,
G' = Q [W_k | b_k] of the other modality). The forward keeps the LN_in tokens,
[C_n | S_{n-1}] and s̃_{n-1} of every iteration (2 x N x R x 3d), the last Q and G' and
the folded weights. The backward recomputes the GRU/MLP activations of all N iterations
in one batched pass, walks the iterations back (eight launches each), forms each weight
gradient once, as one GEMM over all N iterations (K = N R) instead of N GEMMs and N adds,
and maps the folded weights' gradients back to the parameters by hand, so that every
parameter gradient comes out contiguous (no copy when autograd hands it to `.grad`).

Registered as `jsa_fast::joint_slot_attention` and `jsa_fast::joint_slot_attention_backward`
(kernels/registry.py: triton_op on a GPU, custom_op under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from jsa_fast.kernels.gru import gru_bwd_kernel, gru_fwd_kernel
from jsa_fast.kernels.layer_norm import ln_in_bwd_kernel, ln_in_fwd_kernel, residual_norm_kernel, slot_norm_bwd_kernel
from jsa_fast.kernels.registry import interpreting, io_dtype, kernel_input, launcher, register_op
from jsa_fast.kernels.slot_attention import attention_bwd_kernel, attention_fwd_kernel

__all__ = ["joint_slot_attention", "PARAMETERS", "attention_config", "row_config"]

# The parameters each modality owns (ModalitySlotAttention's names), in the operator's order.
PARAMETERS = (
    "mask_token", "norm_input.weight", "norm_input.bias", "norm_slots.weight", "norm_slots.bias",
    "norm_pre_ff.weight", "norm_pre_ff.bias", "to_q.weight", "to_q.bias", "to_k.weight", "to_k.bias",
    "to_v.weight", "to_v.bias", "gru.weight_ih", "gru.weight_hh", "gru.bias_ih", "gru.bias_hh",
    "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
)  # fmt: skip
_FOLDED = ("w_q", "key", "w_logit", "w_gru", "b_gru", "w_mlp1", "b_mlp1")

# On a GPU: row kernels take ROW_ELEMENTS elements a program (whole d-wide rows), the
# attention kernels BLOCK_L x BLOCK_S x BLOCK_D products a strip (the last iteration's
# backward, with the cross map, holds the most); all with GPU_NUM_WARPS. Checked by
# `python -m jsa_fast.kernels.compile_check` (sm_90, no GPU needed): at the paper's shapes at most
# 124 registers a thread and no spills in fp32, bf16, fp16, the autocast mix and fp64;
# no spills up to L = 512 but in fp64 (gradcheck only), the strips narrowing to 4.
GPU_NUM_WARPS = 8
ROW_ELEMENTS = 2048
ATTENTION_PRODUCTS = {"forward": 8192, "backward": 4096}


def row_config(dim: int, rows: int, interpret: bool | None = None) -> dict:
    """BLOCK_R rows of BLOCK_D (>= d) per program; under the interpreter, where a program
    costs the same whatever its size, as few programs as memory allows."""
    block_d = triton.next_power_of_2(dim)
    if interpreting() if interpret is None else interpret:
        return {"BLOCK_R": min(triton.next_power_of_2(rows), max(1, 2**20 // block_d)), "BLOCK_D": block_d}
    return {"BLOCK_R": max(1, ROW_ELEMENTS // block_d), "BLOCK_D": block_d, "num_warps": GPU_NUM_WARPS}


def attention_config(
    length: int, dim: int, num_slots: int, direction: str, last: bool, interpret: bool | None = None
) -> dict:
    """All keys (BLOCK_L >= the longer modality's L) and slots of one item, d in strips;
    the last iteration's second set of logits halves the strip. direction: "forward" or
    "backward"."""
    block_l, block_s, block_d = (triton.next_power_of_2(n) for n in (length, num_slots, dim))
    if interpreting() if interpret is None else interpret:
        return {"BLOCK_L": block_l, "BLOCK_S": block_s, "BLOCK_D": block_d}
    budget = ATTENTION_PRODUCTS[direction] // (2 if last else 1)
    return {
        "BLOCK_L": block_l,
        "BLOCK_S": block_s,
        "BLOCK_D": min(block_d, max(4, budget // (block_l * block_s))),
        "num_warps": GPU_NUM_WARPS,
    }


def _grid(rows: int, config: dict) -> tuple[int]:
    return (triton.cdiv(rows, config["BLOCK_R"]),)


def _as_bytes(mask: Tensor | None, like: Tensor) -> Tensor:
    """A bool mask as the dense B x L uint8 the kernels load (b * L + l), or a placeholder
    when None; a sliced, expanded or transposed mask is copied to that layout."""
    return like if mask is None else mask.contiguous().view(torch.uint8)


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


def _attention_launch(shapes: _Shapes, direction: str, last: bool, fp64: bool) -> tuple[tuple[int], dict]:
    config = attention_config(max(shapes.l_img, shapes.l_aud), shapes.dim, shapes.num_slots, direction, last)
    return (2 * shapes.batch,), config | {"LAST": last, "FP64": fp64}


def fold(p: dict[str, Tensor]) -> dict[str, Tensor]:
    """The folded weights of the module docstring from the stacked parameters p (name -> 2 x ...).

    Logits: with s̃ = LN_slots(S) before its affine, Q = W_q' s̃ + b_query and
    K = W_k x̂ + b_k, the slot-dependent part of K . Q is [x̂ | 1] . (W_q'^T [W_k | b_k])^T s̃:
    b_q and β_slots only shift every slot's logit of a key alike, which the softmax over
    slots ignores. GRU: its input is U = W_v C + b_v, so gi = (W_ih W_v) C + (W_ih b_v + b_ih).
    MLP: W_1 (γ_ff s̄ + β_ff) + b_1 = (W_1 diag(γ_ff)) s̄ + (W_1 β_ff + b_1).
    """
    dim = p["to_q.weight"].shape[-1]
    w_q = p["to_q.weight"] * p["norm_slots.weight"].unsqueeze(1)
    key = torch.cat([p["to_k.weight"], p["to_k.bias"].unsqueeze(2)], dim=2)
    w_iv = torch.bmm(p["gru.weight_ih"], p["to_v.weight"])
    b_iv = torch.baddbmm(p["gru.bias_ih"].unsqueeze(2), p["gru.weight_ih"], p["to_v.bias"].unsqueeze(2)).squeeze(2)
    w_hh, b_hh = p["gru.weight_hh"], p["gru.bias_hh"]
    zeros = w_iv.new_zeros(()).expand(2, dim, dim)
    from_context = torch.cat([w_iv, zeros], dim=1)
    from_hidden = torch.cat([w_hh[:, : 2 * dim], zeros, w_hh[:, 2 * dim :]], dim=1)
    return {
        "w_q": w_q,
        "key": key,
        "w_logit": torch.bmm(w_q.mT, key),
        "b_query": torch.baddbmm(
            p["to_q.bias"].unsqueeze(2), p["to_q.weight"], p["norm_slots.bias"].unsqueeze(2)
        ).squeeze(2),
        "w_gru": torch.cat([from_context, from_hidden], dim=2),
        "b_gru": torch.cat([b_iv[:, : 2 * dim] + b_hh[:, : 2 * dim], b_iv[:, 2 * dim :], b_hh[:, 2 * dim :]], dim=1),
        "w_mlp1": p["mlp.0.weight"] * p["norm_pre_ff.weight"].unsqueeze(1),
        "b_mlp1": torch.baddbmm(
            p["mlp.0.bias"].unsqueeze(2), p["mlp.0.weight"], p["norm_pre_ff.bias"].unsqueeze(2)
        ).squeeze(2),
    }


# ----------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------


def _forward_fake(
    x_img, x_aud, mask_img, mask_aud, slots_init, params, iters, eps, ln_eps, compute_dtype, out_dtype
) -> list[Tensor]:  # noqa: ANN001
    shapes = _Shapes(x_img, x_aud, slots_init, params, iters)
    dtype = io_dtype(compute_dtype)
    p = {name: t.to(dtype) for name, t in zip(PARAMETERS, params)}
    folded = fold(p)
    return (
        _forward_outputs(shapes, x_img.device, out_dtype)
        + _saved_buffers(shapes, x_img.device, dtype)
        + [folded[k] for k in _FOLDED]
    )


def _forward_outputs(shapes: _Shapes, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """JSAOutput's fields, in its order, each its own tensor."""
    s, b, d = shapes.num_slots, shapes.batch, shapes.dim
    out = [torch.empty(shape, device=device, dtype=dtype) for shape in
           ((b, s, d), (b, s, d), (b, s, d), (b, s, d), (b, shapes.l_img, s), (b, shapes.l_aud, s))]  # fmt: skip
    for length in (shapes.l_img, shapes.l_img, shapes.l_aud, shapes.l_aud):  # ia_img, ca_img, ia_aud, ca_aud
        out.append(torch.empty(b, length, device=device, dtype=dtype))
    return out


def _saved_buffers(shapes: _Shapes, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """What the forward keeps for backward besides the folded weights: tokens
    (B (Lv + La) x d), hidden (2 x N x R x 2d: [C_n | S_{n-1}]), slot norms
    (2 x N x R x d: s̃_{n-1}), the last queries (2 x R x d) and their cross weights
    (2 x R x (d+1))."""
    n, r, d = shapes.iters, shapes.rows, shapes.dim

    def new(*shape: int) -> Tensor:
        return torch.empty(shape, device=device, dtype=dtype)

    return [new(shapes.tokens, d), new(2, n, r, 2 * d), new(2, n, r, d), new(2, r, d), new(2, r, d + 1)]


@register_op("jsa_fast::joint_slot_attention", _forward_fake)
def _forward(
    x_img: Tensor, x_aud: Tensor, mask_img: Tensor | None, mask_aud: Tensor | None, slots_init: Tensor,
    params: list[Tensor], iters: int, eps: float, ln_eps: list[float], compute_dtype: torch.dtype, out_dtype: torch.dtype,
) -> list[Tensor]:  # fmt: skip
    shapes = _Shapes(x_img, x_aud, slots_init, params, iters)
    dtype = io_dtype(compute_dtype)
    fp64 = dtype == torch.float64
    p = {name: kernel_input(t) for name, t in zip(PARAMETERS, params)}
    folded = {name: w.to(dtype) for name, w in fold(p).items()}
    x_img, x_aud, slots_init = (kernel_input(t) for t in (x_img, x_aud, slots_init))
    device, d, r, rows = x_img.device, shapes.dim, shapes.rows, 2 * shapes.rows
    outputs = _forward_outputs(shapes, device, io_dtype(out_dtype))
    slots_img, slots_aud, q_img, q_aud, attn_img, attn_aud, ia_img, ca_img, ia_aud, ca_aud = outputs
    tokens, hidden, slot_norms, _, _ = _saved_buffers(shapes, device, dtype)
    eps_in, eps_slots, eps_ff = ln_eps
    w_mlp2, b_mlp2 = p["mlp.2.weight"].to(dtype), p["mlp.2.bias"]

    config = row_config(d, shapes.tokens)
    launcher(ln_in_fwd_kernel)[_grid(shapes.tokens, config)](
        x_img, x_aud, _as_bytes(mask_img, x_img), _as_bytes(mask_aud, x_img), p["mask_token"], p["norm_input.weight"],
        p["norm_input.bias"], tokens, shapes.batch * shapes.l_img, shapes.tokens, d, eps_in,
        HAS_MASK=mask_img is not None, FP64=fp64, **config,
    )  # fmt: skip
    row_cfg = row_config(d, rows)

    def slots_and_norms(s_bar: Tensor, mlp: Tensor, bias: Tensor, n: int, mode: int) -> None:
        """S_n (and s̃_n) into hidden[:, n] and slot_norms[:, n]; S_N into the outputs."""
        following = min(n, iters - 1)
        launcher(residual_norm_kernel)[_grid(rows, row_cfg)](
            s_bar, mlp, bias, hidden[:, following, :, d:], slot_norms[:, following], slots_img, slots_aud, rows, r,
            shapes.num_slots, hidden.stride(0), 2 * d, slot_norms.stride(0), d, eps_slots, MODE=mode, FP64=fp64, **row_cfg,
        )  # fmt: skip

    slots_and_norms(slots_init, slots_init, slots_init, 0, mode=0)
    query = cross = tokens  # placeholders until the last iteration
    for n in range(iters):
        last = n == iters - 1
        logit_weights = torch.bmm(slot_norms[:, n], folded["w_logit"])
        if last:
            query = torch.baddbmm(folded["b_query"].unsqueeze(1), slot_norms[:, n], folded["w_q"].mT)
            cross = torch.bmm(query, folded["key"].flip(0))  # each modality's queries on the other's keys
        grid, config = _attention_launch(shapes, "forward", last, fp64)
        launcher(attention_fwd_kernel)[grid](
            tokens, logit_weights, cross, query, hidden[:, n], attn_img, attn_aud, ia_img, ia_aud, ca_img, ca_aud, q_img, q_aud,
            shapes.batch, shapes.l_img, shapes.l_aud, d, shapes.num_slots, logit_weights.stride(0), hidden.stride(0), 2 * d,
            shapes.scale, eps, **config,
        )  # fmt: skip
        gates = torch.baddbmm(folded["b_gru"].unsqueeze(1), hidden[:, n], folded["w_gru"].mT)
        s_bar = torch.empty(2, r, d, device=device, dtype=dtype)
        s_bar_norm = torch.empty_like(s_bar)
        launcher(gru_fwd_kernel)[_grid(rows, row_cfg)](
            gates, hidden[:, n, :, d:], s_bar, s_bar_norm, rows, r, gates.stride(0), hidden.stride(0), 2 * d, d, eps_ff,
            STORE_BAR=True, FP64=fp64, **row_cfg,
        )  # fmt: skip
        mlp = torch.baddbmm(folded["b_mlp1"].unsqueeze(1), s_bar_norm, folded["w_mlp1"].mT).relu_()
        slots_and_norms(s_bar, torch.bmm(mlp, w_mlp2.mT), b_mlp2, n + 1, mode=2 if last else 1)
    saved = [tokens, hidden, slot_norms, query, cross] + [folded[k] for k in _FOLDED]
    return [o.to(out_dtype) for o in outputs] + saved


# ----------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------


def _backward_fake(
    grads, x_img, x_aud, mask_img, mask_aud, slots_init, params, saved, iters, eps, ln_eps
) -> list[Tensor]:  # noqa: ANN001
    return [torch.empty_like(x_img), torch.empty_like(x_aud), torch.empty_like(slots_init)] + [
        torch.empty(shape, device=x_img.device, dtype=dtype) for shape, dtype in _grad_buffer_layout(params)
    ]


# What `_backward` returns after the inputs' gradients: the LN_in sums (3 x 2 x d:
# γ_in, β_in, mask tokens), then a buffer per parameter, b_gru's (2 x 4d) for
# gru.bias_ih (its first 3d are bias_ih's); `_to_parameter_grads` maps them to PARAMETERS.
_GRAD_BUFFERS = (
    "norm_input", "norm_slots.weight", "norm_slots.bias", "norm_pre_ff.weight", "norm_pre_ff.bias", "to_q.weight",
    "to_q.bias", "to_k.weight", "to_k.bias", "to_v.weight", "to_v.bias", "gru.weight_ih", "gru.weight_hh",
    "gru.bias_ih", "gru.bias_hh", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
)  # fmt: skip


def _grad_buffer_layout(params: list[Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each of _backward's parameter buffers."""
    p = dict(zip(PARAMETERS, params))
    dim = p["to_q.weight"].shape[-1]
    special = {
        "norm_input": ((3, 2, dim), p["norm_input.weight"].dtype),
        "gru.bias_ih": ((2, 4 * dim), p["gru.bias_ih"].dtype),
    }
    return [special.get(name) or (tuple(p[name].shape), p[name].dtype) for name in _GRAD_BUFFERS]


@register_op("jsa_fast::joint_slot_attention_backward", _backward_fake)
def _backward(
    grads: list[Tensor | None], x_img: Tensor, x_aud: Tensor, mask_img: Tensor | None, mask_aud: Tensor | None,
    slots_init: Tensor, params: list[Tensor], saved: list[Tensor], iters: int, eps: float, ln_eps: list[float],
) -> list[Tensor]:  # fmt: skip
    """Gradients of x_img, x_aud, slots_init and the parameters (buffers in _GRAD_BUFFERS'
    order) from those of the forward's ten outputs (None where none arrived)."""
    shapes = _Shapes(x_img, x_aud, slots_init, params, iters)
    tokens, hidden, slot_norms, query, cross, *folded = saved
    f = dict(zip(_FOLDED, folded))
    dtype = hidden.dtype
    fp64 = dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    p = {name: kernel_input(t) for name, t in zip(PARAMETERS, params)}
    x_io = [kernel_input(t) for t in (x_img, x_aud)]
    grads = [None if g is None else kernel_input(g) for g in grads]  # an output's gradient may be expanded
    g_slots_img, g_slots_aud, g_q_img, g_q_aud, g_attn_img, g_attn_aud, g_ia_img, g_ca_img, g_ia_aud, g_ca_aud = grads
    device, d, r, n_all = x_img.device, shapes.dim, shapes.rows, iters * shapes.rows
    rows = 2 * r
    eps_in, eps_slots, eps_ff = ln_eps
    row_cfg = row_config(d, rows)
    w_mlp2 = p["mlp.2.weight"].to(dtype)

    # The GRU/MLP activations of all N iterations, recomputed in one batched pass.
    hidden_all = hidden.view(2, n_all, 2 * d)
    gates_all = torch.baddbmm(f["b_gru"].unsqueeze(1), hidden_all, f["w_gru"].mT)
    s_bar_norm_all = torch.empty(2, n_all, d, device=device, dtype=dtype)
    config = row_config(d, 2 * n_all)
    launcher(gru_fwd_kernel)[_grid(2 * n_all, config)](
        gates_all, hidden[:, :, :, d:], s_bar_norm_all, s_bar_norm_all, 2 * n_all, n_all, gates_all.stride(0),
        hidden.stride(0), 2 * d, d, eps_ff, STORE_BAR=False, FP64=fp64, **config,
    )  # fmt: skip
    mlp_all = torch.baddbmm(f["b_mlp1"].unsqueeze(1), s_bar_norm_all, f["w_mlp1"].mT).relu_()
    logit_weights_all = torch.bmm(slot_norms.view(2, n_all, d), f["w_logit"])

    # Gradients per iteration, kept for the weight gradients over all iterations.
    grad_slots = torch.empty(2, iters, r, d, device=device, dtype=dtype)  # dL/dS_n, n = 1..N
    grad_gates = torch.empty(2, iters, r, 4 * d, device=device, dtype=dtype)
    grad_logit_weights = torch.empty(2, iters, r, d + 1, device=device, dtype=dtype)
    grad_mlp = torch.empty(2, iters, r, shapes.hidden, device=device, dtype=dtype)  # dL/d(pre-relu)
    grad_tokens = torch.empty(shapes.tokens, d, device=device, dtype=acc)
    grad_cross = torch.empty(2, r, d + 1, device=device, dtype=dtype)
    grad_s0 = torch.empty(2, r, d, device=device, dtype=dtype)
    for m, g in enumerate((g_slots_img, g_slots_aud)):
        target = grad_slots[m, iters - 1]
        target.zero_() if g is None else target.copy_(g.reshape(r, d))
    # Each map's gradients go to the kernel as a pair: zeros for a missing half, the
    # tokens as a placeholder (never read) when both are missing.
    map_grads, has = {}, {}
    for name, pair, extra in (("attn", (g_attn_img, g_attn_aud), (shapes.num_slots,)), ("ia", (g_ia_img, g_ia_aud), ()),
                              ("ca", (g_ca_img, g_ca_aud), ())):  # fmt: skip
        has[name] = any(g is not None for g in pair)
        map_grads[name] = [
            tokens if not has[name] else g if g is not None else tokens.new_zeros(shapes.batch, length, *extra)
            for g, length in zip(pair, (shapes.l_img, shapes.l_aud))
        ]
    g_query = None  # dL/dQ of the last queries, from the q outputs and the cross-modal maps
    if g_q_img is not None or g_q_aud is not None:
        g_query = torch.stack(
            [g if g is not None else query.new_zeros(shapes.batch, shapes.num_slots, d) for g in (g_q_img, g_q_aud)]
        )
        g_query = g_query.to(dtype).view(2, r, d)

    for n in reversed(range(iters)):
        last = n == iters - 1
        layer = slice(n * r, (n + 1) * r)
        grad_s = grad_slots[:, n]
        grad_y = torch.bmm(grad_s, w_mlp2)
        torch.ops.aten.threshold_backward.grad_input(grad_y, mlp_all[:, layer], 0, grad_input=grad_mlp[:, n])
        grad_s_bar_norm = torch.bmm(grad_mlp[:, n], f["w_mlp1"])
        grad_h_direct = torch.empty(2, r, d, device=device, dtype=dtype)
        launcher(gru_bwd_kernel)[_grid(rows, row_cfg)](
            gates_all[:, layer], hidden[:, n, :, d:], grad_s_bar_norm, grad_s, grad_gates[:, n], grad_h_direct,
            rows, r, gates_all.stride(0), hidden.stride(0), 2 * d, grad_slots.stride(0), grad_gates.stride(0), d, eps_ff,
            FP64=fp64, **row_cfg,
        )  # fmt: skip
        grad_hidden = torch.bmm(grad_gates[:, n], f["w_gru"])
        grid, config = _attention_launch(shapes, "backward", last, fp64)
        launcher(attention_bwd_kernel)[grid](
            tokens, logit_weights_all[:, layer], cross, grad_hidden, *map_grads["attn"], *map_grads["ia"], *map_grads["ca"],
            grad_tokens, grad_logit_weights[:, n], grad_cross, shapes.batch, shapes.l_img, shapes.l_aud, d, shapes.num_slots,
            logit_weights_all.stride(0), grad_hidden.stride(0), 2 * d, grad_logit_weights.stride(0), shapes.scale, eps,
            HAS_G_ATTN=last and has["attn"], HAS_G_IA=last and has["ia"], HAS_G_CA=last and has["ca"],
            ACCUMULATE=not last, **config,
        )  # fmt: skip
        grad_norm = torch.bmm(grad_logit_weights[:, n], f["w_logit"].mT)
        if last:
            if has["ca"]:  # G' = Q [W_k | b_k] of the other modality
                key_cross = f["key"].flip(0).mT
                g_query = (
                    torch.bmm(grad_cross, key_cross)
                    if g_query is None
                    else torch.baddbmm(g_query, grad_cross, key_cross)
                )
            if g_query is not None:
                grad_norm = torch.baddbmm(grad_norm, g_query, f["w_q"])
        target = grad_slots[:, n - 1] if n > 0 else grad_s0
        launcher(slot_norm_bwd_kernel)[_grid(rows, row_cfg)](
            grad_norm, hidden[:, n, :, d:], grad_h_direct, grad_hidden[:, :, d:], target, rows, r, hidden.stride(0), 2 * d,
            2 * d, target.stride(0), d, eps_slots, FP64=fp64, **row_cfg,
        )  # fmt: skip

    grad_x_img, grad_x_aud = torch.empty_like(x_io[0]), torch.empty_like(x_io[1])
    config = row_config(d, shapes.tokens)
    grid = _grid(shapes.tokens, config)
    partial = torch.empty(grid[0], 3, 2, d, device=device, dtype=acc)
    launcher(ln_in_bwd_kernel)[grid](
        x_io[0], x_io[1], _as_bytes(mask_img, x_io[0]), _as_bytes(mask_aud, x_io[0]), p["mask_token"], p["norm_input.weight"],
        grad_tokens, grad_x_img, grad_x_aud, partial, shapes.batch * shapes.l_img, shapes.tokens, d, eps_in,
        HAS_MASK=mask_img is not None, FP64=fp64, **config,
    )  # fmt: skip

    def over_iterations(t: Tensor) -> Tensor:
        return t.view(2, n_all, t.shape[-1])

    folded_grads = {
        "w_logit": torch.bmm(over_iterations(slot_norms).mT, over_iterations(grad_logit_weights)),
        "w_gru": torch.bmm(over_iterations(grad_gates).mT, hidden_all),
        "b_gru": over_iterations(grad_gates).sum(1),
        "w_mlp1": torch.bmm(over_iterations(grad_mlp).mT, s_bar_norm_all),
        "b_mlp1": over_iterations(grad_mlp).sum(1),
    }
    if g_query is not None:  # Q = s̃ W_q'^T + b_query
        folded_grads["w_q"] = torch.bmm(g_query.mT, slot_norms[:, iters - 1])
        folded_grads["b_query"] = g_query.sum(1)
    if has["ca"]:
        folded_grads["key_cross"] = torch.bmm(query.mT, grad_cross).flip(0)
    parameter_grads = _unfold_grads(folded_grads, f, p, d)
    parameter_grads["mlp.2.weight"] = torch.bmm(over_iterations(grad_slots).mT, mlp_all)
    parameter_grads["mlp.2.bias"] = over_iterations(grad_slots).sum(1)
    parameter_grads["norm_input"] = partial.sum(0)
    out = [
        grad_x_img.to(x_img.dtype),
        grad_x_aud.to(x_aud.dtype),
        grad_s0.view(2 * shapes.batch, shapes.num_slots, d).sum(0).to(slots_init.dtype),
    ]
    return out + [
        parameter_grads[name].to(dtype) for name, (_, dtype) in zip(_GRAD_BUFFERS, _grad_buffer_layout(params))
    ]


def _unfold_grads(g: dict[str, Tensor], f: dict[str, Tensor], p: dict[str, Tensor], dim: int) -> dict[str, Tensor]:
    """The parameters' gradients from the folded weights' (the chain rule through `fold`,
    by hand, so that each comes out contiguous in few launches). g: gradients by folded
    name ("w_q" and "b_query" only when the last queries got one; "key_cross": of
    [W_k | b_k] through the cross-modal logits, when those got one); f: the folded
    weights; p: the parameters."""
    dtype = p["to_q.weight"].dtype
    g, f = {k: v.to(dtype) for k, v in g.items()}, {k: v.to(dtype) for k, v in f.items()}
    out = {}
    # w_logit = W_q'^T key, Q = s̃ W_q'^T + b_query, W_q' = W_q diag(γ_slots), b_query = W_q β_slots + b_q
    g_w_q = (
        torch.bmm(f["key"], g["w_logit"].mT) if "w_q" not in g else torch.baddbmm(g["w_q"], f["key"], g["w_logit"].mT)
    )
    g_w_q_scaled = g_w_q * p["norm_slots.weight"].unsqueeze(1)
    out["norm_slots.weight"] = (g_w_q * p["to_q.weight"]).sum(1)
    if "b_query" in g:
        out["to_q.weight"] = torch.baddbmm(g_w_q_scaled, g["b_query"].unsqueeze(2), p["norm_slots.bias"].unsqueeze(1))
        out["norm_slots.bias"] = torch.bmm(g["b_query"].unsqueeze(1), p["to_q.weight"]).squeeze(1)
        out["to_q.bias"] = g["b_query"]
    else:  # b_q and β_slots reach nothing but the queries
        out["to_q.weight"] = g_w_q_scaled
        out["norm_slots.bias"], out["to_q.bias"] = (
            torch.zeros_like(p["norm_slots.bias"]),
            torch.zeros_like(p["to_q.bias"]),
        )
    # key = [W_k | b_k], used by w_logit and by the cross-modal logits
    g_key_cross = g.get("key_cross")
    w_k_parts = []
    for columns in (slice(0, dim), slice(dim, dim + 1)):
        if g_key_cross is None:
            w_k_parts.append(torch.bmm(f["w_q"], g["w_logit"][..., columns]))
        else:
            w_k_parts.append(torch.baddbmm(g_key_cross[..., columns], f["w_q"], g["w_logit"][..., columns]))
    out["to_k.weight"], out["to_k.bias"] = w_k_parts[0], w_k_parts[1].squeeze(2)
    # w_gru = [[W_iv,rz,n 0-padded] | [W_hh rz, 0, W_hh n]], W_iv = W_ih W_v, b_iv = W_ih b_v + b_ih
    g_w_iv = g["w_gru"][:, : 3 * dim, :dim]
    g_b_iv = g["b_gru"][:, : 3 * dim]
    out["gru.weight_ih"] = torch.baddbmm(
        torch.bmm(g_w_iv, p["to_v.weight"].mT), g_b_iv.unsqueeze(2), p["to_v.bias"].unsqueeze(1)
    )
    out["to_v.weight"] = torch.bmm(p["gru.weight_ih"].mT, g_w_iv)
    out["to_v.bias"] = torch.bmm(g_b_iv.unsqueeze(1), p["gru.weight_ih"]).squeeze(1)
    out["gru.weight_hh"] = torch.cat([g["w_gru"][:, : 2 * dim, dim:], g["w_gru"][:, 3 * dim :, dim:]], dim=1)
    out["gru.bias_ih"] = g["b_gru"]  # its first 3d; _to_parameter_grads takes the view
    out["gru.bias_hh"] = torch.cat([g["b_gru"][:, : 2 * dim], g["b_gru"][:, 3 * dim :]], dim=1)
    # w_mlp1 = W_1 diag(γ_ff), b_mlp1 = W_1 β_ff + b_1
    out["mlp.0.weight"] = torch.baddbmm(
        g["w_mlp1"] * p["norm_pre_ff.weight"].unsqueeze(1), g["b_mlp1"].unsqueeze(2), p["norm_pre_ff.bias"].unsqueeze(1)
    )
    out["norm_pre_ff.weight"] = (g["w_mlp1"] * p["mlp.0.weight"]).sum(1)
    out["norm_pre_ff.bias"] = torch.bmm(g["b_mlp1"].unsqueeze(1), p["mlp.0.weight"]).squeeze(1)
    out["mlp.0.bias"] = g["b_mlp1"]
    return out


def _to_parameter_grads(buffers: list[Tensor], params: list[Tensor], dim: int) -> list[Tensor]:
    """_backward's parameter buffers -> one gradient per PARAMETERS entry (views)."""
    b = dict(zip(_GRAD_BUFFERS, buffers))
    norm_input = b.pop("norm_input")
    b["norm_input.weight"], b["norm_input.bias"] = norm_input[0], norm_input[1]
    b["mask_token"] = norm_input[2]
    b["gru.bias_ih"] = b["gru.bias_ih"][:, : 3 * dim]
    return [b[name].view(param.shape) if name == "mask_token" else b[name] for name, param in zip(PARAMETERS, params)]


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
    param_grads = _to_parameter_grads(buffers, params, x_img.shape[-1])
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
    autocast); ln_eps: the eps of LN_in, LN_slots and LN_ff. Differentiable in x_img,
    x_aud, slots_init and params.
    """
    if (mask_img is None) != (mask_aud is None):
        raise ValueError("mask_img and mask_aud must be given together or not at all")
    if len(params) != len(PARAMETERS):
        raise ValueError(f"params must hold the {len(PARAMETERS)} stacked parameters {PARAMETERS}, got {len(params)}")
    out = _forward(
        x_img, x_aud, mask_img, mask_aud, slots_init, list(params), iters, eps, list(ln_eps), compute_dtype, out_dtype
    )
    return out[:_NUM_OUTPUTS]
