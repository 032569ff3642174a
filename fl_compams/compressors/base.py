"""What every compressor shares: the base classes, the helpers, the shared config keys and the registry.

A compressor family is one module that defines a :class:`Payload` subclass (the numbers that cross the network,
how they decode, and how its wire body is written and read back) and one or more :class:`Compressor`
subclasses (hyper-parameters, ``encode``, its run-config keys and ``from_config``), and registers them with
:func:`register`. The registry is the only map from names to compressor classes and from kind bytes to payload
readers: the codec, the run config and the protocol's client keys are all derived from it.

References: Li, Karimi & Li, "On Distributed Adaptive Optimization with Gradient Compression" (ICLR 2022).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fl_compams.bits import unpack_bits
from fl_compams.schema import NONNEG_INT, UNIT_OPEN, Key, choice, key

if TYPE_CHECKING:
    from fl_compams.codec import Reader, Writer

__all__ = [
    "COMPRESSORS",
    "INDEX_CODINGS",
    "SHARED_KEYS",
    "VALUE_DTYPES",
    "Compressor",
    "Kind",
    "Payload",
    "compressor_class",
    "compressor_keys",
    "compressor_of_kind",
    "kind_name",
    "make_compressor",
    "register",
    "registered",
    "registered_kinds",
    "unregister",
]


class Kind(enum.IntEnum):
    """Kind bytes of the built-in payloads (never reuse a number); other compressors may register others."""

    IDENTITY = 1
    TOPK = 2
    BLOCKSIGN = 3
    RANDK = 4
    MVSS = 5
    QSGD = 6
    SIGNTOPK = 7
    QSGD_TOPK = 10  # fl_compams.compressors.qsgd_topk (10: clear of the numbers other new kinds take)
    SIGN = 8
    LAQ = 16  # fl_compams.compressors.laq (16: clear of the numbers other new kinds take next)


VALUE_DTYPES = ("float32", "float16")
INDEX_CODINGS = ("int32", "varint")
_FP16_MAX = 65504.0

# Keys shared by several families, declared once; they lead the compressor part of the run config.
TOPK_RATIO = key("topk-ratio", 0.01, UNIT_OPEN, "k / d for topk, randk and signtopk (ignored if topk-k > 0)")
TOPK_K = key("topk-k", 0, NONNEG_INT, "absolute k for topk, randk and signtopk; 0 = use topk-ratio")
VALUE_DTYPE = key("value-dtype", "float32", choice(VALUE_DTYPES), "wire dtype of sparse/dense values")
INDEX_CODING = key("index-coding", "int32", choice(INDEX_CODINGS), "wire coding of sparse indices")
SHARED_KEYS: tuple[Key, ...] = (TOPK_RATIO, TOPK_K, VALUE_DTYPE, INDEX_CODING)


# -------------------------------------------------------------------------------------------- base classes
def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when 0 is the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


class Payload:
    """Base of the typed payloads: what a client sends, as tensors, before the codec turns it into bytes.

    A payload holds exactly the numbers that cross the network (GRACE's payload/context split), so decoding
    needs only the payload. Subclasses are frozen dataclasses with fields ``dim`` and ``kind`` (the kind byte)
    and implement ``decode``, ``write_body`` and ``read_body``; ``add_to`` lets the server sum n payloads into
    one dense buffer without holding n dense copies.
    """

    kind: int
    dim: int
    #: The header's value-dtype byte describes the body's values (float32 or float16); else it must be 0.
    wire_values: ClassVar[bool] = False
    #: The header's index-coding byte describes the body's indices; else it must be 0.
    wire_indices: ClassVar[bool] = False

    def decode(self) -> torch.Tensor:
        """Return the dense vector ``C(x)``."""
        raise NotImplementedError

    def add_to(self, out: torch.Tensor, weight: float = 1.0) -> None:
        """``out += weight * decode(self)``, in place."""
        out.add_(self.decode().to(out.dtype), alpha=weight)

    def norm(self) -> float:
        """l2 norm of the decoded vector."""
        return float(torch.linalg.vector_norm(self.decode()))

    def to(self, device: torch.device | str) -> Payload:
        """The payload with every tensor on ``device`` (itself when they already are: no copy)."""
        device = torch.device(device)
        tensors = [
            v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)
        ]  # type: ignore[arg-type]
        if all(_same_device(t.device, device) for t in tensors):
            return self
        moved = {
            f.name: v.to(device)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if isinstance(v := getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)  # type: ignore[type-var]

    def write_body(self, w: Writer) -> None:
        """Write the wire body (everything after the header) with the codec's writer."""
        raise NotImplementedError

    @classmethod
    def read_body(cls, r: Reader, kind: int, dim: int) -> Payload:
        """Read and validate a body written by :meth:`write_body`; raise ``PayloadError`` if malformed."""
        raise NotImplementedError


class Compressor:
    """Base class: subclasses are frozen dataclasses implementing ``encode``, ``theory_bits``, ``from_config``.

    A compressor holds hyper-parameters only: no error-feedback memory, no learning rate, no device. ``encode``
    works on a 1-D torch tensor on any device and returns a payload on the same device; ``decode`` returns
    ``C(x)`` as a dense vector. Randomised operators take an explicit seeded ``torch.Generator`` on x's device.
    """

    #: Registry name (the run config's ``compressor`` value).
    name: ClassVar[str]
    #: The payload kind byte ``encode`` produces (the server checks replies against it).
    kind: ClassVar[int]
    #: The payload class ``encode`` returns; the codec reads bodies of this kind with its ``read_body``.
    payload_type: ClassVar[type[Payload]]
    #: Run-config keys this compressor reads in ``from_config`` (always client keys).
    config_keys: ClassVar[tuple[Key, ...]] = ()
    #: E[C(x)] = x for every x (unbiased operators are used without error feedback by their papers).
    unbiased: ClassVar[bool] = False
    #: ``encode`` needs a generator.
    randomized: ClassVar[bool] = False

    @classmethod
    def from_config(cls, values: Mapping[str, Any], block_sizes: tuple[int, ...] | None) -> Compressor:
        """Build from parsed run-config values (kebab-case keys) and the model's block sizes."""
        raise NotImplementedError

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


# ------------------------------------------------------------------------------------------------ helpers
def index_bits(dim: int) -> int:
    """``ceil(log2 d)``: bits of one raw index (at least 1)."""
    return max(1, math.ceil(math.log2(dim)))


def value_bits(value_dtype: str) -> int:
    """Bits of one wire value."""
    return 16 if value_dtype == "float16" else 32


def resolve_k(k: int | None, ratio: float | None, dim: int) -> int:
    """Number of kept coordinates: ``k`` if given, else ``round(ratio * d)``, clipped to [1, d]."""
    if k is not None:
        return min(k, dim)
    return max(1, min(dim, round(ratio * dim)))


def check_k_ratio(name: str, k: int | None, ratio: float | None) -> None:
    """Exactly one of k (a positive integer) or ratio (in (0, 1])."""
    if (k is None) == (ratio is None):
        raise ValueError(f"{name}: give exactly one of k or ratio (got k={k}, ratio={ratio})")
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"{name}: k must be a positive integer, got {k!r}")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name}: ratio must be in (0, 1], got {ratio!r}")


def k_or_ratio(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"k": topk-k}`` if topk-k > 0, else ``{"ratio": topk-ratio}``."""
    return {"k": values["topk-k"]} if values["topk-k"] > 0 else {"ratio": values["topk-ratio"]}


def check_choice(name: str, field: str, value: object, allowed: tuple[str, ...]) -> None:
    """``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}: {field} must be one of {allowed}, got {value!r}")


def check_vector(x: torch.Tensor) -> None:
    """A non-empty 1-D floating-point tensor."""
    if x.ndim != 1 or x.numel() == 0:
        raise ValueError(f"compressors take a non-empty flat vector, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"compressors take a floating-point vector, got {x.dtype}")


def check_rng(name: str, x: torch.Tensor, rng: torch.Generator | None) -> torch.Generator:
    """The generator of a randomised compressor (refuse to draw from the global one)."""
    if rng is None:
        raise ValueError(
            f"{name} is randomised: pass a seeded torch.Generator on {x.device} as rng (randomness is "
            "explicit so that runs are reproducible)"
        )
    return rng


def cast_values(values: torch.Tensor, value_dtype: str) -> torch.Tensor:
    """Round values to the wire dtype; float16 saturates at +-65504 (error feedback keeps the remainder)."""
    if value_dtype == "float16":
        return values.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
    return values


def signed(signs: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed sign bits (1 = non-negative) -> a tensor of +1/-1 of the given dtype."""
    return unpack_bits(signs, count).to(dtype).mul_(2).sub_(1)


# ----------------------------------------------------------------------------------------------- registry
#: Name -> compressor class: the only place config strings become classes.
COMPRESSORS: dict[str, type[Compressor]] = {}
_BY_KIND: dict[int, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    """Add a compressor class to the registry (usable as a class decorator); returns the class.

    Refuses a taken name or kind byte, a kind byte outside [1, 255], a payload type that is not a
    :class:`Payload`, a server-side config key, and a config key whose name another compressor declares
    with a different definition (shared keys are declared once and reused).
    """
    name, kind = cls.name, int(cls.kind)
    if name in COMPRESSORS:
        raise ValueError(f"compressor name {name!r} is already registered ({COMPRESSORS[name].__qualname__})")
    if not 1 <= kind <= 255:
        raise ValueError(f"{name}: kind byte must be in [1, 255], got {kind}")
    if kind in _BY_KIND:
        raise ValueError(f"{name}: kind byte {kind} is already used by {_BY_KIND[kind].name!r}")
    if not (isinstance(cls.payload_type, type) and issubclass(cls.payload_type, Payload)):
        raise TypeError(f"{name}: payload_type must be a Payload subclass, got {cls.payload_type!r}")
    declared = {k.name: k for c in COMPRESSORS.values() for k in c.config_keys}
    for k in cls.config_keys:
        if k.side != "client":
            raise ValueError(
                f"{name}: config key {k.name!r} must be a client key (clients build the compressor)"
            )
        if declared.get(k.name, k) is not k:
            raise ValueError(f"{name}: config key {k.name!r} is declared differently by another compressor")
    COMPRESSORS[name] = cls
    _BY_KIND[kind] = cls
    return cls


def unregister(name: str) -> type[Compressor]:
    """Remove a compressor from the registry; returns its class."""
    cls = COMPRESSORS.pop(name)
    del _BY_KIND[int(cls.kind)]
    return cls


@contextmanager
def registered(cls: type[Compressor]) -> Iterator[type[Compressor]]:
    """``with registered(MyCompressor): ...``: the compressor is known inside the block only."""
    register(cls)
    try:
        yield cls
    finally:
        unregister(cls.name)


def compressor_of_kind(kind: int) -> type[Compressor] | None:
    """The compressor registered for a kind byte, or None."""
    return _BY_KIND.get(int(kind))


def registered_kinds() -> list[int]:
    """The kind bytes the codec accepts, sorted."""
    return sorted(_BY_KIND)


def kind_name(kind: int) -> str:
    """Upper-case name of a kind byte (``Kind.TOPK.name`` for the built-ins), or the number if unknown."""
    cls = _BY_KIND.get(int(kind))
    return cls.name.upper() if cls else str(int(kind))


def compressor_keys() -> tuple[Key, ...]:
    """Run-config keys of the registered compressors, each once.

    Order (the order of ``pyproject.toml``): the shared keys any compressor uses, then every compressor's own
    keys in its declaration order, compressors by name, so the order does not depend on import order.
    """
    used = {k.name for cls in COMPRESSORS.values() for k in cls.config_keys}
    keys = {k.name: k for k in SHARED_KEYS if k.name in used}
    for name in sorted(COMPRESSORS):
        for k in COMPRESSORS[name].config_keys:
            keys.setdefault(k.name, k)
    return tuple(keys.values())


def compressor_class(name: str) -> type[Compressor]:
    """The compressor class registered under ``name``."""
    try:
        return COMPRESSORS[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; known: {sorted(COMPRESSORS)}") from None


def make_compressor(name: str, **params: Any) -> Compressor:
    """Build a compressor by registry name, e.g. ``make_compressor("topk", ratio=0.01)``."""
    return compressor_class(name)(**params)
