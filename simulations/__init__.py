"""Experiments: data sets, partitioning, models, the in-process runner and result files."""
