r"""QSGD (Alistarh et al., NeurIPS 2017): s quantization levels with stochastic rounding over buckets, unbiased.

Wire body: ``levels u32 | bucket u32 | norms f32[n_buckets] | signs ceil(dim/8) | magnitudes`` with the
magnitudes (levels in {0..s}) bit-packed at ``bit_length(s)`` bits each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from fl_compams.bits import pack_bits, pack_uint, unpack_uint
from fl_compams.compressors.base import Compressor, Kind, Payload, check_rng, check_vector, register, signed
from fl_compams.errors import PayloadError
from fl_compams.schema import NONNEG_INT, Key, key

if TYPE_CHECKING:
    from fl_compams.codec import Reader, Writer

__all__ = ["QSGD", "QSGDPayload", "read_levels", "read_magnitudes", "write_magnitudes"]

_MAX_LEVELS = 2**15


@dataclass(frozen=True, eq=False)
class QSGDPayload(Payload):
    """QSGD with ``levels`` = s quantization levels over buckets of ``bucket_size`` coordinates.

    Coordinate i of bucket B decodes to ``norms[B] * sign_i * level_i / s`` with ``level_i`` in {0..s}.
    """

    dim: int
    levels: int
    bucket_size: int
    norms: torch.Tensor
    signs: torch.Tensor
    magnitudes: torch.Tensor
    kind: int = Kind.QSGD

    def decode(self) -> torch.Tensor:
        """Return the dense dequantized vector."""
        dtype = self.norms.dtype
        values = signed(self.signs, self.dim, dtype).mul_(self.magnitudes.to(dtype))
        scale = torch.repeat_interleave(self.norms / self.levels, self.bucket_size)[: self.dim]
        return values.mul_(scale)

    def write_body(self, w: Writer) -> None:
        """``levels | bucket | norms | signs | magnitudes``."""
        w.u32(self.levels)
        w.u32(self.bucket_size)
        w.f32(self.norms)
        w.raw(self.signs)
        write_magnitudes(w, self.magnitudes, self.levels)

    @classmethod
    def read_body(cls, r: Reader, kind: int, dim: int) -> QSGDPayload:
        """Check levels in [1, 32768], bucket in [1, dim], norms finite and >= 0, magnitudes <= levels."""
        levels = read_levels(r)
        bucket = r.count("bucket size", dim, minimum=1)
        norms = r.f32(-(-dim // bucket), "norms")
        if bool((norms < 0).any()):
            raise PayloadError("QSGD bucket norms must be >= 0")
        signs = r.bits(dim, "signs")
        return cls(dim, levels, bucket, norms, signs, read_magnitudes(r, dim, levels))


def read_levels(r: Reader) -> int:
    """The number of levels s, in [1, 32768]."""
    levels = r.u32("levels")
    if not 1 <= levels <= _MAX_LEVELS:
        raise PayloadError(f"QSGD levels must be in [1, {_MAX_LEVELS}], got {levels}")
    return levels


def write_magnitudes(w: Writer, magnitudes: torch.Tensor, levels: int) -> None:
    """Levels in {0..s}, bit-packed at ``bit_length(s)`` bits each."""
    w.raw(pack_uint(magnitudes.detach().cpu().numpy(), levels.bit_length()))


def read_magnitudes(r: Reader, count: int, levels: int) -> torch.Tensor:
    """``count`` levels packed by :func:`write_magnitudes`, each <= ``levels``, as int32."""
    width = levels.bit_length()
    magnitudes = unpack_uint(r.bits(count * width, "magnitudes").numpy(), count, width)
    if magnitudes.max(initial=0) > levels:
        raise PayloadError(f"QSGD magnitude {int(magnitudes.max())} exceeds the {levels} levels")
    return torch.from_numpy(magnitudes.astype(np.int32))


@register
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
    kind: ClassVar[int] = Kind.QSGD
    payload_type: ClassVar[type[Payload]] = QSGDPayload
    unbiased: ClassVar[bool] = True
    randomized: ClassVar[bool] = True
    config_keys: ClassVar[tuple[Key, ...]] = (
        key(
            "qsgd-levels",
            4,
            ((lambda v: 1 <= v <= _MAX_LEVELS), f"an integer in [1, {_MAX_LEVELS}]"),
            "QSGD levels s",
        ),
        key("qsgd-bucket-size", 0, NONNEG_INT, "QSGD bucket size; 0 = one bucket"),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.levels, int) or not 1 <= self.levels <= _MAX_LEVELS:
            raise ValueError(f"qsgd: levels must be an integer in [1, {_MAX_LEVELS}], got {self.levels!r}")
        if not isinstance(self.bucket_size, int) or self.bucket_size < 0:
            raise ValueError(f"qsgd: bucket_size must be an integer >= 0, got {self.bucket_size!r}")

    @classmethod
    def from_config(cls, values: Mapping[str, Any], block_sizes: tuple[int, ...] | None = None) -> QSGD:
        """``qsgd-levels``, ``qsgd-bucket-size``."""
        return cls(levels=values["qsgd-levels"], bucket_size=values["qsgd-bucket-size"])

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> QSGDPayload:
        """Quantize every bucket to s levels with unbiased stochastic rounding."""
        check_vector(x)
        gen = check_rng("qsgd", x, rng)
        d = x.numel()
        bucket = min(self.bucket_size or d, d)  # a bucket larger than d is one bucket (the wire allows <= d)
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
