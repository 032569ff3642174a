"""Read result files: one run's rows, and a sweep of run directories.

A sweep directory is laid out as::

    <sweep_dir>/<method-label>/seed-<s>/            config.json, metrics.jsonl
    <sweep_dir>/<method-label>/<axis>-<value>/seed-<s>/

:func:`load_sweep` turns it into ``{key: [rows of seed s0, rows of seed s1, ...]}`` with ``key`` either
``"<method-label>"`` or ``"<method-label>/<axis>-<value>"``. Everything else in ``simulations.report`` is a
pure function of that mapping (a plain ``dict`` built by hand works too). The format of the files themselves is
defined in :mod:`strategies.results`; this module is the only one of the package that reads them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from strategies.results import read_metrics

__all__ = ["AXIS_DIR", "Sweep", "has_metrics", "load_sweep", "parse_key", "read_rows"]

log = logging.getLogger(__name__)

#: ``<axis>-<number>``: the name of a sub-directory of a method that varies one setting (``n-4``, ``alpha-0.1``).
AXIS_DIR = re.compile(r"^(?P<axis>.+?)-(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")
_SEED_DIR = re.compile(r"^seed-(\d+)$")
_METRICS = "metrics.jsonl"


def has_metrics(run_dir: Path | str) -> bool:
    """Whether a run directory has a ``metrics.jsonl`` (a run that failed early has none)."""
    return (Path(run_dir) / _METRICS).is_file()


def read_rows(run_dir: Path | str) -> list[dict]:
    """Every complete row of a run's ``metrics.jsonl``, in file order (see :func:`strategies.results.read_metrics`)."""
    return read_metrics(run_dir)


def parse_key(key: str) -> tuple[str, str | None, str | None]:
    """Split a sweep key into ``(method label, axis, value)``.

    Parameters
    ----------
    key : str
        ``"topk-0.01-ef"`` or ``"topk-0.01-ef/n-4"``.

    Returns
    -------
    tuple
        ``("topk-0.01-ef", None, None)`` or ``("topk-0.01-ef", "n", "4")``. A sub-directory name without a
        trailing number gives ``(label, name, None)``.
    """
    label, _, sub = key.partition("/")
    if not sub:
        return label, None, None
    m = AXIS_DIR.match(sub)
    if m:
        return label, m["axis"], m["value"]
    return label, sub, None


class Sweep(dict):
    """``dict[key, list[list[row]]]`` returned by :func:`load_sweep`, plus what was loaded and skipped.

    Attributes
    ----------
    skipped : list of tuple of (str, str)
        ``(run directory, reason)`` for every seed directory that was not loaded.
    seeds : dict of str to list of int
        The seeds that were loaded for each key, in the order of the row lists.
    run_dirs : dict of str to list of pathlib.Path
        The run directory of each loaded seed, in the same order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[tuple[str, str]] = []
        self.seeds: dict[str, list[int]] = {}
        self.run_dirs: dict[str, list[Path]] = {}


def _natural_key(name: str) -> tuple:
    """Sort ``n-4`` before ``n-16`` and ``alpha-0.05`` before ``alpha-0.1``."""
    m = AXIS_DIR.match(name)
    if m:
        return (0, m["axis"], float(m["value"]), name)
    return (1, name, 0.0, name)


def _load_seed(run_dir: Path, *, allow_incomplete: bool = False) -> tuple[list[dict] | None, str]:
    """Rows of one seed directory sorted by round, or ``None`` and why it was skipped."""
    if not has_metrics(run_dir):
        return None, "no metrics.jsonl"
    try:
        rows = read_rows(run_dir)
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable metrics.jsonl: {e}"
    by_round: dict[int, dict] = {}
    for r in rows:
        if isinstance(r, dict) and isinstance(r.get("round"), int):
            by_round[r["round"]] = r  # a repeated round (resumed run) keeps its last row
    rows = [by_round[k] for k in sorted(by_round)]
    if not rows or rows[-1]["round"] < 1:
        return None, "no training rounds in metrics.jsonl"
    expected = None
    cfg_path = run_dir / "config.json"
    if cfg_path.is_file():
        try:
            expected = int(json.loads(cfg_path.read_text())["config"]["num-server-rounds"])
        except (OSError, ValueError, KeyError, TypeError):
            expected = None
    if not allow_incomplete and expected is not None and rows[-1]["round"] < expected:
        return None, f"incomplete: {rows[-1]['round']} of {expected} rounds"
    return rows, ""


def load_sweep(sweep_dir: Path | str, *, allow_incomplete: bool = False) -> Sweep:
    """Load every ``seed-<s>`` run directory of a sweep.

    Parameters
    ----------
    sweep_dir : path-like
        Directory holding ``<label>/seed-<s>/`` and/or ``<label>/<axis>-<value>/seed-<s>/`` run directories.
    allow_incomplete : bool, default False
        Keep seeds that stopped early. By default a seed is skipped when its last round is below the
        ``num-server-rounds`` of its ``config.json`` or below the last round of another seed of the same key.

    Returns
    -------
    Sweep
        ``{key: [rows of each seed, sorted by seed]}``; keys are ``"<label>"`` or ``"<label>/<axis>-<value>"``,
        sorted by label and then by the numeric axis value. Rows of a seed are sorted by ``round`` (a repeated
        round keeps its last row). Skipped seed directories (no ``metrics.jsonl``, no training round,
        incomplete) are listed with the reason in ``.skipped`` and logged as warnings; keys whose seeds were
        all skipped are absent.

    Raises
    ------
    FileNotFoundError
        If ``sweep_dir`` is not a directory.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory not found: {root}")
    groups: dict[str, list[tuple[int, Path]]] = {}

    def seed_dirs(d: Path) -> list[tuple[int, Path]]:
        out = []
        for c in d.iterdir():
            m = _SEED_DIR.match(c.name)
            if m and c.is_dir():
                out.append((int(m[1]), c))
        return sorted(out)

    for label_dir in sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
    ):
        direct = seed_dirs(label_dir)
        if direct:
            groups[label_dir.name] = direct
        subs = [c for c in label_dir.iterdir() if c.is_dir() and not c.name.startswith(".")]
        for sub in sorted(subs, key=lambda p: _natural_key(p.name)):
            if _SEED_DIR.match(sub.name):
                continue
            nested = seed_dirs(sub)
            if nested:
                groups[f"{label_dir.name}/{sub.name}"] = nested

    sweep = Sweep()
    for key, dirs in groups.items():
        loaded: list[tuple[int, Path, list[dict]]] = []
        for seed, run_dir in dirs:
            rows, reason = _load_seed(run_dir, allow_incomplete=allow_incomplete)
            if rows is None:
                sweep.skipped.append((str(run_dir), reason))
                continue
            loaded.append((seed, run_dir, rows))
        if loaded and not allow_incomplete:
            last = max(rows[-1]["round"] for _, _, rows in loaded)
            kept = []
            for seed, run_dir, rows in loaded:
                if rows[-1]["round"] < last:
                    sweep.skipped.append((str(run_dir), f"incomplete: {rows[-1]['round']} of {last} rounds"))
                else:
                    kept.append((seed, run_dir, rows))
            loaded = kept
        if loaded:
            sweep[key] = [rows for _, _, rows in loaded]
            sweep.seeds[key] = [seed for seed, _, _ in loaded]
            sweep.run_dirs[key] = [run_dir for _, run_dir, _ in loaded]
    for run_dir, reason in sweep.skipped:
        log.warning("skipped %s: %s", run_dir, reason)
    return sweep
