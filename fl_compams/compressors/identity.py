"""Identity (no compression, the full-precision baseline): ``C(x) = x``.

Wire body: ``values[dim]`` in the header's value dtype (float32, or float16 rounded by the sender).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fl_compams.compressors.base import (
    VALUE_DTYPE,
    VALUE_DTYPES,
    Compressor,
    Kind,
    Payload,
    cast_values,
    check_choice,
    check_vector,
    register,
    value_bits,
)
from fl_compams.schema import Key

if TYPE_CHECKING:
    from fl_compams.codec import Reader, Writer

__all__ = ["DensePayload", "Identity"]


@dataclass(frozen=True, eq=False)
class DensePayload(Payload):
    """All d values: ``values[dim]``."""

    dim: int
    values: torch.Tensor
    kind: int = Kind.IDENTITY
    wire_values: ClassVar[bool] = True

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

    def write_body(self, w: Writer) -> None:
        """``values[dim]``."""
        w.values(self.values)

    @classmethod
    def read_body(cls, r: Reader, kind: int, dim: int) -> DensePayload:
        """``dim`` finite values."""
        return cls(dim, r.values(dim))


@register
@dataclass(frozen=True)
class Identity(Compressor):
    """No compression (full-precision baseline): ``C(x) = x``; 32 d bits (16 d with float16 values)."""

    value_dtype: str = "float32"
    name: ClassVar[str] = "identity"
    kind: ClassVar[int] = Kind.IDENTITY
    payload_type: ClassVar[type[Payload]] = DensePayload
    config_keys: ClassVar[tuple[Key, ...]] = (VALUE_DTYPE,)

    def __post_init__(self) -> None:
        check_choice("identity", "value_dtype", self.value_dtype, VALUE_DTYPES)

    @classmethod
    def from_config(cls, values: Mapping[str, Any], block_sizes: tuple[int, ...] | None = None) -> Identity:
        """``value-dtype``."""
        return cls(value_dtype=values["value-dtype"])

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> DensePayload:
        """Send every coordinate."""
        check_vector(x)
        return DensePayload(x.numel(), cast_values(x, self.value_dtype).clone())

    def theory_bits(self, dim: int) -> float:
        """``32 d`` (or ``16 d``)."""
        return float(value_bits(self.value_dtype) * dim)
