r"""LAQ's b-bit innovation quantizer (Sun, Chen, Giannakis & Yang, NeurIPS 2019; the authors' code ``quantd``).

Applied to the *innovation* ``v = grad - Q_prev`` of a worker (its gradient minus its last upload), with radius
``R = ||v||_inf`` and ``tau = 1 / (2^b - 1)``::

    q_i = floor( (v_i + R) / (2 tau R) + 1/2 )  in {0, ..., 2^b - 1}
    dQ  = -R 1 + 2 tau R q                        (the innovation; Q = Q_prev + dQ, ||Q - grad||_inf <= tau R)

so the payload decodes standalone (no ``Q_prev`` needed) and, used on its own (``compressor = "laq"``), it is a
deterministic b-bit uniform quantizer of x on ``[-||x||_inf, ||x||_inf]``. ``R = 0`` sends zero codes (decode 0).

Wire body: ``R f32 | bits u32 | codes`` with the codes bit-packed at ``bits`` bits each (most significant bit
first, zero padding), ``ceil(d b / 8)`` bytes. Theory bits ``32 + b d`` (algorithms.md section 4.5; the authors'
code counts ``b d`` and omits the radius).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from fl_compams.bits import pack_uint, unpack_uint
from fl_compams.compressors.base import Compressor, Kind, Payload, check_vector, register
from fl_compams.errors import PayloadError
from fl_compams.schema import Key, key

if TYPE_CHECKING:
    from fl_compams.codec import Reader, Writer

__all__ = ["MAX_BITS", "LAQPayload", "LAQQuantizer"]

#: Widest code the wire (``unpack_uint``) carries; issue 12 asks for b in 1..16.
MAX_BITS = 16


def _check_bits(bits: Any, what: str, error: type[Exception] = ValueError) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise error(f"{what} must be an integer in [1, {MAX_BITS}], got {bits!r}")


@dataclass(frozen=True, eq=False)
class LAQPayload(Payload):
    """Radius ``R`` (a 0-d float32 tensor), ``bits`` = b and the codes ``q`` in {0..2^b - 1} (int32 tensor)."""

    dim: int
    bits: int
    radius: torch.Tensor
    codes: torch.Tensor
    kind: int = Kind.LAQ

    def decode(self) -> torch.Tensor:
        """``-R + 2 tau R q`` (float32), tau = 1 / (2^b - 1)."""
        r = self.radius.float()
        step = 2.0 * r / float(2**self.bits - 1)
        return self.codes.to(torch.float32).mul(step).sub_(r)

    def write_body(self, w: Writer) -> None:
        """``R | bits | packed codes``."""
        w.f32(self.radius.reshape(1))
        w.u32(self.bits)
        w.raw(pack_uint(self.codes.detach().cpu().numpy(), self.bits))

    @classmethod
    def read_body(cls, r: Reader, kind: int, dim: int) -> LAQPayload:
        """R finite and >= 0; bits in [1, 16]; ``ceil(d b / 8)`` code bytes with zero padding bits."""
        radius = r.f32(1, "radius")
        if bool(radius[0] < 0):
            raise PayloadError(f"LAQ radius must be >= 0 (it is an infinity norm), got {float(radius[0])}")
        bits = r.u32("bits")
        _check_bits(bits, "LAQ bits", PayloadError)
        codes = unpack_uint(r.bits(dim * bits, "codes").numpy(), dim, bits)
        return cls(dim, bits, radius.reshape(()), torch.from_numpy(codes.astype(np.int32)))


@register
@dataclass(frozen=True)
class LAQQuantizer(Compressor):
    r"""LAQ's deterministic b-bit quantizer (Sun et al., NeurIPS 2019, eq. (3)-(4)), see the module docstring.

    ``encode(x)`` quantizes ``x`` on the grid of :math:`2^b` points spanning :math:`[-R, R]`,
    :math:`R = \|x\|_\infty`; LAQ applies it to the innovation ``grad - Q_prev`` (:mod:`fl_compams.laq`).
    """

    bits: int = 4
    name: ClassVar[str] = "laq"
    kind: ClassVar[int] = Kind.LAQ
    payload_type: ClassVar[type[Payload]] = LAQPayload
    config_keys: ClassVar[tuple[Key, ...]] = (
        key(
            "laq-bits",
            4,
            ((lambda v: 1 <= v <= MAX_BITS), f"an integer in [1, {MAX_BITS}]"),
            (
                "LAQ: bits b per coordinate of the quantized innovation (4 as the paper; the digits CNN needs 8, "
                "else the 3||eps||^2 term of the skip rule dwarfs every innovation)"
            ),
        ),
    )

    def __post_init__(self) -> None:
        _check_bits(self.bits, "laq: bits")

    @classmethod
    def from_config(
        cls, values: Mapping[str, Any], block_sizes: tuple[int, ...] | None = None
    ) -> LAQQuantizer:
        """``laq-bits``."""
        return cls(bits=values["laq-bits"])

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> LAQPayload:
        """The authors' ``quantd`` with ``v2 = 0``: ``q = floor((x + R) / (2 tau R) + 1/2)``, clamped to the grid."""
        check_vector(x)
        top = 2**self.bits - 1
        radius = x.detach().abs().max().to(torch.float32)
        if not bool(torch.isfinite(radius)):
            raise PayloadError("refusing to quantize a vector with non-finite values")
        if float(radius) == 0.0:  # nothing to send; any code decodes to 0
            codes = torch.zeros(x.numel(), dtype=torch.int32, device=x.device)
        else:
            r = radius.double()
            scaled = (x.double() + r) * (top / (2.0 * r)) + 0.5  # (x + R) / (2 tau R) + 1/2
            codes = torch.floor(scaled).clamp_(0, top).to(torch.int32)  # clamp: float rounding at x = +-R
        return LAQPayload(x.numel(), self.bits, radius, codes)

    def theory_bits(self, dim: int) -> float:
        """``32 + b d`` (the radius and the codes)."""
        return float(32 + self.bits * dim)
