"""Census of joint slot attention as a GPU would run it, counted without a GPU.

    python bench/census.py [--batch 256 4096] [--mode fp32 autocast] [--json PATH]

At the paper's shapes JSA is bound by kernel launches and small GEMMs, so what decides its
GPU time can be counted on a CPU. Each module (the reference as it dispatches on CUDA, and
`FusedJointSlotAttention`'s Triton path) runs one forward and one backward in training
mode with explicit token masks, fixed random weights on all ten outputs, inputs that
require grad, on fake tensors (torch's FakeTensorMode: shapes, dtypes and strides without
memory or arithmetic, so B = 4,096 costs nothing) with the project's operators taking
their GPU path (`registry.planning_gpu_launches`: the GPU's dtypes and launch
configurations, every Triton launch counted and skipped). Counted:

- kernels: every dispatched aten op that launches a kernel on CUDA (views, allocations
  and metadata queries excluded), as many as it launches there (`KERNELS_PER_OP`), plus
  every Triton launch; a project operator counts by what runs inside it, never as one;
  what the module's forward runs around the operator (parameter stacking, masks, casts)
  is counted too.
- GEMM GFLOP: 2 M N K of every aten matrix product, plus what each Triton launch declares
  (`launcher(kernel, flops=...)`); beside it the GFLOP the K/V-free algorithm needs
  (`needed_gflop`).
- kept: the bytes of the tensors the forward creates that are still alive after it (what
  autograd and the operator keep for backward), parameters, inputs and outputs excluded.
- backward scratch: the largest sum, at any op boundary of the backward, of the bytes of
  tensors the backward created and still holds, the gradients it returns excluded.

"autocast" runs the modules in fp32 under bf16 autocast, as training does (CPU autocast
stands in for CUDA's, whose casts of matmul inputs are the same); the fused module's
operator then computes in bf16 as on a GPU (under the interpreter it would widen to fp32).
The reference's GRUCell dispatches on CUDA as two bias-free linears and the fused cell
`_thnn_fused_gru_cell` (one kernel each way), which the census stands in for.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_results  # noqa: E402

from jsa_fast import FusedJointSlotAttention, JointSlotAttention  # noqa: E402
from jsa_fast.kernels import registry  # noqa: E402

# Ops that allocate, alias or query without launching a kernel.
NO_LAUNCH = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::_unsafe_view", "aten::lift_fresh", "aten::resize_", "aten::set_", "aten::is_same_size",
    "aten::_local_scalar_dense", "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset",
    "aten::detach", "aten::alias",
}  # fmt: skip

# Ops that are one call but several kernels on CUDA. baddbmm and addbmm (and addmm with
# a 2-D input) copy their input into the result before cuBLAS runs (`result.copy_(self)`
# in aten/src/ATen/native/cuda/Blas.cpp); addmm with a 1-D bias and beta 1 puts the bias
# in cublasLt's epilogue instead. constant_pad_nd fills the result, then copies the input in.
KERNELS_PER_OP = {"aten::baddbmm": 2, "aten::addbmm": 2, "aten::constant_pad_nd": 2}


def kernels_of(name: str, args: tuple) -> int:
    if name == "aten::addmm":
        return 1 if args[0].dim() == 1 else 2
    return KERNELS_PER_OP.get(name, 1)


def gemm_flops(name: str, args: tuple) -> int:
    """2 M N K of an aten matrix product (0 for any other op)."""
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"):
        a, b = (args[0], args[1]) if name in ("aten::mm", "aten::bmm") else (args[1], args[2])
        batch = a.shape[0] if a.dim() == 3 else 1
        return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
    return 0


def _fused_gru_cell(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None):  # noqa: ANN001, ANN202
    """aten::_thnn_fused_gru_cell (CUDA-only in PyTorch): h' and the workspace
    [r, z, n, h, gh_n] (R x 5d) that its backward reads, as the CUDA kernel keeps them."""
    if input_bias is not None:
        input_gates, hidden_gates = input_gates + input_bias, hidden_gates + hidden_bias
    i_r, i_z, i_n = input_gates.chunk(3, 1)
    h_r, h_z, h_n = hidden_gates.chunk(3, 1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (hx - n), torch.cat([r, z, n, hx, h_n], 1)


def _fused_gru_cell_backward(grad_hy, workspace, has_bias):  # noqa: ANN001, ANN202
    r, z, n, hx, h_n = workspace.chunk(5, 1)
    g_n = grad_hy * (1 - z) * (1 - n * n)
    g_r = g_n * h_n * r * (1 - r)
    g_z = grad_hy * (hx - n) * z * (1 - z)
    g_input, g_hidden = torch.cat([g_r, g_z, g_n], 1), torch.cat([g_r, g_z, g_n * r], 1)
    return g_input, g_hidden, grad_hy * z, g_input.sum(0), g_hidden.sum(0)


def _cuda_gru_cell(cell: torch.nn.GRUCell, input: torch.Tensor, hx: torch.Tensor) -> torch.Tensor:
    """GRUCell.forward as ATen runs it on CUDA (RNN.cpp gru_cell): two bias-free linears,
    then the fused cell."""
    input_gates, hidden_gates = F.linear(input, cell.weight_ih), F.linear(hx, cell.weight_hh)
    return torch.ops.aten._thnn_fused_gru_cell(input_gates, hidden_gates, hx, cell.bias_ih, cell.bias_hh)[0]


def _uncounted(fn, *args):  # noqa: ANN001, ANN202
    with _disable_current_modes():
        return fn(*args)


# The CUDA-only cell on fake (meta) and CPU tensors, one op each (the aten ops inside are
# not counted: on CUDA it is one kernel).
_CUDA_ONLY = torch.library.Library("aten", "IMPL")
for _name, _impl in (
    ("_thnn_fused_gru_cell", _fused_gru_cell),
    ("_thnn_fused_gru_cell_backward", _fused_gru_cell_backward),
):
    for _key in ("CPU", "Meta"):
        _CUDA_ONLY.impl(_name, lambda *args, _impl=_impl: _uncounted(_impl, *args), _key)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def launches(func: Any, name: str, args: tuple, out: Any) -> bool:
    """Whether an op launches a kernel. An op that may return its input (`to`, `contiguous`,
    `reshape`: composite ops reach a dispatch mode undecomposed inside a project op's body)
    launches one exactly when its result has storage of its own; an in-place op always does."""
    if name in NO_LAUNCH or name.startswith("prim::"):
        return False
    if func.is_view or any(a.alias_info is not None and not a.alias_info.is_write for a in func._schema.returns):
        inputs = {_key(t) for t in _tensors(list(args))}
        return any(_key(t) not in inputs for t in _tensors(out))
    return True


class Census(TorchDispatchMode):
    """Counts kernels and GEMM FLOPs (module docstring) and follows every storage created:
    after each op, the keys of those still alive (for the peak)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.flops = 0
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.timeline: list[list[int]] = []
        self._depth = 0

    @contextmanager
    def _hook(self, kernel: Any, flops: int) -> Iterator[None]:
        self.ops[f"triton::{kernel.fn.__name__}"] += 1
        self.flops += flops
        with _disable_current_modes():
            yield

    def __enter__(self) -> Census:
        # Entered again inside a project op's body: the hook is registered once.
        self._depth += 1
        if self._depth == 1:
            registry.LAUNCH_HOOKS.append(self._hook)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            registry.LAUNCH_HOOKS.remove(self._hook)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (dispatch signature)
        kwargs = kwargs or {}
        name = func._schema.name
        if name in registry.IMPLEMENTATIONS:
            # A project op counts by its contents: run its body with the census active.
            with self:
                out = registry.IMPLEMENTATIONS[name](*args, **kwargs)
        else:
            out = func(*args, **kwargs)
            if launches(func, name, args, out):
                self.ops[name] += kernels_of(name, args)
                self.flops += gemm_flops(name, args)
        inputs = {_key(t) for t in _tensors([*args, *kwargs.values()])}
        for t in _tensors(out):  # storages this op created (a view of an older tensor is not new)
            if _key(t) not in inputs:
                self.storages.setdefault(_key(t), (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
        self.timeline.append([key for key, (ref, _) in self.storages.items() if not ref.expired()])
        return out

    def total(self) -> int:
        return sum(self.ops.values())

    def alive_bytes(self, exclude: list[torch.Tensor]) -> int:
        """Bytes of the recorded storages still alive, but those of `exclude`."""
        excluded = {_key(t) for t in exclude}
        return sum(n for key, (ref, n) in self.storages.items() if key not in excluded and not ref.expired())

    def peak_bytes(self, exclude: list[torch.Tensor]) -> int:
        """The largest sum over the timeline of the alive recorded storages, but `exclude`."""
        excluded = {_key(t) for t in exclude}
        return max((sum(self.storages[k][1] for k in alive if k not in excluded) for alive in self.timeline), default=0)


def needed_forward_flops(batch: int, dim: int, num_slots: int, iters: int, mlp_hidden: int) -> int:
    """The GEMM work of the K/V-free algorithm's forward: per modality and iteration
    2 R (d (d+1) + 6 d^2 + 2 d H) with R = B S (logit projection, GRU input and hidden
    gates, MLP), plus the weight folds W_q^T [W_k | b_k] and W_ih W_v; the last queries,
    the cross-modal logits and the attention products are not included. Forward +
    backward needs 3 times as much."""
    rows = batch * num_slots
    per_iteration = 2 * rows * (dim * (dim + 1) + 6 * dim**2 + 2 * dim * mlp_hidden)
    folds = 2 * dim * dim * (dim + 1) + 2 * 3 * dim * dim * dim
    return 2 * (iters * per_iteration + folds)


def needed_gflop(batch: int, dim: int, num_slots: int, iters: int, mlp_hidden: int) -> float:
    """needed_forward_flops of forward + backward, in GFLOP (95.0 at the paper's shape)."""
    return 3 * needed_forward_flops(batch, dim, num_slots, iters, mlp_hidden) / 1e9


IMPLEMENTATIONS = {
    "reference": "the reference module as it dispatches on a GPU (its GRUCell as the fused CUDA cell)",
    "fused": "FusedJointSlotAttention's Triton path",
}
MODES = ("fp32", "autocast")


@contextmanager
def _autocast_bf16(enabled: bool) -> Iterator[None]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        yield


def census_one(impl: str, batch: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Kernels, GEMM FLOPs, kept bytes and backward scratch of one forward and backward."""
    sizes = dict(dim=args.dim, num_slots=args.slots, iters=args.iters, mlp_hidden=args.mlp_hidden)
    with ExitStack() as stack:
        stack.enter_context(FakeTensorMode())
        stack.enter_context(registry.planning_gpu_launches())
        torch.manual_seed(0)
        module = FusedJointSlotAttention(**sizes, backend="triton") if impl == "fused" else JointSlotAttention(**sizes)
        module.train()
        if impl == "reference":
            for branch in (module.image, module.audio):
                branch.gru.forward = partial(_cuda_gru_cell, branch.gru)
        x_img = torch.randn(batch, args.l_img, args.dim, requires_grad=True)
        x_aud = torch.randn(batch, args.l_aud, args.dim, requires_grad=True)
        inputs = [x_img, x_aud, torch.rand(batch, args.l_img) < 0.1, torch.rand(batch, args.l_aud) < 0.1]
        weights = [torch.randn(1)] * 10  # replaced below, once the outputs' shapes are known
        forward, backward = Census(), Census()
        with _autocast_bf16(mode == "autocast"), forward:
            out = module(*inputs)
        kept = forward.alive_bytes([*module.parameters(), *inputs, *out])
        weights = [torch.randn_like(o) for o in out]
        with backward:
            torch.autograd.backward(list(out), weights)
        grads = [t.grad for t in (x_img, x_aud, *module.parameters()) if t.grad is not None]
        scratch = backward.peak_bytes([*grads, *weights])
    return {
        "impl": impl,
        "mode": mode,
        "batch": batch,
        "fwd_kernels": forward.total(),
        "bwd_kernels": backward.total(),
        "total_kernels": forward.total() + backward.total(),
        "triton_launches": sum(n for op, n in (forward.ops + backward.ops).items() if op.startswith("triton::")),
        "fwd_gflop": forward.flops / 1e9,
        "bwd_gflop": backward.flops / 1e9,
        "gemm_gflop": (forward.flops + backward.flops) / 1e9,
        "needed_gflop": needed_gflop(batch, **sizes),
        "kept_mib": kept / 2**20,
        "bwd_scratch_mib": scratch / 2**20,
        "fwd_kernels_by_name": dict(forward.ops.most_common()),
        "bwd_kernels_by_name": dict(backward.ops.most_common()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 4096], help="batch sizes")
    parser.add_argument("--mode", choices=MODES, nargs="+", default=list(MODES))
    parser.add_argument("--impl", choices=list(IMPLEMENTATIONS), nargs="+", default=list(IMPLEMENTATIONS))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--mlp-hidden", type=int, default=1024)
    parser.add_argument("--l-img", type=int, default=49)
    parser.add_argument("--l-aud", type=int, default=16)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default=None, help="output path (default bench/results/census-cpu-<time>.json)")
    args = parser.parse_args(argv)

    rows = [census_one(impl, batch, mode, args) for mode in args.mode for batch in args.batch for impl in args.impl]
    for row in rows:
        reference = next(
            (r for r in rows if r["impl"] == "reference" and (r["mode"], r["batch"]) == (row["mode"], row["batch"])),
            None,
        )
        row["gemm_vs_needed"] = row["gemm_gflop"] / row["needed_gflop"]
        row["scratch_vs_kept"] = row["bwd_scratch_mib"] / row["kept_mib"] if row["kept_mib"] else None
        if reference is not None:
            row["kernels_vs_reference"] = row["total_kernels"] / reference["total_kernels"]
            row["kept_vs_reference"] = row["kept_mib"] / reference["kept_mib"]
    print_table(
        rows,
        ["impl", "mode", "batch", "fwd_kernels", "bwd_kernels", "total_kernels", "triton_launches", "gemm_gflop",
         "gemm_vs_needed", "kept_mib", "kept_vs_reference", "bwd_scratch_mib", "scratch_vs_kept"],
    )  # fmt: skip
    config = {k: v for k, v in vars(args).items() if k != "json"}
    print(f"wrote {write_results('census', torch.device('cpu'), config, rows, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
