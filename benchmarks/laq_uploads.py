"""LAQ against quantized GD (LAQ with zero thresholds): uploads to reach a test accuracy (issue 12's LAQ target).

Drives the algorithm layer (``worker_begin`` / ``worker_end`` / ``server_step``, the code the Flower apps run)
in one process on the configured task, with each client's data, seeded minibatches and dropout masks as the
ClientApp derives them, but no transport: the uploads and the model are those of a fault-free Flower run.
A ratio, never pass/fail::

    PYTHONPATH=. python benchmarks/laq_uploads.py --rounds 150 --seeds 0 1 2 [--stochastic] [--model logreg]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from fl_compams import protocol
from fl_compams.algorithm import (
    ServerReply,
    WorkerState,
    instruction_for,
    server_step,
    worker_begin,
    worker_end,
)
from fl_compams.codec import from_bytes
from fl_compams.config import build_algorithm, parse_config
from fl_compams.flat import ParamSpec, flatten, unflatten
from fl_compams.laq import LazyConfig
from fl_compams.server import init_server_state
from tasks.task import client_data, load_data, make_model
from tasks.training import evaluate, local_update


def run(overrides: dict, clients: int, zero_threshold: bool) -> list[dict]:
    cfg = parse_config({"algorithm": "laq", **overrides})
    bundle = load_data(cfg.data, seed=cfg.seed)
    model = make_model(cfg.data, bundle, cfg.seed)
    spec = ParamSpec.from_module(model)
    algorithm = build_algorithm(cfg, spec.block_sizes)
    if zero_threshold:  # quantized GD: every worker uploads its b-bit innovation every round
        zero = LazyConfig(xi=0.0, max_skip=cfg.laq.laq_max_skip, error_weight=0.0, constant=0.0)
        algorithm = type(algorithm)(**{**algorithm.__dict__, "lazy": zero})
    state = init_server_state(flatten(model.state_dict(), spec), algorithm.server_opt)
    data = [client_data(cfg.data, m, clients, cfg.seed, torch.device("cpu")) for m in range(clients)]
    workers = [WorkerState() for _ in range(clients)]
    rows, uploads = [], 0
    for rnd in range(1, cfg.server.num_server_rounds + 1):
        replies = []
        for m, (x, y) in enumerate(data):
            label = f"partition-{m}"
            workers[m], begun = worker_begin(
                algorithm, workers[m], instruction_for(state, label, rnd, algorithm), dim=spec.dim
            )
            model.load_state_dict(unflatten(state.theta, spec))
            with torch.random.fork_rng():
                torch.manual_seed(protocol.derive_seed(cfg.seed, m, rnd, 1))
                grad, _ = local_update(
                    model,
                    x,
                    y,
                    steps=1,
                    lr=cfg.train.local_lr,
                    batch_size=cfg.train.batch_size if cfg.laq.laq_stochastic else x.shape[0],
                    generator=torch.Generator().manual_seed(protocol.derive_seed(cfg.seed, m, rnd, 0)),
                )
            reply, workers[m] = worker_end(algorithm, workers[m], grad, round=rnd, acked=begun.acked)
            payload = None if reply.skip else from_bytes(reply.payload, spec.dim)
            uploads += payload is not None
            replies.append(ServerReply(label, rnd, payload, int(x.shape[0]), reply.acked))
        state, _ = server_step(algorithm, state, rnd, replies)
        model.load_state_dict(unflatten(state.theta, spec))
        loss, acc = evaluate(model, bundle.test_x, bundle.test_y)
        rows.append({"round": rnd, "uploads": uploads, "accuracy": acc, "loss": loss})
    return rows


def uploads_to(rows: list[dict], target: float) -> float:
    """Uploads when the test accuracy first reaches ``target`` (inf if never)."""
    return next((r["uploads"] for r in rows if r["accuracy"] >= target), math.inf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument(
        "--lr", type=float, default=0.05, help="server-lr alpha (a step on the sum of gradients)"
    )
    parser.add_argument("--stochastic", action="store_true", help="SLAQ (batch-size minibatches)")
    parser.add_argument("--model", default="auto")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--max-skip", type=int, default=100, help="t-bar")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.93, 0.95, 0.96])
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared machine: one thread is faster than contended ones
    overrides = {
        "num-server-rounds": args.rounds,
        "server-lr": args.lr,
        "model": args.model,
        "laq-bits": args.bits,
        "laq-stochastic": args.stochastic,
        "laq-max-skip": args.max_skip,
    }
    for seed in args.seeds:
        out = {}
        for name, zero in (("laq", False), ("qgd", True)):
            rows = run({**overrides, "seed": seed}, args.clients, zero)
            out[name] = {
                "final_accuracy": rows[-1]["accuracy"],
                "best_accuracy": max(r["accuracy"] for r in rows),
                "uploads": rows[-1]["uploads"],
                "uploads_to": {str(t): uploads_to(rows, t) for t in args.targets},
                "rows": rows,
            }
        # the same accuracy: quantized GD's final accuracy (less half a point, so noise does not decide)
        target = out["qgd"]["final_accuracy"] - 0.005
        for name in out:
            out[name]["uploads_to_qgd_final"] = uploads_to(out[name].pop("rows"), target)
        print(json.dumps({"seed": seed, **vars(args), **out}), flush=True)


if __name__ == "__main__":
    main()
