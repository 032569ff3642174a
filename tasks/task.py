"""The learning task both sides build from the config: data, the client's partition, the model, the device.

Data sets and partitions are immutable and cached per process (Ray reuses worker processes across virtual
clients, so each is loaded once rather than once per message). Nothing mutable is cached: client state lives in
Flower's ``context.state`` only.

A client that trains on its own data file (``tasks.local_data``) needs only the task's shape to build the model:
:func:`task_shape` knows it for the built-in data sets without loading them, and the partitioners (which import
flwr-datasets, about 3 s per deployment ClientApp process) are imported only when a partition is computed.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from fl_compams.config import DataConfig
from tasks.data import DataBundle, load_dataset
from tasks.models import build_model, default_model_for

__all__ = [
    "TASK_SHAPES",
    "client_data",
    "load_data",
    "make_model",
    "model_for_task",
    "partitions",
    "resolve_device",
    "task_shape",
]

#: ``(input shape C x H x W, number of classes)`` of the built-in data sets, so that a client training on its
#: own data file builds the model without the central data set (a test keeps this equal to ``load_data``).
TASK_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}


@functools.lru_cache(maxsize=4)
def load_data(dataset: str, data_dir: str, download: bool) -> DataBundle:
    """The data set (cached per process)."""
    return load_dataset(dataset, data_dir=data_dir, download=download)


@functools.lru_cache(maxsize=16)
def _partitions(data: DataConfig, num_partitions: int, seed: int) -> tuple[np.ndarray, ...]:
    from tasks.partition import partition_indices  # imports flwr-datasets: only when needed

    bundle = load_data(data.dataset, data.data_dir, data.download)
    parts = partition_indices(
        bundle.train_y.numpy(),
        num_partitions,
        partitioner=data.partitioner,
        alpha=data.dirichlet_alpha,
        seed=seed,
        min_partition_size=data.min_partition_size,
    )
    return tuple(parts)


def partitions(data: DataConfig, num_partitions: int, seed: int) -> tuple[np.ndarray, ...]:
    """Index arrays of every client's share of the training set (deterministic for the seed)."""
    return _partitions(data, num_partitions, seed)


def client_data(
    data: DataConfig, partition_id: int, num_partitions: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training examples of one client, on ``device``."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    bundle = load_data(data.dataset, data.data_dir, data.download)
    idx = torch.from_numpy(partitions(data, num_partitions, seed)[partition_id])
    return bundle.train_x[idx].to(device), bundle.train_y[idx].to(device)


def make_model(data: DataConfig, bundle: DataBundle, seed: int) -> torch.nn.Module:
    """The configured model with a deterministic initialisation for ``seed`` (global RNG left untouched)."""
    name = default_model_for(data.dataset) if data.model == "auto" else data.model
    return build_model(name, bundle.num_classes, bundle.input_shape, seed=seed)


def task_shape(data: DataConfig) -> tuple[tuple[int, int, int], int]:
    """``(input shape, number of classes)`` of the configured data set, without loading it when it is built in."""
    if data.dataset in TASK_SHAPES:
        return TASK_SHAPES[data.dataset]
    bundle = load_data(data.dataset, data.data_dir, data.download)
    return bundle.input_shape, bundle.num_classes


def model_for_task(data: DataConfig, seed: int) -> torch.nn.Module:
    """The configured model, built from :func:`task_shape` (the same model and initialisation as :func:`make_model`)."""
    input_shape, num_classes = task_shape(data)
    name = default_model_for(data.dataset) if data.model == "auto" else data.model
    return build_model(name, num_classes, input_shape, seed=seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU; ``cuda`` without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but no CUDA device is available; use device = 'auto' or 'cpu'")
    return torch.device(name)
