"""benchmarks/bench_core.py: the targets each device is held to, and one tiny run of every case."""

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_core.py"
spec = importlib.util.spec_from_file_location("bench_core", _PATH)
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_core"] = bench  # dataclasses look their module up by name
spec.loader.exec_module(bench)


def test_cuda_targets_cover_every_compressor_from_1e7_on():
    for label in bench.compressors_for(1_000_000):
        for op in ("encode", "decode", "aggregate"):
            assert bench.target_for(label, op, 10_000_000, "cuda") == 0.10
            assert bench.target_for(label, op, 1_000_000, "cuda") is None
        assert bench.target_for(label, "to_bytes", 10_000_000, "cuda") is None
    assert bench.target_for("torch.topk", "encode", 10_000_000, "cuda") is None  # a reference, not a target


def test_cpu_targets_are_the_table():
    assert bench.target_for("topk-1% int32+f32", "aggregate", 1_000_000, "cpu") == 0.20
    assert bench.target_for("identity", "encode", 1_000_000, "cpu") is None


@pytest.mark.filterwarnings("ignore")
def test_every_case_runs_and_reports_a_ratio(monkeypatch):
    monkeypatch.setattr(bench, "MIN_SAMPLE_S", 0.0)
    rows = bench.run_dim(20_000, 1, 0)
    ops = {(r["label"], r["op"]) for r in rows}
    for label in bench.compressors_for(20_000):
        assert {(label, op) for op in bench.OPS} <= ops
    assert all(r["ratio"] > 0 for r in rows)


def test_resnet_round_benchmark_runs_on_a_small_model_with_buffers(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_resnet.py"
    spec_resnet = importlib.util.spec_from_file_location("bench_resnet", path)
    module = importlib.util.module_from_spec(spec_resnet)
    spec_resnet.loader.exec_module(module)
    assert (
        module.main(["--model", "digits-bn-cnn", "--repeats", "1", "--clients", "2", "--batch-size", "8"])
        == 0
    )
    out = capsys.readouterr().out
    assert "| client fwd+bwd (one minibatch) |" in out and "Load during the run" in out
    # every compressor's row: the buffers record holds at least the 194 buffer values' bytes
    rows = [line.split("|") for line in out.splitlines() if line.startswith(("| topk", "| blocksign"))]
    assert len(rows) == 2 and all(int(r[3].replace(",", "")) >= 4 * 192 + 8 * 2 for r in rows)
