"""benchmarks/bench_core.py: the targets each device is held to, and one tiny run of every case."""

import importlib.util
import re
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


# ---------------------------------------------------------------------------------------- bench_round.py
_ROUND_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_round.py"
_round_spec = importlib.util.spec_from_file_location("bench_round", _ROUND_PATH)
bench_round = importlib.util.module_from_spec(_round_spec)
sys.modules["bench_round"] = bench_round  # the Ray workers import it by this name
_round_spec.loader.exec_module(bench_round)


def _call(pid, start, total, setup=0.0, compute=0.0, compress=0.0, state=0.0):
    return {
        "pid": pid,
        "start": start,
        "end": start + total,
        "total": total,
        "setup": setup,
        "compute": compute,
        "compress": compress,
        "state": state,
    }


def test_round_breakdown_adds_up_along_the_busiest_worker_without_first_and_last_round():
    rounds = [{"start": 0.0, "end": 5.0, "clients": []}]  # the first round (start-up) is left out
    for i in range(1, 4):
        t = 10.0 * i
        rounds.append(
            {
                "start": t,
                "end": t + 0.3,
                "clients": [
                    _call(1, t + 0.05, 0.10, setup=0.01, compute=0.05, compress=0.02),
                    _call(1, t + 0.18, 0.10, setup=0.01, compute=0.05, compress=0.02),
                    _call(2, t + 0.06, 0.12, setup=0.02, compute=0.08, compress=0.01, state=0.005),
                ],
                "server": {"configure": 0.5, "aggregate": 1.0, "evaluate": 2.0},
            }
        )
    rows = bench_round.breakdown(rounds)
    assert len(rows) == 2  # rounds 1 and 2 of 0..3: the last one has no next round to end it
    for row in rows:
        assert row["wall"] == pytest.approx(10.0)
        assert row["server"] + row["exchange"] == pytest.approx(row["wall"])
        server_parts = sum(row[p] for p in (*bench_round.SERVER_PARTS, "server_other"))
        assert server_parts == pytest.approx(row["server"]) and row["server_other"] == pytest.approx(6.2)
        assert row["client_critical"] == pytest.approx(0.20)  # worker 1 (two calls) is the busiest
        parts = sum(row[p] for p in (*bench_round.CLIENT_PARTS, "other"))
        assert parts == pytest.approx(row["client_critical"])
        assert row["transport"] == pytest.approx(0.3 - 0.20)
        assert row["dispatch"] + row["gaps"] + row["collect"] == pytest.approx(row["transport"])
        assert row["dispatch"] == pytest.approx(0.05) and row["gaps"] == pytest.approx(0.03)
        assert row["setup_share"] == pytest.approx(0.04 / 0.32)
        assert row["workers"] == 2 and row["calls"] == 3 and row["busiest_calls"] == 2


def test_timing_grid_hands_on_replies_without_the_timing_record():
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    sent = [Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)]

    class Grid:
        def send_and_receive(self, messages, timeout=None):
            content = RecordDict(
                {
                    "payload": ConfigRecord({"x": 1}),
                    bench_round.TIMING_RECORD: ConfigRecord(_call(7, 0.0, 0.1)),
                }
            )
            return [Message(content, dst_node_id=1, message_type=MessageType.TRAIN)]

        def get_node_ids(self):
            return [5]

    grid = bench_round.TimingGrid(Grid())
    (reply,) = grid.send_and_receive(sent)
    assert list(reply.content.keys()) == ["payload"]
    assert grid.rounds[0]["clients"][0]["pid"] == 7 and grid.rounds[0]["sent"] == 1
    assert grid.get_node_ids() == [5]


@pytest.mark.slow
def test_bench_round_runs_and_ends_with_the_ratio(capsys):
    assert bench_round.main(["--rounds", "3", "--repeats", "1", "--clients", "2", "--plain-rounds", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"compams/fedavg seconds-per-round ratio: \d+\.\d\d", out[-1])
    assert any(line.startswith("| compams |") for line in out)
    assert any(line.startswith("| flower-fedavg |") for line in out)
