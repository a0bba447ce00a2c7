"""The launch and memory census (bench/census.py): what decides the fused module's GPU time,
counted on CPU. Launch counts do not depend on the widths or the batch, so the fast tests
count at tiny widths; the paper's widths are the slow test (and the committed JSON)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_census():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_census", BENCH / "census.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


census = load_census()


def tiny(**widths):
    import argparse

    defaults = dict(dim=16, mlp_hidden=32, l_img=7, l_aud=3, slots=2, iters=5)
    return argparse.Namespace(**(defaults | widths))


def test_fused_launches_do_not_depend_on_the_batch_and_stay_few():
    args = tiny()
    one, two = (census.census_one("fused", batch, args) for batch in (1, 2))
    for key in ("fwd_ops", "bwd_ops", "fwd_ops_by_name", "bwd_ops_by_name"):
        assert one[key] == two[key]
    # Eight launches per iteration each way; the bound is 200.
    assert two["total_ops"] <= 150
    assert two["fwd_ops_by_name"]["triton::attention_fwd_kernel"] == args.iters
    assert two["bwd_ops_by_name"]["triton::attention_bwd_kernel"] == args.iters
    reference = census.census_one("reference", 2, args)
    assert reference["total_ops"] > 4 * two["total_ops"]
    assert two["kept_mib"] < reference["kept_mib"]


def test_project_ops_count_by_their_contents():
    # The operator itself never counts as one op: only what runs inside it does.
    ops = census.census_one("fused", 1, tiny(iters=1))
    assert not any(name.startswith("jsa_fast::") for name in {**ops["fwd_ops_by_name"], **ops["bwd_ops_by_name"]})
    assert ops["triton_launches"] > 0 and ops["fwd_ops_by_name"]["aten::bmm"] > 0


def test_cuda_gru_cell_stand_in_matches_grucell():
    # The reference as it dispatches on a GPU runs GRUCell as the fused CUDA cell; the
    # census's CPU stand-in for that cell must compute what GRUCell computes.
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


@pytest.mark.slow
def test_census_at_the_papers_widths(tmp_path):
    out = tmp_path / "census.json"
    assert census.main(["--json", str(out)]) == 0
    import json

    rows = {row["impl"]: row for row in json.loads(out.read_text())["rows"]}
    fused = rows["fused"]
    assert fused["ops_same_at_both_batches"] and fused["total_ops"] <= 200
    assert fused["kept_vs_reference"] <= 0.5
    assert fused["kept_mib_extrapolated"] <= 0.5 * rows["reference-cuda"]["kept_mib_extrapolated"]
