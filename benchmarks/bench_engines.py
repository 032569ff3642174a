"""Seconds per round of the two engines of ``run_experiment``: Flower's simulation on Ray and the in-process grid.

For each setting (the default config on digits, and MNIST-1D with its MLP) and engine, one run of ``--rounds``
rounds on ``--clients`` virtual clients; reported from the run's ``metrics.jsonl`` ``wall_s`` column (seconds since
the ServerApp started, written at the end of each round): the steady per-round time (rounds 2..R, the first round
holds Ray's actor start-up) and the whole call of ``run_experiment`` (Ray's start and stop included). The two runs
of a setting must give the same rows apart from ``wall_s`` (checked, printed). Prints the machine and the CPU
share other processes took while it ran (timings on a shared machine are noisy).

    .venv/bin/python benchmarks/bench_engines.py                # 10 clients, 8 rounds, both settings
    .venv/bin/python benchmarks/bench_engines.py --rounds 4 --settings mnist1d
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import cpu_times, machine_info

from simulations.runner import run_experiment
from strategies.results import read_metrics

SETTINGS = {
    "default": {},  # digits, the CNN, COMP-AMS with Top-k 1% + EF
    "mnist1d": {"dataset": "mnist1d", "model": "mnist1d-mlp"},
}


def variants(clients: int) -> list[tuple[str, str, int | None]]:
    """(label, engine, in-process workers): Ray; in-process with the clients here; with one worker per core."""
    cores = min(clients, len(os.sched_getaffinity(0)))
    out = [("ray", "ray", None), ("inprocess, workers 0", "inprocess", 0)]
    return out + ([(f"inprocess, workers {cores}", "inprocess", cores)] if cores > 1 else [])


def measure(setting: str, engine: str, workers: int | None, rounds: int, clients: int, out: Path):
    """One run: its timings and its rows without wall_s."""
    name = f"{engine}-{workers}"
    overrides = {**SETTINGS[setting], "num-server-rounds": rounds, "out-dir": str(out), "run-name": name}
    busy0, own0 = cpu_times()
    started = time.perf_counter()
    path = run_experiment(overrides, num_supernodes=clients, engine=engine, workers=workers)
    total = time.perf_counter() - started
    busy1, own1 = cpu_times()
    rows = read_metrics(path)
    wall = [r["wall_s"] for r in rows]
    steady = (wall[-1] - wall[1]) / (rounds - 1)
    timing = {
        "per_round": steady,
        "first_round": wall[1] - wall[0],
        "total": total,
        "own": (own1 - own0) / total,
        "other": max(0.0, (busy1 - busy0) - (own1 - own0)) / total,
    }
    return timing, [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}"
    )
    args = parser.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    if unknown := [s for s in settings if s not in SETTINGS]:
        parser.error(f"unknown settings {unknown}; available: {list(SETTINGS)}")
    if args.rounds < 2 or args.clients < 1:
        parser.error("--rounds must be >= 2 and --clients >= 1")

    start = time.perf_counter()
    print("## Machine\n")
    print("\n".join(machine_info()))
    print(f"\nCommand: `python {' '.join([os.path.relpath(sys.argv[0]), *(argv or sys.argv[1:])])}`")
    print(f"{args.clients} clients, {args.rounds} rounds; Ray: 1 CPU per client\n")
    print(
        "| setting | engine | s / round (rounds 2..R) | first round | whole run | rows equal to ray "
        "| cores: this process | cores: other processes (Ray's workers included) |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            reference = None
            for label, engine, workers in variants(args.clients):
                timing, rows = measure(
                    setting, engine, workers, args.rounds, args.clients, Path(tmp) / setting
                )
                reference = rows if reference is None else reference
                print(
                    f"| {setting} | {label} | {timing['per_round']:.3f} | {timing['first_round']:.2f} | "
                    f"{timing['total']:.1f} | {rows == reference} | {timing['own']:.2f} | {timing['other']:.2f} |",
                    flush=True,
                )
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
