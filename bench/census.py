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
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_results  # noqa: E402
from jsa_fast import FusedJointSlotAttention, JointSlotAttention  # noqa: E402
from kernels import registry  # noqa: E402

# Ops that allocate, alias or query without launching a kernel.
NO_LAUNCH = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::_unsafe_view", "aten::lift_fresh", "aten::resize_", "aten::set_", "aten::is_same_size",
    "aten::_local_scalar_dense", "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset",
}  # fmt: skip
PROJECT_NAMESPACES = ("jsa",)


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
        if func.namespace in PROJECT_NAMESPACES:
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


def make_module(impl: str, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = dict(dim=args.dim, num_slots=args.slots, iters=args.iters, mlp_hidden=args.mlp_hidden)
    module = FusedJointSlotAttention(**sizes, backend="triton") if impl == "fused" else JointSlotAttention(**sizes)
    return module.train()


def census_one(impl: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Ops of one forward and one backward, and the bytes the forward keeps, at `batch`."""
    module = make_module(impl, args)
    gen = torch.Generator().manual_seed(1)
    x_img = torch.randn(batch, args.l_img, args.dim, generator=gen).requires_grad_()
    x_aud = torch.randn(batch, args.l_aud, args.dim, generator=gen).requires_grad_()
    mask_img = torch.rand(batch, args.l_img, generator=gen) < 0.1
    mask_aud = torch.rand(batch, args.l_aud, generator=gen) < 0.1
    inputs = [x_img, x_aud, mask_img, mask_aud]
    with torch.no_grad():
        weights = [torch.randn(o.shape, generator=gen) for o in module(*inputs)]
    forward, backward = Census(), Census()
    with forward:
        out = module(*inputs)
    kept = forward.alive_bytes([*module.parameters(), *inputs, *out])
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
    parser.add_argument("--impl", choices=["reference", "fused"], nargs="+", default=["reference", "fused"])
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
    print_table(rows, ["impl", "fwd_ops", "bwd_ops", "total_ops", "triton_launches", "kept_mib_extrapolated", "ops_vs_reference", "kept_vs_reference"])
    config = {k: v for k, v in vars(args).items() if k != "json"}
    print(f"wrote {write_results('census', torch.device('cpu'), config, rows, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
