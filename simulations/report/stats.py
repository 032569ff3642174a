"""Statistics over metrics rows: means and standard deviations over seeds, targets, budgets, smoothing.

Pure functions of row lists (one per seed, as :func:`simulations.report.load.load_sweep` returns them); no
files, no matplotlib. Standard deviations over seeds are sample standard deviations (``ddof=1``) and are
missing (``None``, or NaN in arrays) with fewer than 2 seeds. A value that cannot be computed is ``None``.

The training loss is smoothed in exactly one way everywhere (the tables' final loss and rounds-to-target, the
plotted curves, the report text): :func:`smoothed`, a trailing mean over :data:`SMOOTH_WINDOW` = 5 rounds. Five
is the window the committed report in ``docs/results/`` was produced with (its "train loss (last 5)" columns,
the final training losses quoted in ``docs/results/README.md`` and the rounds to the 0.5 target of the
``speedup`` preset: 54.3, 38.0, 30.7, 25.3 rounds), so those numbers regenerate unchanged. Before, the plots
alone used a 10-round window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "SMOOTH_WINDOW",
    "UPLOADS_COLUMN",
    "add_cumulative_traffic",
    "add_smoothed",
    "at_budget",
    "column_mean",
    "downlink_bytes_per_client",
    "finite",
    "first_reached",
    "pooled_mean",
    "sample_mean_std",
    "series_on_grid",
    "smoothed",
    "sorted_by_round",
    "theory_bytes_per_client",
    "uplink_bytes_per_client",
]

#: Trailing window (rounds) of the smoothed training loss, for tables, plots and the report text alike.
SMOOTH_WINDOW = 5

Rows = Sequence[Mapping[str, Any]]
T = TypeVar("T")


def finite(v: Any) -> float | None:
    """``v`` as a finite float, else ``None`` (bools are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def sample_mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (``ddof=1``) of the non-``None`` values; ``(None, None)`` if there are none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def pooled_mean(values: Iterable[float | None]) -> float | None:
    """Mean of the non-``None`` values, or ``None``."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def sorted_by_round(rows: Rows) -> list[Mapping[str, Any]]:
    """The rows in round order."""
    return sorted(rows, key=lambda r: r["round"])


def column_mean(seeds: Sequence[Rows], column: str, *, min_round: int = 0) -> float | None:
    """Mean of ``column`` over every row (round >= ``min_round``) of every seed that has a finite value."""
    return pooled_mean(finite(r.get(column)) for rows in seeds for r in rows if r["round"] >= min_round)


def uplink_bytes_per_client(seeds: Sequence[Rows]) -> float | None:
    """Measured uplink bytes per client per round: ``uplink_bytes_per_client`` over all rounds >= 1."""
    return column_mean(seeds, "uplink_bytes_per_client", min_round=1)


def downlink_bytes_per_client(seeds: Sequence[Rows]) -> float | None:
    """Measured downlink bytes per contacted client per round: ``downlink_bytes / (clients_ok + clients_failed)``.

    Every instruction sent counts, whether or not its reply came back (rounds >= 1 that sent something).
    """
    vals = []
    for rows in seeds:
        for r in rows:
            down = finite(r.get("downlink_bytes"))
            sent = (finite(r.get("clients_ok")) or 0) + (finite(r.get("clients_failed")) or 0)
            if r["round"] > 0 and down is not None and sent:
                vals.append(down / sent)
    return pooled_mean(vals)


#: Cumulative columns :func:`add_cumulative_traffic` adds: both directions' bytes, and the uploads so far.
TOTAL_BYTES_COLUMN = "total_bytes_cum"
UPLOADS_COLUMN = "uploads_cum"


def add_cumulative_traffic(sweep: Mapping[str, Sequence[Sequence[dict]]]) -> tuple[str, str]:
    """Store ``total_bytes_cum`` (uplink + downlink) and ``uploads_cum`` in every row; return their names.

    An upload is a reply that carried a payload: ``clients_ok`` minus the replies that were skips
    (``clients_skipped``, LAQ's lazy replies; 0 for algorithms that never skip).
    """
    for seeds in sweep.values():
        for rows in seeds:
            uploads = 0.0
            for row in sorted_by_round(rows):
                up, down = finite(row.get("uplink_bytes_cum")), finite(row.get("downlink_bytes_cum"))
                row[TOTAL_BYTES_COLUMN] = None if up is None or down is None else up + down
                if row["round"] > 0:
                    uploads += (finite(row.get("clients_ok")) or 0) - (
                        finite(row.get("clients_skipped")) or 0
                    )
                row[UPLOADS_COLUMN] = uploads
    return TOTAL_BYTES_COLUMN, UPLOADS_COLUMN


def theory_bytes_per_client(seeds: Sequence[Rows]) -> float | None:
    """``uplink_theory_bits / 8 / clients_ok`` over all rounds >= 1 with a successful client."""
    vals = []
    for rows in seeds:
        for r in rows:
            bits, ok = finite(r.get("uplink_theory_bits")), finite(r.get("clients_ok"))
            if r["round"] > 0 and bits is not None and ok:
                vals.append(bits / 8.0 / ok)
    return pooled_mean(vals)


def smoothed(rows: Rows, column: str = "train_loss", window: int = SMOOTH_WINDOW) -> list[tuple[int, float]]:
    """Trailing mean of ``column`` over the last ``window`` rounds that have a value.

    Parameters
    ----------
    rows : sequence of mapping
        Metrics rows of one seed.
    column : str, default "train_loss"
        Column to smooth; rows where it is ``None`` or missing (round 0) are skipped.
    window : int, default SMOOTH_WINDOW (5)
        Window length; the first ``window - 1`` values average over the rounds available so far.

    Returns
    -------
    list of (int, float)
        ``(round, smoothed value)`` for every round with a value, in round order.
    """
    pts = [(r["round"], v) for r in sorted_by_round(rows) if (v := finite(r.get(column))) is not None]
    out = []
    for i, (rnd, _) in enumerate(pts):
        win = [v for _, v in pts[max(0, i - window + 1) : i + 1]]
        out.append((rnd, sum(win) / len(win)))
    return out


def add_smoothed(sweep: Mapping[str, Sequence[Sequence[dict]]], column: str = "train_loss") -> str:
    """Store :func:`smoothed` ``column`` in every row of the sweep as ``<column>_smooth`` and return that name.

    Rows without a value of ``column`` get ``None`` (plots skip them), so a curve of ``<column>_smooth`` is
    exactly the series the tables summarise.
    """
    name = f"{column}_smooth"
    for seeds in sweep.values():
        for rows in seeds:
            by_round = dict(smoothed(rows, column))
            for row in rows:
                row[name] = by_round.get(row["round"])
    return name


def first_reached(
    points: Iterable[tuple[T, float | None]], target: float, *, below: bool = False
) -> T | None:
    """The first ``where`` of ``(where, value)`` pairs whose value is ``>= target`` (``<= target`` with ``below``).

    ``where`` is a round (``first_reached(smoothed(rows), 0.5, below=True)``) or a row; ``None`` values are
    skipped, and ``None`` is returned if no value reaches the target (equality reaches it).
    """
    for rnd, v in points:
        if v is not None and (v <= target if below else v >= target):
            return rnd
    return None


def at_budget(rows: Rows, budget_bytes: float) -> Mapping[str, Any] | None:
    """The last row whose ``uplink_bytes_cum <= budget_bytes`` (round 0 spends nothing), or ``None``."""
    within = [r for r in rows if (b := finite(r.get("uplink_bytes_cum"))) is not None and b <= budget_bytes]
    return within[-1] if within else None


def _points(rows: Sequence[Mapping], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of the rows where both are present and finite."""
    xs, ys = [], []
    for r in rows:
        xv, yv = r.get(x), r.get(y)
        if (
            isinstance(xv, int | float)
            and isinstance(yv, int | float)
            and math.isfinite(xv)
            and math.isfinite(yv)
        ):
            xs.append(float(xv))
            ys.append(float(yv))
    return np.asarray(xs), np.asarray(ys)


def series_on_grid(
    seeds: Sequence[Sequence[Mapping]], *, x: str, y: str, positive_x: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and standard deviation over seeds of column ``y`` as a function of column ``x``.

    Parameters
    ----------
    seeds : sequence of row lists
        One list of metrics rows per seed.
    x : str
        ``"round"`` or a non-decreasing column such as ``"uplink_bytes_cum"``.
    y : str
        Any numeric column; rows where it is missing or ``None`` are ignored.
    positive_x : bool, default False
        Drop points with ``x <= 0`` first (for a log-scaled x axis).

    Returns
    -------
    grid, mean, std : numpy.ndarray
        ``std`` is the sample standard deviation (``ddof=1``) and is NaN where fewer than 2 seeds exist.

    Notes
    -----
    For ``x == "round"`` the grid is the rounds at which every seed has a value of ``y``.

    For any other ``x`` the seeds are put on a common grid: the union of all seeds' x values inside the
    range that every seed covers (from the largest first x to the smallest last x, no extrapolation). Each
    seed's value at a grid point is its ``y`` at its **last round with x <= the grid point** — the model
    that seed had after spending that many bytes (the same rule as :func:`at_budget`). When all seeds have
    identical byte counts this is exactly the per-round mean.
    """
    per_seed = []
    for rows in seeds:
        xs, ys = _points(rows, x, y)
        if x == "round":
            order = np.argsort(xs, kind="stable")
            xs, ys = xs[order], ys[order]
        if positive_x:
            keep = xs > 0
            xs, ys = xs[keep], ys[keep]
        if xs.size == 0:
            return np.empty(0), np.empty(0), np.empty(0)
        per_seed.append((xs, ys))
    if not per_seed:
        return np.empty(0), np.empty(0), np.empty(0)

    if x == "round":
        common = set(per_seed[0][0].tolist())
        for xs, _ in per_seed[1:]:
            common &= set(xs.tolist())
        grid = np.array(sorted(common), dtype=float)
        values = np.stack([ys[np.searchsorted(xs, grid)] for xs, ys in per_seed]) if grid.size else None
    else:
        for xs, _ in per_seed:
            if np.any(np.diff(xs) < 0):
                raise ValueError(f"column {x!r} is not non-decreasing over rounds; cannot use it as x")
        lo = max(xs[0] for xs, _ in per_seed)
        hi = min(xs[-1] for xs, _ in per_seed)
        allx = np.unique(np.concatenate([xs for xs, _ in per_seed]))
        grid = allx[(allx >= lo) & (allx <= hi)]
        values = (
            np.stack([ys[np.searchsorted(xs, grid, side="right") - 1] for xs, ys in per_seed])
            if grid.size
            else None
        )
    if values is None:
        return np.empty(0), np.empty(0), np.empty(0)
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if values.shape[0] >= 2 else np.full(grid.shape, np.nan)
    return grid, mean, std
