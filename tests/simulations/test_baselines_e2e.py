"""The baselines run through the same Flower apps: QAdam, Flower's FedAvg and FedAdam, SGD with momentum."""

import pytest

from simulations.runner import run_experiment
from strategies.results import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BASELINES = {
    "qadam": {
        "compressor": "blocksign",
        "client-opt": "adam",
        "local-lr": 0.003,
        "server-opt": "sgd",
        "server-lr": 1.0,
    },
    "flower-fedavg": {"algorithm": "flower-fedavg", "compressor": "identity", "local-lr": 0.3},
    "flower-fedadam": {
        "algorithm": "flower-fedadam",
        "compressor": "identity",
        "server-lr": 0.01,
        "eps": 1e-3,
    },
    "mvss": {"compressor": "mvss", "mvss-density": 0.01, "error-feedback": False},
    "sgdm-topk": {"compressor": "topk", "server-opt": "sgd", "server-momentum": 0.9, "server-lr": 0.1},
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_runs_learn_and_measure_bytes(tmp_path, name):
    path = run_experiment(
        {"out-dir": str(tmp_path), "run-name": name, "num-server-rounds": 8, **BASELINES[name]},
        num_supernodes=2,
    )
    rows = read_metrics(path)
    assert [r["round"] for r in rows] == list(range(9))
    last = rows[-1]
    assert last["clients_ok"] == 2 and last["clients_failed"] == 0
    assert last["loss"] < rows[0]["loss"] and last["accuracy"] > rows[0]["accuracy"]  # it learns
    assert last["uplink_bytes_per_client"] > 0 and last["uplink_theory_bits"] > 0
    if name.startswith("flower"):  # dense models both ways
        assert last["uplink_bytes_per_client"] > 4 * 151_306
    if (
        name == "mvss"
    ):  # unbiased random sparsification: about 1 % of the coordinates, a random count each time
        sizes = {c["payload_bytes"] for r in rows[1:] for c in r["clients"].values()}
        assert len(sizes) > 1
        assert all(abs(size - 0.01 * 151_306 * 8) < 0.2 * 0.01 * 151_306 * 8 for size in sizes)
        assert all(r["clients"][k]["residual_norm"] == 0.0 for r in rows[1:] for k in r["clients"])  # no EF
    if name == "qadam":  # 1 bit per coordinate plus scales
        assert last["uplink_bytes_per_client"] < 151_306 / 8 + 2000
