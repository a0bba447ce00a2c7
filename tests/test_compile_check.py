"""The Triton kernels compile for Hopper (sm_90) with the launch configurations the ops
use on a GPU, without spilling registers: `python -m kernels.compile_check`, run in a
fresh process because this test session interprets the kernels (conftest.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    out = tmp_path / "compile_check.json"
    command = [sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--shapes", "all", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"slot_attention forward", "slot_attention backward", "gru_gates forward", "gru_gates backward"}
    assert {row["dtype"] for row in rows} == {"fp32", "bf16", "fp16", "fp64"}
    assert all(0 < row["registers"] <= 255 for row in rows)
    # fp64 is for gradcheck; speed needs no spills in the others.
    assert all(row["spill_bytes"] == 0 for row in rows if row["dtype"] != "fp64")
    paper_backward = [
        row for row in rows
        if row["kernel"] == "slot_attention backward" and row["shape"].startswith("image") and row["dtype"] != "fp64"
    ]
    assert all(row["num_warps"] == 8 and row["registers"] <= 128 for row in paper_backward)


def test_compile_check_refuses_to_run_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "kernels.compile_check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "TRITON_INTERPRET" in result.stderr
