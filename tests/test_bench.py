"""Smoke tests of the benchmarks at tiny sizes on the CPU: they run, their JSON records
carry what a GPU session will compare (device, versions, configuration, rows), and the
implementations they time agree where the benchmark checks it."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_benchmark(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_record(path: Path) -> dict:
    record = json.loads(path.read_text())
    assert {"benchmark", "device", "torch", "utc", "config", "rows"} <= set(record)
    assert record["rows"]
    return record


def test_kreciprocal_benchmark(tmp_path):
    out = tmp_path / "kreciprocal.json"
    assert (
        load_benchmark("kreciprocal").main(
            ["--device", "cpu", "--batch", "16", "64", "--dim", "8", "--k", "4", "--repeats", "2", "--json", str(out)]
        )
        == 0
    )
    record = read_record(out)
    assert [(row["B"], row["input"]) for row in record["rows"]] == [
        (b, i) for b in (16, 64) for i in ("random", "collapsed-0.1", "collapsed-0.01")
    ]
    assert all(row["identical"] for row in record["rows"])  # extension == reference, bit for bit


def test_slot_attention_benchmark(tmp_path):
    out = tmp_path / "slot_attn.json"
    args = ["--device", "cpu", "--batch", "2", "--dim", "16", "--mlp-hidden", "32", "--l-img", "4", "--l-aud", "3", "--iters", "2",
            "--dtype", "fp32", "--impl", "reference eager", "fused eager", "--warmup", "1", "--repeats", "1", "--json", str(out)]  # fmt: skip
    assert load_benchmark("slot_attn").main(args) == 0
    rows = read_record(out)["rows"]
    assert {row["impl"] for row in rows} == {"reference eager", "fused eager"}
    reference = [row for row in rows if row["impl"] == "reference eager"]
    assert all(row["vs_best_reference"] == 1.0 for row in reference)  # the only reference variant is the best
    assert all(row["vs_best_reference"] > 0 and row["gflop"] > 0 for row in rows)


def test_train_step_benchmark_eager(tmp_path):
    out = tmp_path / "train_step.json"
    args = ["--device", "cpu", "--preset", "tiny", "--batch-size", "8", "--steps", "2", "--variants", "eager reference", "--json", str(out)]  # fmt: skip
    assert load_benchmark("train_step").main(args) == 0
    (row,) = read_record(out)["rows"]
    assert row["variant"] == "eager reference" and row["samples_per_s"] > 0
    assert 0 < row["jsa_ms"] < row["step_ms"] and row["jsa_share"] == pytest.approx(row["jsa_ms"] / row["step_ms"])


@pytest.mark.slow
def test_train_step_benchmark(tmp_path):
    out = tmp_path / "train_step.json"
    args = ["--device", "cpu", "--preset", "tiny", "--batch-size", "8", "--steps", "2", "--json", str(out)]
    assert load_benchmark("train_step").main(args) == 0
    assert read_record(out)["rows"]


def test_video_tools_benchmark(tmp_path):
    out = tmp_path / "video_tools.json"
    args = [
        "--clips",
        "2",
        "--seconds",
        "1",
        "--size",
        "64",
        "--workers",
        "1",
        "--localize-fps",
        "4",
        "--json",
        str(out),
    ]
    assert load_benchmark("video_tools").main(args) == 0
    rows = read_record(out)["rows"]
    assert [(row["tool"], row["items"]) for row in rows] == [("prepare", 2), ("localize", 4)]  # 1 s at 4 maps/s
    assert all(row["per_s"] > 0 for row in rows)
