"""What of the GPU path can be checked without a GPU: `python -m jsa_fast.kernels.compile_check`
finds every launch of the operators' GPU bodies, compiles each for Ampere (sm_80), Hopper
(sm_90) and Blackwell (sm_100) as a launch there would, and tells spill traffic from a
stack frame; the triton_op bodies run on fake CUDA tensors. In fresh processes, as this
test session interprets the kernels (conftest.py)."""

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jsa_fast.kernels.compile_check import architectures, parse_ptxas_report, problems

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("sm_80", "sm_90", "sm_100")

# ptxas -v reports captured from Triton 3.6's ptxas (CUDA 12.8) for sm_80. A kernel that
# calls printf: a stack frame for vprintf's arguments, no spill traffic.
PRINTF_REPORT = """\
ptxas info    : 34 bytes gmem, 16 bytes cmem[4]
ptxas info    : Compiling entry function 'printing' for 'sm_80'
ptxas info    : Function properties for printing
    24 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 24 bytes cumulative stack size, 384 bytes cmem[0]
ptxas info    : Compile time = 10.057 ms
"""
# LN_slots backward in fp32 at the paper's shape, as of 025e128 (the issue's "8-byte stack
# frame"): the frame holds a spill, one STL.64 and one LDL.64 a thread in the SASS.
LN_SLOTS_BACKWARD_REPORT = """\
ptxas info    : 28 bytes gmem, 16 bytes cmem[4]
ptxas info    : Compiling entry function 'slot_norm_bwd_kernel' for 'sm_80'
ptxas info    : Function properties for slot_norm_bwd_kernel
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 8 bytes cumulative stack size, 440 bytes cmem[0]
ptxas info    : Compile time = 52.722 ms
"""
# A kernel whose noinline callee spills: the kernel's own properties say no spill stores,
# the callee's, printed after the register count, say 260 bytes.
CALLEE_SPILLS_REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'calling' for 'sm_80'
ptxas info    : Function properties for calling
    304 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 304 bytes cumulative stack size, 384 bytes cmem[0]
ptxas info    : Compile time = 1719.376 ms
ptxas info    : Function properties for probe_kernels_$__spill_helper__Pfp32_i32___$_2_$__$_cconstexpr_8192_
    0 bytes stack frame, 260 bytes spill stores, 284 bytes spill loads
"""


def compiling_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment without TRITON_INTERPRET (Triton compiles there) and
    with a cache of its own (compiles for real)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return env | {"TRITON_CACHE_DIR": str(tmp_path / "triton-cache"), "PYTHONPATH": str(ROOT)}


def run_python(tmp_path: Path, *command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = compiling_env(tmp_path)
    return subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_compile_check(tmp_path: Path, *options: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, list]:
    out = tmp_path / "compile_check.json"
    result = run_python(tmp_path, "-m", "jsa_fast.kernels.compile_check", *options, "--json", str(out), timeout=timeout)
    assert result.returncode in (0, 1) and out.exists(), result.stdout + result.stderr
    return result, json.loads(out.read_text())["rows"]


def spilling(rows: list[dict]) -> list[str]:
    return [
        f"sm_{row['arch']} {row['kernel']} ({row['site']}) {row['precision']}: {row['spill_store_bytes']} B stores"
        for row in rows
        if row["spill_store_bytes"] + row["spill_load_bytes"]
    ]


def test_a_stack_frame_without_spill_traffic_passes():
    usage = parse_ptxas_report(PRINTF_REPORT)
    assert usage == {
        "registers": 24,
        "stack_bytes": 24,
        "spill_store_bytes": 0,
        "spill_load_bytes": 0,
        "static_shared_bytes": 0,
    }
    assert problems(usage | {"shared_bytes": 0}, "fp32", 80) == []


def test_spill_traffic_fails():
    usage = parse_ptxas_report(LN_SLOTS_BACKWARD_REPORT) | {"shared_bytes": 64}
    assert usage["registers"] == 48 and usage["stack_bytes"] == 8
    assert usage["spill_store_bytes"] == usage["spill_load_bytes"] == 8
    assert problems(usage, "fp32", 80) == ["spills (8 B stores, 8 B loads)"]
    assert problems(usage, "fp64", 80) == []  # fp64 is there for gradcheck: reported only
    callee = parse_ptxas_report(CALLEE_SPILLS_REPORT)
    assert (callee["stack_bytes"], callee["spill_store_bytes"], callee["spill_load_bytes"]) == (304, 260, 284)
    assert problems(callee | {"shared_bytes": 0}, "bf16", 90) == ["spills (260 B stores, 284 B loads)"]
    too_much_shared = {**usage, "spill_store_bytes": 0, "spill_load_bytes": 0, "shared_bytes": 166913}
    assert problems(too_much_shared, "bf16", 80) == ["166913 B shared > 166912 B"]


REAL_COMPILES = """
import json
import torch
import triton
import triton.language as tl
from jsa_fast.kernels.compile_check import Launch, Pointer, problems, resources

@triton.jit
def printing(X, n, BLOCK: tl.constexpr):
    tl.device_print("x", tl.load(X + tl.arange(0, BLOCK)))

@triton.jit
def spilling(X, n, BLOCK: tl.constexpr):  # BLOCK values a thread, all live across two sums
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    y = x - tl.sum(x, axis=0) / n
    tl.store(X + offs, y * tl.sum(y * y, axis=0), mask=offs < n)

found = {}
for kernel, block in ((printing, 32), (spilling, 8192)):
    launch = Launch(kernel, "here", [Pointer(torch.float32), 3], {"BLOCK": block, "num_warps": 1})
    usage = resources(launch, 80, {})
    found[kernel.fn.__name__] = usage | {"problems": problems(usage, "fp32", 80)}
print(json.dumps(found))
"""


def test_real_compiles_tell_a_stack_frame_from_spill_traffic(tmp_path):
    # Triton's ptxas on two small kernels for sm_80: printf's stack frame passes, a block
    # of 8,192 fp32 values in one warp (256 a thread) spills and fails.
    script = tmp_path / "real_compiles.py"  # triton.jit reads its kernels' source from a file
    script.write_text(textwrap.dedent(REAL_COMPILES))
    result = run_python(tmp_path, str(script))
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    printing, spilled = found["printing"], found["spilling"]
    assert printing["stack_bytes"] > 0 and printing["spill_store_bytes"] == printing["spill_load_bytes"] == 0
    assert printing["problems"] == []
    assert spilled["registers"] == 255 and spilled["spill_store_bytes"] > 0 and spilled["spill_load_bytes"] > 0
    assert spilled["problems"] and spilled["problems"][0].startswith("spills")


TRACED_LAUNCHES = """
import importlib
import json
from dataclasses import replace
from triton.runtime.jit import JITFunction
from jsa_fast.kernels.compile_check import SHAPES, specialise, traced_launches

operator = importlib.import_module("jsa_fast.kernels.joint_slot_attention")  # the package's name is the function
kernels = sorted(name for name, value in vars(operator).items() if isinstance(value, JITFunction))
found = {}
for batch in (256, 4096):
    launches = traced_launches(replace(SHAPES["paper"][0], batch=batch), "bf16")
    found[batch] = sorted({(launch.kernel.fn.__name__, launch.site, specialise(launch, 90)[0].hash()) for launch in launches})
print(json.dumps({"kernels": kernels, "found": found}))
"""


def test_every_launch_of_the_operators_is_found(tmp_path):
    # The forward and backward bodies traced on fake tensors launch every kernel the
    # operator module imports, from its own lines; at B = 4,096 each launch specialises
    # as at B = 256 (the configurations and integer hints do not change), so it compiles
    # once for both.
    result = run_python(tmp_path, "-c", TRACED_LAUNCHES)
    assert result.returncode == 0, result.stdout + result.stderr
    traced = json.loads(result.stdout.splitlines()[-1])
    found = traced["found"]
    assert sorted({kernel for kernel, _, _ in found["256"]}) == traced["kernels"]
    assert len(traced["kernels"]) >= 8 and all(
        site.startswith("joint_slot_attention.py:") for _, site, _ in found["256"]
    )
    assert found["256"] == found["4096"]


def test_compile_check_reports_every_architecture(tmp_path):
    # The CLI end to end on the three architectures (one list or several arguments), for
    # the launches of kernels that compile in seconds; the full check is the slow test.
    options = ("--shapes", "paper", "--precisions", "bf16", "--kernels", "attention_fwd_kernel", "ln_in_fwd_kernel")
    result, rows = run_compile_check(tmp_path, "--arch", "sm_80,sm_90", "100", *options)
    assert {(row["arch"], row["kernel"], row["batch"]) for row in rows} == {
        (arch, kernel, batch)
        for arch in (80, 90, 100)
        for kernel in ("attention_fwd_kernel", "ln_in_fwd_kernel")
        for batch in (256, 4096)
    }
    assert all(row["registers"] > 0 and row["launches"] > 0 and row["site"] for row in rows)  # ptxas parsed
    assert [line.split(":")[0] for line in result.stdout.splitlines()[-3:]] == list(ARCHS)  # the summaries
    assert result.returncode == 0 and "FAIL" not in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_without_spills_at_the_papers_shape(tmp_path, arch):
    # Every launch at B = 256 and 4,096 in fp32, bf16, fp16, the autocast mix and fp64
    # (reported only): 10 to 20 minutes an architecture on 2 cores.
    result, rows = run_compile_check(tmp_path, "--arch", arch, "--shapes", "paper", timeout=3600)
    assert {row["precision"] for row in rows} == {"fp32", "bf16", "fp16", "autocast", "fp64"}
    assert spilling([row for row in rows if row["precision"] != "fp64"]) == []
    assert result.returncode == 0, result.stderr


def test_compile_check_reads_architecture_lists():
    assert architectures("sm_80,sm_90,sm_100") == [80, 90, 100]
    assert architectures("90") == [90] and architectures("sm_90a") == [90]
    with pytest.raises(argparse.ArgumentTypeError, match="not an architecture list"):
        architectures("hopper")


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


def test_gpu_op_bodies_trace_on_fake_cuda_tensors(tmp_path):
    # On a GPU the ops are triton_op's whose bodies launch through wrap_triton; no GPU here,
    # but their Python (launch configurations, buffers, dtypes) runs on fake CUDA tensors.
    result = run_python(tmp_path, "-c", GPU_OPS_ON_FAKE_CUDA_TENSORS)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
