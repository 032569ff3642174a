r"""QSGD o Top-k (Basu et al., Qsparse-local-SGD, NeurIPS 2019): QSGD on the k largest coordinates, scaled.

``C(x) = Q_s(Top_k(x)) / (1 + beta_{k,s})`` with ``beta_{k,s} = min(k / s^2, sqrt(k) / s)``, QSGD's variance
constant on a k-vector (Alistarh et al., NeurIPS 2017), so that ``E||Q_s(y)||^2 <= (1 + beta)||y||^2`` makes C a
gamma-compression: ``E||x - C(x)||^2 <= (1 - k / (d (1 + beta)))||x||^2`` (algorithms.md section 5.1).

Wire body: ``nnz u32 | indices | levels u32 | scale f32 | signs ceil(nnz/8) | magnitudes`` where ``scale`` is
``||Top_k(x)||_2 / (1 + beta)`` and the magnitudes (levels in {0..s}) are bit-packed at ``bit_length(s)`` bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

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
    check_rng,
    check_vector,
    index_bits,
    k_or_ratio,
    register,
    resolve_k,
    signed,
)
from fl_compams.compressors.qsgd import QSGD, read_levels, read_magnitudes, write_magnitudes
from fl_compams.compressors.signtopk import KeptValuesPayload
from fl_compams.errors import PayloadError
from fl_compams.kernels import topk_indices
from fl_compams.schema import Key

if TYPE_CHECKING:
    from fl_compams.codec import Reader, Writer

__all__ = ["QSGDTopK", "QSGDTopKPayload", "qsgd_beta"]

#: The ``qsgd-levels`` key, declared once by :class:`QSGD` (the registry refuses a second definition).
QSGD_LEVELS = next(k for k in QSGD.config_keys if k.name == "qsgd-levels")


def qsgd_beta(n: int, levels: int) -> float:
    """QSGD's variance constant on an n-vector: ``beta_{n,s} = min(n / s^2, sqrt(n) / s)``."""
    return min(n / levels**2, math.sqrt(n) / levels)


@dataclass(frozen=True, eq=False)
class QSGDTopKPayload(KeptValuesPayload):
    """k indices, their signs and QSGD levels, and one scale: coordinate i decodes to ``scale sign_i l_i / s``."""

    dim: int
    indices: torch.Tensor
    levels: int
    scale: torch.Tensor
    signs: torch.Tensor
    magnitudes: torch.Tensor
    index_coding: str = "int32"
    kind: int = Kind.QSGD_TOPK
    wire_indices: ClassVar[bool] = True

    def _values(self, dtype: torch.dtype) -> torch.Tensor:
        values = signed(self.signs, self.indices.numel(), dtype).mul_(self.magnitudes.to(dtype))
        return values.mul_(self.scale.to(dtype) / self.levels)

    def write_body(self, w: Writer) -> None:
        """``nnz | indices | levels | scale | signs | magnitudes``."""
        w.u32(self.indices.numel())
        w.indices(self.indices, self.index_coding)
        w.u32(self.levels)
        w.f32(self.scale.reshape(1))
        w.raw(self.signs)
        write_magnitudes(w, self.magnitudes, self.levels)

    @classmethod
    def read_body(cls, r: Reader, kind: int, dim: int) -> QSGDTopKPayload:
        """Check nnz <= dim, indices, levels in [1, 32768], scale finite and >= 0, padding, magnitudes <= s."""
        nnz = r.count("nnz", dim)
        indices = r.indices(nnz, dim)
        levels = read_levels(r)
        scale = r.f32(1, "scale")
        if scale[0] < 0:
            raise PayloadError(f"QSGD o Top-k scale must be >= 0, got {float(scale[0])}")
        signs = r.bits(nnz, "signs")
        magnitudes = read_magnitudes(r, nnz, levels)
        return cls(dim, indices, levels, scale.reshape(()), signs, magnitudes, r.index_coding)


@register
@dataclass(frozen=True)
class QSGDTopK(Compressor):
    r"""QSGD o Top-k / (1 + beta_{k,s}) (Basu et al., NeurIPS 2019), a gamma-compression, randomised.

    Top-k (ties to the lower index), then QSGD with s = ``levels`` and one bucket on the k values (unbiased
    stochastic rounding), then the factor :math:`1/(1+\beta_{k,s})`. Contraction
    :math:`\gamma = k / (d (1 + \beta_{k,s}))`. Theory bits ``k (1 + ceil(log2(s + 1))) + 32 + k ceil(log2 d)``.
    """

    k: int | None = None
    ratio: float | None = None
    levels: int = 4
    index_coding: str = "int32"
    name: ClassVar[str] = "qsgd-topk"
    kind: ClassVar[int] = Kind.QSGD_TOPK
    payload_type: ClassVar[type[Payload]] = QSGDTopKPayload
    randomized: ClassVar[bool] = True
    config_keys: ClassVar[tuple[Key, ...]] = (TOPK_RATIO, TOPK_K, INDEX_CODING, QSGD_LEVELS)

    def __post_init__(self) -> None:
        check_k_ratio("qsgd-topk", self.k, self.ratio)
        check_choice("qsgd-topk", "index_coding", self.index_coding, INDEX_CODINGS)
        QSGD(levels=self.levels)  # the same level range as QSGD

    @classmethod
    def from_config(cls, values: Mapping[str, Any], block_sizes: tuple[int, ...] | None = None) -> QSGDTopK:
        """``topk-k`` or ``topk-ratio``, ``qsgd-levels``, ``index-coding``."""
        return cls(**k_or_ratio(values), levels=values["qsgd-levels"], index_coding=values["index-coding"])

    def k_for(self, dim: int) -> int:
        """Number of coordinates kept for a vector of length ``dim``."""
        return resolve_k(self.k, self.ratio, dim)

    def gamma(self, dim: int) -> float:
        """The contraction constant ``k / (d (1 + beta_{k,s}))``."""
        k = self.k_for(dim)
        return k / (dim * (1 + qsgd_beta(k, self.levels)))

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> QSGDTopKPayload:
        """Top-k indices, then QSGD's stochastic rounding of the kept values with the given generator."""
        check_vector(x)
        gen = check_rng("qsgd-topk", x, rng)
        k = self.k_for(x.numel())
        idx = topk_indices(x, k)
        q = QSGD(levels=self.levels).encode(x[idx], gen)  # one bucket over the k values
        scale = q.norms[0] / (1 + qsgd_beta(k, self.levels))
        return QSGDTopKPayload(x.numel(), idx, self.levels, scale, q.signs, q.magnitudes, self.index_coding)

    def theory_bits(self, dim: int) -> float:
        """``k (1 + ceil(log2(s + 1))) + 32 + k ceil(log2 d)``."""
        k = self.k_for(dim)
        return float(k * (1 + math.ceil(math.log2(self.levels + 1))) + 32 + k * index_bits(dim))
