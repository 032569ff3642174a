"""Load a sweep of run directories and plot it (learning curves, x–y summaries).

A sweep directory is laid out as::

    <sweep_dir>/<method-label>/seed-<s>/            config.json, metrics.jsonl
    <sweep_dir>/<method-label>/<axis>-<value>/seed-<s>/

:func:`load_sweep` turns it into ``{key: [rows of seed s0, rows of seed s1, ...]}`` with ``key`` either
``"<method-label>"`` or ``"<method-label>/<axis>-<value>"``. Everything else here is a pure function of that
mapping (a plain ``dict`` built by hand works too).

Matplotlib is used through :class:`matplotlib.figure.Figure` and the Agg canvas only, never ``pyplot``, so
importing this module needs no display and changes no global backend.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter
from PIL import Image

from simulations.tables import _AXIS_DIR, parse_key
from strategies.results import read_metrics

__all__ = [
    "LINESTYLES",
    "MARKERS",
    "OKABE_ITO",
    "Sweep",
    "load_sweep",
    "parse_key",
    "plot_curves",
    "plot_xy",
    "series_on_grid",
    "style",
]

log = logging.getLogger(__name__)

#: Okabe–Ito colour-blind-safe palette, in the order styles are assigned.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
#: One marker per palette colour (curves stay distinguishable in grayscale).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: Line styles; 7 entries so that (colour, line style) pairs do not repeat for 56 series.
LINESTYLES: tuple[Any, ...] = (
    "-",
    "--",
    "-.",
    ":",
    (0, (5, 1)),
    (0, (3, 1, 1, 1, 1, 1)),
    (0, (1, 2, 5, 2)),
)

#: PNGs larger than this (bytes) are re-encoded with a 256-colour palette.
_PALETTE_ABOVE = 100_000

_SEED_DIR = re.compile(r"^seed-(\d+)$")

_LABELS = {
    "round": "round",
    "accuracy": "test accuracy",
    "loss": "test loss",
    "train_loss": "training loss",
    "uplink_bytes_cum": "cumulative uplink bytes",
    "downlink_bytes_cum": "cumulative downlink bytes",
    "probe_bytes_cum": "cumulative probe bytes",
    "uplink_bytes_per_client": "uplink bytes per client",
    "sigma_g2": r"measured $\sigma_g^2$",
    "sigma2": r"measured $\sigma^2$",
    "wall_s": "server wall time (s)",
}


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


def _read_rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)


def _natural_key(name: str) -> tuple:
    """Sort ``n-4`` before ``n-16`` and ``alpha-0.05`` before ``alpha-0.1``."""
    m = _AXIS_DIR.match(name)
    if m:
        return (0, m["axis"], float(m["value"]), name)
    return (1, name, 0.0, name)


def _load_seed(run_dir: Path, *, allow_incomplete: bool = False) -> tuple[list[dict] | None, str]:
    """Rows of one seed directory sorted by round, or ``None`` and why it was skipped."""
    if not (run_dir / "metrics.jsonl").is_file():
        return None, "no metrics.jsonl"
    try:
        rows = _read_rows(run_dir)
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


def style(index: int) -> dict[str, Any]:
    """Colour, marker and line style of the ``index``-th series.

    Colours and markers cycle together through 8 entries; the line style cycles through 7, so every
    series up to 56 has a distinct (colour, marker, line style) combination and any two of the first 7
    differ in all three.
    """
    return {
        "color": OKABE_ITO[index % len(OKABE_ITO)],
        "marker": MARKERS[index % len(MARKERS)],
        "linestyle": LINESTYLES[index % len(LINESTYLES)],
    }


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
    that seed had after spending that many bytes (the same rule as ``tables.summarize``'s accuracy at a
    budget). When all seeds have identical byte counts this is exactly the per-round mean.
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


def _markevery(n: int, index: int, count: int = 8) -> tuple[int, int] | None:
    """About ``count`` markers per line, staggered between series so they do not sit on top of each other."""
    if n <= count:
        return None
    step = max(1, n // count)
    return ((index * step // 3) % step, step)


def _new_figure(figsize: tuple[float, float] = (6.4, 4.0)) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, ax: Any, n_series: int, out_path: Path | str, dpi: int) -> Path:
    if n_series > 6:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    elif n_series:
        ax.legend(loc="best", fontsize="small")
    ax.grid(True, which="major", alpha=0.3, linewidth=0.6)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png", metadata={"Software": None}, bbox_inches="tight")
    data = buf.getvalue()
    if len(data) > _PALETTE_ABOVE:
        # Many noisy curves with translucent bands compress badly as RGBA; a 256-colour palette PNG of the
        # same pixels is typically 2-3x smaller and looks the same for line art.
        with Image.open(io.BytesIO(data)) as im:
            pal = im.convert("RGB").quantize(
                colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
            )
        buf = io.BytesIO()
        pal.save(buf, format="PNG", optimize=True)
        data = min(data, buf.getvalue(), key=len)
    out.write_bytes(data)
    return out


def _is_bytes(column: str) -> bool:
    return "bytes" in column


def plot_curves(
    sweep: Mapping[str, Sequence[Sequence[Mapping]]],
    *,
    x: str,
    y: str,
    out_path: Path | str,
    title: str = "",
    methods: Sequence[str] | None = None,
    logx: bool | None = None,
    logy: bool = False,
    labels: Mapping[str, str] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    dpi: int = 120,
) -> Path:
    """Plot ``y`` against ``x``: one line per method (mean over seeds) with a ±1 std band.

    Parameters
    ----------
    sweep : mapping
        ``{key: [rows of each seed]}`` as returned by :func:`load_sweep`.
    x : str
        ``"round"`` or a cumulative column such as ``"uplink_bytes_cum"``. For a column other than ``round``
        each seed is evaluated on a common grid at its last round with x <= the grid point (see
        :func:`series_on_grid`); lines connect the grid points.
    y : str
        Column to plot (``"accuracy"``, ``"loss"``, ``"train_loss"``, ``"sigma_g2"``, ...). Rows without a
        value (``train_loss`` at round 0, unprobed rounds) are ignored.
    out_path : path-like
        PNG to write (parent directories are created).
    title : str, default ""
        Axes title.
    methods : sequence of str, optional
        Keys to plot, in this order (styles are assigned by position in this list). Default: all keys.
    logx : bool, optional
        Log-scale x; default True when ``x`` is a byte column (points with x <= 0, e.g. round 0, are then
        dropped), False for ``round``.
    logy : bool, default False
        Log-scale y.
    labels : mapping, optional
        Legend text per key (default: the key).
    xlabel, ylabel : str, optional
        Axis labels (default: derived from the column names).
    dpi : int, default 120
        Resolution of the PNG.

    Returns
    -------
    pathlib.Path
        ``out_path``.

    Raises
    ------
    KeyError
        If a key of ``methods`` is not in ``sweep``.

    Notes
    -----
    The band (mean ± 1 sample std over seeds) is drawn only where at least 2 seeds exist. A method with no
    value of ``y`` is left out of the plot (with a log warning).
    """
    keys = list(sweep) if methods is None else list(methods)
    missing = [k for k in keys if k not in sweep]
    if missing:
        raise KeyError(f"methods not in sweep: {missing}; available: {list(sweep)}")
    if logx is None:
        logx = x != "round" and _is_bytes(x)
    labels = labels or {}

    fig = _new_figure()
    ax = fig.add_subplot()
    drawn = 0
    for i, key in enumerate(keys):
        grid, mean, std = series_on_grid(sweep[key], x=x, y=y, positive_x=bool(logx))
        if grid.size == 0:
            log.warning("plot %s: no values of %r against %r for %s", out_path, y, x, key)
            continue
        st = style(i)
        ax.plot(
            grid,
            mean,
            label=labels.get(key, key),
            color=st["color"],
            linestyle=st["linestyle"],
            marker=st["marker"],
            markevery=_markevery(grid.size, i),
            markersize=5,
            linewidth=1.4,
        )
        band = ~np.isnan(std)
        if band.any():
            # on a log axis a band reaching zero would fill the plot: its lower edge stops a decade below
            lower = np.maximum(mean - std, mean / 10) if logy else mean - std
            ax.fill_between(grid, lower, mean + std, where=band, color=st["color"], alpha=0.18, linewidth=0)
        drawn += 1
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if _is_bytes(x):
        ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
    ax.set_xlabel(xlabel if xlabel is not None else _LABELS.get(x, x))
    ax.set_ylabel(ylabel if ylabel is not None else _LABELS.get(y, y))
    if title:
        ax.set_title(title)
    return _finish(fig, ax, drawn, out_path, dpi)


def plot_xy(
    points: Mapping[str, tuple[Sequence[float], ...]],
    *,
    xlabel: str,
    ylabel: str,
    out_path: Path | str,
    title: str = "",
    logx: bool = False,
    logy: bool = False,
    sort_x: bool = True,
    dpi: int = 120,
) -> Path:
    """Plot one marker-and-line series per method, e.g. accuracy gap against measured σ_g².

    Parameters
    ----------
    points : mapping
        ``{series label: (xs, ys)}`` or ``{series label: (xs, ys, yerr)}``; ``yerr`` (± error bar half
        widths, entries may be ``None``) is optional. Points with a ``None`` or non-finite coordinate are
        dropped. Styles are assigned by position in the mapping.
    xlabel, ylabel : str
        Axis labels.
    out_path : path-like
        PNG to write (parent directories are created).
    title : str, default ""
        Axes title.
    logx, logy : bool, default False
        Log-scale the axes (non-positive coordinates are then dropped).
    sort_x : bool, default True
        Connect the points of each series in increasing x (otherwise in the given order).
    dpi : int, default 120
        Resolution of the PNG.

    Returns
    -------
    pathlib.Path
        ``out_path``.

    Raises
    ------
    ValueError
        If the coordinate lists of a series differ in length.
    """
    fig = _new_figure()
    ax = fig.add_subplot()
    drawn = 0
    for i, (name, series) in enumerate(points.items()):
        xs, ys = list(series[0]), list(series[1])
        errs = list(series[2]) if len(series) > 2 and series[2] is not None else [None] * len(xs)
        if not (len(xs) == len(ys) == len(errs)):
            raise ValueError(f"series {name!r}: x, y (and yerr) lengths differ")
        pts = []
        for xv, yv, ev in zip(xs, ys, errs, strict=True):
            if xv is None or yv is None or not (math.isfinite(xv) and math.isfinite(yv)):
                continue
            if (logx and xv <= 0) or (logy and yv <= 0):
                continue
            pts.append((float(xv), float(yv), float(ev) if ev is not None and math.isfinite(ev) else 0.0))
        if not pts:
            log.warning("plot %s: series %s has no finite points", out_path, name)
            continue
        if sort_x:
            pts.sort(key=lambda p: p[0])
        px, py, pe = (np.array(c) for c in zip(*pts, strict=True))
        st = style(i)
        kwargs = {
            "label": str(name),
            "color": st["color"],
            "linestyle": st["linestyle"],
            "marker": st["marker"],
            "markersize": 6,
            "linewidth": 1.4,
        }
        if np.any(pe > 0):
            ax.errorbar(px, py, yerr=pe, capsize=3, **kwargs)
        else:
            ax.plot(px, py, **kwargs)
        drawn += 1
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return _finish(fig, ax, drawn, out_path, dpi)
