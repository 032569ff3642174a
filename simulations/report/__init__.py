"""Reports of sweeps: load result files, compute statistics over seeds, render tables and plots.

Modules, each built on the ones before it:

- :mod:`~simulations.report.load`: reads run directories and sweeps (the only module that reads result files);
- :mod:`~simulations.report.stats`: statistics over rows (means and stds over seeds, targets, the one
  training-loss smoothing, :data:`SMOOTH_WINDOW`);
- :mod:`~simulations.report.tables`: summary rows and markdown tables;
- :mod:`~simulations.report.plots`: PNG plots (colour-blind-safe, no display needed);
- :mod:`~simulations.report.write`: :func:`write_report`, a preset's README.md, plots and summary.json;
- :mod:`~simulations.report.run_status`: ``python -m simulations.report.run_status RUN_DIR``, one run's summary.
"""

from simulations.report.load import Sweep, load_sweep, parse_key
from simulations.report.plots import LINESTYLES, MARKERS, OKABE_ITO, plot_curves, plot_xy, style
from simulations.report.stats import SMOOTH_WINDOW, add_smoothed, sample_mean_std, series_on_grid, smoothed
from simulations.report.tables import (
    REFERENCE_LABEL,
    default_columns,
    fmt_bytes,
    fmt_mean_std,
    mean_std,
    reached,
    summarize,
    to_markdown,
)
from simulations.report.write import write_report

__all__ = [
    "LINESTYLES",
    "MARKERS",
    "OKABE_ITO",
    "REFERENCE_LABEL",
    "SMOOTH_WINDOW",
    "Sweep",
    "add_smoothed",
    "default_columns",
    "fmt_bytes",
    "fmt_mean_std",
    "load_sweep",
    "mean_std",
    "parse_key",
    "plot_curves",
    "plot_xy",
    "reached",
    "sample_mean_std",
    "series_on_grid",
    "smoothed",
    "style",
    "summarize",
    "to_markdown",
    "write_report",
]
