"""Reports of sweeps: load result files, compute statistics over seeds, render tables and plots.

Modules, each built on the ones before it:

- :mod:`~simulations.report.load`: reads run directories and sweeps (the only module that reads result files);
- :mod:`~simulations.report.stats`: statistics over rows (means and stds over seeds, targets, the one
  training-loss smoothing, :data:`SMOOTH_WINDOW`);
- :mod:`~simulations.report.tables`: summary rows and markdown tables;
- :mod:`~simulations.report.plots`: PNG plots (colour-blind-safe, no display needed);
- :mod:`~simulations.report.write`: :func:`write_report`, a preset's README.md, plots and summary.json;
- :mod:`~simulations.report.run_status`: ``python -m simulations.report.run_status RUN_DIR``, one run's summary.

Import from the modules themselves: this package imports nothing, so ``run_status`` (which ``make run`` calls)
does not pay for matplotlib and scipy.
"""
