"""Write partitions of the central data set as ``.npz`` data files for SuperNodes (node config ``data-file``).

    python scripts/export_npz.py OUT_DIR --num-partitions 2 [--run-config "dataset='digits' seed=0 ..."]

Writes ``OUT_DIR/partition-<i>.npz`` with ``x`` (float32, N x C x H x W, or N x C x L for mnist1d, preprocessed
like the data set) and ``y`` (int64), the exact examples the simulation gives partition ``i`` for that run config
(never the validation split), so a deployment whose SuperNodes read these files trains on the same data as a
simulation. It is also a template for preparing a
node's own data in the format ``tasks.local_data`` reads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from flwr.common.config import parse_config_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_compams.config import parse_config
from tasks.task import client_data


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and write one file per partition."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-partitions", type=int, required=True)
    parser.add_argument(
        "--run-config",
        default="",
        help="run-config keys that decide the split, as for flwr run (TOML values): dataset, seed, partitioner, ...",
    )
    args = parser.parse_args(argv)
    overrides = parse_config_args([args.run_config]) if args.run_config.strip() else {}  # flwr's own parser
    cfg = parse_config(overrides)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for pid in range(args.num_partitions):
        x, y = client_data(cfg.data, pid, args.num_partitions, cfg.seed, torch.device("cpu"))
        path = args.out_dir / f"partition-{pid}.npz"
        np.savez(path, x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64))
        print(f"{path}: {x.shape[0]} examples, x {tuple(x.shape)} float32, y int64")
    return 0


if __name__ == "__main__":
    sys.exit(main())
