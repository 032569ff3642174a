"""Server-side averaging of decoded payloads, in place.

``g_bar = sum_i w_i decode(payload_i)`` with uniform weights ``1/n`` (the paper) or weights proportional to the
clients' example counts. Each payload adds itself into one dense buffer (Top-k by scatter-add), so the server
holds one dense vector however many clients reply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fl_compams.payloads import Payload

__all__ = ["aggregation_weights", "weighted_mean"]

WEIGHTINGS = ("uniform", "num-examples")


def aggregation_weights(weighting: str, num_examples: Sequence[int]) -> list[float]:
    """Normalised weights: ``1/n`` each (``"uniform"``) or ``n_i / sum_j n_j`` (``"num-examples"``)."""
    n = len(num_examples)
    if n == 0:
        raise ValueError("cannot aggregate zero replies")
    if weighting == "uniform":
        return [1.0 / n] * n
    if weighting == "num-examples":
        if any(c < 0 for c in num_examples) or sum(num_examples) <= 0:
            raise ValueError(
                f"num-examples weights need non-negative counts with a positive sum, got {num_examples}"
            )
        total = float(sum(num_examples))
        return [c / total for c in num_examples]
    raise ValueError(f"unknown weighting {weighting!r}; use one of {WEIGHTINGS}")


def weighted_mean(
    payloads: Sequence[Payload],
    weights: Sequence[float],
    dim: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``sum_i weights[i] * decode(payloads[i])`` accumulated into one dense vector."""
    if len(payloads) != len(weights):
        raise ValueError(f"got {len(payloads)} payloads but {len(weights)} weights")
    out = torch.zeros(dim, dtype=dtype, device=device)
    for payload, w in zip(payloads, weights, strict=True):
        if payload.dim != dim:
            raise ValueError(f"payload has dimension {payload.dim}, expected {dim}")
        payload.to(device).add_to(out, w)
    return out
