"""Every command-line entry point (typer): a user mistake is one line on stderr and exit code 2, never a traceback.

The four entry points: ``fl-compams`` (simulations.cli), ``python -m simulations.report.run_status``,
``scripts/make_node_keys.py`` and ``scripts/export_npz.py``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from simulations import cli
from simulations.report import run_status
from simulations.sweep import available_presets

ROOT = Path(__file__).resolve().parents[2]


def script(name: str):
    """A module of scripts/ (not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MISTAKES = [
    # (entry point, arguments, a word the one-line message must contain)
    ("cli", ["reproduce", "nosuch"], "unknown preset 'nosuch'"),
    ("cli", ["report", "nosuch"], "unknown preset 'nosuch'"),
    ("cli", ["reproduce", "speedup", "--seeds", "zero"], "--seeds"),
    ("cli", ["reproduce", "speedup", "--dataset", "nosuch", "--dry-run"], "config key 'dataset'"),
    ("cli", ["reproduce", "speedup", "--rounds", "ten"], "--rounds"),
    ("cli", ["reproduce", "speedup", "--bogus"], "--bogus"),
    ("cli", ["nosuchcommand"], "nosuchcommand"),
    ("cli", ["reproduce"], "PRESET"),
    ("run_status", [], "RUN_DIR"),
    ("run_status", ["run", "--status-json", "{not json"], "--status-json"),
    ("run_status", ["run", "--wall-s", "soon"], "--wall-s"),
    ("make_node_keys", ["keys"], "NAME"),
    ("make_node_keys", ["keys", "edge-0", "edge-0"], "twice"),
    ("export_npz", ["data"], "--num-partitions"),
    ("export_npz", ["data", "--num-partitions", "0"], "--num-partitions"),
    (
        "export_npz",
        ["data", "--num-partitions", "2", "--run-config", "nosuch=1"],
        "unknown config key(s): 'nosuch'",
    ),
    ("export_npz", ["data", "--num-partitions", "2", "--run-config", "seed=x"], "invalid format"),
    ("export_npz", ["data", "--num-partitions", "2", "--run-config", "seed=-1"], "config key 'seed'"),
]


def entry_point(name: str):
    return {"cli": cli.main, "run_status": run_status.main}.get(name) or script(name).main


@pytest.mark.parametrize(
    ("name", "argv", "needle"), MISTAKES, ids=lambda v: " ".join(v) if isinstance(v, list) else v
)
def test_a_mistake_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, name, argv, needle):
    monkeypatch.chdir(tmp_path)  # relative paths (keys, data, run) land here, and nothing is written
    assert entry_point(name)(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err and needle in err, err
    assert err.startswith(f"{'fl-compams' if name == 'cli' else name}")
    assert not any(tmp_path.iterdir())


def test_help_lists_every_preset_and_option(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in available_presets():
        assert name in out
    for command in ("list", "reproduce", "report"):
        assert command in out
    assert cli.main(["reproduce", "--help"]) == 0
    out = capsys.readouterr().out
    for name in available_presets():
        assert name in out
    for option in (
        "--dataset",
        "--runs",
        "--out",
        "--seeds",
        "--rounds",
        "--data-dir",
        "--download",
        "--num-cpus",
    ):
        assert option in out
    assert cli.main(["list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == available_presets()


def test_the_console_script_answers_a_mistake_without_a_traceback():
    """What pip's ``fl-compams`` wrapper runs: ``sys.exit(<pyproject's [project.scripts] target>())``."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["fl-compams"]
    module, attr = target.split(":")
    code = f"import sys; from {module} import {attr}; sys.exit({attr}())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "reproduce", "nosuch"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("fl-compams: error:") and "\n" not in proc.stderr.strip(), (
        proc.stderr
    )
