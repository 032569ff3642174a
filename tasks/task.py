"""The learning task both sides build from the config: data, the client's partition, the model, the device.

Data sets and partitions are immutable and cached per process (Ray reuses worker processes across virtual
clients, so each is loaded once rather than once per message). Nothing mutable is cached: client state lives in
Flower's ``context.state`` only.

With ``validation-fraction`` > 0, a seeded, stratified share of the training set is held out as a validation
split (:func:`load_data` returns it as ``val_x``/``val_y``) before the partitioners see the training set, so no
client ever holds a validation example, and the server and every client derive the same split from the run
config and seed alone.

A client that trains on its own data file (``tasks.local_data``) needs only the task's shape to build the model:
:func:`task_shape` knows it for the built-in data sets without loading them, and the partitioners (which import
flwr-datasets, about 3 s per deployment ClientApp process) are imported only when a partition is computed.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from fl_compams.config import MNIST1D_DEFAULT_SAMPLES, DataConfig
from tasks.data import DataBundle, hold_out_validation, load_dataset
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

#: ``(input shape, number of classes)`` of the built-in data sets (``C x H x W`` images, ``C x L`` signals), so
#: that a client training on its own data file builds the model without the central data set (a test keeps
#: this equal to ``load_data``).
TASK_SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist1d": ((1, 40), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}


@functools.lru_cache(maxsize=4)
def _dataset(dataset: str, data_dir: str, download: bool, mnist1d_samples: int) -> DataBundle:
    return load_dataset(dataset, data_dir=data_dir, download=download, mnist1d_samples=mnist1d_samples)


@functools.lru_cache(maxsize=4)
def _split(
    dataset: str, data_dir: str, download: bool, mnist1d_samples: int, fraction: float, seed: int
) -> DataBundle:
    return hold_out_validation(_dataset(dataset, data_dir, download, mnist1d_samples), fraction, seed)


def _samples(data: DataConfig) -> int:
    """``mnist1d-samples`` where it matters, else the default (so other data sets share one cache entry)."""
    return data.mnist1d_samples if data.dataset == "mnist1d" else MNIST1D_DEFAULT_SAMPLES


def _base(data: DataConfig) -> DataBundle:
    """The configured data set without a validation split (cached)."""
    return _dataset(data.dataset, data.data_dir, data.download, _samples(data))


def load_data(data: DataConfig, seed: int) -> DataBundle:
    """The configured data set with its validation split (cached per process).

    ``train_x``/``train_y`` are the training examples the clients' partitions index (:func:`partitions`,
    :func:`client_data`), ``val_x``/``val_y`` the examples held out of them (``validation-fraction`` of each
    class, drawn from ``seed``; empty when the fraction is 0), ``test_x``/``test_y`` the fixed test set. Server and
    clients call it with the same config and seed, so they agree on every split.
    """
    if data.validation_fraction == 0.0:
        return _base(data)
    return _split(data.dataset, data.data_dir, data.download, _samples(data), data.validation_fraction, seed)


@functools.lru_cache(maxsize=16)
def _partitions(data: DataConfig, num_partitions: int, seed: int) -> tuple[np.ndarray, ...]:
    from tasks.partition import partition_indices  # imports flwr-datasets: only when needed

    bundle = load_data(data, seed=seed)
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
    """Index arrays of every client's share of the training set (deterministic for the seed).

    The indices point into ``load_data(data, seed=seed).train_x``: the training set without the validation
    split, so no partition holds a validation example.
    """
    return _partitions(data, num_partitions, seed)


def client_data(
    data: DataConfig, partition_id: int, num_partitions: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training examples of one client, on ``device``."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    bundle = load_data(data, seed=seed)
    idx = torch.from_numpy(partitions(data, num_partitions, seed)[partition_id])
    return bundle.train_x[idx].to(device), bundle.train_y[idx].to(device)


def make_model(data: DataConfig, bundle: DataBundle, seed: int) -> torch.nn.Module:
    """The configured model with a deterministic initialisation for ``seed`` (global RNG left untouched)."""
    name = default_model_for(data.dataset) if data.model == "auto" else data.model
    return build_model(name, bundle.num_classes, bundle.input_shape, seed=seed)


def task_shape(data: DataConfig) -> tuple[tuple[int, ...], int]:
    """``(input shape, number of classes)`` of the configured data set, without loading it when it is built in."""
    if data.dataset in TASK_SHAPES:
        return TASK_SHAPES[data.dataset]
    bundle = _base(data)
    return bundle.input_shape, bundle.num_classes


def model_for_task(data: DataConfig, seed: int) -> torch.nn.Module:
    """The configured model, built from :func:`task_shape` (the same model and initialisation as :func:`make_model`)."""
    input_shape, num_classes = task_shape(data)
    name = default_model_for(data.dataset) if data.model == "auto" else data.model
    return build_model(name, num_classes, input_shape, seed=seed)


def resolve_device(name: str, *, deterministic: bool = True) -> torch.device:
    """``auto`` = CUDA when available, else CPU; ``cuda`` without a GPU is an error that says so.

    On CUDA with ``deterministic`` (the ``deterministic`` config key, on by default), torch is switched to its
    deterministic kernels (``torch.use_deterministic_algorithms``; e.g. ``index_add_`` and convolution
    backward otherwise use float atomics whose order varies, so two runs with one seed drift apart within a
    few rounds) and cuDNN autotuning is off. An op without a deterministic kernel warns instead of failing:
    such a run may not repeat exactly. The switch is process-wide, which is what a node or a Ray worker
    running one run's clients wants. ``deterministic = false`` restores torch's default, faster kernels.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but no CUDA device is available; use device = 'auto' or 'cpu'")
    device = torch.device(name)
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace to be deterministic; read when its first handle is created
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not deterministic
    return device
