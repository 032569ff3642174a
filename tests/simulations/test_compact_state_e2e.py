"""Compact client state (state-dtype, state-store) end to end through Flower's simulation engine."""

import pytest

from clients import state_io
from simulations.runner import run_experiment
from strategies.results import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

DIM = 151_306  # the digits CNN


def test_float16_state_on_disk_with_two_way_compression(tmp_path):
    overrides = {
        "out-dir": str(tmp_path),
        "run-name": "compact",
        "num-server-rounds": 4,
        "state-dtype": "float16",
        "state-store": "disk",
        "downlink-compressor": "blocksign",
    }
    rows = read_metrics(run_experiment(overrides, num_supernodes=2))
    assert all(r["clients_ok"] == 2 and r["clients_failed"] == 0 for r in rows[1:])
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    assert rows[1]["downlink_resyncs"] == 2 and all(
        r["downlink_resyncs"] == 0 for r in rows[2:]
    )  # replicas match
    stored = 2 * DIM + 8  # float16 values and the scale exponent
    assert rows[-1]["state_bytes"]["residual"] == {"mean": stored, "max": stored}
    assert rows[-1]["state_bytes"]["replica"] == {"mean": stored, "max": stored}
    run_dir = state_io.temporary_root() / f"run-{state_io.run_key_for(str(tmp_path), 'compact', 0)}"
    assert not run_dir.exists()  # the run's end removed the run-scoped files and their directory
