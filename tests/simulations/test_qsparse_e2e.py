"""Qsparse-local-SGD through the Flower apps: the synchronous and the asynchronous variant learn and report."""

import pytest

from fl_compams.qsparse import Qsparse
from simulations.runner import run_experiment
from strategies.results import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

COMMON = {"algorithm": "qsparse", "compressor": "signtopk", "local-lr": 0.05, "num-server-rounds": 6}


def run(tmp_path, name, **keys):
    path = run_experiment({"out-dir": str(tmp_path), "run-name": name, **COMMON, **keys}, num_supernodes=3)
    return read_metrics(path)


def test_sync_qsparse_learns_with_h_local_steps_per_reply(tmp_path):
    rows = run(tmp_path, "qsparse-sync", **{"local-steps": 4})
    assert [r["round"] for r in rows] == list(range(7))
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["accuracy"] > rows[0]["accuracy"]
    for r in rows[1:]:
        assert r["clients_ok"] == 3 and r["clients_failed"] == 0
        for c in r["clients"].values():
            assert c["work_steps"] == 4 and c["staleness"] == 0 and c["residual_norm"] > 0  # memory kept
    # Sign-Top-k at 1 %: k indices + k sign bits + one scale, far below the dense 4 d bytes
    assert rows[-1]["uplink_bytes_per_client"] < 0.05 * 4 * 151_306


def test_async_qsparse_sends_stale_work_with_per_client_periods(tmp_path):
    rows = run(
        tmp_path, "qsparse-async", **{"local-steps": 4, "qsparse-async": True, "qsparse-periods": "uniform"}
    )
    periods = {
        f"partition-{i}": Qsparse(lr=0.05, steps=4, asynchronous=True, periods="uniform").period(i)
        for i in range(3)
    }
    first = rows[1]
    assert all(c["work_steps"] == 0 for c in first["clients"].values())  # first contact: no work yet
    assert first["loss"] == rows[0]["loss"]  # so the model did not move
    for r in rows[2:]:
        assert r["clients_ok"] == 3
        for label, c in r["clients"].items():
            assert c["work_steps"] == periods[label] and c["staleness"] == 1  # last round's work
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["accuracy"] > rows[0]["accuracy"]
