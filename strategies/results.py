"""Results directory of one run: config.json, metrics.jsonl, partitions.json, model.npz.

Plots and tables are pure functions of these files. The model is saved as ``.npz`` of named float arrays and
read back with ``allow_pickle=False``.
"""

from __future__ import annotations

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

__all__ = ["ResultsDir", "load_model", "read_metrics", "resolve_run_dir"]


def resolve_run_dir(out_dir: str, run_name: str, *, base: Path | None = None) -> Path:
    """``<out-dir>/<run-name>``; out-dir defaults to ``runs/`` under ``base`` (the launch directory)."""
    root = Path(out_dir) if out_dir else (base or Path.cwd()) / "runs"
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    return (root / name).resolve()


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
        """Open ``path``; a fresh run starts an empty ``metrics.jsonl``, a resumed one keeps rounds <= the given."""
        self.path = Path(path)
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
