"""sigma_g^2 of a data split, measured at a fixed reference model (a property of the split, not of a run).

The probe of a run (``probe-every``) measures sigma_g^2 at that run's own current model, so its value mixes the
split with how far training has got. Theorem 1 of Li, Karimi & Li bounds the gradient dissimilarity
``(1/n) sum_i ||grad f_i(theta) - grad f(theta)||^2 <= sigma_g^2`` over all theta; comparing splits at common
reference models (the initial model, a fixed trained checkpoint) isolates the split.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fl_compams.config import DataConfig
from tasks.task import client_data
from tasks.training import full_gradient

__all__ = ["SplitHeterogeneity", "split_sigma_g2"]


class SplitHeterogeneity(NamedTuple):
    """sigma_g^2 of a split at one model, and the pieces it is made of."""

    sigma_g2: float  # (1/n) sum_i ||grad f_i - grad f||^2, grad f = (1/n) sum_i grad f_i
    weighted_sigma_g2: float  # the same with grad f and the mean weighted by the clients' example counts
    mean_grad_sq_norm: float  # ||grad f||^2, the scale sigma_g^2 is measured against
    client_sizes: tuple[int, ...]


@torch.no_grad()
def _dissimilarity(grads: torch.Tensor, weights: torch.Tensor) -> tuple[float, torch.Tensor]:
    mean = (weights[:, None] * grads).sum(0)
    return float((weights * ((grads - mean) ** 2).sum(1)).sum()), mean


def split_sigma_g2(
    data: DataConfig,
    num_partitions: int,
    seed: int,
    model: torch.nn.Module,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> SplitHeterogeneity:
    """sigma_g^2 of the split ``(data, num_partitions, seed)`` at the weights ``model`` holds (left unchanged).

    Each client's full local gradient grad f_i is taken over its whole partition in eval mode (dropout off, so
    the value is deterministic); the split is the one the run's clients get (:func:`tasks.task.partitions`).
    """
    device = torch.device(device)
    model = model.to(device)
    grads, sizes = [], []
    for pid in range(num_partitions):
        x, y = client_data(data, pid, num_partitions, seed, device)
        if x.shape[0] == 0:
            continue  # an empty client has no gradient; it is left out of both means
        grad, _ = full_gradient(model, x, y, batch_size=batch_size)
        grads.append(grad.double())
        sizes.append(int(x.shape[0]))
    if not grads:
        raise ValueError("every partition is empty: no gradient to compare")
    stacked = torch.stack(grads)
    n = len(sizes)
    uniform, mean = _dissimilarity(stacked, torch.full((n,), 1.0 / n, dtype=torch.float64, device=device))
    counts = torch.tensor(sizes, dtype=torch.float64, device=device)
    weighted, _ = _dissimilarity(stacked, counts / counts.sum())
    return SplitHeterogeneity(uniform, weighted, float((mean**2).sum()), tuple(sizes))
