"""The COMP-AMS ServerApp: validate the config, run the CompAMS strategy, evaluate centrally, write results.

Results go to ``<out-dir>/<run-name>/`` (default ``runs/<timestamp>`` under the working directory of the
process, which for ``flwr run .`` is where the local SuperLink was started; the README command passes an
absolute ``out-dir``): ``config.json``, ``metrics.jsonl`` (one line per round, round 0 = the initial model),
``partitions.json`` and ``model.npz``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from clients.training import evaluate
from fl_compams import protocol
from fl_compams.config import build_compressor, build_server_optimizer, parse_config
from fl_compams.flat import ParamSpec, flatten, unflatten
from fl_compams.server import init_server_state
from simulations.partition import partition_stats
from simulations.results import ResultsDir, resolve_run_dir
from simulations.task import load_data, make_model, partitions, resolve_device
from strategies.comp_ams import CompAMS
from strategies.wire import wire_bytes

log = logging.getLogger(__name__)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the run config comes from pyproject plus ``--run-config``."""
    run_server(grid, dict(context.run_config))


def run_server(grid: Grid, run_config: Mapping[str, Any], *, timeout: float = 3600.0) -> Path:
    """Run one COMP-AMS experiment on ``grid``; return the results directory."""
    cfg = parse_config(run_config)  # a bad key or value stops here, before any round
    random.seed(cfg.seed)  # Flower samples nodes with the `random` module
    device = resolve_device(cfg.train.device)
    bundle = load_data(cfg.data.dataset, cfg.data.data_dir, cfg.data.download)
    model = make_model(cfg.data, bundle, cfg.seed).to(device)
    spec = ParamSpec.from_module(model)
    optimizer = build_server_optimizer(cfg.server)
    compressor = build_compressor(cfg.compression, spec.block_sizes)
    state = init_server_state(flatten(model.state_dict(), spec), optimizer)
    strategy = CompAMS(cfg, spec, compressor, optimizer, state)

    node_ids = sorted(grid.get_node_ids())
    results = ResultsDir(resolve_run_dir(cfg.output.out_dir, cfg.output.run_name))
    results.write_json(
        "config.json",
        {
            "config": cfg.to_flat(),
            "num_nodes": len(node_ids),
            "model": type(model).__name__,
            "dim": spec.dim,
            "param_spec": spec.to_dict(),
            "device": str(device),
            "versions": {"flwr": flwr.__version__, "torch": torch.__version__},
        },
    )
    parts = partitions(cfg.data, len(node_ids), cfg.seed) if node_ids else ()
    results.write_json(
        "partitions.json", partition_stats(bundle.train_y.numpy(), list(parts), bundle.num_classes)
    )
    test_x, test_y = bundle.test_x.to(device), bundle.test_y.to(device)
    totals = {"up": 0, "down": 0, "probe": 0}
    started = time.perf_counter()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, test_x, test_y)
        row: dict[str, Any] = {"round": server_round, "accuracy": acc, "loss": loss}
        row.update(_traffic_row(strategy, server_round, totals))
        if cfg.output.probe_every and server_round and server_round % cfg.output.probe_every == 0:
            row.update(probe_heterogeneity(grid, arrays, strategy.client_config(), timeout))
            totals["probe"] += row["probe_bytes"]
        row["probe_bytes_cum"] = totals["probe"]
        row["wall_s"] = round(time.perf_counter() - started, 3)
        results.append_metrics(row)
        log.info("round %d: accuracy %.4f loss %.4f", server_round, acc, loss)
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy.start(
        grid,
        initial_arrays=strategy.current_arrays(),
        num_rounds=cfg.server.num_server_rounds,
        timeout=timeout,
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    results.save_model(unflatten(strategy.state.theta.cpu(), spec))
    return results.path


def _traffic_row(strategy: CompAMS, server_round: int, totals: dict[str, int]) -> dict[str, Any]:
    traffic = strategy.traffic.get(server_round)
    if traffic is None:  # round 0: the initial model, nothing sent yet
        return {
            "train_loss": None,
            "uplink_bytes": 0,
            "downlink_bytes": 0,
            "uplink_bytes_cum": 0,
            "downlink_bytes_cum": 0,
            "uplink_theory_bits": 0.0,
            "clients_ok": 0,
            "clients_failed": 0,
        }
    up, down = sum(traffic.uplink_bytes.values()), sum(traffic.downlink_bytes.values())
    totals["up"] += up
    totals["down"] += down
    ok = max(1, len(traffic.ok))
    return {
        "train_loss": traffic.train_loss,
        "uplink_bytes": up,
        "downlink_bytes": down,
        "uplink_bytes_cum": totals["up"],
        "downlink_bytes_cum": totals["down"],
        "uplink_theory_bits": traffic.uplink_theory_bits,
        "uplink_bytes_per_client": sum(traffic.uplink_bytes[n] for n in traffic.ok) / ok,
        "uplink_theory_bytes_per_client": traffic.uplink_theory_bits / 8 / ok,
        "clients_ok": len(traffic.ok),
        "clients_failed": len(traffic.failures),
        "failures": {str(k): v for k, v in traffic.failures.items()},
        "residual_norm": traffic.residual_norm,
        "clients": {str(k): v for k, v in sorted(traffic.per_client.items())},
    }


def probe_heterogeneity(
    grid: Grid, arrays: ArrayRecord, client_config: ConfigRecord, timeout: float
) -> dict[str, Any]:
    """Ask every node for its full local gradient at the current model; report sigma_g^2 and sigma^2.

    ``sigma_g2 = (1/n) sum_i ||grad f_i - grad f||^2`` with ``grad f = (1/n) sum_i grad f_i`` (the
    heterogeneity term of Li et al.'s Theorem 1) and ``sigma2`` = the mean local minibatch variance. Probe
    traffic is reported separately from training traffic.
    """
    content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: client_config})
    messages = [
        Message(content=content, message_type=protocol.PROBE_MESSAGE_TYPE, dst_node_id=nid)
        for nid in grid.get_node_ids()
    ]
    probe_bytes = wire_bytes(content) * len(messages)
    grads, variances = [], []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log.warning("probe: node %d failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        probe_bytes += wire_bytes(reply.content)
        grad = reply.content[protocol.PROBE_GRADIENT][protocol.PROBE_GRADIENT].numpy()
        grads.append(torch.from_numpy(grad.astype("float64")))
        variances.append(float(reply.content[protocol.METRICS][protocol.LOCAL_VARIANCE]))
    if not grads:
        return {"sigma_g2": None, "sigma2": None, "probe_clients": 0, "probe_bytes": probe_bytes}
    stacked = torch.stack(grads)
    mean = stacked.mean(0)
    sigma_g2 = float(((stacked - mean) ** 2).sum(1).mean())
    return {
        "sigma_g2": sigma_g2,
        "sigma2": sum(variances) / len(variances),
        "grad_norm2": float(mean.square().sum()),
        "probe_clients": len(grads),
        "probe_bytes": probe_bytes,
    }
