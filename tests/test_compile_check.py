"""What of the GPU path can be checked without a GPU: the Triton kernels compile for Hopper
(sm_90), Ampere and Blackwell with the launch configurations the operator uses there, without spilling
registers (`python -m jsa_fast.kernels.compile_check`), and the triton_op bodies run on fake CUDA
tensors. Both in fresh processes, as this test session interprets the kernels (conftest.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compiling_env() -> dict[str, str]:
    """This process's environment without TRITON_INTERPRET: Triton compiles there."""
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def run_compile_check(tmp_path, *options: str) -> list[dict]:
    env = compiling_env()
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    out = tmp_path / "compile_check.json"
    command = [sys.executable, "-m", "jsa_fast.kernels.compile_check", *options, "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())["rows"]


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    # The paper's shapes in fp32, bf16 and the autocast mix (fp32 tensors, bf16 products).
    rows = run_compile_check(tmp_path, "--arch", "90", "--shapes", "paper", "--precisions", "fp32", "bf16", "autocast")
    kernels = {row["kernel"] for row in rows}
    assert len(kernels) == 11 and {"ln_in forward", "attention backward, last", "gru + LN_ff backward"} <= kernels
    assert {row["precision"] for row in rows} == {"fp32", "bf16", "autocast"}
    assert all(row["registers"] > 0 and row["shared_bytes"] >= 0 for row in rows)  # cuobjdump parsed
    assert all(row["spill_bytes"] == 0 for row in rows)
    # At most 128 registers a thread: two 8-warp programs fit an SM.
    assert len(rows) == 33 and all(row["num_warps"] == 8 and row["registers"] <= 128 for row in rows)


def test_kernels_compile_for_ampere_and_blackwell(tmp_path):
    # The extension's other architectures (setup.py): sm_80 and sm_100, bf16 at the paper's shapes.
    rows = run_compile_check(tmp_path, "--arch", "80", "100", "--shapes", "paper", "--precisions", "bf16")
    assert {row["arch"] for row in rows} == {80, 100} and len(rows) == 22
    assert all(row["spill_bytes"] == 0 and row["registers"] > 0 for row in rows)


@pytest.mark.slow
def test_kernels_compile_without_spills_at_every_shape(tmp_path):
    # Odd widths, one and three slots, 256 and 512 image tokens, fp16 and fp64 too (the
    # exit status covers spills but in fp64).
    rows = run_compile_check(tmp_path, "--arch", "90", "--shapes", "all")
    assert len({row["shape"] for row in rows}) == 5 and len({row["precision"] for row in rows}) == 5


def test_compile_check_refuses_to_run_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "jsa_fast.kernels.compile_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "TRITON_INTERPRET" in result.stderr


GPU_OPS_ON_FAKE_CUDA_TENSORS = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import jsa_fast.kernels as kernels
from jsa_fast import JointSlotAttention
from jsa_fast.kernels.joint_slot_attention import PARAMETERS
assert not kernels.INTERPRET
reference = JointSlotAttention(dim=96, num_slots=3, iters=2, mlp_hidden=64)
stacked = [torch.stack([reference.image.get_parameter(n), reference.audio.get_parameter(n)]).detach() for n in PARAMETERS]
with FakeTensorMode(allow_non_fake_inputs=True):
    # Inputs, parameters and outputs in one dtype, or the autocast mix: fp32 tensors, bf16 products.
    for dtype, compute in ((torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.float32,) * 2, (torch.float32, torch.bfloat16)):
        x_img, x_aud = torch.empty(4, 49, 96, device="cuda", dtype=dtype), torch.empty(4, 16, 96, device="cuda", dtype=dtype)
        masks = torch.zeros(4, 49, device="cuda", dtype=torch.bool), torch.zeros(4, 16, device="cuda", dtype=torch.bool)
        params = [p.to("cuda", dtype) for p in stacked]
        slots_init = torch.empty(3, 96, device="cuda", dtype=dtype)
        out = torch.ops.jsa_fast.joint_slot_attention(x_img, x_aud, *masks, slots_init, params, 2, 1e-8, [1e-5] * 3, compute, dtype)
        assert [tuple(o.shape) for o in out[:10]] == [(4, 3, 96)] * 4 + [(4, 49, 3), (4, 16, 3), (4, 49), (4, 49), (4, 16), (4, 16)]
        assert all(o.dtype == dtype and o.device.type == "cuda" for o in out[:10])
        tokens, hidden = out[10:12]
        assert tokens.shape == (4 * 65, 96) and tokens.dtype == hidden.dtype == compute  # kept in the products' dtype
        grads = torch.ops.jsa_fast.joint_slot_attention_backward(list(out[:10]), x_img, x_aud, *masks, slots_init, params, out[10:], 2, 1e-8, [1e-5] * 3)
        assert grads[0].shape == x_img.shape and grads[2].shape == slots_init.shape and all(g.device.type == "cuda" for g in grads)
print("ok")
"""


def test_gpu_op_bodies_trace_on_fake_cuda_tensors():
    # On a GPU the ops are triton_op's whose bodies launch through wrap_triton; no GPU here,
    # but their Python (launch configurations, buffers, dtypes) runs on fake CUDA tensors.
    env = compiling_env()
    result = subprocess.run(
        [sys.executable, "-c", GPU_OPS_ON_FAKE_CUDA_TENSORS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
