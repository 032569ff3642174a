"""COMP-AMS on a real Flower deployment: SuperLink and SuperNodes as processes on 127.0.0.1, `flwr run`, TLS.

Checked: the run's status through `flwr ls --format json` (`flwr run` exits 0 even for failed runs), the results
files, the residual carried across rounds, the residual mirrored to each node's state-dir, the measured bytes
against an in-process simulation of the same settings, a node with a bad data file (its replies are errors, the
rounds go on), and a SuperNode restart in the middle of a run (the restored residual is the saved one).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from clients import persist, state_io
from fl_compams.config import parse_config
from simulations.runner import run_experiment
from strategies.results import read_metrics
from tasks.task import client_data

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROUNDS = 3
#: Small settings shared by the deployment runs and the reference simulation (default model: the digits CNN,
#: compressor: Top-k 1 % with error feedback). min-train-nodes = 2 makes round 1 wait for both SuperNodes.
SETTINGS = {"num-server-rounds": ROUNDS, "min-train-nodes": 2, "seed": 0}


def saved_state(state_dir: Path, out_dir: Path, run_name: str, run_id: int, key: str):
    """The state a node mirrored to its state-dir, filed under the run key (out-dir and run-name)."""
    run_key = state_io.run_key_for(str(out_dir), run_name, run_id)
    path = persist.state_path(state_dir, run_key, key)
    return persist.read_state(path, run_key=run_key, node_key=key, dim=None)


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


def assert_bytes_match(dep_rows: list[dict], sim_rows: list[dict]) -> None:
    """Per client and round, the measured bytes of the deployment equal the simulation's, to the byte."""
    dep, sim = visits_by_examples(dep_rows), visits_by_examples(sim_rows)
    assert sorted(dep) == sorted(sim)
    for n in sim:
        for (r1, _, s), (r2, _, d) in zip(sim[n], dep[n], strict=True):
            assert r1 == r2
            for key in ("payload_bytes", "uplink_bytes", "downlink_bytes"):
                assert d[key] == s[key], (n, r1, key, d[key], s[key])
    print(
        "bytes per client and round (deployment == simulation):",
        {k: sim[n][0][2][k] for k in ("payload_bytes", "uplink_bytes", "downlink_bytes")},
    )


def test_insecure_deployment_partitions_state_dir_and_bytes_match_simulation(
    deployment, tmp_path, simulation
):
    dep = deployment()
    state_dirs = {i: tmp_path / f"state-{i}" for i in range(2)}
    for i in range(2):
        # keep-state: the files stay after the run's end, so the test can compare them (test_tls_...: removed).
        dep.start_supernode(
            f"p{i}", f"partition-id={i} num-partitions=2 state-dir='{state_dirs[i]}' keep-state=true"
        )
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
    data = parse_config(SETTINGS).data
    for i, state_dir in state_dirs.items():
        key = f"partition-{i}"
        saved = saved_state(state_dir, tmp_path / "runs", "insecure", run_id, key)
        n = client_data(data, i, 2, SETTINGS["seed"], torch.device("cpu"))[1].numel()
        assert saved is not None and saved.rounds == ROUNDS
        assert (
            float(torch.from_numpy(saved.arrays["ef"]["residual"]).norm())
            == visits[n][-1][2]["residual_norm"]
        )
    print(run["network-traffic"])
    assert_bytes_match(rows, simulation)
    # Same partitions, same seeds, same code: the deployment trains the model the simulation trains.
    for d, s in zip(rows, simulation, strict=True):
        print(
            "round",
            d["round"],
            "loss dep - sim:",
            d["loss"] - s["loss"],
            "accuracy",
            d["accuracy"],
            s["accuracy"],
        )
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5) and d["accuracy"] == s["accuracy"]


def export_partitions(out: Path) -> dict[int, Path]:
    """Partitions 0 and 1 of the simulation's split as .npz data files, written by the documented script."""
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "export_npz.py"),
            str(out),
            "--num-partitions",
            "2",
            "--run-config",
            "seed=0",
        ],
        check=True,
        capture_output=True,
    )
    return {i: out / f"partition-{i}.npz" for i in range(2)}


def test_tls_deployment_with_node_data_files_and_a_bad_node(deployment, tmp_path, certs, simulation):
    dep = deployment(certs)
    with pytest.raises(OSError):  # the SuperLink speaks only TLS
        urllib.request.urlopen(f"http://127.0.0.1:{dep.port}/health", timeout=5)
    files = export_partitions(tmp_path / "data")
    bad = tmp_path / "data" / "wrong-shape.npz"
    np.savez(bad, x=np.zeros((5, 1, 28, 28), np.float32), y=np.zeros(5, np.int64))
    for i, path in files.items():
        dep.start_supernode(
            f"edge-{i}", f"data-file='{path}' node-name='edge-{i}' state-dir='{tmp_path / 'state'}'"
        )
    dep.start_supernode("edge-bad", f"data-file='{bad}' node-name='edge-bad'")
    started = time.monotonic()
    run = finish(dep, dep.start_run(run_config(tmp_path / "runs", "tls", **{"num-server-rounds": 2})))
    print(f"deployment run: {time.monotonic() - started:.1f} s")
    assert run["status"] == "finished:completed", dep.diagnostics()
    rows = read_metrics(tmp_path / "runs" / "tls")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients_ok"] == 2 and r["clients_failed"] == 1  # the round went on without the bad node
        (reason,) = r["failures"].values()
        assert "LocalDataError" in reason and str(bad) in reason and "expected N x 1 x 8 x 8" in reason, (
            reason
        )
    visits = visits_by_examples(rows)
    assert sorted(visits) == [587, 851]  # the sizes of the two exported partitions
    for v in visits.values():
        assert_residual_chain(v)
    # The run ended: both nodes removed their state files of the run (no keep-state), and the run's directory.
    run_id = int(run["run-id"])
    run_key = state_io.run_key_for(str(tmp_path / "runs"), "tls", run_id)
    for i in range(2):
        path = persist.state_path(tmp_path / "state", run_key, f"node-edge-{i}")
        assert not path.exists() and not persist.previous_path(path).exists()
    assert not (tmp_path / "state" / f"run-{run_key}").exists()
    assert_bytes_match(rows, simulation[:3])


def wait_for_round(run_dir: Path, server_round: int, run_proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(
            r["round"] >= server_round for r in read_metrics(run_dir)
        ):
            return
        if not run_proc.running():
            raise RuntimeError("flwr run ended before round {server_round}")
        time.sleep(0.2)
    raise TimeoutError(f"round {server_round} did not finish in {timeout} s")


def test_supernode_restart_mid_run_restores_the_saved_residual(deployment, tmp_path):
    dep = deployment()
    state_dir = tmp_path / "state"  # one state-dir for both nodes: files are keyed by partition
    config = {i: f"partition-id={i} num-partitions=2 state-dir='{state_dir}'" for i in range(2)}
    dep.start_supernode("p0", config[0])
    old_id = dep.start_supernode("p1", config[1])
    run_dir = tmp_path / "runs" / "restart"
    started = time.monotonic()
    run_proc = dep.start_run(run_config(tmp_path / "runs", "restart"))
    wait_for_round(run_dir, 1, run_proc)
    t0 = time.monotonic()
    dep.stop_supernode("p1")  # SIGTERM to its process group: the SuperNode and its ClientApp processes
    print(f"stopped p1 in {time.monotonic() - t0:.1f} s")
    run_id = int(dep.runs()[0]["run-id"])
    saved = saved_state(state_dir, tmp_path / "runs", "restart", run_id, "partition-1")
    new_id = dep.start_supernode("p1", config[1])
    assert new_id != old_id  # Flower gives a restarted SuperNode a new node id
    run = finish(dep, run_proc)
    print(f"deployment run with restart: {time.monotonic() - started:.1f} s")
    assert run["status"] == "finished:completed", dep.diagnostics()
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for r in rows[1:]:
        print(r["round"], r["clients_ok"], r["clients_failed"], r.get("failures"))
    visits = visits_by_examples(rows)
    assert_residual_chain(visits[851])  # partition 0 was never interrupted: rounds 1, 2, 3
    p1 = visits[587]
    before, after = [v for v in p1 if v[0] <= 1], [v for v in p1 if v[0] > 1]
    assert [c["state_rounds"] for _, _, c in before] == [1]
    assert saved is not None and saved.rounds == 1  # what the node wrote in round 1, before it was stopped
    saved_norm = float(torch.from_numpy(saved.arrays["ef"]["residual"]).norm())
    assert saved_norm == before[-1][2]["residual_norm"]
    assert after, "the restarted SuperNode never trained"
    first = after[0][2]
    assert first["state_rounds"] == 2  # the counter continued from the file
    assert first["residual_norm_in"] == saved_norm  # and so did the residual
    assert_residual_chain(p1)
