"""Two-way COMP-AMS and dist-EF-SGDM end to end through Flower's simulation engine, and their exact resume."""

import numpy as np
import pytest

from simulations.runner import run_experiment
from strategies.results import load_model, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

DENSE = 4 * 151_306  # the digits CNN as float32


def test_two_way_compams_with_partial_participation_counts_resyncs(tmp_path):
    overrides = {"downlink-compressor": "blocksign", "fraction-train": 0.5, "downlink-log": 2}
    path = run_experiment(
        {"out-dir": str(tmp_path), "run-name": "two-way", "num-server-rounds": 8, **overrides},
        num_supernodes=4,
    )
    rows = read_metrics(path)
    assert [r["round"] for r in rows] == list(range(9))
    assert all(r["clients_failed"] == 0 and r["clients_ok"] == 2 for r in rows[1:])
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["accuracy"] > rows[0]["accuracy"]  # it learns
    assert rows[1]["downlink_resyncs"] == 2  # nobody holds a replica yet
    for r in rows[1:]:  # bytes follow the resyncs: a dense model each, a Block-Sign broadcast otherwise
        for c in r["clients"].values():
            assert c["downlink_bytes"] > DENSE or c["downlink_bytes"] < 3 * (DENSE / 32 + 2000)
        assert sum(c["downlink_bytes"] > DENSE for c in r["clients"].values()) == r["downlink_resyncs"]
    assert sum(r["downlink_resyncs"] for r in rows[1:]) < 16  # most rounds reuse the log


def test_ef_sgdm_learns_with_one_bit_both_ways(tmp_path):
    path = run_experiment(
        {
            "out-dir": str(tmp_path),
            "run-name": "ef-sgdm",
            "num-server-rounds": 8,
            "algorithm": "ef-sgdm",
            "server-lr": 0.03,
        },
        num_supernodes=2,
    )
    rows = read_metrics(path)
    last = rows[-1]
    assert last["clients_ok"] == 2 and last["clients_failed"] == 0
    assert last["loss"] < rows[0]["loss"] and last["accuracy"] > rows[0]["accuracy"]
    assert last["uplink_bytes_per_client"] < 151_306 / 8 + 2000  # one bit per coordinate plus scales
    assert last["downlink_bytes_per_client"] < 151_306 / 8 + 3000 and last["downlink_resyncs"] == 0


TWO_WAY = {"fraction-train": 0.6, "downlink-compressor": "topk", "downlink-log": 2}


def test_two_way_resume_continues_exactly(tmp_path):
    straight = run_experiment(
        {**TWO_WAY, "out-dir": str(tmp_path), "run-name": "straight", "num-server-rounds": 6},
        num_supernodes=4,
    )
    base = {**TWO_WAY, "out-dir": str(tmp_path), "run-name": "resumed", "checkpoint-every": 3}
    run_experiment({**base, "num-server-rounds": 3}, num_supernodes=4)
    resumed = run_experiment({**base, "num-server-rounds": 6, "resume": True}, num_supernodes=4)
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["round"] for r in b] == list(range(7))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)  # accuracy of the public model, bytes, resyncs: all equal
    assert any(r["downlink_resyncs"] for r in a[4:])  # the run needed resyncs after the resume point too
    ma, mb = load_model(straight), load_model(resumed)
    for name in ma:
        assert np.array_equal(ma[name].numpy(), mb[name].numpy())
