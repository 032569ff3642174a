r"""Sign-Top-k (Basu et al., Qsparse-local-SGD, NeurIPS 2019): Top-k (Li et al., Definition 1) then scaled sign.

Wire body: ``nnz u32 | indices | scale f32 | signs ceil(nnz/8)`` (indices as in the sparse body).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fl_compams.bits import pack_bits
from fl_compams.compressors.base import (
    INDEX_CODING,
    INDEX_CODINGS,
    TOPK_K,
    TOPK_RATIO,
    Compressor,
    Kind,
    Payload,
    check_choice,
    check_k_ratio,
    check_vector,
    index_bits,
    k_or_ratio,
    register,
    resolve_k,
    signed,
)
from fl_compams.errors import PayloadError
from fl_compams.kernels import l1_mean, topk_indices
from fl_compams.schema import Key

if TYPE_CHECKING:
    from fl_compams.codec import Reader, Writer

__all__ = ["SignSparsePayload", "SignTopK"]


class KeptValuesPayload(Payload):
    """A payload of k kept coordinates (``indices``) whose values ``_values(dtype)`` computes from a ``scale``.

    Shared by Sign-Top-k and QSGD o Top-k: dense decode and the server's scatter-add read the same values.
    """

    def _values(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def decode(self) -> torch.Tensor:
        """Return the dense vector (zero off the kept coordinates)."""
        out = torch.zeros(self.dim, dtype=self.scale.dtype, device=self.scale.device)
        out[self.indices] = self._values(out.dtype)
        return out

    def add_to(self, out: torch.Tensor, weight: float = 1.0) -> None:
        """``out += weight * decode(self)`` by scatter-add."""
        out.index_add_(0, self.indices, self._values(out.dtype), alpha=weight)


@dataclass(frozen=True, eq=False)
class SignSparsePayload(KeptValuesPayload):
    """Sign-Top-k payload: k indices, k sign bits, and one scale ``||Top_k(x)||_1 / k``."""

    dim: int
    indices: torch.Tensor
    scale: torch.Tensor
    signs: torch.Tensor
    index_coding: str = "int32"
    kind: int = Kind.SIGNTOPK
    wire_indices: ClassVar[bool] = True

    def _values(self, dtype: torch.dtype) -> torch.Tensor:
        return signed(self.signs, self.indices.numel(), dtype).mul_(self.scale.to(dtype))

    def norm(self) -> float:
        """l2 norm of the decoded vector: ``scale * sqrt(k)``."""
        return float(self.scale) * float(self.indices.numel()) ** 0.5

    def write_body(self, w: Writer) -> None:
        """``nnz | indices | scale | signs``."""
        w.u32(self.indices.numel())
        w.indices(self.indices, self.index_coding)
        w.f32(self.scale.reshape(1))
        w.raw(self.signs)

    @classmethod
    def read_body(cls, r: Reader, kind: int, dim: int) -> SignSparsePayload:
        """Check nnz <= dim, indices in range and strictly increasing, scale finite and >= 0, sign padding zero."""
        nnz = r.count("nnz", dim)
        indices = r.indices(nnz, dim)
        scale = r.f32(1, "scale")
        if scale[0] < 0:
            raise PayloadError(f"sign-top-k scale must be >= 0, got {float(scale[0])}")
        return cls(dim, indices, scale.reshape(()), r.bits(nnz, "signs"), r.index_coding)


@register
@dataclass(frozen=True)
class SignTopK(Compressor):
    r"""Sign-Top-k (Basu et al., Qsparse-local-SGD, NeurIPS 2019): ``(||Top_k(x)||_1 / k) sign(Top_k(x))``.

    Exact error :math:`\|C(x) - x\|^2 = \|x\|^2 - \|Top_k(x)\|_1^2 / k`. Theory bits ``k + 32 + k ceil(log2 d)``.
    """

    k: int | None = None
    ratio: float | None = None
    index_coding: str = "int32"
    name: ClassVar[str] = "signtopk"
    kind: ClassVar[int] = Kind.SIGNTOPK
    payload_type: ClassVar[type[Payload]] = SignSparsePayload
    config_keys: ClassVar[tuple[Key, ...]] = (TOPK_RATIO, TOPK_K, INDEX_CODING)

    def __post_init__(self) -> None:
        check_k_ratio("signtopk", self.k, self.ratio)
        check_choice("signtopk", "index_coding", self.index_coding, INDEX_CODINGS)

    @classmethod
    def from_config(cls, values: Mapping[str, Any], block_sizes: tuple[int, ...] | None = None) -> SignTopK:
        """``topk-k`` or ``topk-ratio``, ``index-coding``."""
        return cls(**k_or_ratio(values), index_coding=values["index-coding"])

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> SignSparsePayload:
        """Top-k indices, their signs and the mean kept magnitude."""
        check_vector(x)
        k = resolve_k(self.k, self.ratio, x.numel())
        idx = topk_indices(x, k)
        kept = x[idx]
        scale = l1_mean(kept)
        return SignSparsePayload(x.numel(), idx, scale, pack_bits(kept >= 0), self.index_coding)

    def theory_bits(self, dim: int) -> float:
        """``k + 32 + k ceil(log2 d)``."""
        k = resolve_k(self.k, self.ratio, dim)
        return float(k + 32 + k * index_bits(dim))
