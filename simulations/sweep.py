"""Experiment presets: TOML files under ``simulations/presets`` expanded into runs, run and resumed.

A preset has ``[preset]`` (description, ``num-supernodes``, ``seeds``, targets), ``[base]`` run-config
overrides for every run, ``[datasets.<name>]`` overrides used with ``--dataset <name>``, ``[methods.<label>]``
(one table of overrides per method) and optionally ``[[axis]]`` entries (a label plus overrides, e.g. a
Dirichlet alpha or the number of clients) crossed with the methods. A preset may instead name a ``source``
preset whose runs it re-reads (``equal-budget``). ``num-supernodes`` may appear anywhere overrides do. A data
set's table may hold ``[datasets.<name>.methods.<label>]``: that method's overrides on that data set (e.g. its
learning rate tuned there), applied after the method's own table and before the axis;
``[datasets.<name>.axis.<label>]``: one setting's overrides on that data set, applied last; and
``[datasets.<name>.preset]``: entries of ``[preset]`` for that data set (seeds, targets, and ``methods`` /
``axes``: the labels to run there when a study runs only part of its grid on that data set). ``datasets`` in
``[preset]`` lists the only data sets a preset runs on (a model that needs MNIST-1D's sequences).

Runs go to ``<out>/<dataset>/<preset>/<method>[/<axis>]/seed-<s>/``; a run whose results are complete is
skipped, so an interrupted sweep resumes where it stopped. The directory of an incomplete run is renamed to a
hidden ``.seed-<s>.incomplete-<n>`` beside it before the run starts again (a run never reuses a directory, and
nothing written is deleted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from fl_compams.config import parse_config
from fl_compams.errors import ConfigError
from strategies.results import read_metrics

PRESET_DIR = Path(__file__).resolve().parent / "presets"

__all__ = [
    "PRESET_DIR",
    "PlannedRun",
    "available_presets",
    "is_complete",
    "load_preset",
    "plan_runs",
    "preset_meta",
    "set_aside",
]


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: where it goes and what it overrides."""

    key: str  # "method" or "method/axis"
    seed: int
    num_supernodes: int
    overrides: dict[str, Any] = field(hash=False)
    run_dir: Path = field(hash=False)

    @property
    def rounds(self) -> int:
        """Number of rounds the run is configured for."""
        return parse_config(self.overrides).server.num_server_rounds


def available_presets() -> list[str]:
    """Names of the preset files."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str) -> dict[str, Any]:
    """Parse ``presets/<name>.toml``."""
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        raise ValueError(f"unknown preset {name!r}; available: {available_presets()}")
    return tomllib.loads(path.read_text())


def _dataset_table(preset: dict[str, Any], dataset: str) -> dict[str, Any]:
    """``[datasets.<name>]`` of a preset (a copy; empty for the default digits)."""
    return dict(preset.get("datasets", {}).get(dataset, {})) if dataset != "digits" else {}


def preset_meta(preset: dict[str, Any], dataset: str = "digits") -> dict[str, Any]:
    """The ``[preset]`` table, updated by ``[datasets.<name>.preset]`` (e.g. a target that suits that data)."""
    return {**preset.get("preset", {}), **_dataset_table(preset, dataset).get("preset", {})}


def _select(
    tables: dict[str, Any], labels: list[str] | None, what: str, name: str, dataset: str
) -> dict[str, Any]:
    """The entries of ``tables`` named in ``labels`` (all of them when ``labels`` is None), in preset order."""
    if labels is None:
        return dict(tables)
    unknown = sorted(set(labels) - set(tables))
    if unknown:
        raise ConfigError(
            f"preset {name!r}, [datasets.{dataset}.preset] {what}: unknown labels {unknown}; "
            f"the preset defines {sorted(tables)}"
        )
    return {label: table for label, table in tables.items() if label in labels}


def plan_runs(
    name: str,
    *,
    out: Path,
    dataset: str = "digits",
    seeds: list[int] | None = None,
    rounds: int | None = None,
    data_dir: str = "",
    download: bool = False,
) -> list[PlannedRun]:
    """Expand a preset into runs (validating every run's config now, before anything starts)."""
    preset = load_preset(name)
    meta = preset_meta(preset, dataset)
    if "source" in meta:
        return []
    if dataset not in meta.get("datasets", [dataset]):
        raise ConfigError(
            f"preset {name!r} runs on {', '.join(meta['datasets'])} only (its [preset] datasets); "
            f"use --dataset {meta['datasets'][0]}"
        )
    base = dict(preset.get("base", {}))
    on_dataset = _dataset_table(preset, dataset)
    on_dataset.pop("preset", None)  # read by preset_meta
    per_method = on_dataset.pop("methods", {})  # [datasets.<name>.methods.<label>]: that method on that data
    per_axis = on_dataset.pop("axis", {})  # [datasets.<name>.axis.<label>]: that setting on that data
    if dataset != "digits":  # the data set's default model unless its table names one
        base.update({"dataset": dataset, "data-dir": data_dir, "download": download, "model": "auto"})
        base.update(on_dataset)
    if rounds is not None:
        base["num-server-rounds"] = rounds
    methods = _select(preset.get("methods", {}), meta.get("methods"), "methods", name, dataset)
    all_axes = {a["label"]: a for a in preset.get("axis") or [{"label": ""}]}
    axes = list(_select(all_axes, meta.get("axes"), "axes", name, dataset).values())
    runs = []
    # Seed-major order: an interrupted sweep leaves every method and setting with the same number of seeds.
    for seed in seeds if seeds is not None else meta.get("seeds", [0]):
        for method, method_overrides in methods.items():
            for axis in axes:
                axis_overrides = {k: v for k, v in axis.items() if k != "label"}
                key = f"{method}/{axis['label']}" if axis["label"] else method
                overrides = {
                    **base,
                    **method_overrides,
                    **per_method.get(method, {}),
                    **axis_overrides,
                    **per_axis.get(axis["label"], {}),
                    "seed": seed,
                }
                n = int(overrides.pop("num-supernodes", meta.get("num-supernodes", 10)))
                run_dir = out / dataset / name / key / f"seed-{seed}"
                overrides.update({"out-dir": str(run_dir.parent), "run-name": run_dir.name})
                parse_config(overrides)  # fail on a bad preset before the first run
                runs.append(PlannedRun(key, seed, n, overrides, run_dir))
    return runs


def is_complete(run: PlannedRun) -> bool:
    """True if the run's results already hold every round and the final model."""
    if not (run.run_dir / "model.npz").exists() or not (run.run_dir / "metrics.jsonl").exists():
        return False
    rows = read_metrics(run.run_dir)
    return bool(rows) and rows[-1]["round"] == run.rounds


def set_aside(run_dir: Path) -> Path | None:
    """Rename an existing (incomplete) run directory to ``.<name>.incomplete-<n>`` beside it; return the new path.

    A fresh run refuses a directory that holds results; the report loader skips hidden directories.
    """
    if not run_dir.exists():
        return None
    n = 1
    while (target := run_dir.with_name(f".{run_dir.name}.incomplete-{n}")).exists():
        n += 1
    run_dir.rename(target)
    return target
