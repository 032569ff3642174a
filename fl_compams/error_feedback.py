"""Error feedback (EF) as a pure step (Li, Karimi & Li, Algorithm 2, lines 5-6).

Each worker compresses its update plus its residual and keeps what the compressor dropped:

    p = x + e,    payload = encode(p),    e' = p - decode(payload)

which equals ``e_{t+1} = e_t + g_t - C(g_t + e_t)``. Hence the telescoping identity
``sum_t decode(payload_t) + e_{T+1} = sum_t x_t + e_1`` holds exactly (up to float rounding), and whatever the
wire loses (e.g. float16 rounding of the values) lands in the residual rather than being lost.
"""

from __future__ import annotations

import torch

from fl_compams.compressors import Compressor
from fl_compams.payloads import Payload

__all__ = ["ef_step"]


def ef_step(
    compressor: Compressor,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    rng: torch.Generator | None = None,
) -> tuple[Payload, torch.Tensor | None]:
    """Compress ``x`` with error feedback; ``residual=None`` is the no-EF ablation.

    Parameters
    ----------
    compressor
        The operator C.
    x
        The update to send (a gradient, or the average local gradient), a flat vector.
    residual
        The worker's residual e (same shape and device as x), or None to compress x alone and keep no memory
        (the paper's "without error feedback" curves).
    rng
        Generator for randomised compressors.

    Returns
    -------
    payload, new_residual
        The payload of ``C(x + e)`` and ``e' = (x + e) - C(x + e)`` (None when EF is off).
    """
    if residual is None:
        return compressor.encode(x, rng), None
    if residual.shape != x.shape or residual.device != x.device:
        raise ValueError(
            f"residual must match the update: update {tuple(x.shape)} on {x.device}, residual "
            f"{tuple(residual.shape)} on {residual.device}"
        )
    corrected = x + residual
    payload = compressor.encode(corrected, rng)
    new_residual = corrected.sub_(compressor.decode(payload).to(corrected.dtype))
    return payload, new_residual
