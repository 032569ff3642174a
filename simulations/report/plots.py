"""Plots of a sweep: learning curves (mean over seeds with a ± 1 std band) and x–y summaries.

Inputs are ``{key: [rows of each seed]}`` (see :func:`simulations.report.load.load_sweep`); the curves are
the means over seeds of :func:`simulations.report.stats.series_on_grid`. Styles use the Okabe–Ito
colour-blind-safe palette, with a distinct marker and line style per series.

Matplotlib is used through :class:`matplotlib.figure.Figure` and the Agg canvas only, never ``pyplot``, so
importing this module needs no display and changes no global backend.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter
from PIL import Image

from simulations.report.stats import series_on_grid

__all__ = ["LINESTYLES", "MARKERS", "OKABE_ITO", "plot_curves", "plot_xy", "style"]

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
    "total_bytes_cum": "cumulative bytes, uplink + downlink",
    "uploads_cum": "cumulative uploads (replies with a payload)",
}


def style(index: int) -> dict[str, Any]:
    """Colour, marker and line style of the ``index``-th series.

    Colours cycle through 8 entries; markers too, shifted by one at each pass through the colours, so no two of
    the first 64 series share both colour and marker (series 8 is orange with a square, series 0 orange with a
    circle). The line style cycles through 7, so any two of the first 7 differ in all three.
    """
    n = len(OKABE_ITO)
    return {
        "color": OKABE_ITO[index % n],
        "marker": MARKERS[(index + index // n) % len(MARKERS)],
        "linestyle": LINESTYLES[index % len(LINESTYLES)],
    }


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


def _is_accuracy(column: str) -> bool:
    return column.endswith("accuracy")


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
    zoom_accuracy: bool = True,
    target: float | None = None,
) -> Path:
    """Plot ``y`` against ``x``: one line per method (mean over seeds) with a ±1 std band.

    Parameters
    ----------
    sweep : mapping
        ``{key: [rows of each seed]}`` as returned by :func:`simulations.report.load.load_sweep`.
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
    zoom_accuracy : bool, default True
        For an accuracy column, limit the y axis to the range the lines cover over their second half (2
        points below the lowest, 1 above the highest): the early rounds leave the plot at the bottom.
    target : float, optional
        Draw a dashed horizontal line at this value (the target a table counts rounds or bytes to).

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
    tails: list[float] = []  # each line's values over its second half: where the y axis zooms for accuracy
    for i, key in enumerate(keys):
        grid, mean, std = series_on_grid(sweep[key], x=x, y=y, positive_x=bool(logx))
        if grid.size == 0:
            log.warning("plot %s: no values of %r against %r for %s", out_path, y, x, key)
            continue
        tails += [float(v) for v in mean[grid.size // 2 :] if np.isfinite(v)]
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
    if target is not None:
        tails.append(target)  # the target stays in view
    if zoom_accuracy and _is_accuracy(y) and tails:
        # a 0-1 axis hides the differences that matter (93-99 %): zoom on where the lines end up
        ax.set_ylim(max(0.0, min(tails) - 0.02), min(1.0, max(tails) + 0.01))
    if target is not None:
        ax.axhline(target, color="0.3", linestyle="--", linewidth=1.0, label=f"target {target:g}")
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
