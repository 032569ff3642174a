"""Compression operators C: R^d -> R^d as frozen values with pure ``encode`` / ``decode``.

A compressor holds hyper-parameters only: no error-feedback memory, no learning rate, no device. ``encode``
works on a 1-D torch tensor on any device and returns a typed payload on the same device; ``decode`` returns
``C(x)`` as a dense vector. Randomised operators take an explicit seeded ``torch.Generator`` on x's device.

References: Li, Karimi & Li, "On Distributed Adaptive Optimization with Gradient Compression" (ICLR 2022):
Top-k is Definition 1 and Block-Sign is Definition 2; baselines as cited on each class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from fl_compams.bits import pack_bits
from fl_compams.kernels import blocksign_encode, topk_indices
from fl_compams.payloads import (
    INDEX_CODINGS,
    BlockSignPayload,
    DensePayload,
    Kind,
    Payload,
    QSGDPayload,
    SignSparsePayload,
    SparsePayload,
)

__all__ = [
    "COMPRESSORS",
    "MVSS",
    "QSGD",
    "BlockSign",
    "Compressor",
    "Identity",
    "RandK",
    "SignTopK",
    "TopK",
    "make_compressor",
]

VALUE_DTYPES = ("float32", "float16")
_FP16_MAX = 65504.0


def _index_bits(dim: int) -> int:
    return max(1, math.ceil(math.log2(dim)))


def _resolve_k(k: int | None, ratio: float | None, dim: int) -> int:
    """Number of kept coordinates: ``k`` if given, else ``round(ratio * d)``, clipped to [1, d]."""
    if k is not None:
        return min(k, dim)
    return max(1, min(dim, round(ratio * dim)))


def _check_k_ratio(name: str, k: int | None, ratio: float | None) -> None:
    if (k is None) == (ratio is None):
        raise ValueError(f"{name}: give exactly one of k or ratio (got k={k}, ratio={ratio})")
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"{name}: k must be a positive integer, got {k!r}")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name}: ratio must be in (0, 1], got {ratio!r}")


def _check_vector(x: torch.Tensor) -> None:
    if x.ndim != 1 or x.numel() == 0:
        raise ValueError(f"compressors take a non-empty flat vector, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"compressors take a floating-point vector, got {x.dtype}")


def _check_rng(name: str, x: torch.Tensor, rng: torch.Generator | None) -> torch.Generator:
    if rng is None:
        raise ValueError(
            f"{name} is randomised: pass a seeded torch.Generator on {x.device} as rng (randomness is "
            "explicit so that runs are reproducible)"
        )
    return rng


def _cast_values(values: torch.Tensor, value_dtype: str) -> torch.Tensor:
    """Round values to the wire dtype; float16 saturates at +-65504 (error feedback keeps the remainder)."""
    if value_dtype == "float16":
        return values.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
    return values


class Compressor:
    """Base class: subclasses are frozen dataclasses implementing ``encode`` and ``theory_bits``."""

    name: ClassVar[str]
    #: The payload kind ``encode`` produces (the server checks replies against it).
    kind: ClassVar[Kind]
    #: E[C(x)] = x for every x (unbiased operators are used without error feedback by their papers).
    unbiased: ClassVar[bool] = False
    #: ``encode`` needs a generator.
    randomized: ClassVar[bool] = False

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> Payload:
        """Compress the flat vector x into a payload on x's device."""
        raise NotImplementedError

    def decode(self, payload: Payload) -> torch.Tensor:
        """Dense ``C(x)`` from a payload; depends only on the payload."""
        return payload.decode()

    def __call__(self, x: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        """``C(x)`` as a dense vector: ``decode(encode(x, rng))``."""
        return self.decode(self.encode(x, rng))

    def theory_bits(self, dim: int) -> float:
        """Uplink size in bits per message from the papers' formulas (algorithms.md section 8)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Identity(Compressor):
    """No compression (full-precision baseline): ``C(x) = x``; 32 d bits (16 d with float16 values)."""

    value_dtype: str = "float32"
    name: ClassVar[str] = "identity"
    kind: ClassVar[Kind] = Kind.IDENTITY

    def __post_init__(self) -> None:
        _check_choice("identity", "value_dtype", self.value_dtype, VALUE_DTYPES)

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> DensePayload:
        """Send every coordinate."""
        _check_vector(x)
        return DensePayload(x.numel(), _cast_values(x, self.value_dtype).clone())

    def theory_bits(self, dim: int) -> float:
        """``32 d`` (or ``16 d``)."""
        return float(_value_bits(self.value_dtype) * dim)


@dataclass(frozen=True)
class TopK(Compressor):
    r"""Top-k sparsification (Li et al., Definition 1): keep the k largest |x_i| of the whole vector.

    ``C(x)_i = x_i`` for i in S (the k largest magnitudes; ties to the lower index), else 0. Contraction:
    :math:`\|C(x) - x\|^2 = \sum_{i \notin S} x_i^2 \le (1 - k/d)\|x\|^2`. Theory bits ``k (b_v + ceil(log2 d))``.
    """

    k: int | None = None
    ratio: float | None = None
    value_dtype: str = "float32"
    index_coding: str = "int32"
    name: ClassVar[str] = "topk"
    kind: ClassVar[Kind] = Kind.TOPK

    def __post_init__(self) -> None:
        _check_k_ratio("topk", self.k, self.ratio)
        _check_choice("topk", "value_dtype", self.value_dtype, VALUE_DTYPES)
        _check_choice("topk", "index_coding", self.index_coding, INDEX_CODINGS)

    def k_for(self, dim: int) -> int:
        """Number of coordinates kept for a vector of length ``dim``."""
        return _resolve_k(self.k, self.ratio, dim)

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> SparsePayload:
        """Select the exact top-k magnitudes."""
        _check_vector(x)
        idx = topk_indices(x, self.k_for(x.numel()))
        values = _cast_values(x[idx], self.value_dtype)
        return SparsePayload(Kind.TOPK, x.numel(), idx, values, self.index_coding)

    def theory_bits(self, dim: int) -> float:
        """``k (b_v + ceil(log2 d))``: values plus raw indices."""
        return float(self.k_for(dim) * (_value_bits(self.value_dtype) + _index_bits(dim)))


@dataclass(frozen=True)
class BlockSign(Compressor):
    r"""Block-Sign (Li et al., Definition 2): ``C(x)_B = sign(x_B) ||x_B||_1 / d_B`` for every block B.

    Blocks are the model's trainable tensors (``ParamSpec.block_sizes``); ``block_sizes=None`` means one block.
    sign(0) = +1, so every coordinate is one bit. Exact error:
    :math:`\|C(x) - x\|^2 = \sum_B (\|x_B\|_2^2 - \|x_B\|_1^2 / d_B) \le (1 - \min_B 1/d_B)\|x\|^2`.
    Theory bits ``d + 32 N_blk``.
    """

    block_sizes: tuple[int, ...] | None = None
    name: ClassVar[str] = "blocksign"
    kind: ClassVar[Kind] = Kind.BLOCKSIGN

    def __post_init__(self) -> None:
        if self.block_sizes is not None:
            sizes = tuple(int(b) for b in self.block_sizes)
            if not sizes or min(sizes) < 1:
                raise ValueError(f"blocksign: block sizes must be positive, got {self.block_sizes}")
            object.__setattr__(self, "block_sizes", sizes)

    def blocks_for(self, dim: int) -> tuple[int, ...]:
        """Block sizes for a vector of length ``dim`` (checked against the configured blocks)."""
        if self.block_sizes is None:
            return (dim,)
        if sum(self.block_sizes) != dim:
            raise ValueError(
                f"blocksign: block sizes sum to {sum(self.block_sizes)} but the vector has {dim} "
                "elements; build the compressor from the model's ParamSpec.block_sizes"
            )
        return self.block_sizes

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> BlockSignPayload:
        """Pack the signs and compute one l1-mean scale per block."""
        _check_vector(x)
        blocks = self.blocks_for(x.numel())
        signs, scales = blocksign_encode(x, blocks)
        return BlockSignPayload(x.numel(), blocks, scales, signs)

    def theory_bits(self, dim: int) -> float:
        """``d + 32 N_blk``."""
        return float(dim + 32 * len(self.blocks_for(dim)))


@dataclass(frozen=True)
class RandK(Compressor):
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
    kind: ClassVar[Kind] = Kind.RANDK
    randomized: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_k_ratio("randk", self.k, self.ratio)
        _check_choice("randk", "value_dtype", self.value_dtype, VALUE_DTYPES)
        _check_choice("randk", "index_coding", self.index_coding, INDEX_CODINGS)

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        """Only the scaled form is unbiased."""
        return self.scaled

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> SparsePayload:
        """Sample k coordinates with the given generator."""
        _check_vector(x)
        gen = _check_rng("randk", x, rng)
        d = x.numel()
        k = _resolve_k(self.k, self.ratio, d)
        idx = torch.sort(torch.randperm(d, generator=gen, device=x.device)[:k]).values
        values = x[idx] * (d / k) if self.scaled else x[idx]
        return SparsePayload(Kind.RANDK, d, idx, _cast_values(values, self.value_dtype), self.index_coding)

    def theory_bits(self, dim: int) -> float:
        """``k (b_v + ceil(log2 d))``."""
        k = _resolve_k(self.k, self.ratio, dim)
        return float(k * (_value_bits(self.value_dtype) + _index_bits(dim)))


@dataclass(frozen=True)
class MVSS(Compressor):
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
    kind: ClassVar[Kind] = Kind.MVSS
    unbiased: ClassVar[bool] = True
    randomized: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"mvss: density must be in (0, 1], got {self.density!r}")
        _check_choice("mvss", "value_dtype", self.value_dtype, VALUE_DTYPES)
        _check_choice("mvss", "index_coding", self.index_coding, INDEX_CODINGS)

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
        _check_vector(x)
        gen = _check_rng("mvss", x, rng)
        p = self.probabilities(x)
        u = torch.rand(x.numel(), generator=gen, device=x.device, dtype=torch.float64)
        idx = torch.nonzero(u < p).squeeze(1)
        values = (x[idx].to(torch.float64) / p[idx]).to(x.dtype)
        return SparsePayload(
            Kind.MVSS, x.numel(), idx, _cast_values(values, self.value_dtype), self.index_coding
        )

    def theory_bits(self, dim: int) -> float:
        """Expected ``kappa d (b_v + ceil(log2 d))``."""
        return self.density * dim * (_value_bits(self.value_dtype) + _index_bits(dim))


@dataclass(frozen=True)
class QSGD(Compressor):
    r"""QSGD (Alistarh et al., NeurIPS 2017) with s levels and stochastic rounding, unbiased.

    For a bucket v: :math:`Q_s(v)_i = \|v\|_2 \, \mathrm{sign}(v_i) \, \xi_i / s`, with :math:`\xi_i` equal to
    :math:`\ell + 1` with probability :math:`s|v_i|/\|v\|_2 - \ell` and :math:`\ell` otherwise
    (:math:`\ell = \lfloor s|v_i|/\|v\|_2 \rfloor`). ``bucket_size=0`` uses one bucket.
    Theory bits ``32 n_buckets + d (1 + ceil(log2(s + 1)))`` (the naive code, which the codec implements).
    """

    levels: int = 1
    bucket_size: int = 0
    name: ClassVar[str] = "qsgd"
    kind: ClassVar[Kind] = Kind.QSGD
    unbiased: ClassVar[bool] = True
    randomized: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.levels, int) or not 1 <= self.levels <= 2**15:
            raise ValueError(f"qsgd: levels must be an integer in [1, 32768], got {self.levels!r}")
        if not isinstance(self.bucket_size, int) or self.bucket_size < 0:
            raise ValueError(f"qsgd: bucket_size must be an integer >= 0, got {self.bucket_size!r}")

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> QSGDPayload:
        """Quantize every bucket to s levels with unbiased stochastic rounding."""
        _check_vector(x)
        gen = _check_rng("qsgd", x, rng)
        d = x.numel()
        bucket = self.bucket_size or d
        n_buckets = -(-d // bucket)
        padded = torch.zeros(n_buckets * bucket, dtype=x.dtype, device=x.device)
        padded[:d] = x
        buckets = padded.view(n_buckets, bucket)
        norms = torch.linalg.vector_norm(buckets, dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        r = (buckets.abs() * (self.levels / safe[:, None])).view(-1)[:d]
        low = torch.floor(r)
        u = torch.rand(d, generator=gen, device=x.device, dtype=r.dtype)
        magnitudes = (low + (u < (r - low)).to(r.dtype)).clamp_(max=self.levels).to(torch.int32)
        signs = pack_bits(x >= 0)
        return QSGDPayload(d, self.levels, bucket, norms.to(x.dtype), signs, magnitudes)

    def theory_bits(self, dim: int) -> float:
        """``32 n_buckets + d (1 + ceil(log2(s + 1)))``."""
        n_buckets = -(-dim // (self.bucket_size or dim))
        return float(32 * n_buckets + dim * (1 + math.ceil(math.log2(self.levels + 1))))


@dataclass(frozen=True)
class SignTopK(Compressor):
    r"""Sign-Top-k (Basu et al., Qsparse-local-SGD, NeurIPS 2019): ``(||Top_k(x)||_1 / k) sign(Top_k(x))``.

    Exact error :math:`\|C(x) - x\|^2 = \|x\|^2 - \|Top_k(x)\|_1^2 / k`. Theory bits ``k + 32 + k ceil(log2 d)``.
    """

    k: int | None = None
    ratio: float | None = None
    index_coding: str = "int32"
    name: ClassVar[str] = "signtopk"
    kind: ClassVar[Kind] = Kind.SIGNTOPK

    def __post_init__(self) -> None:
        _check_k_ratio("signtopk", self.k, self.ratio)
        _check_choice("signtopk", "index_coding", self.index_coding, INDEX_CODINGS)

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> SignSparsePayload:
        """Top-k indices, their signs and the mean kept magnitude."""
        _check_vector(x)
        k = _resolve_k(self.k, self.ratio, x.numel())
        idx = topk_indices(x, k)
        kept = x[idx]
        scale = torch.linalg.vector_norm(kept, 1) / k
        return SignSparsePayload(x.numel(), idx, scale, pack_bits(kept >= 0), self.index_coding)

    def theory_bits(self, dim: int) -> float:
        """``k + 32 + k ceil(log2 d)``."""
        k = _resolve_k(self.k, self.ratio, dim)
        return float(k + 32 + k * _index_bits(dim))


def _value_bits(value_dtype: str) -> int:
    return 16 if value_dtype == "float16" else 32


def _check_choice(name: str, key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {key} must be one of {allowed}, got {value!r}")


#: The only map from names to compressor classes (config strings become objects here and nowhere else).
COMPRESSORS: dict[str, Callable[..., Compressor]] = {
    cls.name: cls for cls in (Identity, TopK, BlockSign, RandK, MVSS, QSGD, SignTopK)
}


def make_compressor(name: str, **params) -> Compressor:
    """Build a compressor by registry name, e.g. ``make_compressor("topk", ratio=0.01)``."""
    try:
        factory = COMPRESSORS[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; known: {sorted(COMPRESSORS)}") from None
    return factory(**params)
