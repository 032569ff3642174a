"""Where a client's training examples come from: a partition of the central data set, or its own data file.

A SuperNode chooses with its ``--node-config``:

``partition-id=<i> num-partitions=<n>``
    Central-data-set mode (simulations, and deployments that replay a simulation): the client recomputes
    partition ``i`` of the configured data set's training split, exactly as the simulation does.
``data-file='/path/to/train.npz'``
    The node's own data: an ``.npz`` file (``numpy.savez``) with two arrays,

    - ``x``: the inputs, floating point (stored as float32, or float16/float64 which are converted),
      ``N x C x H x W`` images or ``N x C x L`` signals, or without the channel axis (``N x H x W``,
      ``N x L``) for one-channel inputs (a channel axis is added). Each example must have the configured data
      set's shape (digits: 1 x 8 x 8; MNIST-1D: 1 x 40; MNIST and Fashion-MNIST: 1 x 28 x 28; CIFAR-10:
      3 x 32 x 32) and be preprocessed the way that data set is (the server evaluates on it);
    - ``y``: the labels, a 1-D integer array (int64 preferred) with one label per example, in
      ``[0, num_classes)``.

    ``data-file`` takes precedence over ``partition-id``; a given ``partition-id`` then only seeds the node's
    randomness (minibatch order). The file is read with ``allow_pickle=False``: object arrays are rejected.

Anything wrong with the file raises :class:`LocalDataError` naming the file and the problem. Raised inside the
ClientApp, it turns that node's reply into an error reply: the server drops it and the round goes on with the
other nodes.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_compams import nodes
from fl_compams.config import DataConfig

__all__ = ["DATA_FILE_KEY", "LocalDataError", "NodeData", "load_npz", "node_data"]

DATA_FILE_KEY = nodes.DATA_FILE_KEY
PARTITION_ID_KEY = nodes.PARTITION_ID_KEY
NUM_PARTITIONS_KEY = "num-partitions"


class LocalDataError(ValueError):
    """A node's data file is missing, unreadable, or does not fit the task (shape, dtype, labels)."""


@dataclass(frozen=True, eq=False)
class NodeData:
    """A node's training examples.

    Attributes
    ----------
    x, y : torch.Tensor
        ``float32`` inputs ``N x *input_shape`` and ``int64`` labels, on the requested device.
    seed_id : int
        The integer that, with the run seed and the round, seeds this node's randomness.
    source : str
        ``"partition <i>/<n>"`` or ``"file <path>"`` (for messages).
    """

    x: torch.Tensor
    y: torch.Tensor
    seed_id: int
    source: str


def _fail(path: Path, problem: str) -> LocalDataError:
    return LocalDataError(f"data-file {str(path)!r}: {problem}")


def load_npz(
    path: str | Path, input_shape: tuple[int, ...], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate a node's ``.npz`` data file.

    Parameters
    ----------
    path
        The file (``~`` is expanded).
    input_shape
        Shape of one example the model expects, channels first (``(C, H, W)``, or ``(C, L)`` for signals).
    num_classes
        Labels must lie in ``[0, num_classes)``.

    Returns
    -------
    x, y : numpy.ndarray
        ``float32`` inputs ``N x *input_shape`` (C-contiguous) and ``int64`` labels of length ``N``.

    Raises
    ------
    LocalDataError
        If the file is missing or unreadable, lacks ``x`` or ``y``, or its arrays have the wrong dtype, shape,
        non-finite values, or labels out of range. The message names the file and what is wrong.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise _fail(path, "no such file" if not path.exists() else "not a regular file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise _fail(path, "is a single .npy array, expected an .npz archive with arrays 'x' and 'y'")
        with loaded as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise _fail(path, f"missing array(s) {missing}; found {sorted(npz.files)}")
            x, y = npz["x"], npz["y"]
    except LocalDataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # includes pickled object arrays
        raise _fail(
            path, f"cannot be read as an .npz archive without pickle ({type(err).__name__}: {err})"
        ) from err
    return _check_x(path, x, input_shape), _check_y(path, y, num_classes, len(x))


def _check_x(path: Path, x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    if x.dtype.kind != "f":
        raise _fail(
            path,
            f"'x' has dtype {x.dtype}, expected float32 images preprocessed like the configured data set "
            "(e.g. x = ((pixels / 255) - mean) / std, saved with x.astype(np.float32))",
        )
    rank = 1 + len(input_shape)
    if x.ndim == rank - 1 and input_shape[0] == 1:
        x = x[:, None]
    if x.ndim != rank or tuple(x.shape[1:]) != tuple(input_shape):
        expected = "N x " + " x ".join(map(str, input_shape))
        if input_shape[0] == 1:
            expected += " (or N x " + " x ".join(map(str, input_shape[1:])) + ")"
        hint = ""
        if rank >= 3 and x.ndim == rank and tuple(x.shape[1:]) == (*input_shape[1:], input_shape[0]):
            layout = {4: "N x H x W x C", 3: "N x L x C"}.get(rank, "channels last")
            hint = (
                f"; it looks like {layout}: transpose it with x.transpose{(0, rank - 1, *range(1, rank - 1))}"
            )
        raise _fail(path, f"'x' has shape {tuple(x.shape)}, expected {expected}{hint}")
    if x.shape[0] == 0:
        raise _fail(path, "'x' holds no examples")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise _fail(path, "'x' contains NaN or infinite values")
    return x


def _check_y(path: Path, y: np.ndarray, num_classes: int, n: int) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise _fail(path, f"'y' has dtype {y.dtype}, expected integer labels (int64)")
    if y.ndim != 1 or y.shape[0] != n:
        raise _fail(path, f"'y' has shape {tuple(y.shape)}, expected ({n},): one label per image in 'x'")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise _fail(path, f"'y' has labels in [{lo}, {hi}], outside [0, {num_classes}) for this task")
    return y.astype(np.int64)


def node_data(
    data: DataConfig,
    node_config: Mapping[str, Any],
    seed: int,
    device: torch.device,
    input_shape: tuple[int, ...],
    num_classes: int,
) -> NodeData:
    """A node's training examples, from ``data-file`` or from its partition of the central data set.

    Parameters
    ----------
    data
        The data part of the run config (data set, partitioner).
    node_config
        The SuperNode's ``--node-config`` (``context.node_config``).
    seed
        The run seed (the central partition depends on it).
    device
        Where the tensors go.
    input_shape, num_classes
        What the task's model expects; a data file must match them.

    Raises
    ------
    LocalDataError
        If ``data-file`` is set but unusable, or if neither ``data-file`` nor ``partition-id`` and
        ``num-partitions`` are set.
    """
    seed_id = nodes.seed_id(node_config)
    data_file = node_config.get(DATA_FILE_KEY)
    if data_file:
        x, y = load_npz(str(data_file), input_shape, num_classes)
        return NodeData(
            torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), seed_id, f"file {data_file}"
        )
    if PARTITION_ID_KEY not in node_config or NUM_PARTITIONS_KEY not in node_config:
        raise LocalDataError(
            "this SuperNode has no data: start it with --node-config \"data-file='/path/to/train.npz'\" "
            '(its own data) or "partition-id=<i> num-partitions=<n>" (a partition of the central data set); '
            f"got node config {dict(node_config)}"
        )
    from tasks.task import client_data  # the partitioners are only imported when needed

    pid, n_parts = int(node_config[PARTITION_ID_KEY]), int(node_config[NUM_PARTITIONS_KEY])
    x, y = client_data(data, pid, n_parts, seed, device)
    return NodeData(x, y, seed_id, f"partition {pid}/{n_parts}")
