"""Experiments on top of both apps: the in-process runner (Ray), sweeps, presets, the CLI and reports."""
