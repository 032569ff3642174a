"""Simulations on an existing Ray cluster: a Ray head started by the test, joined by address or RAY_ADDRESS."""

from __future__ import annotations

import pytest
import ray

from simulations.runner import run_experiment
from strategies.results import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SETTINGS = {"num-server-rounds": 2, "min-train-nodes": 2, "seed": 0}


def check(path) -> None:
    rows = read_metrics(path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_ok"] == 2 and r["clients_failed"] == 0 for r in rows[1:])


def test_simulation_joins_a_running_ray_head(ray_head, tmp_path, monkeypatch):
    # By address, with clients that each take half of the head's (declared) GPU: Ray places them there. (On a
    # cluster without that GPU, Flower stops with "ActorPool is empty"; that case is not run here because Flower
    # then leaves its ServerApp thread running, which keeps the test process from exiting.)
    path = run_experiment(
        {**SETTINGS, "out-dir": str(tmp_path), "run-name": "address"},
        num_supernodes=2,
        num_cpus=1,
        num_gpus=0.5,
        ray_address=ray_head,
    )
    check(path)
    assert not ray.is_initialized()  # the runner disconnected; the head it joined is still up
    # Through RAY_ADDRESS, the way `flwr run` with a simulation SuperLink would pick up a cluster.
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    check(run_experiment({**SETTINGS, "out-dir": str(tmp_path), "run-name": "env"}, num_supernodes=2))
