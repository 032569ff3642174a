"""In-process runs through Flower's simulation engine (Ray backend), with the same ServerApp/ClientApp code.

``run_experiment(overrides)`` validates the config, runs it on ``num_supernodes`` virtual clients and returns the
results directory, which holds the same files as a ``flwr run .`` run. Flower 1.41 deprecates
``run_simulation``; it is called in one place only (:func:`_simulate`) so a replacement touches one function.
``engine="inprocess"`` runs the same ServerApp and ClientApp code without Ray, on
:class:`simulations.inprocess_grid.InProcessGrid` (sweeps on few cores; same results round for round).

Virtual clients see the run config, as deployed ones do, and a run that can be resumed (a ``run-name`` and
``checkpoint-every > 0`` or ``resume``) gives them the node config ``state-dir = <run dir>/client-state``: they
persist their state as SuperNodes with ``state-dir`` do, so that a resumed simulation continues with the
residuals (and QAdam moments, round counters) the clients had, which a new simulation's contexts do not carry.
They also get ``keep-state = true``: the state stays with the run's results when the run ends, since a finished
run may be resumed with more rounds. Other runs write no client state (they could not use it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_compams.config import ExperimentConfig, parse_config

__all__ = ["ENGINES", "run_experiment", "virtual_node_config"]

#: The engines :func:`run_experiment` runs on.
ENGINES = ("ray", "inprocess")

# Quiet Ray and Flower before they are imported.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def run_experiment(
    overrides: Mapping[str, Any] | None = None,
    *,
    num_supernodes: int = 10,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    ray_address: str | None = None,
    verbose: bool = False,
    client_app=None,
    on_round=None,
    engine: str = "ray",
    workers: int | None = None,
) -> Path:
    """Run one experiment in-process and return its results directory.

    Parameters
    ----------
    overrides
        Run-config keys (kebab-case) that differ from the defaults.
    num_supernodes
        Number of virtual clients; each gets ``partition-id`` and ``num-partitions`` in its node config.
    num_cpus, num_gpus
        Ray resources per client (``num_gpus > 0`` puts clients on GPUs; fractions share one GPU).
    ray_address
        Join a running Ray cluster (e.g. ``"127.0.0.1:6379"``) instead of starting one; ``RAY_ADDRESS`` in the
        environment does the same.
    client_app
        A Flower ``ClientApp`` to use instead of :data:`clients.client_app.app` (tests inject faulty clients);
        it gets the run config and, in a run that can be resumed, ``state-dir`` (see the module docstring).
    on_round
        Called with each ``metrics.jsonl`` row as it is written (progress bars).
    engine
        ``"ray"``: Flower's simulation engine on Ray. ``"inprocess"``: the same ServerApp code
        (:func:`strategies.server_app.run_server`) and ClientApp on :class:`simulations.inprocess_grid.InProcessGrid`,
        without Ray: the same results round for round (tests/simulations/test_inprocess_engine.py), without
        Ray's start-up, actors' memory and polling. Clients run with ``int(num_cpus)`` torch threads each. It
        takes no GPUs and no Ray cluster.
    workers
        ``engine="inprocess"`` only: client processes (fresh interpreters; node i in worker i mod workers), as
        Ray's actor pool runs clients in parallel. Default 0: every client in this process, one after another
        (no start-up; on a shared 2-core machine the faster choice, see benchmarks/bench_engines.py).
    """
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from clients.client_app import app as default_client_app
    from simulations.virtual_nodes import WithContext
    from strategies.server_app import run_server

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "ray" and workers is not None:
        raise ValueError("workers applies to engine 'inprocess' (Ray sizes its actor pool from num_cpus)")
    if engine == "inprocess" and (num_gpus or ray_address):
        raise ValueError(
            "engine 'inprocess' runs on this process's CPUs: it takes no num_gpus or ray_address"
        )
    cfg = parse_config(overrides)  # fail fast, before Ray starts
    config = cfg.to_flat()
    if engine == "inprocess":
        threads = max(1, int(num_cpus))
        return _run_inprocess(cfg, client_app, num_supernodes, threads, workers or 0, on_round, verbose)
    outcome: dict[str, Path] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:  # context.run_config is empty under run_simulation
        outcome["path"] = run_server(grid, config, on_round=on_round)

    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": verbose}
    if ray_address:
        init_args["address"] = ray_address
    backend_config = {
        "client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "init_args": init_args,
    }
    app = WithContext(client_app or default_client_app, config, virtual_node_config(cfg))
    _simulate(server_app, app, num_supernodes, backend_config, verbose)
    if "path" not in outcome:
        raise RuntimeError("the simulation ended without results; run with verbose=True to see Flower's log")
    return outcome["path"]


def virtual_node_config(cfg: ExperimentConfig) -> dict[str, str]:
    """Node config every virtual client gets besides Flower's partition keys: ``state-dir`` in a resumable run.

    A run can be resumed when it has a ``run-name`` and writes checkpoints (or is itself a resumption); its
    clients then mirror their state to ``<run dir>/client-state`` (see the module docstring).
    """
    from clients.state_io import KEEP_STATE_KEY, STATE_DIR_KEY
    from strategies.results import resolve_run_dir

    out = cfg.output
    if not (out.run_name and (out.checkpoint_every or out.resume)):
        return {}
    return {
        STATE_DIR_KEY: str(resolve_run_dir(out.out_dir, out.run_name) / "client-state"),
        KEEP_STATE_KEY: "true",  # kept at the run's end: a finished run may be resumed with more rounds
    }


def _run_inprocess(
    cfg: ExperimentConfig,
    client_app,
    num_supernodes: int,
    threads: int,
    workers: int,
    on_round,
    verbose: bool,
) -> Path:
    """``run_server`` on an :class:`~simulations.inprocess_grid.InProcessGrid` of wrapped ClientApps."""
    from clients.client_app import app as default_client_app
    from simulations.inprocess_grid import InProcessGrid
    from simulations.virtual_nodes import WithContext
    from strategies.server_app import run_server

    if not verbose:  # as _simulate: Flower's per-round log only when asked for
        logging.getLogger("flwr").setLevel(logging.ERROR)
    config = cfg.to_flat()
    app = WithContext(client_app or default_client_app, config, virtual_node_config(cfg))
    with (
        InProcessGrid(app, num_supernodes, seed=cfg.seed, client_threads=threads, workers=workers) as grid,
        grid.identity(),
    ):
        return run_server(grid, config, on_round=on_round)


def _simulate(server_app, client_app, num_supernodes: int, backend_config: dict, verbose: bool) -> None:
    """The one call of Flower's deprecated ``run_simulation``."""
    from flwr.simulation import run_simulation

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_name="ray",
        backend_config=backend_config,
        verbose_logging=verbose,
    )
