"""Typed compressed payloads: what a client sends, as tensors, before the codec turns it into bytes.

A payload holds exactly the numbers that cross the network and nothing else (GRACE's payload/context split).
Decoding needs only the payload: the server never needs a client's compressor object to read its message.
Every payload decodes to a dense vector and can add itself into a dense accumulator in place
(``add_to``), which is how the server averages n payloads without holding n dense copies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from fl_compams.bits import unpack_bits
from fl_compams.kernels import blocksign_decode

__all__ = [
    "BlockSignPayload",
    "DensePayload",
    "Kind",
    "Payload",
    "QSGDPayload",
    "SignSparsePayload",
    "SparsePayload",
]


class Kind(enum.IntEnum):
    """Payload kinds; the value is the kind byte on the wire (never reuse a number)."""

    IDENTITY = 1
    TOPK = 2
    BLOCKSIGN = 3
    RANDK = 4
    MVSS = 5
    QSGD = 6
    SIGNTOPK = 7


SPARSE_KINDS = frozenset({Kind.TOPK, Kind.RANDK, Kind.MVSS})
INDEX_CODINGS = ("int32", "varint")


def _signed(signs: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed sign bits (1 = non-negative) -> a tensor of +1/-1 of the given dtype."""
    bits = unpack_bits(signs, count)
    return bits.to(dtype).mul_(2).sub_(1)


@dataclass(frozen=True, eq=False)
class DensePayload:
    """All d values (the identity compressor): ``values[dim]``."""

    dim: int
    values: torch.Tensor
    kind: Kind = Kind.IDENTITY

    def decode(self) -> torch.Tensor:
        """Return the dense vector (float16 values are widened to float32)."""
        v = self.values
        return v.float() if v.dtype == torch.float16 else v.clone()

    def add_to(self, out: torch.Tensor, weight: float = 1.0) -> None:
        """``out += weight * decode(self)``, in place."""
        out.add_(self.values.to(out.dtype), alpha=weight)

    def norm(self) -> float:
        """l2 norm of the decoded vector."""
        return float(torch.linalg.vector_norm(self.values.float()))

    def to(self, device: torch.device | str) -> DensePayload:
        """Copy of the payload on another device."""
        return DensePayload(self.dim, self.values.to(device), self.kind)


@dataclass(frozen=True, eq=False)
class SparsePayload:
    """Coordinates ``indices`` (int64, strictly increasing) with ``values``; zero elsewhere.

    Used by Top-k, Rand-k and MVSS (the kind tells which; the wire body is the same). ``index_coding`` only
    chooses how the indices are written to bytes: raw int32 or LEB128 varints of the gaps.
    """

    kind: Kind
    dim: int
    indices: torch.Tensor
    values: torch.Tensor
    index_coding: str = "int32"

    def decode(self) -> torch.Tensor:
        """Return the dense vector."""
        out = torch.zeros(self.dim, dtype=_wide_dtype(self.values), device=self.values.device)
        out[self.indices] = self.values.to(out.dtype)
        return out

    def add_to(self, out: torch.Tensor, weight: float = 1.0) -> None:
        """``out += weight * decode(self)`` by scatter-add of the k values."""
        vals = self.values.to(out.dtype)
        out.index_add_(0, self.indices, vals, alpha=weight)

    def norm(self) -> float:
        """l2 norm of the decoded vector (from the k values)."""
        return float(torch.linalg.vector_norm(self.values.float()))

    def to(self, device: torch.device | str) -> SparsePayload:
        """Copy of the payload on another device."""
        return SparsePayload(
            self.kind, self.dim, self.indices.to(device), self.values.to(device), self.index_coding
        )


@dataclass(frozen=True, eq=False)
class BlockSignPayload:
    """Block-Sign (Li et al., Definition 2): one sign bit per coordinate plus one scale per block.

    ``signs`` holds ``ceil(dim / 8)`` packed bytes (bit = 1 for x >= 0, so sign(0) = +1); ``scales[b]`` is
    ``||x_B||_1 / d_B``; ``block_sizes`` partition ``dim``.
    """

    dim: int
    block_sizes: tuple[int, ...]
    scales: torch.Tensor
    signs: torch.Tensor
    kind: Kind = Kind.BLOCKSIGN

    def decode(self) -> torch.Tensor:
        """Return ``sign(x_B) * scale_B`` for every block, concatenated."""
        return blocksign_decode(self.signs, self.scales, self.block_sizes, self.dim)

    def add_to(self, out: torch.Tensor, weight: float = 1.0) -> None:
        """``out += weight * decode(self)``, one block at a time to bound the temporary memory."""
        out.add_(self.decode().to(out.dtype), alpha=weight)

    def norm(self) -> float:
        """l2 norm of the decoded vector: ``sqrt(sum_B d_B scale_B^2)``."""
        sizes = torch.tensor(self.block_sizes, dtype=torch.float64)
        return float(torch.sqrt((sizes * self.scales.double().cpu() ** 2).sum()))

    def to(self, device: torch.device | str) -> BlockSignPayload:
        """Copy of the payload on another device."""
        return BlockSignPayload(
            self.dim, self.block_sizes, self.scales.to(device), self.signs.to(device), self.kind
        )


@dataclass(frozen=True, eq=False)
class SignSparsePayload:
    """Sign-Top-k (Qsparse-local-SGD): k indices, k sign bits, and one scale ``||Top_k(x)||_1 / k``."""

    dim: int
    indices: torch.Tensor
    scale: torch.Tensor
    signs: torch.Tensor
    index_coding: str = "int32"
    kind: Kind = Kind.SIGNTOPK

    def decode(self) -> torch.Tensor:
        """Return the dense vector with ``+-scale`` on the kept coordinates."""
        out = torch.zeros(self.dim, dtype=self.scale.dtype, device=self.scale.device)
        out[self.indices] = self._values(out.dtype)
        return out

    def add_to(self, out: torch.Tensor, weight: float = 1.0) -> None:
        """``out += weight * decode(self)`` by scatter-add."""
        out.index_add_(0, self.indices, self._values(out.dtype), alpha=weight)

    def _values(self, dtype: torch.dtype) -> torch.Tensor:
        return _signed(self.signs, self.indices.numel(), dtype).mul_(self.scale.to(dtype))

    def norm(self) -> float:
        """l2 norm of the decoded vector: ``scale * sqrt(k)``."""
        return float(self.scale) * float(self.indices.numel()) ** 0.5

    def to(self, device: torch.device | str) -> SignSparsePayload:
        """Copy of the payload on another device."""
        return SignSparsePayload(
            self.dim,
            self.indices.to(device),
            self.scale.to(device),
            self.signs.to(device),
            self.index_coding,
        )


@dataclass(frozen=True, eq=False)
class QSGDPayload:
    """QSGD with ``levels`` = s quantization levels over buckets of ``bucket_size`` coordinates.

    Coordinate i of bucket B decodes to ``norms[B] * sign_i * level_i / s`` with ``level_i`` in {0..s}.
    """

    dim: int
    levels: int
    bucket_size: int
    norms: torch.Tensor
    signs: torch.Tensor
    magnitudes: torch.Tensor
    kind: Kind = Kind.QSGD

    def decode(self) -> torch.Tensor:
        """Return the dense dequantized vector."""
        dtype = self.norms.dtype
        signed = _signed(self.signs, self.dim, dtype).mul_(self.magnitudes.to(dtype))
        scale = torch.repeat_interleave(self.norms / self.levels, self.bucket_size)[: self.dim]
        return signed.mul_(scale)

    def add_to(self, out: torch.Tensor, weight: float = 1.0) -> None:
        """``out += weight * decode(self)``."""
        out.add_(self.decode().to(out.dtype), alpha=weight)

    def norm(self) -> float:
        """l2 norm of the decoded vector."""
        return float(torch.linalg.vector_norm(self.decode()))

    def to(self, device: torch.device | str) -> QSGDPayload:
        """Copy of the payload on another device."""
        return QSGDPayload(
            self.dim,
            self.levels,
            self.bucket_size,
            self.norms.to(device),
            self.signs.to(device),
            self.magnitudes.to(device),
        )


Payload = DensePayload | SparsePayload | BlockSignPayload | SignSparsePayload | QSGDPayload


def _wide_dtype(values: torch.Tensor) -> torch.dtype:
    return torch.float32 if values.dtype == torch.float16 else values.dtype
