"""``fl-compams``: reproduce the paper's experiments from presets, and report them.

    fl-compams list
    fl-compams reproduce accuracy-vs-bits [--seeds 0,1,2] [--dataset mnist --data-dir DIR --download]
    fl-compams reproduce accuracy-vs-bits --engine inprocess   # the same runs without Ray
    fl-compams report accuracy-vs-bits

Runs go to ``--runs`` (default ``runs/sweeps``, not committed); tables, plots and a compact ``summary.json`` go to
``--out`` (default ``docs/results``). Finished runs are skipped, so an interrupted sweep resumes. Built on typer
(:mod:`simulations.cli_base`): a mistake (unknown preset, bad option, bad config value) is one line on stderr
and exit code 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fl_compams.errors import ConfigError
from simulations.cli_base import UserError, new_app, run_app
from simulations.sweep import available_presets, is_complete, load_preset, plan_runs, set_aside

PROG = "fl-compams"


def _describe(name: str) -> str:
    return f"{name:20s} {load_preset(name).get('preset', {}).get('description', '')}"


def _preset_list() -> str:
    """Every preset with its description, one a line: the epilog of ``--help``.

    Typer's rich help keeps a line break only between paragraphs, hence one paragraph per preset.
    """
    return "\n\n".join(["Presets:", *(escape(_describe(name)) for name in available_presets())])


def _preset(name: str) -> str:
    if name not in available_presets():
        raise typer.BadParameter(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    return name


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"takes comma-separated integers, got {text!r}") from None


def _engine(name: str) -> str:
    from simulations.runner import ENGINES

    if name not in ENGINES:
        raise typer.BadParameter(f"unknown engine {name!r}; available: {', '.join(ENGINES)}")
    return name


app = new_app(
    "Reproduce the paper's experiments from presets (runs, then tables and plots).",
    epilog=_preset_list(),
    no_args_is_help=True,
)
_PRESETS = f"PRESET is one of: {', '.join(available_presets())} (fl-compams list)."

# The options reproduce and report share.
Preset = Annotated[
    str, typer.Argument(callback=_preset, show_default=False)
]  # its help is in each command's docstring: typer 0.20 on click 8.5 drops an argument's help
Dataset = Annotated[
    str, typer.Option(help="digits (embedded), mnist1d (generated), mnist, fashion-mnist or cifar10")
]
Runs = Annotated[Path, typer.Option(help="where run directories go")]
Out = Annotated[Path, typer.Option(help="where tables and plots go")]
Seeds = Annotated[  # a str that the callback turns into list[int] (typer would read list[int] as repeated options)
    str | None,
    typer.Option(callback=_seeds, metavar="0,1,2", show_default=False, help="seeds (default: the preset's)"),
]
Rounds = Annotated[int | None, typer.Option(show_default=False, help="override num-server-rounds")]
DataDir = Annotated[str, typer.Option(help="directory of the downloaded data sets")]
Download = Annotated[bool, typer.Option("--download", help="allow downloading the data set")]


@app.command("list")
def list_presets() -> int:
    """List the presets."""
    for name in available_presets():
        print(_describe(name))
    return 0


def _plan(preset: str, runs: Path, dataset: str, seeds, rounds, data_dir: str, download: bool):
    try:
        return plan_runs(
            preset,
            out=runs,
            download=download,
            dataset=dataset,
            seeds=seeds,
            rounds=rounds,
            data_dir=data_dir,
        )
    except ConfigError as e:  # e.g. --dataset nosuch, --rounds 0
        raise UserError(str(e)) from None


@app.command(
    help=f"Run a preset's missing runs (finished runs are skipped), then write its report.\n\n{_PRESETS}"
)
def reproduce(
    preset: Preset,
    dataset: Dataset = "digits",
    runs: Runs = Path("runs/sweeps"),
    out: Out = Path("docs/results"),
    seeds: Seeds = None,
    rounds: Rounds = None,
    data_dir: DataDir = "",
    download: Download = False,
    num_cpus: Annotated[
        float, typer.Option(help="CPUs per client (Ray; inprocess: its torch threads)")
    ] = 1.0,
    num_gpus: Annotated[float, typer.Option(help="Ray GPUs per client")] = 0.0,
    ray_address: Annotated[str | None, typer.Option(help="join a running Ray cluster")] = None,
    engine: Annotated[
        str,
        typer.Option(
            callback=_engine,
            help="ray (Flower's simulation engine) or inprocess (the same apps without Ray, in this process "
            "or --workers processes: the same results, no Ray start-up)",
        ),
    ] = "ray",
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            show_default=False,
            help="inprocess: client processes running clients in parallel (default 0: all in this process)",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the runs without running them")] = False,
) -> int:
    """Run a preset's missing runs (finished runs are skipped), then write its report."""
    planned = _plan(preset, runs, dataset, seeds, rounds, data_dir, download)
    todo = [r for r in planned if not is_complete(r)]
    print(f"{preset}: {len(planned)} runs, {len(planned) - len(todo)} already complete, {len(todo)} to run")
    if dry_run:
        for r in todo:
            print(f"  {r.key} seed {r.seed}: {r.num_supernodes} clients, {r.rounds} rounds -> {r.run_dir}")
        return 0
    if engine == "inprocess" and (num_gpus or ray_address):
        raise UserError("--engine inprocess runs on this machine's CPUs: drop --num-gpus and --ray-address")
    if engine == "ray" and workers is not None:
        raise UserError("--workers applies to --engine inprocess")
    _run_all(
        todo, num_cpus=num_cpus, num_gpus=num_gpus, ray_address=ray_address, engine=engine, workers=workers
    )
    return _write(preset, runs, out, dataset)


@app.command(
    help=f"Write a preset's report (tables, plots, summary.json) from the runs that exist.\n\n{_PRESETS}"
)
def report(
    preset: Preset,
    dataset: Dataset = "digits",
    runs: Runs = Path("runs/sweeps"),
    out: Out = Path("docs/results"),
    seeds: Seeds = None,
    rounds: Rounds = None,
    data_dir: DataDir = "",
    download: Download = False,
) -> int:
    """Write a preset's report (tables, plots, summary.json) from the runs that exist."""
    _plan(preset, runs, dataset, seeds, rounds, data_dir, download)  # the same checks as reproduce
    return _write(preset, runs, out, dataset)


def _write(preset: str, runs: Path, out: Path, dataset: str) -> int:
    from simulations.report.write import write_report

    path = write_report(preset, runs_root=runs, out_root=out, dataset=dataset)
    print(f"report: {path}")
    return 0


def _run_all(
    todo, *, num_cpus: float, num_gpus: float, ray_address: str | None, engine: str = "ray", workers=None
) -> None:
    from tqdm import tqdm

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
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            ray_address=ray_address,
            engine=engine,
            **({} if workers is None else {"workers": workers}),
            on_round=lambda row, bar=bar: bar.update(1) if row["round"] > 0 else None,
        )
        bar.close()
        overall.update(1)
    overall.close()
    print(f"ran {len(todo)} runs in {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fl-compams`` command (pyproject's console script): returns the exit code."""
    return run_app(app, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
