"""Versioned binary wire format for payloads. Never pickle: this parses bytes from untrusted clients.

Layout (little endian)::

    header  magic "CAMS" | version u8 | kind u8 | value dtype u8 | index coding u8 | dim u32      (12 bytes)
    body    written and read by the payload class registered for the kind byte; the built-ins:
            IDENTITY   values[dim]
            TOPK/RANDK/MVSS  nnz u32 | indices | values[nnz]
            BLOCKSIGN  n_blocks u32 | block sizes u32[n_blocks] | scales f32[n_blocks] | signs ceil(dim/8)
            SIGNTOPK   nnz u32 | indices | scale f32 | signs ceil(nnz/8)
            SIGN       scale f32 | signs ceil(dim/8)
            QSGD       levels u32 | bucket u32 | norms f32[n_buckets] | signs ceil(dim/8) | magnitudes
    indices  int32 coding:  u32[nnz], strictly increasing
             varint coding: n_bytes u32 | LEB128 varints of the gaps (i_0, i_1 - i_0 - 1, ...)
    values   float32 or float16 (the header's value dtype); signs are packed bits, 1 = non-negative.
    magnitudes  QSGD levels in {0..s}, bit-packed at bit_length(s) bits each.

The codec owns the header and the primitives (:class:`Writer`, :class:`Reader`: counts, finite numbers, packed
bits, indices); each payload class owns its body (``write_body`` / ``read_body``) and the registry in
:mod:`fl_compams.compressors.base` maps the kind byte to it. :func:`from_bytes` checks the header and every
count against the expected dimension before it reads or allocates anything sized by the data, then checks
the content (index range and order, finite values, level range, zero padding bits) and raises
:class:`PayloadError` naming what was expected and what was found.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import torch

from fl_compams.compressors.base import (
    INDEX_CODINGS,
    Payload,
    compressor_of_kind,
    kind_name,
    registered_kinds,
)
from fl_compams.errors import PayloadError

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "Reader",
    "Writer",
    "from_bytes",
    "max_encoded_size",
    "to_bytes",
]

MAGIC = b"CAMS"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBBBI")
HEADER_SIZE = _HEADER.size
_U32 = struct.Struct("<I")
_MAX_DIM = 2**32 - 1

_VALUE_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
_VALUE_CODES = {torch.float32: 0, torch.float16: 1}
_INDEX_CODES = {name: i for i, name in enumerate(INDEX_CODINGS)}
_F32 = np.dtype("<f4")
_U32_DT = np.dtype("<u4")
_U8 = np.dtype(np.uint8)


# ----------------------------------------------------------------------------------------------- encoding
class Writer:
    """Collects a body's parts; ``values`` and ``indices`` also set the header's dtype and coding bytes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.value_code = 0
        self.index_code = 0

    def u32(self, value: int) -> None:
        """One little-endian uint32."""
        self.parts.append(_U32.pack(value))

    def u32_array(self, values: Sequence[int]) -> None:
        """Little-endian uint32s."""
        self.parts.append(np.asarray(values, dtype=_U32_DT).tobytes())

    def values(self, values: torch.Tensor) -> None:
        """Finite float32 or float16 values; their dtype goes into the header."""
        self.value_code = _value_code(values)
        self.parts.append(_values_bytes(values))

    def f32(self, values: torch.Tensor) -> None:
        """Finite numbers as float32 (scales, norms); the header is not involved."""
        self.parts.append(_values_bytes(values.float()))

    def indices(self, indices: torch.Tensor, coding: str) -> None:
        """Strictly increasing indices in the given coding (which goes into the header)."""
        self.index_code = _index_code(coding)
        self.parts.append(_indices_bytes(indices, coding))

    def raw(self, data: torch.Tensor | np.ndarray) -> None:
        """Bytes as they are (packed bits)."""
        arr = _cpu_numpy(data) if isinstance(data, torch.Tensor) else data
        self.parts.append(arr.tobytes())


def to_bytes(payload: Payload) -> bytes:
    """Serialise a payload (moved to the CPU) into the versioned wire format."""
    cls = compressor_of_kind(payload.kind)
    if cls is None or not isinstance(payload, cls.payload_type):
        expected = "an unregistered kind" if cls is None else cls.payload_type.__name__
        raise PayloadError(
            f"cannot serialise payload kind {payload.kind!r}: expected {expected}, got {type(payload).__name__}"
        )
    w = Writer()
    payload.write_body(w)
    if not 0 < payload.dim <= _MAX_DIM:
        raise PayloadError(f"dimension must be in [1, {_MAX_DIM}], got {payload.dim}")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, int(payload.kind), w.value_code, w.index_code, payload.dim)
    return b"".join([header, *w.parts])


def _cpu_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _value_code(values: torch.Tensor) -> int:
    try:
        return _VALUE_CODES[values.dtype]
    except KeyError:
        raise PayloadError(
            f"values of dtype {values.dtype} cannot be sent; the wire carries float32 or float16"
        ) from None


def _values_bytes(values: torch.Tensor) -> bytes:
    _value_code(values)
    if not bool(torch.isfinite(values).all()):
        raise PayloadError("refusing to send non-finite values (NaN or inf) in a payload")
    arr = _cpu_numpy(values)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _index_code(coding: str) -> int:
    try:
        return _INDEX_CODES[coding]
    except KeyError:
        raise PayloadError(f"unknown index coding {coding!r}; use one of {INDEX_CODINGS}") from None


def _indices_bytes(indices: torch.Tensor, coding: str) -> bytes:
    idx = _cpu_numpy(indices).astype(np.int64, copy=False)
    if idx.size and (idx[0] < 0 or np.any(np.diff(idx) <= 0)):
        raise PayloadError("payload indices must be non-negative and strictly increasing")
    if coding == "int32":
        return idx.astype(_U32_DT).tobytes()
    gaps = np.diff(idx, prepend=-1) - 1
    stream = _varint_encode(gaps)
    return _U32.pack(len(stream)) + stream


def _varint_encode(values: np.ndarray) -> bytes:
    """LEB128: 7 bits per byte, low groups first, high bit set on all but the last byte of a value."""
    v = values.astype(np.uint64)
    n_bytes = np.ones(v.size, dtype=np.int64)
    for j in range(1, 5):
        n_bytes += v >= (1 << (7 * j))
    pos = np.arange(5)
    groups = ((v[:, None] >> (7 * pos).astype(np.uint64)) & 0x7F).astype(np.uint8)
    groups |= np.where(pos[None, :] < (n_bytes - 1)[:, None], 0x80, 0).astype(np.uint8)
    return groups[pos[None, :] < n_bytes[:, None]].tobytes()


def max_encoded_size(dim: int) -> int:
    """Upper bound on the size of any valid payload of dimension ``dim`` (sparse with 5-byte varints: 9d)."""
    return HEADER_SIZE + 9 * dim + 64


# ----------------------------------------------------------------------------------------------- decoding
class Reader:
    """Cursor over the body that only hands out data after checking the bytes are there.

    ``value_dtype`` and ``index_coding`` come from the (already validated) header; ``block_sizes`` from the
    caller of :func:`from_bytes`. The checked readers
    (``count``, ``values``, ``f32``, ``bits``, ``indices``) raise :class:`PayloadError` naming what was
    expected and what was found, and return owned, writable, native-endian tensors.
    """

    def __init__(
        self,
        data: bytes,
        offset: int,
        value_dtype: np.dtype = _F32,
        index_coding: str = "int32",
        block_sizes: Sequence[int] | None = None,
    ):
        self.data = memoryview(data)
        self.offset = offset
        self.value_dtype = value_dtype
        self.index_coding = index_coding
        #: The model's block layout, when the caller knows it: a body that carries one must match it.
        self.block_sizes = None if block_sizes is None else tuple(int(b) for b in block_sizes)

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self.data) - self.offset

    def need(self, n: int, what: str) -> None:
        """Fail unless ``n`` more bytes are there."""
        if n > self.remaining:
            raise PayloadError(
                f"truncated payload: {what} needs {n} more bytes, only {self.remaining} left "
                f"(payload is {len(self.data)} bytes)"
            )

    def u32(self, what: str) -> int:
        """One little-endian uint32."""
        self.need(4, what)
        (value,) = _U32.unpack_from(self.data, self.offset)
        self.offset += 4
        return value

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        """A read-only numpy view of ``count`` items."""
        n = dtype.itemsize * count
        self.need(n, what)
        arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += n
        return arr

    def count(self, what: str, dim: int, minimum: int = 0) -> int:
        """A uint32 count in ``[minimum, dim]``."""
        value = self.u32(what)
        if not minimum <= value <= dim:
            raise PayloadError(f"{what} must be in [{minimum}, {dim}] for dimension {dim}, got {value}")
        return value

    def values(self, count: int) -> torch.Tensor:
        """``count`` finite values of the header's value dtype."""
        return _tensor(_finite(self.array(self.value_dtype, count, "values"), "values"))

    def f32(self, count: int, what: str) -> torch.Tensor:
        """``count`` finite float32 numbers."""
        return _tensor(_finite(self.array(_F32, count, what), what))

    def bits(self, n_bits: int, what: str) -> torch.Tensor:
        """``ceil(n_bits / 8)`` packed bytes whose padding bits are zero."""
        packed = self.array(_U8, (n_bits + 7) // 8, what)
        pad = (-n_bits) % 8
        if pad and packed[-1] & ((1 << pad) - 1):
            raise PayloadError(f"{what}: the {pad} padding bits of the last byte must be zero")
        return _tensor(packed)

    def indices(self, nnz: int, dim: int) -> torch.Tensor:
        """``nnz`` strictly increasing int64 indices below ``dim`` in the header's index coding."""
        if self.index_coding == "int32":
            idx = self.array(_U32_DT, nnz, "indices").astype(np.int64)
            if nnz:
                steps = np.diff(idx)
                if np.any(steps == 0):
                    dup = int(idx[1:][steps == 0][0])
                    raise PayloadError(f"duplicate index {dup}: indices must be strictly increasing")
                if np.any(steps < 0):
                    pos = int(np.flatnonzero(steps < 0)[0]) + 1
                    raise PayloadError(
                        f"unsorted indices at position {pos}: indices must be strictly increasing"
                    )
        else:
            n_bytes = self.u32("index stream length")
            if not nnz <= n_bytes <= 5 * nnz:
                raise PayloadError(
                    f"varint index stream of {nnz} indices must take [{nnz}, {5 * nnz}] bytes, got {n_bytes}"
                )
            gaps = _varint_decode(self.array(_U8, n_bytes, "index stream"), nnz)
            idx = np.cumsum(gaps + 1) - 1  # gaps are >= 0, so indices are strictly increasing by construction
        if nnz and idx[-1] >= dim:
            raise PayloadError(f"index out of range: expected < {dim}, got {int(idx.max())}")
        return torch.from_numpy(idx.astype(np.int64, copy=False))

    def finish(self) -> None:
        """Fail if bytes are left over."""
        if self.remaining:
            raise PayloadError(
                f"trailing bytes: payload should end at byte {self.offset} but has {len(self.data)} bytes"
            )


def from_bytes(
    data: bytes | bytearray | memoryview,
    expected_dim: int,
    *,
    expected_kind: int | None = None,
    block_sizes: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> Payload:
    """Parse and validate a payload for a model of ``expected_dim`` parameters.

    ``block_sizes``, when given, is the model's block layout (``ParamSpec.block_sizes``): a payload that
    carries a layout of its own (Block-Sign) must have exactly these blocks, checked before anything sized by
    its block count is read, so a payload of d one-coordinate blocks costs no more to refuse than to read.

    Raises
    ------
    PayloadError
        On anything malformed: short or long input, bad magic or version, unknown kind, dtype or index
        coding, a dimension other than ``expected_dim``, a kind other than ``expected_kind``, counts that
        exceed the dimension, indices out of range, duplicated or unsorted, non-finite values, QSGD levels
        above s, non-zero padding bits, or a block layout other than ``block_sizes``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) < HEADER_SIZE:
        raise PayloadError(f"truncated payload: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    if len(data) > max_encoded_size(expected_dim):
        raise PayloadError(
            f"oversize payload: {len(data)} bytes, while no valid payload for dimension {expected_dim} "
            f"exceeds {max_encoded_size(expected_dim)} bytes"
        )
    magic, version, kind_code, value_code, index_code, dim = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise PayloadError(f"bad magic: expected {MAGIC!r}, got {bytes(magic)!r} (not a COMP-AMS payload)")
    if version != FORMAT_VERSION:
        raise PayloadError(f"unsupported format version: expected {FORMAT_VERSION}, got {version}")
    cls = compressor_of_kind(kind_code)
    if cls is None:
        raise PayloadError(f"unknown payload kind {kind_code}; known: {registered_kinds()}")
    kind = cls.kind
    if expected_kind is not None and kind != expected_kind:
        raise PayloadError(f"wrong payload kind: expected {kind_name(expected_kind)}, got {kind_name(kind)}")
    if dim != expected_dim:
        raise PayloadError(f"dimension mismatch: expected {expected_dim}, got {dim}")
    if value_code not in _VALUE_DTYPES:
        raise PayloadError(f"unknown value dtype code {value_code}; known: {sorted(_VALUE_DTYPES)}")
    if index_code >= len(INDEX_CODINGS):
        raise PayloadError(f"unknown index coding {index_code}; known: {list(range(len(INDEX_CODINGS)))}")
    body = cls.payload_type
    if not body.wire_values and value_code != 0:
        raise PayloadError(
            f"{kind_name(kind)} payloads carry float32 numbers only: expected value dtype code 0, got {value_code}"
        )
    if not body.wire_indices and index_code != 0:
        raise PayloadError(
            f"{kind_name(kind)} payloads have no indices: expected index coding code 0, got {index_code}"
        )
    reader = Reader(data, HEADER_SIZE, _VALUE_DTYPES[value_code], INDEX_CODINGS[index_code], block_sizes)
    payload = body.read_body(reader, kind, dim)
    reader.finish()
    return payload if torch.device(device).type == "cpu" else payload.to(device)


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """Own, writable, native-endian copy (the input buffer may be read-only or reused)."""
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


def _finite(arr: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise PayloadError(f"non-finite {what}: element {bad} is {arr[bad]}")
    return arr


def _varint_decode(stream: np.ndarray, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(stream < 0x80)
    if ends.size != count or ends[-1] != stream.size - 1:
        raise PayloadError(
            f"varint index stream holds {ends.size} complete values, expected {count}"
            + ("" if ends.size == 0 or ends[-1] == stream.size - 1 else " (last value unterminated)")
        )
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 5:
        raise PayloadError(f"varint longer than 5 bytes ({int(lengths.max())}) in the index stream")
    if np.any((lengths > 1) & (stream[ends] == 0)):
        raise PayloadError("non-canonical (overlong) varint in the index stream")
    shift = (np.arange(stream.size) - np.repeat(starts, lengths)) * 7
    parts = (stream & 0x7F).astype(np.int64) << shift
    values = np.add.reduceat(parts, starts)
    if values.max() > _MAX_DIM:
        raise PayloadError(f"varint gap {int(values.max())} exceeds 32 bits")
    return values
