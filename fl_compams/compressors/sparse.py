"""Sparsifiers that send k coordinates and their values: Top-k, Rand-k and MVSS (one payload, one wire body).

Wire body: ``nnz u32 | indices | values[nnz]``; indices are strictly increasing, written as raw ``u32[nnz]``
(index coding int32) or as ``n_bytes u32`` then LEB128 varints of the gaps (index coding varint); values are
float32 or float16 (the header's value dtype). The kind byte tells the three apart.

References: Li, Karimi & Li (ICLR 2022), Definition 1 (Top-k); Stich et al. (NeurIPS 2018, Rand-k);
Wangni et al. (NeurIPS 2018, MVSS).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fl_compams.compressors.base import (
    INDEX_CODING,
    INDEX_CODINGS,
    TOPK_K,
    TOPK_RATIO,
    VALUE_DTYPE,
    VALUE_DTYPES,
    Compressor,
    Kind,
    Payload,
    cast_values,
    check_choice,
    check_k_ratio,
    check_rng,
    check_vector,
    index_bits,
    k_or_ratio,
    register,
    resolve_k,
    value_bits,
)
from fl_compams.kernels import topk_indices
from fl_compams.schema import BOOL, UNIT_OPEN, Key, key

if TYPE_CHECKING:
    from fl_compams.codec import Reader, Writer

__all__ = ["MVSS", "SPARSE_KINDS", "RandK", "SparsePayload", "TopK"]

SPARSE_KINDS = frozenset({Kind.TOPK, Kind.RANDK, Kind.MVSS})


@dataclass(frozen=True, eq=False)
class SparsePayload(Payload):
    """Coordinates ``indices`` (int64, strictly increasing) with ``values``; zero elsewhere.

    ``index_coding`` only chooses how the indices are written to bytes: raw int32 or LEB128 varints of the gaps.
    """

    kind: int
    dim: int
    indices: torch.Tensor
    values: torch.Tensor
    index_coding: str = "int32"
    wire_values: ClassVar[bool] = True
    wire_indices: ClassVar[bool] = True

    def decode(self) -> torch.Tensor:
        """Return the dense vector."""
        dtype = torch.float32 if self.values.dtype == torch.float16 else self.values.dtype
        out = torch.zeros(self.dim, dtype=dtype, device=self.values.device)
        out[self.indices] = self.values.to(out.dtype)
        return out

    def add_to(self, out: torch.Tensor, weight: float = 1.0) -> None:
        """``out += weight * decode(self)`` by scatter-add of the k values."""
        out.index_add_(0, self.indices, self.values.to(out.dtype), alpha=weight)

    def norm(self) -> float:
        """l2 norm of the decoded vector (from the k values)."""
        return float(torch.linalg.vector_norm(self.values.float()))

    def write_body(self, w: Writer) -> None:
        """``nnz u32 | indices | values[nnz]``."""
        w.u32(self.indices.numel())
        w.indices(self.indices, self.index_coding)
        w.values(self.values)

    @classmethod
    def read_body(cls, r: Reader, kind: int, dim: int) -> SparsePayload:
        """Check nnz <= dim, indices in range and strictly increasing, finite values."""
        nnz = r.count("nnz", dim)
        indices = r.indices(nnz, dim)
        return cls(kind, dim, indices, r.values(nnz), r.index_coding)


def _wire_config(values: Mapping[str, Any]) -> dict[str, str]:
    return {"value_dtype": values["value-dtype"], "index_coding": values["index-coding"]}


class _Sparsifier(Compressor):
    """Shared parts of the three: wire options checked at construction, theory bits ``k (b_v + ceil(log2 d))``."""

    value_dtype: str
    index_coding: str
    payload_type: ClassVar[type[Payload]] = SparsePayload

    def _check_wire(self) -> None:
        check_choice(self.name, "value_dtype", self.value_dtype, VALUE_DTYPES)
        check_choice(self.name, "index_coding", self.index_coding, INDEX_CODINGS)

    def _payload(self, dim: int, idx: torch.Tensor, values: torch.Tensor) -> SparsePayload:
        return SparsePayload(self.kind, dim, idx, cast_values(values, self.value_dtype), self.index_coding)

    def _bits(self, k: float, dim: int) -> float:
        return k * (value_bits(self.value_dtype) + index_bits(dim))


@register
@dataclass(frozen=True)
class TopK(_Sparsifier):
    r"""Top-k sparsification (Li et al., Definition 1): keep the k largest |x_i| of the whole vector.

    ``C(x)_i = x_i`` for i in S (the k largest magnitudes; ties to the lower index), else 0. Contraction:
    :math:`\|C(x) - x\|^2 = \sum_{i \notin S} x_i^2 \le (1 - k/d)\|x\|^2`. Theory bits ``k (b_v + ceil(log2 d))``.
    """

    k: int | None = None
    ratio: float | None = None
    value_dtype: str = "float32"
    index_coding: str = "int32"
    name: ClassVar[str] = "topk"
    kind: ClassVar[int] = Kind.TOPK
    config_keys: ClassVar[tuple[Key, ...]] = (TOPK_RATIO, TOPK_K, VALUE_DTYPE, INDEX_CODING)

    def __post_init__(self) -> None:
        check_k_ratio("topk", self.k, self.ratio)
        self._check_wire()

    @classmethod
    def from_config(cls, values: Mapping[str, Any], block_sizes: tuple[int, ...] | None = None) -> TopK:
        """``topk-k`` or ``topk-ratio``, ``value-dtype``, ``index-coding``."""
        return cls(**k_or_ratio(values), **_wire_config(values))

    def k_for(self, dim: int) -> int:
        """Number of coordinates kept for a vector of length ``dim``."""
        return resolve_k(self.k, self.ratio, dim)

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> SparsePayload:
        """Select the exact top-k magnitudes."""
        check_vector(x)
        idx = topk_indices(x, self.k_for(x.numel()))
        return self._payload(x.numel(), idx, x[idx])

    def theory_bits(self, dim: int) -> float:
        """``k (b_v + ceil(log2 d))``: values plus raw indices."""
        return float(self._bits(self.k_for(dim), dim))


@register
@dataclass(frozen=True)
class RandK(_Sparsifier):
    """Rand-k (Stich et al. 2018): keep k coordinates chosen uniformly without replacement.

    ``scaled=False`` (default, for error feedback) sends ``x_S``, with E||C(x)-x||^2 = (1 - k/d)||x||^2;
    ``scaled=True`` sends ``(d/k) x_S``, which is unbiased.
    """

    k: int | None = None
    ratio: float | None = None
    scaled: bool = False
    value_dtype: str = "float32"
    index_coding: str = "int32"
    name: ClassVar[str] = "randk"
    kind: ClassVar[int] = Kind.RANDK
    randomized: ClassVar[bool] = True
    config_keys: ClassVar[tuple[Key, ...]] = (
        TOPK_RATIO,
        TOPK_K,
        VALUE_DTYPE,
        INDEX_CODING,
        key("randk-scaled", False, BOOL, "send (d/k) x_S so that Rand-k is unbiased"),
    )

    def __post_init__(self) -> None:
        check_k_ratio("randk", self.k, self.ratio)
        self._check_wire()

    @classmethod
    def from_config(cls, values: Mapping[str, Any], block_sizes: tuple[int, ...] | None = None) -> RandK:
        """``topk-k`` or ``topk-ratio``, ``randk-scaled``, ``value-dtype``, ``index-coding``."""
        return cls(**k_or_ratio(values), scaled=values["randk-scaled"], **_wire_config(values))

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        """Only the scaled form is unbiased."""
        return self.scaled

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> SparsePayload:
        """Sample k coordinates with the given generator."""
        check_vector(x)
        gen = check_rng("randk", x, rng)
        d = x.numel()
        k = resolve_k(self.k, self.ratio, d)
        idx = torch.sort(torch.randperm(d, generator=gen, device=x.device)[:k]).values
        return self._payload(d, idx, x[idx] * (d / k) if self.scaled else x[idx])

    def theory_bits(self, dim: int) -> float:
        """``k (b_v + ceil(log2 d))``."""
        return float(self._bits(resolve_k(self.k, self.ratio, dim), dim))


@register
@dataclass(frozen=True)
class MVSS(_Sparsifier):
    r"""Minimum-variance stochastic sparsification (Wangni et al., NeurIPS 2018), unbiased, no EF.

    Keep coordinate i with probability :math:`p_i = \min(\lambda |x_i|, 1)` and send :math:`x_i / p_i`;
    :math:`\lambda` is the exact solution of :math:`\sum_i p_i = \kappa d` (closed form over the sorted
    magnitudes; algorithms.md section 3), which minimises the variance :math:`\sum_i x_i^2 (1/p_i - 1)` at
    expected density :math:`\kappa`. COMP-AMS's baseline is MVSS-0.01.
    """

    density: float = 0.01
    value_dtype: str = "float32"
    index_coding: str = "int32"
    name: ClassVar[str] = "mvss"
    kind: ClassVar[int] = Kind.MVSS
    unbiased: ClassVar[bool] = True
    randomized: ClassVar[bool] = True
    config_keys: ClassVar[tuple[Key, ...]] = (
        VALUE_DTYPE,
        INDEX_CODING,
        key("mvss-density", 0.01, UNIT_OPEN, "expected density kappa of MVSS"),
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"mvss: density must be in (0, 1], got {self.density!r}")
        self._check_wire()

    @classmethod
    def from_config(cls, values: Mapping[str, Any], block_sizes: tuple[int, ...] | None = None) -> MVSS:
        """``mvss-density``, ``value-dtype``, ``index-coding``."""
        return cls(density=values["mvss-density"], **_wire_config(values))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Inclusion probabilities p with ``sum(p) = min(kappa d, nnz(x))`` and p_i = 0 iff x_i = 0."""
        a = x.abs().to(torch.float64)
        budget = self.density * x.numel()
        nnz = int(torch.count_nonzero(a))
        if nnz <= budget:
            return (a > 0).to(torch.float64)
        desc = torch.sort(a, descending=True).values
        # tail[j] = sum of all but the j largest magnitudes; with j saturated coordinates the rest share
        # the remaining budget: lambda_j = (budget - j) / tail[j]; take the smallest j with
        # lambda_j * a_(j+1) <= 1 (the largest unsaturated coordinate stays below 1).
        jmax = min(int(budget), nnz - 1)
        tail = torch.flip(torch.cumsum(torch.flip(desc, (0,)), 0), (0,))[: jmax + 1]
        j = torch.arange(jmax + 1, device=x.device, dtype=torch.float64)
        lam = (budget - j) / tail
        ok = torch.nonzero(lam * desc[: jmax + 1] <= 1.0)
        lam_star = lam[ok[0, 0]] if ok.numel() else lam[-1]
        return torch.clamp(lam_star * a, max=1.0)

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> SparsePayload:
        """Draw the Bernoulli mask and send the kept values divided by their probabilities."""
        check_vector(x)
        gen = check_rng("mvss", x, rng)
        p = self.probabilities(x)
        u = torch.rand(x.numel(), generator=gen, device=x.device, dtype=torch.float64)
        idx = torch.nonzero(u < p).squeeze(1)
        return self._payload(x.numel(), idx, (x[idx].to(torch.float64) / p[idx]).to(x.dtype))

    def theory_bits(self, dim: int) -> float:
        """Expected ``kappa d (b_v + ceil(log2 d))``."""
        return self._bits(self.density * dim, dim)
