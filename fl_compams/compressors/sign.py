r"""Scaled sign with one scale for the whole vector: ``C(x) = (||x||_1 / d) sign(x)``.

Zheng, Huang & Kwok, NeurIPS 2019 (dist-EF-SGD, the non-block version); Karimireddy et al. 2019 (EF-signSGD).

Block-Sign (:mod:`.blocksign`) with a single block; a kind of its own so that a one-scale payload is told apart
from a Block-Sign payload, which must carry the model's per-layer blocks. sign(0) = +1.

Wire body: ``scale f32 | signs ceil(dim/8)`` (packed bits, 1 = non-negative, zero padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fl_compams.compressors.base import Compressor, Kind, Payload, check_vector, register
from fl_compams.errors import PayloadError
from fl_compams.kernels import blocksign_decode, blocksign_encode

if TYPE_CHECKING:
    from fl_compams.codec import Reader, Writer

__all__ = ["Sign", "SignPayload"]


@dataclass(frozen=True, eq=False)
class SignPayload(Payload):
    """One-scale sign payload: ``scale = ||x||_1 / d`` and ``ceil(dim / 8)`` packed sign bytes."""

    dim: int
    scale: torch.Tensor
    signs: torch.Tensor
    kind: int = Kind.SIGN

    def decode(self) -> torch.Tensor:
        """Return ``scale * sign(x)``."""
        return blocksign_decode(self.signs, self.scale.reshape(1), (self.dim,), self.dim)

    def norm(self) -> float:
        """l2 norm of the decoded vector: ``scale * sqrt(d)``."""
        return float(self.scale) * float(self.dim) ** 0.5

    def write_body(self, w: Writer) -> None:
        """``scale | signs``."""
        w.f32(self.scale.reshape(1))
        w.raw(self.signs)

    @classmethod
    def read_body(cls, r: Reader, kind: int, dim: int) -> SignPayload:
        """Scale finite and >= 0; sign padding zero."""
        scale = r.f32(1, "scale")
        if scale[0] < 0:
            raise PayloadError(f"sign scale must be >= 0 (a mean absolute value), got {float(scale[0])}")
        return cls(dim, scale.reshape(()), r.bits(dim, "signs"))


@register
@dataclass(frozen=True)
class Sign(Compressor):
    r"""Scaled sign, one scale: ``C(x) = sign(x) ||x||_1 / d``.

    Exact error :math:`\|C(x) - x\|^2 = \|x\|_2^2 - \|x\|_1^2 / d \le (1 - 1/d)\|x\|^2`. Theory bits ``d + 32``.
    """

    name: ClassVar[str] = "sign"
    kind: ClassVar[int] = Kind.SIGN
    payload_type: ClassVar[type[Payload]] = SignPayload

    @classmethod
    def from_config(cls, values: Mapping[str, Any], block_sizes: tuple[int, ...] | None = None) -> Sign:
        """No keys."""
        return cls()

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> SignPayload:
        """Pack the signs and compute the l1-mean scale."""
        check_vector(x)
        signs, scales = blocksign_encode(x, (x.numel(),))
        return SignPayload(x.numel(), scales.reshape(()), signs)

    def theory_bits(self, dim: int) -> float:
        """``d + 32``."""
        return float(dim + 32)
