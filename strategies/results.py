"""Results directory of one run: config.json, metrics.jsonl, partitions.json, model.npz.

Plots and tables are pure functions of these files. The model is saved as ``.npz`` of named float arrays and
read back with ``allow_pickle=False``. With ``tensorboard = true`` every ``metrics.jsonl`` row is also written
as TensorBoard scalars (:class:`TensorBoardScalars`) to an ``events.out.tfevents.*`` file beside it, so that
``tensorboard --logdir runs/`` shows every run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily: plots and tables read results without it
    import torch

import numpy as np

__all__ = [
    "ResultsDir",
    "TensorBoardScalars",
    "check_fresh",
    "load_model",
    "read_metrics",
    "resolve_run_dir",
    "scalar_values",
]


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

    def __init__(self, path: Path, *, keep_rounds_upto: int | None = None, tensorboard: bool = False) -> None:
        """Open ``path``; a fresh run needs an empty or new directory, a resumed one keeps rounds <= the given.

        ``tensorboard``: also write each row as TensorBoard scalars (a resumed run's events file tells
        TensorBoard to drop the earlier files' rounds after ``keep_rounds_upto``, as it drops the rows).
        """
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
        self.scalars = None
        if tensorboard:
            purge = None if keep_rounds_upto is None else keep_rounds_upto + 1
            self.scalars = TensorBoardScalars(self.path, purge_from=purge)

    def write_json(self, name: str, data: Mapping[str, Any]) -> None:
        """Write ``name`` atomically (temp file + rename)."""
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, self.path / name)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one round's metrics as a JSON line."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_json_safe(row)) + "\n")
        if self.scalars is not None:
            self.scalars.write_row(row)

    def save_model(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Save named tensors as ``model.npz``."""
        tmp = self.path / ".model.tmp.npz"
        np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in tensors.items()})
        os.replace(tmp, self.path / "model.npz")


#: Per-client entries and failure reasons stay in metrics.jsonl: one scalar per client and metric would bury the
#: run's own curves (100 clients x 15 metrics).
_NOT_SCALARS = frozenset({"round", "clients", "failures"})


def scalar_values(row: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one ``metrics.jsonl`` row: tag -> value.

    Every finite number (a bool as 0 or 1) of the row except ``round`` (the step), per-client entries and
    failure reasons; a nested table's numbers are tagged by path (``state_bytes/residual/mean``).
    """
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, bool | int | float) and math.isfinite(value):
            out[prefix] = float(value)

    for key, value in row.items():
        if key not in _NOT_SCALARS:
            walk(str(key), value)
    return out


_EVENT_FILES = itertools.count()  # two writers in one process and second never share a file


class TensorBoardScalars:
    """TensorBoard's event format, written synchronously: one event per ``metrics.jsonl`` row, step = round.

    Values are written as float64 scalar tensors (the scalars plugin's format; float64 keeps byte counters
    exact, which TensorBoard's float32 ``simple_value`` would not beyond 2^24). Each row is appended and the file
    closed again, so a crash loses at most the row being written and no thread or open file is left behind.
    Needs the ``tensorboard`` package (a dependency); a missing one is a :class:`~fl_compams.errors.ConfigError`.
    """

    def __init__(self, path: Path, *, purge_from: int | None = None) -> None:
        """Start an events file in ``path``; ``purge_from``: TensorBoard drops earlier files' steps >= it."""
        from fl_compams.errors import ConfigError

        try:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        except ImportError as err:
            raise ConfigError(
                "tensorboard = true needs the tensorboard package: pip install 'tensorboard>=2.16'"
            ) from err
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{next(_EVENT_FILES)}"
        self.file = Path(path) / name
        # Every file starts a session: TensorBoard takes a run's first START as its beginning and each later one
        # as a restart that drops the steps >= its own from the files before it.
        start = SessionLog(status=SessionLog.START)
        self._append(
            [
                Event(wall_time=time.time(), file_version="brain.Event:2"),
                Event(wall_time=time.time(), step=purge_from or 0, session_log=start),
            ]
        )

    def write_row(self, row: Mapping[str, Any]) -> None:
        """Append the row's scalars (:func:`scalar_values`) at step ``row["round"]``."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.types_pb2 import DT_DOUBLE
        from tensorboard.plugins.scalar.metadata import create_summary_metadata

        values = [
            Summary.Value(
                tag=tag,
                tensor=TensorProto(dtype=DT_DOUBLE, double_val=[value]),
                metadata=create_summary_metadata(display_name=tag, description=""),
            )
            for tag, value in scalar_values(row).items()
        ]
        self._append([Event(wall_time=time.time(), step=int(row["round"]), summary=Summary(value=values))])

    def _append(self, events) -> None:
        from tensorboard.summary.writer.record_writer import RecordWriter

        with self.file.open("ab") as f:
            writer = RecordWriter(f)
            for event in events:
                writer.write(event.SerializeToString())


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
