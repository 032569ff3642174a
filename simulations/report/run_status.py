"""Summarise one run directory (and, for `flwr run`, the run status); exit non-zero if the run failed.

python -m simulations.report.run_status RUN_DIR [--status-json "$(flwr ls CONN --format json)"] [--wall-s S]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from simulations.cli_base import UserError, new_app, run_app
from simulations.report.load import has_metrics, read_rows


def summary(run_dir: Path) -> dict:
    """Final accuracy, best accuracy, rounds and bytes of a run."""
    rows = [r for r in read_rows(run_dir) if r["round"] > 0]
    if not rows:
        raise SystemExit(f"{run_dir}: no training rounds in metrics.jsonl")
    last = rows[-1]
    return {
        "run_dir": str(run_dir),
        "rounds": last["round"],
        "final_accuracy": last["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rows),
        "uplink_bytes_per_client_per_round": last.get("uplink_bytes_per_client"),
        "uplink_theory_bytes_per_client_per_round": last.get("uplink_theory_bytes_per_client"),
        "uplink_bytes_total": last["uplink_bytes_cum"],
        "downlink_bytes_total": last["downlink_bytes_cum"],
        "clients_failed_total": sum(r["clients_failed"] for r in rows),
        "server_wall_s": last["wall_s"],
    }


app = new_app(__doc__.split("\n\n")[0])


@app.command()
def run_status(
    run_dir: Annotated[Path, typer.Argument(show_default=False)],
    status_json: Annotated[str, typer.Option(help="output of `flwr ls <connection> --format json`")] = "",
    wall_s: Annotated[float | None, typer.Option(help="wall time of the whole command")] = None,
) -> int:
    """Print RUN_DIR's summary as JSON; exit 1 if the run failed (flwr's status or no results)."""
    if status_json:
        try:
            status = json.loads(status_json)
        except json.JSONDecodeError as e:
            raise UserError(
                f"--status-json is not JSON ({e}): pass the output of `flwr ls ... --format json`"
            ) from None
        runs = status.get("runs", []) if isinstance(status, dict) else []
        latest = max(runs, key=lambda r: r.get("pending-at", "")) if runs else {}
        if latest and "failed" in str(latest.get("status", "")):
            print(f"flwr run failed: {json.dumps(latest)}", file=sys.stderr)
            return 1
    if not has_metrics(run_dir):
        print(f"no results at {run_dir}: the run failed before writing them", file=sys.stderr)
        return 1
    info = summary(run_dir)
    if wall_s is not None:
        info["command_wall_s"] = wall_s
    print(json.dumps(info, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: the exit code (2 for a usage mistake, one line on stderr)."""
    return run_app(app, argv, "run_status")


if __name__ == "__main__":
    sys.exit(main())
