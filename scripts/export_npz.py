"""Write partitions of the central data set as ``.npz`` data files for SuperNodes (node config ``data-file``).

    python scripts/export_npz.py OUT_DIR --num-partitions 2 [--run-config "dataset='digits' seed=0 ..."]

Writes ``OUT_DIR/partition-<i>.npz`` with ``x`` (float32, N x C x H x W, or N x C x L for mnist1d, preprocessed
like the data set) and ``y`` (int64), the exact examples the simulation gives partition ``i`` for that run config
(never the validation split), so a deployment whose SuperNodes read these files trains on the same data as a
simulation. It is also a template for preparing a
node's own data in the format ``tasks.local_data`` reads.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import numpy as np
import torch
import typer
from flwr.common.config import parse_config_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_compams.config import parse_config
from fl_compams.errors import ConfigError
from simulations.cli_base import UserError, new_app, run_app
from tasks.task import client_data

app = new_app(__doc__.split("\n\n")[0])


@app.command()
def export_npz(
    out_dir: Annotated[Path, typer.Argument(show_default=False)],
    num_partitions: Annotated[int, typer.Option(min=1, show_default=False, help="number of data files")],
    run_config: Annotated[
        str,
        typer.Option(
            help="run-config keys that decide the split, as for flwr run (TOML values): dataset, seed, "
            "partitioner, ..."
        ),
    ] = "",
) -> int:
    """Write OUT_DIR/partition-<i>.npz for i = 0 .. NUM_PARTITIONS - 1."""
    try:
        overrides = parse_config_args([run_config]) if run_config.strip() else {}  # flwr's own parser
        cfg = parse_config(overrides)
    except (ConfigError, click.ClickException) as e:  # flwr's parser raises ClickException for bad TOML
        raise UserError(
            f"--run-config: {e.format_message() if isinstance(e, click.ClickException) else e}"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    for pid in range(num_partitions):
        x, y = client_data(cfg.data, pid, num_partitions, cfg.seed, torch.device("cpu"))
        path = out_dir / f"partition-{pid}.npz"
        np.savez(path, x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64))
        print(f"{path}: {x.shape[0]} examples, x {tuple(x.shape)} float32, y int64")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and write one file per partition; the exit code."""
    return run_app(app, argv, "export_npz.py")


if __name__ == "__main__":
    sys.exit(main())
