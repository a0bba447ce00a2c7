"""Data-parallel training (jsa_fast.distributed) on CPU processes with the gloo backend:
N processes at B / N pairs each must train exactly like one process at B pairs."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import MICRO, MICRO_FLAGS
from torch import nn

from jsa_fast.checkpoint import load_checkpoint
from jsa_fast.distributed import GlobalBatchNorm2d, World, convert_batchnorm, gather_with_grad, wrap_ddp
from jsa_fast.model import JSAModel
from jsa_fast.train import loss_function, token_masks, train

# fp32 rounding differs between one process and two (reduction order, thread counts)
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def _with_gradient(key: str, value: torch.Tensor) -> torch.Tensor | None:
    """The part of a parameter whose gradient is not zero in exact arithmetic.

    A bias common to both slots' queries (to_q, and norm_slots before it) or to both
    slots' mask logits (a decoder's last output) shifts every slot alike, which the
    softmax over slots ignores: the gradient is rounding noise, which Adam turns into
    steps of about lr, so those entries cannot agree between two runs.
    """
    if key.endswith(("to_q.bias", "norm_slots.bias")):
        return None
    return value[:-1] if key.endswith("decoder.mlp.6.bias") else value


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

    expected = loss_function(single, run_cfg)(*inputs)
    expected["loss"].backward()
    world = World(rank, 2, control=dist.group.WORLD)
    ddp = wrap_ddp(parallel, world, torch.device("cpu"))  # alive until its backward hooks have run
    terms = loss_function(ddp, run_cfg, gather=gather_with_grad)(*(world.shard(t) for t in inputs))
    terms["loss"].backward()
    for name, value in terms.items():
        torch.testing.assert_close(
            world.mean(value), expected[name], **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}"
        )
    for (name, reference), parameter in zip(single.named_parameters(), parallel.parameters()):
        # InfoNCE's 1 / tau = 33 amplifies rounding: compare against each gradient's scale
        atol = max(1e-6, 1e-4 * float(reference.grad.abs().max()))
        torch.testing.assert_close(
            parameter.grad, reference.grad, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
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


def test_global_batchnorm_gather_and_ddp_gradients_match_one_process():
    mp.spawn(_worker, args=(_free_port(),), nprocs=2)


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


def _assert_same_training(a: Path, b: Path) -> None:
    state_a, state_b = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert (state_a["epoch"], state_a["step"]) == (state_b["epoch"], state_b["step"])
    assert state_a["model"].keys() == state_b["model"].keys()
    for key in state_a["model"]:
        if (a_value := _with_gradient(key, state_a["model"][key])) is not None:
            torch.testing.assert_close(a_value, _with_gradient(key, state_b["model"][key]), **TOLERANCE, msg=key)
    records_a, records_b = _metric_records(a), _metric_records(b)
    assert [(r["kind"], r["step"], r["epoch"]) for r in records_a] == [
        (r["kind"], r["step"], r["epoch"]) for r in records_b
    ]
    for ra, rb in zip(records_a, records_b):
        for name in ("loss", "loss_ctr", "loss_match", "loss_div", "loss_recon"):
            assert ra[name] == pytest.approx(rb[name], rel=1e-4, abs=1e-6), (ra["step"], name)


def test_two_processes_train_like_one_and_resume_with_one(world, tmp_path):
    """torchrun, 2 gloo processes at 2 pairs each (token masks on, k-reciprocal mask on
    the gathered batch) for one epoch == one process at 4 pairs; the 2-process
    checkpoint then resumes in one process exactly like the single-process run."""
    one_epoch = MICRO.overridden(epochs=1)
    single = tmp_path / "single"
    train(one_epoch, str(world), single, torch.device("cpu"))

    pair = tmp_path / "pair"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "jsa_fast.train",
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
    assert load_checkpoint(pair / "last.pt")["config"] == one_epoch.to_dict()
    _assert_same_training(single, pair)

    for out in (single, pair):
        train(MICRO, str(world), out, torch.device("cpu"), resume=True)
    _assert_same_training(single, pair)
