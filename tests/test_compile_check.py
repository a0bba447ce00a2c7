"""What of the GPU path can be checked without a GPU: the Triton kernels compile for Hopper
(sm_90) with the launch configurations the ops use there, without spilling registers
(`python -m kernels.compile_check`), and the triton_op bodies run on fake CUDA tensors.
Both in fresh processes, as this test session interprets the kernels (conftest.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compiling_env() -> dict[str, str]:
    """This process's environment without TRITON_INTERPRET: Triton compiles there."""
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = compiling_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    out = tmp_path / "compile_check.json"
    command = [sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--shapes", "all", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"slot_attention forward", "slot_attention backward", "gru_gates forward", "gru_gates backward"}
    assert {row["dtype"] for row in rows} == {"fp32", "bf16", "fp16", "fp64"}
    assert all(row["registers"] > 0 and row["shared_bytes"] >= 0 for row in rows)  # cuobjdump parsed
    # fp64 is for gradcheck; speed needs no spills in the others.
    assert all(row["spill_bytes"] == 0 for row in rows if row["dtype"] != "fp64")
    # At the paper's shapes at most 128 registers a thread: two 8-warp programs fit an SM.
    paper = [row for row in rows if row["shape"].startswith(("image", "audio")) and row["dtype"] != "fp64"]
    assert len(paper) == 12 and all(row["num_warps"] == 8 and row["registers"] <= 128 for row in paper)


def test_compile_check_refuses_to_run_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "kernels.compile_check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "TRITON_INTERPRET" in result.stderr


GPU_OPS_ON_FAKE_CUDA_TENSORS = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import kernels
assert not kernels.INTERPRET
with FakeTensorMode():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.empty(4, 49, 96, device="cuda", dtype=dtype)
        qk, c = torch.empty(4, 3, 96, device="cuda", dtype=dtype), torch.empty(4, 3, device="cuda", dtype=dtype)
        attn, ctx = torch.ops.jsa.slot_attention(x, qk, c, 1e-8)
        grads = torch.ops.jsa.slot_attention_backward(x, qk, c, attn, ctx, 1e-8)
        assert (attn.shape, ctx.shape) == ((4, 49, 3), (4, 3, 96)) and attn.dtype == ctx.dtype == dtype
        assert [g.shape for g in grads] == [x.shape, qk.shape, c.shape] and all(g.dtype == dtype for g in grads)
        gi, h = torch.empty(8, 288, device="cuda", dtype=dtype), torch.empty(8, 96, device="cuda", dtype=dtype)
        out = torch.ops.jsa.gru_gates(gi, gi, h)
        grads = torch.ops.jsa.gru_gates_backward(gi, gi, h, out)
        assert out.shape == h.shape and [g.shape for g in grads] == [gi.shape, gi.shape, h.shape]
        assert all(t.device.type == "cuda" for t in (attn, ctx, out, *grads))
print("ok")
"""


def test_gpu_op_bodies_trace_on_fake_cuda_tensors():
    # On a GPU the ops are triton_op's whose bodies launch through wrap_triton; no GPU here,
    # but their Python (launch configurations, buffers, dtypes) runs on fake CUDA tensors.
    env = compiling_env()
    result = subprocess.run([sys.executable, "-c", GPU_OPS_ON_FAKE_CUDA_TENSORS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
