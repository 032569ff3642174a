"""Split a training set over clients with flwr-datasets partitioners, and describe the split.

Both partitioners run on a tiny ``datasets.Dataset`` of ``{"label", "idx"}`` built from the label vector, and
the ``idx`` column of each partition is read back: the result is one index array into the training set per
client. The split is a pure function of ``(labels, num_partitions, partitioner, alpha, seed,
min_partition_size)``, so each client can recompute its own partition instead of receiving it (about 13 ms for
the 1,438 digits training labels and 10 partitions).

``"dirichlet"``
    :class:`flwr_datasets.partitioner.DirichletPartitioner` (Yurochkin et al., 2019, "Bayesian Nonparametric
    Federated Learning of Neural Networks", arXiv:1905.12022): for every class, the class's samples are divided
    over the clients in proportions drawn from ``Dirichlet(alpha)``; smaller ``alpha`` gives more skewed label
    histograms. The draw is repeated (up to 10 times) until every client has ``min_partition_size`` samples.
    ``self_balancing`` is off, so the proportions are the plain Dirichlet draws.
``"iid"``
    :class:`flwr_datasets.partitioner.IidPartitioner` on a seeded permutation of the samples. That partitioner
    cuts the data set into contiguous shards without shuffling, so the permutation (drawn with
    ``np.random.default_rng(seed)``) is what makes the shards IID.

Both return disjoint partitions that together cover every sample.

``"full"``
    Every client holds the whole training set (not a split): the homogeneous limit, where the heterogeneity
    term sigma_g^2 of COMP-AMS's Theorem 1 is exactly zero. Useful as a control for the sigma_g^2 probe.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

__all__ = ["PARTITIONERS", "partition_indices", "partition_stats"]

PARTITIONERS = ("dirichlet", "iid", "full")


def _validate_labels(labels: np.ndarray) -> np.ndarray:
    """Return ``labels`` as a 1-D ``int64`` array; raise ``ValueError`` if it is not one."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {arr.dtype}.")
    return arr.astype(np.int64, copy=False)


def _read_partitions(partitioner: Partitioner, dataset: datasets.Dataset, n: int) -> list[np.ndarray]:
    """Attach ``dataset`` to ``partitioner`` and read the ``idx`` column of each of the ``n`` partitions."""
    partitioner.dataset = dataset
    return [np.asarray(partitioner.load_partition(pid)["idx"].to_numpy(), dtype=np.int64) for pid in range(n)]


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Split the training set over ``num_partitions`` clients.

    Parameters
    ----------
    labels : np.ndarray
        Integer class label of every training sample (1-D).
    num_partitions : int
        Number of clients; ``1 <= num_partitions <= len(labels)``.
    partitioner : str, default "dirichlet"
        ``"dirichlet"`` (label skew controlled by ``alpha``), ``"iid"``, or ``"full"`` (every client gets all
        samples).
    alpha : float, default 0.5
        Dirichlet concentration (``> 0``); smaller means more heterogeneous clients. Checked but unused for
        ``"iid"``.
    seed : int, default 0
        Seed of the split; the same seed gives the same partitions.
    min_partition_size : int, default 10
        Every partition must hold at least this many samples. ``"dirichlet"`` redraws until it holds (and
        fails after 10 redraws); ``"iid"`` fails at once if ``len(labels) // num_partitions`` is smaller.

    Returns
    -------
    list of np.ndarray
        One ``int64`` index array into ``labels`` per client, in client order. The arrays are disjoint and
        together cover ``0 .. len(labels) - 1``; within an array the order is shuffled.

    Raises
    ------
    ValueError
        On an invalid argument, or if the minimum partition size cannot be met (the message says which knob
        to turn).
    """
    y = _validate_labels(labels)
    n = int(y.size)
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)):
        raise ValueError(f"num_partitions must be an int, got {num_partitions!r}.")
    if not 1 <= num_partitions <= n:
        raise ValueError(
            f"num_partitions must be between 1 and the number of training samples ({n}), got {num_partitions}."
        )
    if partitioner not in PARTITIONERS:
        raise ValueError(f"Unknown partitioner {partitioner!r}; choose one of {', '.join(PARTITIONERS)}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise ValueError(f"alpha (dirichlet-alpha) must be a number, got {alpha!r}.")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha (dirichlet-alpha) must be a finite number > 0, got {alpha!r}.")
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size must be >= 0, got {min_partition_size}.")
    num_partitions = int(num_partitions)

    if partitioner == "full":
        return [np.random.default_rng([seed, pid]).permutation(n) for pid in range(num_partitions)]

    if partitioner == "iid":
        if n // num_partitions < min_partition_size:
            raise ValueError(
                f"An IID split of {n} samples over {num_partitions} partitions gives partitions of "
                f"{n // num_partitions} samples, fewer than min-partition-size={min_partition_size}. "
                "Lower min-partition-size or use fewer partitions."
            )
        perm = np.random.default_rng(seed).permutation(n)
        ds = datasets.Dataset.from_dict({"label": y[perm], "idx": perm}).with_format("arrow")
        return _read_partitions(IidPartitioner(num_partitions=num_partitions), ds, num_partitions)

    # Arrow format: the partitioner's `np.array(dataset["label"])` then converts a pyarrow array in one go
    # instead of iterating rows (about 2x faster overall), and `idx` reads back without a Python loop.
    ds = datasets.Dataset.from_dict({"label": y, "idx": np.arange(n, dtype=np.int64)}).with_format("arrow")
    part = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=int(min_partition_size),
        self_balancing=False,
        shuffle=True,
        seed=int(seed),
    )
    with warnings.catch_warnings():
        # The partitioner warns on every redraw; the outcome (success or the ValueError below) is what matters.
        warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
        try:
            return _read_partitions(part, ds, num_partitions)
        except ValueError as exc:
            if "max number of attempts" not in str(exc):
                raise
            raise ValueError(
                f"The Dirichlet split (alpha={alpha}, seed={seed}) of {n} samples over {num_partitions} "
                f"partitions left a partition with fewer than min-partition-size={min_partition_size} samples "
                "in 11 draws. Lower min-partition-size, raise dirichlet-alpha, or use fewer partitions."
            ) from exc


def partition_stats(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> dict:
    """Summarise a split: sizes and per-partition label histograms.

    Parameters
    ----------
    labels : np.ndarray
        Integer class labels of the whole training set (1-D), each in ``[0, num_classes)``.
    parts : sequence of np.ndarray
        Index arrays into ``labels``, as returned by :func:`partition_indices`.
    num_classes : int
        Number of classes (length of each histogram).

    Returns
    -------
    dict
        ``{"num_partitions": int, "sizes": [int, ...], "label_histograms": [[int] * num_classes, ...]}``,
        plain Python ints (JSON-serialisable).

    Raises
    ------
    ValueError
        If a label is outside ``[0, num_classes)`` or an index is outside ``labels``.
    """
    y = _validate_labels(labels)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"labels range over [{int(y.min())}, {int(y.max())}], outside [0, {num_classes}); "
            "pass the data set's num_classes."
        )
    sizes: list[int] = []
    hists: list[list[int]] = []
    for i, p in enumerate(parts):
        idx = np.asarray(p)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"partition {i} must be a 1-D integer index array, got {idx.dtype} {idx.shape}.")
        if idx.size and (idx.min() < 0 or idx.max() >= y.size):
            raise ValueError(
                f"partition {i} has indices in [{int(idx.min())}, {int(idx.max())}], outside the "
                f"{y.size} labels; pass the labels the partition was computed from."
            )
        sizes.append(int(idx.size))
        hists.append([int(c) for c in np.bincount(y[idx], minlength=num_classes)])
    return {"num_partitions": len(sizes), "sizes": sizes, "label_histograms": hists}
