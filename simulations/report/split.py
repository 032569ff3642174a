"""sigma_g^2 of every split of a heterogeneity sweep, measured at common reference models.

A run's probe measures sigma_g^2 at that run's current model, which mixes the split with training progress.
Here every split (data config, number of clients, seed) is measured at the same two models:

- ``initial``: the initial model of the split's seed (the model every run of that seed starts from);
- ``trained``: one fixed checkpoint, the final model of the reference run (by default the first seed of the
  full-precision IID run), the same for every split.

Imports torch and the task: only the heterogeneity report needs it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_compams.config import parse_config
from simulations.report.load import Sweep
from strategies.results import load_model
from tasks.heterogeneity import split_sigma_g2
from tasks.task import model_for_task

__all__ = ["REFERENCES", "reference_run", "split_sigma_g2_at_references"]

REFERENCES = ("initial", "trained")


def _run_config(run_dir: Path) -> tuple[Any, int]:
    info = json.loads((run_dir / "config.json").read_text())
    return parse_config(info["config"]), int(info["num_nodes"])


def reference_run(sweep: Sweep, preferred: str = "full-precision/iid") -> Path | None:
    """Run directory of the fixed trained checkpoint: the first seed of ``preferred``, else of any full precision."""
    keys = [preferred] + [k for k in sweep.run_dirs if k.startswith("full-precision")]
    for key in keys:
        dirs = [d for d in sweep.run_dirs.get(key, []) if (d / "model.npz").is_file()]
        if dirs:
            return dirs[0]
    return None


def split_sigma_g2_at_references(
    sweep: Sweep, trained_from: Path | None
) -> dict[str, dict[int, dict[str, float]]]:
    """``{setting: {seed: {"initial": sigma_g^2, "trained": sigma_g^2}}}`` for every split in the sweep.

    A split is identified by its setting (the key's axis part, e.g. ``alpha-0.1``) and seed; methods of one
    setting share it (the same data config, clients and seed give the same partitions), which is checked.
    ``trained`` is left out when there is no reference checkpoint.
    """
    trained = None
    if trained_from is not None:
        cfg, _ = _run_config(trained_from)
        trained = model_for_task(cfg.data, cfg.seed)
        trained.load_state_dict(load_model(trained_from))
    out: dict[str, dict[int, dict[str, float]]] = {}
    seen: dict[tuple[str, int], str] = {}
    for key, dirs in sweep.run_dirs.items():
        setting = key.split("/", 1)[1] if "/" in key else ""
        for seed, run_dir in zip(sweep.seeds[key], dirs, strict=True):
            cfg, n = _run_config(run_dir)
            split = json.dumps([repr(cfg.data), n, cfg.seed])
            if (setting, seed) in seen:
                if seen[(setting, seed)] != split:
                    raise ValueError(f"runs of {setting!r}, seed {seed} differ in their split: {run_dir}")
                continue
            seen[(setting, seed)] = split
            values = {
                "initial": split_sigma_g2(cfg.data, n, cfg.seed, model_for_task(cfg.data, cfg.seed)).sigma_g2
            }
            if trained is not None:
                values["trained"] = split_sigma_g2(cfg.data, n, cfg.seed, trained).sigma_g2
            out.setdefault(setting, {})[seed] = values
    return out


def paired_gaps(
    sweep: Mapping[str, list], seeds: Mapping[str, list[int]], key: str, reference_key: str
) -> list[float]:
    """Per seed present in both keys: reference final accuracy minus this key's final accuracy."""
    final = {
        k: {s: rows[-1].get("accuracy") for s, rows in zip(seeds[k], sweep[k], strict=True)}
        for k in (key, reference_key)
        if k in sweep
    }
    if len(final) < 2:
        return []
    return [
        final[reference_key][s] - final[key][s]
        for s in final[key]
        if s in final[reference_key] and final[key][s] is not None and final[reference_key][s] is not None
    ]
