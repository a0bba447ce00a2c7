"""The census (bench/census.py): what decides the fused module's GPU time, counted on CPU
on fake tensors with the operators on their GPU path. Its counting rules are checked on
small programs whose counts are known, then the modules at the paper's shape are held
to issue #21's bounds (fake tensors cost no memory or arithmetic, so B = 4,096 is cheap)."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

BENCH = Path(__file__).resolve().parents[1] / "bench"


sys.path.insert(0, str(BENCH))
import census  # noqa: E402  (one module, as bench/slot_attn.py imports it: its op overrides register once)


def tiny(**widths):
    defaults = dict(dim=16, mlp_hidden=32, l_img=7, l_aud=3, slots=2, iters=3)
    return argparse.Namespace(**(defaults | widths))


def test_composite_ops_count_their_kernels_and_flops():
    def program(a, b, bias):
        torch.baddbmm(bias, a, b)  # the bias copied into the result, then the GEMM
        torch.bmm(a, b).relu_()  # an in-place op launches a kernel of its own
        a.to(torch.float32)  # the same tensor back: nothing launched
        a.to(torch.bfloat16)  # a cast: one kernel
        a.mT.contiguous()  # a copy
        a.view(6, 4).reshape(24)  # views

    with FakeTensorMode():
        inputs = torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(5)
        with census.Census() as mode:
            program(*inputs)
    assert dict(mode.ops) == {
        "aten::baddbmm": 2,
        "aten::bmm": 1,
        "aten::relu_": 1,
        "aten::_to_copy": 1,
        "aten::clone": 1,
    }
    assert mode.flops == 2 * (2 * 2 * 3 * 4 * 5)


def test_peak_scratch_follows_what_is_alive():
    def program():
        a = torch.empty(256, dtype=torch.uint8)  # 256 bytes, dropped after the next op
        b = a + 1  # 256 alive beside a: peak 512
        del a
        return torch.empty(64, dtype=torch.uint8) + b[:64]  # b, the 64 bytes and the result

    with FakeTensorMode():
        mode = census.Census()
        with mode:
            c = program()
        assert mode.peak_bytes([]) == 512
        assert mode.alive_bytes([]) == 64 and mode.alive_bytes([c]) == 0


def test_fused_counts_do_not_depend_on_the_batch():
    args = tiny()
    one, two = (census.census_one("fused", batch, "fp32", args) for batch in (1, 3))
    for key in ("fwd_kernels", "bwd_kernels", "fwd_kernels_by_name", "bwd_kernels_by_name"):
        assert one[key] == two[key]
    assert two["fwd_kernels_by_name"]["triton::attention_fwd_kernel"] == args.iters
    assert two["bwd_kernels_by_name"]["triton::attention_bwd_kernel"] == args.iters
    assert two["gemm_gflop"] > 0 and two["kept_mib"] > 0 and two["bwd_scratch_mib"] > 0


def test_project_ops_count_by_their_contents_without_launching():
    # The operator never counts as one op; on fake tensors its kernels are counted, not run.
    ops = census.census_one("fused", 2, "autocast", tiny(iters=1))
    names = {**ops["fwd_kernels_by_name"], **ops["bwd_kernels_by_name"]}
    assert not any(name.startswith("jsa_fast::") for name in names)
    assert ops["triton_launches"] > 0


def test_cuda_gru_cell_stand_in_matches_grucell():
    # The reference as it dispatches on a GPU runs GRUCell as the fused CUDA cell; the
    # census's stand-in for that cell must compute what GRUCell computes.
    torch.manual_seed(0)
    cell = nn.GRUCell(6, 6).double()
    u = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    got, want = census._cuda_gru_cell(cell, u, h), cell(u, h)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    params = (u, h, *cell.parameters())
    for a, b in zip(torch.autograd.grad((got * g).sum(), params), torch.autograd.grad((want * g).sum(), params)):
        torch.testing.assert_close(a, b)


def test_needed_flops_at_the_papers_shape():
    # The figure: 95.0 GFLOP forward + backward at B = 256.
    assert census.needed_gflop(256, dim=512, num_slots=2, iters=5, mlp_hidden=1024) == pytest.approx(95.0, abs=0.05)


def test_census_at_the_papers_shape_meets_the_bounds(tmp_path):
    out = tmp_path / "census.json"
    assert census.main(["--json", str(out)]) == 0
    rows = {(r["impl"], r["mode"], r["batch"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(i, m, b) for i in ("reference", "fused") for m in ("fp32", "autocast") for b in (256, 4096)}
    for mode in ("fp32", "autocast"):
        fused, reference = rows["fused", mode, 256], rows["reference", mode, 256]
        # Launches do not depend on the batch; at most 100 forward + backward.
        assert fused["total_kernels"] == rows["fused", mode, 4096]["total_kernels"] <= 100
        assert fused["gemm_vs_needed"] <= 1.15
        assert fused["kept_mib"] <= 0.5 * reference["kept_mib"]
        large = rows["fused", mode, 4096]
        assert large["bwd_scratch_mib"] <= 0.5 * large["kept_mib"]
    # The reference as a GPU runs it launches several times as many kernels.
    assert rows["reference", "fp32", 256]["total_kernels"] > 5 * rows["fused", "fp32", 256]["total_kernels"]
