"""Data-parallel training (jsa_fast.distributed) on CPU processes with the gloo backend:
N processes at B / N pairs each must train exactly like one process at B pairs.

Run as a script, this file is each process of a recorded torchrun job (see the end)."""

import copy
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import MICRO, MICRO_FLAGS
from torch import Tensor, nn

from jsa_fast import train as train_module
from jsa_fast.checkpoint import load_checkpoint
from jsa_fast.config import RunConfig
from jsa_fast.distributed import GlobalBatchNorm2d, World, convert_batchnorm, gather_with_grad, wrap_ddp
from jsa_fast.model import JSAModel
from jsa_fast.train import loss_function, token_masks, train

# One BatchNorm layer on one process and on two (`_check_batchnorm_and_gather`)
TOLERANCE = dict(rtol=1e-4, atol=1e-5)

# How close one process and two can be. They compute the same sums in other orders (each
# rank's half of the batch, then the all-reduce, against one sum over the batch; other
# thread splits). In fp32 (eps = 2^-23, twice the unit roundoff u) a sum of n terms in any
# order lies within about (n - 1) u sum|terms| of the exact sum (Higham, Accuracy and
# Stability of Numerical Algorithms, 2nd ed., section 4.2), so two orders differ by at most
# (n - 1) eps sum|terms| < n eps sum|terms|. The tolerance is n eps times a scale:
# - n: the longest sum of the step (`_longest_reduction`, from the layers' sizes). On the
#   micro model, the first BatchNorm's statistics and the first convolution's weight
#   gradient over the global batch's 4 x 32 x 32 positions: n eps = 4,096 x 2^-23 = 4.9e-4.
#   Every output depends on that sum. The step chains it with shorter ones (fan-ins up to
#   288, tokens, slots), which InfoNCE's 1 / tau = 33 and the softmaxes amplify; one worst
#   case covers them as worst cases need every rounding to go the same way, while
#   round-to-nearest errors are unbiased and grow like sqrt(n) eps (Higham and Mary, SIAM
#   J. Sci. Comput. 41(5), 2019): sqrt(4,096) = 64 times room. (Measured, x86-64 with AVX2
#   and with ATEN_CPU_CAPABILITY=default: gradients within 1/20 of the tolerance, losses
#   within 1/80; a check, not where it comes from.)
# - The scale of a gradient, sum|terms| per element, is not at hand. A parameter's gradient
#   sums products of the same activations and output gradients over all its elements, so
#   its largest entry stands for it: an absolute tolerance per tensor (an entry that
#   cancels to about zero keeps the rounding of its terms). The biases whose exact gradient
#   is zero (`_SLOT_SHIFTS`) hold rounding noise only and take their weight's gradient,
#   whose terms are theirs times the layer's LayerNorm'd input, of size about 1.
# - The scale of a loss term is its value (a relative tolerance): each is a mean of
#   non-negative terms (squares, cross-entropies, relu'd cosines).
# Weights after an optimiser step are not compared: Adam moves an element whose gradient is
# rounding noise by about lr whatever the noise's size, so two runs part by ~lr there after
# one step, and their later gradients are taken at other weights. Each step's gradients are
# compared at the same weights instead (`_single_process_step`).
FP32_EPS = torch.finfo(torch.float32).eps

# Biases common to both slots' queries (to_q, and norm_slots before it) shift every slot
# alike, which the softmax over slots ignores: their exact gradient is zero.
_SLOT_SHIFTS = ("to_q.bias", "norm_slots.bias")


@contextmanager
def _longest_reduction(model: nn.Module) -> Iterator[list[int]]:
    """Within the block, [n]: the most terms that one sum of `model`'s forward and backward
    adds, by the sizes its layers run at: a convolution's or linear layer's output element
    sums its fan-in; its weight gradient, and a BatchNorm's statistics and affine
    gradients, sum one term per batch row and position (the output's elements per channel)."""
    longest = [1]

    def count(module: nn.Module, args: tuple, output: Tensor) -> None:
        if isinstance(module, nn.Linear):
            rows, fan_in = output.numel() // output.shape[-1], module.in_features
        else:  # B x C x H x W
            rows, fan_in = output.numel() // output.shape[1], module.weight[0].numel()
        longest[0] = max(longest[0], rows, fan_in)

    layers = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, layers)]
    try:
        yield longest
    finally:
        for handle in handles:
            handle.remove()


def _gradient_scale(name: str, grads: dict[str, Tensor]) -> float:
    """What stands for sum|terms| in parameter `name`'s gradient (see above)."""
    if name.endswith(_SLOT_SHIFTS):
        name = name.removesuffix("bias") + "weight"
    return float(grads[name].abs().max())


def _assert_gradients_close(actual: dict[str, Tensor], expected: dict[str, Tensor], longest: int, what: str) -> None:
    """Gradients of the same step in two reduction orders, within n eps of each tensor's scale."""
    assert actual.keys() == expected.keys()
    for name, reference in expected.items():
        atol = longest * FP32_EPS * _gradient_scale(name, expected)
        torch.testing.assert_close(
            actual[name], reference, rtol=0, atol=atol, msg=lambda m, name=name: f"{what}, {name}: {m}"
        )


def _assert_losses_close(actual: dict[str, float], expected: dict[str, Tensor], longest: int, what: str) -> None:
    """Loss terms of the same step in two reduction orders, within n eps of their value."""
    for name in train_module.LOSS_TERMS:
        assert actual[name] == pytest.approx(expected[name].item(), rel=longest * FP32_EPS, abs=0), (what, name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _check_batchnorm_and_gather(rank)
        _check_model_gradients(rank)
    finally:
        dist.destroy_process_group()


def _check_model_gradients(rank: int) -> None:
    """The full model and loss under DDP on 2 x 2 pairs: the single process's loss terms
    and gradients on the 4 pairs (DDP averages the ranks' gradients)."""
    torch.manual_seed(0)
    run_cfg = MICRO.overridden(mask_prob=0.5)  # the micro model has few tokens to mask
    cfg = run_cfg.model
    single = JSAModel(cfg)
    parallel = convert_batchnorm(copy.deepcopy(single))
    image = torch.randn(4, 3, cfg.image_size, cfg.image_size)
    spec = torch.randn(4, 1, cfg.spec_bins, cfg.spec_frames)
    inputs = (image, spec, *token_masks(cfg, 4, seed=0, step=0))
    assert inputs[2].any() and inputs[3].any()  # token masking takes part

    with _longest_reduction(single) as longest:
        expected = loss_function(single, run_cfg)(*inputs)
    expected["loss"].backward()
    world = World(rank, 2, control=dist.group.WORLD)
    ddp = wrap_ddp(parallel, world, torch.device("cpu"))  # alive until its backward hooks have run
    terms = loss_function(ddp, run_cfg, gather=gather_with_grad)(*(world.shard(t) for t in inputs))
    terms["loss"].backward()
    means = {name: float(world.mean(value)) for name, value in terms.items()}
    _assert_losses_close(means, expected, longest[0], f"rank {rank}")
    _assert_gradients_close(
        {name: p.grad for name, p in parallel.named_parameters()},
        {name: p.grad for name, p in single.named_parameters()},
        longest[0],
        f"rank {rank}",
    )


def _check_batchnorm_and_gather(rank: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 4) * 3 + 2  # the global batch, the same on both ranks
    weights = torch.randn(6, 3, 5, 4)  # a loss sum(weights * bn(x)) that is not trivial
    single = nn.BatchNorm2d(3)
    nn.init.normal_(single.weight)
    nn.init.normal_(single.bias)
    shard = World(rank, 2).shard
    local = convert_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))[0]
    local.load_state_dict(single.state_dict())
    assert isinstance(local, GlobalBatchNorm2d)

    full_x = x.clone().requires_grad_()
    (single(full_x) * weights).sum().backward()
    local_x = shard(x).clone().requires_grad_()
    y = local(local_x)
    (y * shard(weights)).sum().backward()
    torch.testing.assert_close(y.detach(), shard(_forward_only(single, x)), **TOLERANCE)
    # Each rank's backward is that of the sum of the ranks' losses, here the full one.
    torch.testing.assert_close(local_x.grad, shard(full_x.grad), **TOLERANCE)
    for name in ("weight", "bias"):
        grad = getattr(local, name).grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, getattr(single, name).grad, **TOLERANCE)
    # running statistics: one update from the global batch's mean and unbiased variance
    torch.testing.assert_close(local.running_mean, single.running_mean, **TOLERANCE)
    torch.testing.assert_close(local.running_var, single.running_var, **TOLERANCE)
    assert int(local.num_batches_tracked) == 1

    p = torch.randn(4, 2)
    local_p = shard(p).clone().requires_grad_()
    gathered = gather_with_grad(local_p)
    torch.testing.assert_close(gathered, p)
    (gathered * torch.arange(4.0).unsqueeze(1)).sum().backward()
    # both ranks' losses read this rank's rows: the gradient is summed over them
    torch.testing.assert_close(local_p.grad, 2 * shard(torch.arange(4.0).unsqueeze(1).expand(4, 2)))


def _forward_only(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)


@pytest.mark.numeric
def test_global_batchnorm_gather_and_ddp_gradients_match_one_process():
    mp.spawn(_worker, args=(_free_port(),), nprocs=2)


@pytest.mark.numeric
def test_global_batchnorm_is_batchnorm_in_one_process_and_in_eval():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(0.5)
    converted = convert_batchnorm(nn.Sequential(bn))
    assert isinstance(converted[0], GlobalBatchNorm2d) and converted[0].weight is bn.weight
    assert converted[0].running_mean is bn.running_mean
    x = torch.randn(4, 3, 2, 2)
    reference = nn.BatchNorm2d(3)
    reference.running_mean.fill_(0.5)
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted.eval()(x), reference.eval()(x))


def test_model_state_dict_keys_survive_the_conversion():
    model = JSAModel(MICRO.model)
    keys = set(model.state_dict())
    assert keys == set(convert_batchnorm(model).state_dict())
    assert any(isinstance(m, GlobalBatchNorm2d) for m in model.modules())
    with pytest.raises(ValueError, match="momentum"):
        convert_batchnorm(nn.BatchNorm2d(3, momentum=None))


def test_shard_gives_each_rank_its_contiguous_slice():
    assert World(1, 2).shard([0, 1, 2, 3, 4, 5]) == [3, 4, 5]
    assert World(0, 3).shard(torch.arange(6)).tolist() == [0, 1]
    with pytest.raises(ValueError, match="batch of 5 cannot be split evenly over 2"):
        World(0, 2).shard(list(range(5)))


def test_global_batch_size_must_split_evenly(world, tmp_path):
    with pytest.raises(ValueError, match="--batch-size 4 .*not divisible by the 3 processes"):
        train(MICRO, str(world), tmp_path, torch.device("cpu"), world=World(0, 3))


def _metric_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@contextmanager
def _recording_steps() -> Iterator[list[dict]]:
    """Within the block, the optimiser steps that `jsa_fast.train` takes in this process, in
    order: per step this process's "inputs" (image, spec, mask_img, mask_aud) and, as the
    optimiser is about to update, the "weights", their "grads" (DDP's average over the
    ranks) in the optimiser's order, that of JSAModel.parameters(), and its state dict's
    "adam" state."""
    steps: list[dict] = []
    real_step = train_module.train_step

    def recording_step(loss_fn, optimizer, scaler, inputs, device, amp):
        record = {"inputs": [t.detach().clone() for t in inputs]}

        def before_update(optimizer, args, kwargs):
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            record["weights"] = [p.detach().clone() for p in parameters]
            record["grads"] = [p.grad.clone() for p in parameters]
            record["adam"] = copy.deepcopy(optimizer.state_dict()["state"])

        handle = optimizer.register_step_pre_hook(before_update)
        try:
            terms = real_step(loss_fn, optimizer, scaler, inputs, device, amp)
        finally:
            handle.remove()
        steps.append(record)
        return terms

    train_module.train_step = recording_step
    try:
        yield steps
    finally:
        train_module.train_step = real_step


def _single_process_step(
    cfg: RunConfig, weights: list[Tensor], inputs: list[Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """One process's training step at `weights` on the global batch `inputs`, up to the
    optimiser: its loss terms, its gradients by parameter name and its longest sum."""
    model = JSAModel(cfg.model)
    with torch.no_grad():
        for parameter, weight in zip(model.parameters(), weights, strict=True):
            parameter.copy_(weight)
    with _longest_reduction(model) as longest:
        terms = loss_function(model, cfg)(*inputs)
    terms["loss"].backward()
    return terms, {name: p.grad for name, p in model.named_parameters()}, longest[0]


def _same_tensors(a, b) -> bool:
    """Whether nested dicts and lists of tensors are equal, bit for bit."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same_tensors, a, b))
    return a == b


INPUT_NAMES = ("image", "spec", "mask_img", "mask_aud")


@pytest.mark.numeric
def test_two_processes_train_like_one_and_resume_with_one(world, tmp_path):
    """torchrun, 2 gloo processes at 2 pairs each (token masks on, k-reciprocal mask on
    the gathered batch) for one epoch == one process at 4 pairs, step by step: the same
    global batches, and at the same weights the same loss terms and gradients, up to
    rounding (see the derivation above). The 2-process checkpoint then resumes in one
    process on the batches of the single-process run, from the 2-process weights and
    Adam state."""
    one_epoch = MICRO.overridden(epochs=1)
    single = tmp_path / "single"
    with _recording_steps() as single_steps:
        train(one_epoch, str(world), single, torch.device("cpu"))

    pair, records = tmp_path / "pair", tmp_path / "records"
    records.mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        __file__,  # jsa_fast.train's main, with its steps recorded (the end of this file)
        str(records),
        "--data",
        str(world),
        "--out",
        str(pair),
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--epochs",
        "1",
        *MICRO_FLAGS,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("last epoch:") == 1  # rank 0 alone reports
    after_one_epoch = load_checkpoint(pair / "last.pt")
    assert after_one_epoch["config"] == one_epoch.to_dict()
    assert (after_one_epoch["epoch"], after_one_epoch["step"]) == (1, 2)
    pair_steps = [torch.load(records / f"steps.{rank}.pt") for rank in range(2)]
    logged = [r for r in _metric_records(pair) if r["kind"] == "step"]  # the mean over the ranks
    assert len(single_steps) == len(pair_steps[0]) == len(pair_steps[1]) == len(logged) == 2

    names = [name for name, _ in JSAModel(MICRO.model).named_parameters()]
    for step, (one, ranks, losses) in enumerate(zip(single_steps, zip(*pair_steps), logged), start=1):
        for index, name in enumerate(INPUT_NAMES):  # each rank took its half of the global batch
            assert torch.equal(torch.cat([rank["inputs"][index] for rank in ranks]), one["inputs"][index]), (step, name)
        assert _same_tensors(ranks[0]["weights"], ranks[1]["weights"]), step  # replicas stay equal
        assert _same_tensors(ranks[0]["grads"], ranks[1]["grads"]), step
        if step == 1:
            assert _same_tensors(ranks[0]["weights"], one["weights"])  # the same initialisation
        # At the 2 processes' weights, one process's step on the global batch
        terms, expected, longest = _single_process_step(one_epoch, ranks[0]["weights"], one["inputs"])
        if step == 1:  # ... is what the single-process run computed, bit for bit
            assert _same_tensors([expected[name] for name in names], one["grads"])
        _assert_losses_close(losses, terms, longest, f"step {step}")
        _assert_gradients_close(dict(zip(names, ranks[0]["grads"])), expected, longest, f"step {step}")

    resumed = {}
    for out in (single, pair):
        with _recording_steps() as resumed[out]:
            train(MICRO, str(world), out, torch.device("cpu"), resume=True)
    state_single, state_pair = load_checkpoint(single / "last.pt"), load_checkpoint(pair / "last.pt")
    assert (state_single["epoch"], state_single["step"]) == (state_pair["epoch"], state_pair["step"]) == (2, 4)
    assert [(r["kind"], r["step"], r["epoch"]) for r in _metric_records(single)] == [
        (r["kind"], r["step"], r["epoch"]) for r in _metric_records(pair)
    ]
    assert len(resumed[single]) == len(resumed[pair]) == 2
    for step, (one, other) in enumerate(zip(resumed[single], resumed[pair]), start=3):
        for index, name in enumerate(INPUT_NAMES):
            assert torch.equal(other["inputs"][index], one["inputs"][index]), (step, name)
    # From where the 2 processes stopped: their weights and Adam state (2 steps taken)
    first = resumed[pair][0]
    assert _same_tensors(first["weights"], [after_one_epoch["model"][name] for name in names])
    assert _same_tensors(first["adam"], after_one_epoch["optimizer"]["state"])
    assert all(float(state["step"]) == 2 for state in first["adam"].values())


if __name__ == "__main__":
    # One process of the torchrun job above: jsa_fast.train's command line (argv[2:]),
    # its steps (`_recording_steps`) saved to argv[1]/steps.RANK.pt.
    with _recording_steps() as steps:
        status = train_module.main(sys.argv[2:])
    torch.save(steps, Path(sys.argv[1]) / f"steps.{os.environ['RANK']}.pt")
    sys.exit(status)
