"""Results directory of one run: config.json, metrics.jsonl, partitions.json, model.npz.

Plots and tables are pure functions of these files. The model is saved as ``.npz`` of named float arrays and
read back with ``allow_pickle=False``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily: plots and tables read results without it
    import torch

import numpy as np

__all__ = ["ResultsDir", "check_fresh", "load_model", "read_metrics", "resolve_run_dir"]


def resolve_run_dir(out_dir: str, run_name: str, *, base: Path | None = None) -> Path:
    """``<out-dir>/<run-name>``, which must lie inside out-dir; out-dir defaults to ``runs/`` under ``base``.

    ``run-name`` must be a plain name (:data:`fl_compams.schema.PLAIN_NAME`: one path component, no ``/`` or
    ``..``); an empty one becomes a timestamp, with ``-2``, ``-3``, ... appended if that directory exists. The
    resolved directory (symbolic links followed) must lie inside the resolved out-dir.
    """
    from fl_compams.errors import ConfigError  # lazily, like torch: the fl_compams package imports torch
    from fl_compams.schema import PLAIN_NAME

    root = (Path(out_dir) if out_dir else (base or Path.cwd()) / "runs").resolve()
    if run_name and PLAIN_NAME.fullmatch(run_name) is None:
        raise ConfigError(
            f"config key 'run-name': must be a plain name (letters, digits, '.', '_', '-', starting with a "
            f"letter or digit; no '/' or '..'), got {run_name!r}; results go to <out-dir>/<run-name>"
        )
    name = run_name
    if not name:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = stamp
        for n in itertools.count(2):
            if not (root / name).exists():
                break
            name = f"{stamp}-{n}"
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(
            f"run directory {root / name} resolves to {path}, outside out-dir {root} (a symbolic link?); "
            "choose another run-name"
        )
    return path


def check_fresh(path: Path) -> None:
    """Refuse a fresh run in a directory that holds anything (an earlier run's results are never deleted)."""
    from fl_compams.errors import ConfigError

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        held = sorted(p.name for p in path.iterdir())[:6] if path.is_dir() else []
        raise ConfigError(
            f"run directory {path} already exists and holds {held or 'a file'}: results of an earlier run are "
            "never overwritten. Choose another run-name (or leave it empty for a timestamped one), or set "
            "resume = true to continue that run from its latest checkpoint"
        )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class ResultsDir:
    """Writer for one run's results; ``metrics.jsonl`` gets one line per round, flushed at once."""

    def __init__(self, path: Path, *, keep_rounds_upto: int | None = None) -> None:
        """Open ``path``; a fresh run needs an empty or new directory, a resumed one keeps rounds <= the given."""
        self.path = Path(path)
        if keep_rounds_upto is None:
            check_fresh(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        kept = []
        if keep_rounds_upto is not None and self.metrics_path.exists():
            kept = [r for r in read_metrics(self.path) if r["round"] <= keep_rounds_upto]
        tmp = self.path / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.metrics_path)

    def write_json(self, name: str, data: Mapping[str, Any]) -> None:
        """Write ``name`` atomically (temp file + rename)."""
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, self.path / name)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one round's metrics as a JSON line."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_json_safe(row)) + "\n")

    def save_model(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Save named tensors as ``model.npz``."""
        tmp = self.path / ".model.tmp.npz"
        np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in tensors.items()})
        os.replace(tmp, self.path / "model.npz")


def read_metrics(run_dir: Path | str) -> list[dict]:
    """All complete rows of a run's ``metrics.jsonl`` (a torn last line from a crash is ignored)."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def load_model(run_dir: Path | str) -> dict[str, torch.Tensor]:
    """Named tensors from ``model.npz`` (no pickle)."""
    import torch

    with np.load(Path(run_dir) / "model.npz", allow_pickle=False) as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}
