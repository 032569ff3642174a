"""scripts/run_local.sh and scripts/check_run_config.py: a bad run config fails before Flower starts.

Fast: nothing here starts a SuperLink (the script would write ``$FLWR_HOME/superlink.log`` and ``config.toml``
first; both stay absent).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "scripts" / "check_run_config.py"


def run_local(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "VENV_BIN": str(Path(sys.executable).parent)}
    # A 60 s limit: before the check, a bad key failed only after the SuperLink started and the run was submitted.
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "run_local.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_run_local_refuses_a_bad_key_before_starting_flower(tmp_path):
    proc = run_local(tmp_path, "--run-config", "num-server-rounds=5 nosuch=1")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("check_run_config.py: error: run config: unknown config key(s): 'nosuch'"), err
    assert "\n" not in err
    assert (
        not (tmp_path / "flwr" / "superlink.log").exists()
        and not (tmp_path / "flwr" / "config.toml").exists()
    )


@pytest.fixture(scope="module")
def check_main():
    """scripts/check_run_config.py's main, loaded in-process (a subprocess would pay for importing torch)."""
    spec = importlib.util.spec_from_file_location("check_run_config", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-c", "compressor='nosuch'"], "config key 'compressor'"),
        (["--run-config", "seed=x y"], "invalid format"),
        (["--run-config", "a=1", "--run-config", "x.toml"], "TOML files cannot be passed alongside"),
        (["--run-config=topk-ratio=2.0"], "topk-ratio"),
    ],
)
def test_check_answers_a_bad_override_in_one_line(check_main, capsys, args, message):
    assert check_main([str(ROOT), "--stream", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("check_run_config.py: error: run config:") and message in err and "\n" not in err, (
        err
    )


def test_check_accepts_good_overrides_in_flwr_order_and_reads_pyproject(check_main, tmp_path, capsys):
    assert check_main([str(ROOT)]) == 0
    assert (
        check_main(
            [str(ROOT), "--stream", "-c", "num-server-rounds=5", "--run-config=seed=3 compressor='qsgd'"]
        )
        == 0
    )
    assert (
        check_main([str(ROOT), "-c", "compressor='nosuch'", "-c", "compressor='topk'"]) == 0
    )  # the later wins
    assert capsys.readouterr().err == ""
    # A bad value in pyproject's own table is found too, and named as coming from there.
    good = (ROOT / "pyproject.toml").read_text()
    bad = good.replace('compressor = "topk"', 'compressor = "nosuch"', 1)
    assert bad != good
    (tmp_path / "pyproject.toml").write_text(bad)
    assert check_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "[tool.flwr.app.config]" in err and "'compressor'" in err
    assert check_main([str(tmp_path / "missing")]) == 2
    assert "pyproject.toml" in capsys.readouterr().err


def test_the_script_passes_every_run_config_to_the_check():
    text = (ROOT / "scripts" / "run_local.sh").read_text()
    check_line = next(
        line for line in text.splitlines() if "check_run_config.py" in line and "python" in line
    )
    assert '"$@"' in check_line and '"$RUN_CONFIG"' in check_line
    assert text.index("check_run_config.py . ") < text.index("flower-superlink --insecure")
