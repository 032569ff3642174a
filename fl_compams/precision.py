"""Compact storage of client state vectors: float32 (exact), float16 with a power-of-two scale, or bfloat16.

A worker's EF residual (and, with two-way compression, its replica of the public model) is the bulk of its state
(design.md section 7, "State size"). ``state-dtype`` stores them in 2 bytes per element instead of 4; the values
used afterwards are the stored (rounded) ones, so the EF identity holds up to the rounding error:

* ``float16``: the vector is scaled by ``2**k`` before rounding, with ``k`` chosen so that its largest magnitude
  lies in ``(2**14, 2**15]``; ``k`` is stored beside the values. Scaling by a power of two is exact, so the
  rounding is that of float16's 11-bit significand (unit roundoff ``2**-11``) with its exponent range moved to
  the vector: no overflow (float16's maximum is 65504), and elements down to about ``2**-28`` of the largest stay
  normal. Smaller elements round to a multiple of ``2**-24`` of the scale (float16's subnormals).
* ``bfloat16``: float32's exponent range with an 8-bit significand (unit roundoff ``2**-8``); no scale needed.

Rounding is to nearest, ties to even (torch's ``Tensor.to``), the same on every device, so a server and a client
that round the same float32 vector get the same bits; and it is idempotent (``round_to(round_to(x)) ==
round_to(x)``): float16's scale can only grow when the largest magnitude rounds down to ``2**14``, and a finer
scale represents every value of the coarser one. So a vector kept representable (two-way compression's public
model, :mod:`fl_compams.downlink`) is stored exactly.
"""

from __future__ import annotations

import math

import torch

__all__ = ["STATE_DTYPES", "UNIT_ROUNDOFF", "decode", "element_bound", "encode", "itemsize", "round_to"]

STATE_DTYPES = ("float32", "float16", "bfloat16")
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Unit roundoff u = 2**-p of round-to-nearest with a p-bit significand (float16 p = 11, bfloat16 p = 8).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
#: Half the smallest subnormal, relative to the scale: the absolute error bound of elements below normal range.
_TINY = {"float32": 2.0**-150, "float16": 2.0**-25, "bfloat16": 2.0**-134}
#: float16: the largest magnitude is scaled into (2**14, 2**15], below float16's maximum 65504.
_F16_TOP = 15


def _check(dtype: str) -> None:
    if dtype not in _TORCH:
        raise ValueError(f"state dtype must be one of {list(STATE_DTYPES)}, got {dtype!r}")


def itemsize(dtype: str) -> int:
    """Bytes per stored element."""
    _check(dtype)
    return 4 if dtype == "float32" else 2


def _scale_exponent(x: torch.Tensor) -> int:
    top = float(x.abs().max()) if x.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return 0
    m, e = math.frexp(top)  # top = m * 2**e, m in [0.5, 1)
    return _F16_TOP - (e - 1 if m == 0.5 else e)  # 15 - ceil(log2(top)): top * 2**k in (2**14, 2**15]


def _ldexp(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x * 2**k`` in two factors, each a float32 power of two (|k| may exceed float32's exponent range)."""
    if not k:
        return x
    half = k // 2
    return x * 2.0**half * 2.0 ** (k - half)


def encode(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, int]:
    """``(values, k)``: ``x * 2**k`` rounded to ``dtype`` (k = 0 except for float16); float32 is ``x`` itself.

    Raises ValueError for an unknown dtype or a non-finite element (it would not survive the rounding).
    """
    _check(dtype)
    if dtype == "float32":
        return x, 0
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"cannot store a vector with NaN or infinite elements in {dtype}")
    k = _scale_exponent(x) if dtype == "float16" else 0
    return _ldexp(x.float(), k).to(_TORCH[dtype]), k


def decode(values: torch.Tensor, k: int = 0) -> torch.Tensor:
    """The float32 vector ``values * 2**-k`` (exact: a power-of-two scale of a float16/bfloat16 value)."""
    return _ldexp(values.to(torch.float32), -k)


def round_to(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """``decode(*encode(x, dtype))``: the float32 values a vector stored in ``dtype`` reads back as."""
    return decode(*encode(x, dtype))


def element_bound(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Per element, the most ``|round_to(x, dtype) - x|`` can be: ``u |x|`` plus half a subnormal of the scale."""
    _check(dtype)
    k = _scale_exponent(x) if dtype == "float16" else 0
    return UNIT_ROUNDOFF[dtype] * x.abs() + math.ldexp(_TINY[dtype], -k) + 2.0**-149  # float32 subnormals
