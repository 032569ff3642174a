"""Bit packing on any device, with numpy's ``packbits`` bit order (most significant bit first).

On the CPU numpy's packbits/unpackbits run at memory speed; on other devices (CUDA) the same layout is built
with tensor ops, so GPU clients ship only ``ceil(n / 8)`` bytes to the host.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pack_bits", "pack_uint", "unpack_bits", "unpack_uint"]

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor into ``ceil(n / 8)`` uint8 values; padding bits are 0."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.numpy()))
    n = mask.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a bool tensor on ``packed``'s device."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).view(np.bool_))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    return (packed.view(-1, 1) & weights).ne(0).view(-1)[:count]


def pack_uint(values: np.ndarray, width: int) -> np.ndarray:
    """Pack non-negative integers below ``2**width`` into ``width`` bits each (MSB first), as uint8."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bit_matrix = ((values.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.reshape(-1))


def unpack_uint(packed: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_uint` for ``width <= 16``: ``count`` integers, as uint16.

    Memory stays at about 18 bytes per integer: the bits are left-padded to 16 per row and repacked as
    big-endian uint16 instead of being multiplied out in int64.
    """
    if not 1 <= width <= 16:
        raise ValueError(f"width must be in [1, 16], got {width}")
    bits = np.unpackbits(packed, count=count * width).reshape(count, width)
    padded = np.zeros((count, 16), dtype=np.uint8)
    padded[:, 16 - width :] = bits
    return np.packbits(padded, axis=1).view(">u2").reshape(count).astype(np.uint16)
