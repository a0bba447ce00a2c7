"""Multi-process training on PyTorch's engine: DDP under `torchrun`, one process per device.

`python -m torch.distributed.run --nproc-per-node N -m jsa_fast.train ...` starts N
processes; each reads its rank from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK), joins the job (nccl on CUDA, gloo on CPU) and trains on its slice of every
global batch. N processes at B / N pairs each then optimise exactly the objective of one
process at B pairs:

- InfoNCE takes its negatives from the global batch: target slots are all-gathered
  *with* gradient (`gather_with_grad`) and the k-reciprocal mask is computed on the
  gathered B x d slots, as one process would.
- BatchNorm normalises with the global batch's statistics (`GlobalBatchNorm2d`;
  `nn.SyncBatchNorm` refuses CPU tensors and its CUDA-only statistics kernels have no CPU
  implementation in torch 2.11, so it could not run under gloo).
- Gradient scale: every collective used with autograd here (all-gather, all-reduce) has a
  summing backward, so each rank's backward computes the gradient of the sum over ranks of
  the per-rank losses, N L; DDP's gradient averaging divides by N. The per-rank loss is
  the global InfoNCE (identical on every rank) plus local means of the other terms over
  equal shards, so the averaged objective is the single-process loss.

The collectives are `torch.distributed._functional_collectives`, whose autograd and
tracing support lets `torch.compile(fullgraph=True)` capture them (the autograd.Function
collectives of `torch.distributed.nn` break the graph).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "World",
    "process_group",
    "gather_with_grad",
    "GlobalBatchNorm2d",
    "convert_batchnorm",
    "wrap_ddp",
]

Sliceable = TypeVar("Sliceable", Sequence[Any], Tensor)


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank in [0, size), local_rank on its node.

    The default is a single process. `control` is a CPU (gloo) process group for the
    small host-side agreements of the training loop (it is the default group under gloo).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    control: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and progress."""
        return self.rank == 0

    def local_device(self, device: torch.device) -> torch.device:
        """This process's device of `device`'s type: cuda:LOCAL_RANK or the CPU."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def shard(self, items: Sliceable, name: str = "batch") -> Sliceable:
        """This rank's contiguous slice of a global batch (a list of indices or a tensor
        whose first dimension is the batch); ranks hold the batch in rank order."""
        total = len(items)
        if total % self.size:
            raise ValueError(f"{name} of {total} cannot be split evenly over {self.size} processes")
        per_rank = total // self.size
        return items[self.rank * per_rank : (self.rank + 1) * per_rank]

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (a host-side collective; free for one process)."""
        if self.size == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def mean(self, values: Tensor) -> Tensor:
        """The mean over ranks of a detached tensor (for logging; no gradient)."""
        if self.size == 1:
            return values
        values = values.detach().clone()
        dist.all_reduce(values)
        return values / self.size

    def sum(self, values: Tensor) -> Tensor:
        """The sum over ranks of a detached tensor."""
        if self.size == 1:
            return values
        values = values.detach().clone()
        dist.all_reduce(values)
        return values

    def min(self, value: Tensor) -> Tensor:
        """The minimum over ranks of a detached one-element tensor."""
        if self.size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.control)


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join the torchrun job this process belongs to, for the duration of the block.

    Reads RANK, WORLD_SIZE and LOCAL_RANK (set by torchrun); without them, or with
    WORLD_SIZE=1, yields the single-process World and starts nothing. Backend: nccl for
    CUDA (each process on cuda:LOCAL_RANK), gloo for the CPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield World()
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        control = dist.new_group(backend="gloo")  # host-side flags must not sync the GPU
    else:
        dist.init_process_group("gloo")
        control = dist.group.WORLD
    try:
        yield World(dist.get_rank(), dist.get_world_size(), local_rank, control)
    finally:
        dist.destroy_process_group()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' x concatenated in rank order: (B / N) x ... -> B x ....

    Differentiable: the backward sums each rank's gradient for this rank's slice over
    ranks (a reduce-scatter), see the module docstring for the scale. The identity in a
    single process.
    """
    if _world_size() == 1:
        return x
    return funcol.all_gather_tensor_autograd(x.contiguous(), 0, dist.group.WORLD)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises with the statistics of the global batch.

    In training, with more than one process: mu = sum x / n and
    sigma^2 = sum (x - mu)^2 / n per channel, the sums running over the B x H x W
    positions of every rank (n of them), so that each rank's output equals one process's
    on the whole batch; the running statistics are updated with mu and the unbiased
    n / (n - 1) sigma^2 as nn.BatchNorm2d does. The per-channel sums are taken around the
    running mean (a constant), which keeps the one-pass variance accurate, and are
    all-reduced with gradient. Otherwise (eval, one process) it is nn.BatchNorm2d.
    Input B x C x H x W (any memory format); parameters and state-dict keys are
    nn.BatchNorm2d's.
    """

    def forward(self, x: Tensor) -> Tensor:
        size = _world_size()
        if not self.training or size == 1:
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"GlobalBatchNorm2d expects B x C x H x W input, got shape {tuple(x.shape)}")
        shift = self.running_mean.detach().view(1, -1, 1, 1)
        centred = x.float() - shift
        local = torch.cat(
            [
                centred.sum((0, 2, 3)),
                centred.square().sum((0, 2, 3)),
                x.new_full((1,), x.numel() // x.shape[1], dtype=torch.float32),
            ]
        )
        total = funcol.all_reduce(local, "sum", dist.group.WORLD)
        channels = x.shape[1]
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels : 2 * channels] / count - mean.square()).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(shift.view(-1) + mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
        scale = torch.rsqrt(var + self.eps) * self.weight
        y = (centred - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d in `module` by a GlobalBatchNorm2d holding the same
    parameter and buffer objects (an optimiser built before stays valid); returns it."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        if not (module.affine and module.track_running_stats and module.momentum is not None):
            raise ValueError(
                f"convert_batchnorm supports affine BatchNorm2d with running stats and a momentum, got {module}"
            )
        converted = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, device="meta")
        converted.weight, converted.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(converted, name, getattr(module, name))
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child))
    return module


def wrap_ddp(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """`model` under DistributedDataParallel when the job has more than one process.

    Buffers are not re-broadcast each step: GlobalBatchNorm2d keeps the running
    statistics identical on every rank.
    """
    if world.size == 1:
        return model
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
    )
