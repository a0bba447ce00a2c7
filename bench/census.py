"""Launch and memory census of joint slot attention, no GPU needed.

    python bench/census.py [--batch 2 4] [--extrapolate 256] [--json PATH]

At this library's shapes JSA is bound by kernel launches, not by FLOPs or bytes, so what
decides its GPU time can be counted on a CPU. For the reference module and the fused one,
at the paper's widths (d 512, MLP 1024, Lv 49, La 16, S 2, N 5), in training mode with
explicit token masks, one forward and one backward (fixed random weights on all ten
outputs, inputs that require grad, parameter gradients None beforehand):

- ops: every dispatched aten op that launches a kernel (views, allocations and metadata
  queries excluded), plus every Triton launch; an operator of this project counts by
  what runs inside it (its aten ops and Triton launches), never as one.
- kept: the bytes of the tensors the forward creates that are still alive after it
  (what autograd and the ops keep for backward), parameters, inputs and outputs
  excluded. Measured at the --batch sizes and extrapolated linearly (it is a + b B) to
  --extrapolate.

The Triton kernels run under TRITON_INTERPRET=1 (set here before anything imports them).
On CPU the reference's GRUCell is decomposed into aten ops; on CUDA it would be one fused
op (`_thnn_fused_gru_cell`), so the reference's CUDA count is lower by what the
`gru_cell_ops` column shows, reported beside it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

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
}  # fmt: skip


def _fused_gru_cell(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None):  # noqa: ANN001, ANN202
    """aten::_thnn_fused_gru_cell (CUDA-only in PyTorch) for the CPU: h' and the workspace
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


# Each CUDA-only op runs as one op on CPU (the aten ops inside are not counted).
_CUDA_ONLY_ON_CPU = torch.library.Library("aten", "IMPL")
for _name, _impl in (
    ("_thnn_fused_gru_cell", _fused_gru_cell),
    ("_thnn_fused_gru_cell_backward", _fused_gru_cell_backward),
):
    _CUDA_ONLY_ON_CPU.impl(_name, lambda *args, _impl=_impl: _uncounted(_impl, *args), "CPU")


def _uncounted(fn, *args):  # noqa: ANN001, ANN202
    with _disable_current_modes():
        return fn(*args)


class Census(TorchDispatchMode):
    """Counts kernel-launching ops (module docstring) and records every storage created."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self._depth = 0

    @contextmanager
    def _hook(self, kernel: Any) -> Iterator[None]:
        """One Triton launch; what the interpreter does to run it (host copies) is not counted."""
        self.ops[f"triton::{kernel.fn.__name__}"] += 1
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
            if not func.is_view and name not in NO_LAUNCH:
                self.ops[name] += 1
        for t in _tensors(out):
            storage = t.untyped_storage()
            self.storages.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        return out

    def total(self) -> int:
        return sum(self.ops.values())

    def alive_bytes(self, exclude: list[torch.Tensor]) -> int:
        """Bytes of the recorded storages still alive, but those of `exclude`."""
        gc.collect()
        excluded = {t.untyped_storage()._cdata for t in exclude}
        return sum(nbytes for key, (ref, nbytes) in self.storages.items() if key not in excluded and not ref.expired())


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


IMPLEMENTATIONS = {
    "reference": "the reference module, as it dispatches on CPU",
    "reference-cuda": "the reference module as it dispatches on a GPU (its GRUCell as a fused cell)",
    "fused": "FusedJointSlotAttention's Triton path",
}


def census_one(impl: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Ops of one forward and one backward, and the bytes the forward keeps, at `batch`."""
    torch.manual_seed(0)
    sizes = dict(dim=args.dim, num_slots=args.slots, iters=args.iters, mlp_hidden=args.mlp_hidden)
    module = FusedJointSlotAttention(**sizes, backend="triton") if impl == "fused" else JointSlotAttention(**sizes)
    module.train()
    if impl == "reference-cuda":
        for branch in (module.image, module.audio):
            branch.gru.forward = partial(_cuda_gru_cell, branch.gru)
    x_img = torch.randn(batch, args.l_img, args.dim, requires_grad=True)
    x_aud = torch.randn(batch, args.l_aud, args.dim, requires_grad=True)
    inputs = [x_img, x_aud, torch.rand(batch, args.l_img) < 0.1, torch.rand(batch, args.l_aud) < 0.1]
    forward, backward = Census(), Census()
    with forward:
        out = module(*inputs)
    kept = forward.alive_bytes([*module.parameters(), *inputs, *out])
    weights = [torch.randn_like(o) for o in out]
    with backward:
        torch.autograd.backward(list(out), weights)
    return {
        "impl": impl,
        "batch": batch,
        "fwd_ops": forward.total(),
        "bwd_ops": backward.total(),
        "total_ops": forward.total() + backward.total(),
        "triton_launches": sum(n for op, n in (forward.ops + backward.ops).items() if op.startswith("triton::")),
        "kept_mib": kept / 2**20,
        "fwd_ops_by_name": dict(forward.ops.most_common()),
        "bwd_ops_by_name": dict(backward.ops.most_common()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs=2, default=[2, 4], help="two batch sizes to measure at")
    parser.add_argument("--extrapolate", type=int, default=256, help="batch size to extrapolate the bytes to")
    parser.add_argument("--impl", choices=list(IMPLEMENTATIONS), nargs="+", default=list(IMPLEMENTATIONS))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--mlp-hidden", type=int, default=1024)
    parser.add_argument("--l-img", type=int, default=49)
    parser.add_argument("--l-aud", type=int, default=16)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default=None, help="output path (default bench/results/census-cpu-<time>.json)")
    args = parser.parse_args(argv)

    rows = []
    for impl in args.impl:
        small, large = (census_one(impl, batch, args) for batch in args.batch)
        per_item = (large["kept_mib"] - small["kept_mib"]) / (args.batch[1] - args.batch[0])
        row = {k: v for k, v in large.items() if k not in ("batch", "kept_mib")}
        row["ops_same_at_both_batches"] = small["total_ops"] == large["total_ops"]
        row[f"kept_mib_b{args.batch[0]}"], row[f"kept_mib_b{args.batch[1]}"] = small["kept_mib"], large["kept_mib"]
        row["kept_mib_extrapolated"] = small["kept_mib"] + per_item * (args.extrapolate - args.batch[0])
        rows.append(row)
    reference = next((r for r in rows if r["impl"] == "reference"), None)
    for row in rows:
        if reference is not None:
            row["ops_vs_reference"] = row["total_ops"] / reference["total_ops"]
            row["kept_vs_reference"] = row["kept_mib_extrapolated"] / reference["kept_mib_extrapolated"]
    print_table(
        rows,
        [
            "impl",
            "fwd_ops",
            "bwd_ops",
            "total_ops",
            "triton_launches",
            "kept_mib_extrapolated",
            "ops_vs_reference",
            "kept_vs_reference",
        ],
    )
    config = {k: v for k, v in vars(args).items() if k != "json"}
    print(f"wrote {write_results('census', torch.device('cpu'), config, rows, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
