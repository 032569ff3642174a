"""End-to-end runs through Flower's simulation engine (Ray), with the same apps as `flwr run .`."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_compams import AMSGrad, ConfigError, ParamSpec, flatten, parse_config, unflatten
from simulations.runner import run_experiment
from strategies.results import load_model, read_metrics
from tasks.task import load_data, make_model

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def run(tmp_path, name, n, **overrides):
    path = run_experiment({"out-dir": str(tmp_path), "run-name": name, **overrides}, num_supernodes=n)
    return path, [r for r in read_metrics(path) if r["round"] > 0]


def test_bad_config_fails_before_ray_starts():
    with pytest.raises(ConfigError, match=r"unknown config key.*'server_lr'"):
        run_experiment({"server_lr": 0.1})


@pytest.mark.slow
def test_residuals_persist_and_unsampled_clients_keep_theirs(tmp_path):
    path, rows = run(tmp_path, "persist", 3, **{"num-server-rounds": 6, "fraction-train": 0.67})
    history = {}
    for r in rows:
        assert r["clients_ok"] == 2 and r["clients_failed"] == 0
        for node, c in r["clients"].items():
            history.setdefault(node, []).append((r["round"], c))
    assert len(history) == 3
    gaps = 0
    for visits in history.values():
        assert [c["state_rounds"] for _, c in visits] == list(range(1, len(visits) + 1))
        assert visits[0][1]["residual_norm_in"] == 0.0  # e_1 = 0
        for (r0, prev), (r1, cur) in itertools.pairwise(visits):
            # the residual a client restores is exactly the one it stored, however many rounds it sat out
            assert cur["residual_norm_in"] == pytest.approx(prev["residual_norm"], rel=1e-6)
            assert cur["residual_norm_in"] > 0
            gaps += r1 - r0 > 1
    assert gaps >= 1  # at least one client skipped a round in between (fixed seed)
    config = json.loads((path / "config.json").read_text())
    assert config["config"]["fraction-train"] == 0.67 and config["num_nodes"] == 3
    parts = json.loads((path / "partitions.json").read_text())
    assert parts["num_partitions"] == 3 and sum(parts["sizes"]) == 1438


@pytest.mark.slow
def test_identity_full_batch_equals_centralized_amsgrad(tmp_path):
    overrides = {
        "compressor": "identity",
        "model": "logreg",
        "partitioner": "iid",
        "weighting": "num-examples",
        "batch-size": 100_000,  # every client's minibatch is its whole partition
        "num-server-rounds": 4,
        "server-lr": 0.05,
    }
    path, rows = run(tmp_path, "identity", 3, **overrides)
    assert len(rows) == 4
    cfg = parse_config(overrides)
    bundle = load_data(cfg.data, cfg.seed)
    model = make_model(cfg.data, bundle, cfg.seed)
    spec = ParamSpec.from_module(model)
    opt = AMSGrad(lr=0.05)
    theta = flatten(model.state_dict(), spec)
    state = opt.init(theta)
    for _ in range(4):
        model.load_state_dict(unflatten(theta, spec))
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(bundle.train_x), bundle.train_y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        delta, state = opt.update(g, state)
        theta = theta + delta
    federated = flatten(load_model(path), spec)
    assert torch.allclose(federated, theta, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def byte_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bytes")
    return {
        name: run(out, name, 2, compressor=name, **{"num-server-rounds": 1})[1][0]
        for name in ("identity", "topk", "blocksign")
    }


@pytest.mark.slow
def test_measured_uplink_is_payload_plus_fixed_overhead_and_compresses(byte_runs):
    overheads = set()
    for name, row in byte_runs.items():
        for c in row["clients"].values():
            overhead = c["uplink_bytes"] - c["payload_bytes"]
            assert 0 < overhead < 2000, (name, overhead)
            overheads.add(overhead)
    assert max(overheads) - min(overheads) < 400  # the same envelope whatever the payload
    dense = byte_runs["identity"]["uplink_bytes_per_client"]
    assert dense > 4 * 100_000  # the digits CNN has >= 100k parameters
    assert dense / byte_runs["topk"]["uplink_bytes_per_client"] >= 40
    assert dense / byte_runs["blocksign"]["uplink_bytes_per_client"] >= 25
    for row in byte_runs.values():
        assert row["uplink_theory_bits"] > 0 and row["downlink_bytes"] > 4 * 100_000 * 2


@pytest.mark.slow
@pytest.mark.parametrize("partitioner,alpha", [("full", 0.5), ("dirichlet", 0.1)])
def test_sigma_g2_probe(tmp_path, partitioner, alpha):
    _, rows = run(
        tmp_path,
        partitioner,
        4,
        partitioner=partitioner,
        **{"dirichlet-alpha": alpha, "probe-every": 1, "num-server-rounds": 2},
    )
    probed = [r for r in rows if "sigma_g2" in r]
    assert len(probed) == 2
    for r in probed:
        assert r["probe_clients"] == 4 and r["probe_bytes"] > 0 and r["sigma2"] > 0
        assert r["uplink_bytes_cum"] < r["probe_bytes_cum"]  # probe traffic is counted apart (and is dense)
        if partitioner == "full":
            assert r["sigma_g2"] <= 1e-10 * r["grad_norm2"]
        else:
            assert r["sigma_g2"] > 0.1 * r["grad_norm2"]


@pytest.mark.slow
def test_flwr_run_command_completes_and_writes_results(tmp_path):
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "OUT_DIR": str(tmp_path / "runs"),
        "RUN_NAME": "cli",
        "NUM_SUPERNODES": "3",
        "VENV_BIN": str(Path(sys.executable).parent),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "run_local.sh"), "--run-config", "num-server-rounds=2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "runs" / "cli")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["clients_ok"] == 3
    summary = json.loads(proc.stdout[proc.stdout.rindex("{\n") :])
    assert summary["rounds"] == 2
    assert np.load(tmp_path / "runs" / "cli" / "model.npz", allow_pickle=False).files
