"""Summarise one run directory (and, for `flwr run`, the run status); exit non-zero if the run failed.

python -m simulations.report.run_status RUN_DIR [--status-json "$(flwr ls CONN --format json)"] [--wall-s S]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--status-json", default="", help="output of `flwr ls <connection> --format json`")
    parser.add_argument("--wall-s", type=float, default=None, help="wall time of the whole command")
    args = parser.parse_args(argv)
    if args.status_json:
        status = json.loads(args.status_json)
        runs = status.get("runs", [])
        latest = max(runs, key=lambda r: r.get("pending-at", "")) if runs else {}
        if latest and "failed" in str(latest.get("status", "")):
            print(f"flwr run failed: {json.dumps(latest)}", file=sys.stderr)
            return 1
    if not has_metrics(args.run_dir):
        print(f"no results at {args.run_dir}: the run failed before writing them", file=sys.stderr)
        return 1
    info = summary(args.run_dir)
    if args.wall_s is not None:
        info["command_wall_s"] = args.wall_s
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
