"""``fl-compams``: reproduce the paper's experiments from presets, and report them.

    fl-compams list
    fl-compams reproduce accuracy-vs-bits [--seeds 0,1,2] [--dataset mnist --data-dir DIR --download]
    fl-compams report accuracy-vs-bits

Runs go to ``--runs`` (default ``runs/sweeps``, not committed); tables, plots and a compact ``summary.json`` go to
``--out`` (default ``docs/results``). Finished runs are skipped, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from simulations.sweep import available_presets, is_complete, load_preset, plan_runs, set_aside


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-compams", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the presets")
    for name in ("reproduce", "report"):
        p = sub.add_parser(name, help=f"{name} a preset")
        p.add_argument("preset", help=f"one of {available_presets()}")
        p.add_argument(
            "--dataset", default="digits", help="digits (embedded), mnist, fashion-mnist or cifar10"
        )
        p.add_argument("--runs", type=Path, default=Path("runs/sweeps"), help="where run directories go")
        p.add_argument("--out", type=Path, default=Path("docs/results"), help="where tables and plots go")
        p.add_argument("--seeds", type=_seeds, default=None, help="e.g. 0,1,2 (default: the preset's)")
        p.add_argument("--rounds", type=int, default=None, help="override num-server-rounds")
        p.add_argument("--data-dir", default="", help="directory of the downloaded data sets")
        p.add_argument("--download", action="store_true", help="allow downloading the data set")
        if name == "reproduce":
            p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per client")
            p.add_argument("--num-gpus", type=float, default=0.0, help="Ray GPUs per client")
            p.add_argument("--ray-address", default=None, help="join a running Ray cluster")
            p.add_argument("--dry-run", action="store_true", help="list the runs without running them")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fl-compams`` command."""
    args = _parser().parse_args(argv)
    if args.command == "list":
        for name in available_presets():
            print(f"{name:20s} {load_preset(name).get('preset', {}).get('description', '')}")
        return 0
    kwargs = dict(dataset=args.dataset, seeds=args.seeds, rounds=args.rounds, data_dir=args.data_dir)
    runs = plan_runs(args.preset, out=args.runs, download=args.download, **kwargs)
    if args.command == "reproduce":
        todo = [r for r in runs if not is_complete(r)]
        print(
            f"{args.preset}: {len(runs)} runs, {len(runs) - len(todo)} already complete, {len(todo)} to run"
        )
        if args.dry_run:
            for r in todo:
                print(
                    f"  {r.key} seed {r.seed}: {r.num_supernodes} clients, {r.rounds} rounds -> {r.run_dir}"
                )
            return 0
        _run_all(todo, args)
    from simulations.report.write import write_report

    path = write_report(args.preset, runs_root=args.runs, out_root=args.out, dataset=args.dataset)
    print(f"report: {path}")
    return 0


def _run_all(todo, args) -> None:
    from simulations.runner import run_experiment

    started = time.perf_counter()
    overall = tqdm(total=len(todo), desc="runs", position=0, unit="run")
    for r in todo:
        bar = tqdm(total=r.rounds, desc=f"{r.key} s{r.seed}", position=1, leave=False, unit="round")
        if (old := set_aside(r.run_dir)) is not None:
            tqdm.write(f"{r.run_dir} was incomplete; moved to {old.name} and started again")
        run_experiment(
            r.overrides,
            num_supernodes=r.num_supernodes,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            ray_address=args.ray_address,
            on_round=lambda row, bar=bar: bar.update(1) if row["round"] > 0 else None,
        )
        bar.close()
        overall.update(1)
    overall.close()
    print(f"ran {len(todo)} runs in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
