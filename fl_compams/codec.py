"""Versioned binary wire format for payloads. Never pickle: this parses bytes from untrusted clients.

Layout (little endian)::

    header  magic "CAMS" | version u8 | kind u8 | value dtype u8 | index coding u8 | dim u32      (12 bytes)
    body    IDENTITY   values[dim]
            TOPK/RANDK/MVSS  nnz u32 | indices | values[nnz]
            BLOCKSIGN  n_blocks u32 | block sizes u32[n_blocks] | scales f32[n_blocks] | signs ceil(dim/8)
            SIGNTOPK   nnz u32 | indices | scale f32 | signs ceil(nnz/8)
            QSGD       levels u32 | bucket u32 | norms f32[n_buckets] | signs ceil(dim/8) | magnitudes
    indices  int32 coding:  u32[nnz], strictly increasing
             varint coding: n_bytes u32 | LEB128 varints of the gaps (i_0, i_1 - i_0 - 1, ...)
    values   float32 or float16 (the header's value dtype); signs are packed bits, 1 = non-negative.
    magnitudes  QSGD levels in {0..s}, bit-packed at bit_length(s) bits each.

:func:`from_bytes` checks the header and every count against the expected dimension before it reads or
allocates anything sized by the data, then checks the content (index range and order, finite values, level
range, zero padding bits) and raises :class:`PayloadError` naming what was expected and what was found.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from fl_compams.bits import pack_uint, unpack_uint
from fl_compams.errors import PayloadError
from fl_compams.payloads import (
    INDEX_CODINGS,
    SPARSE_KINDS,
    BlockSignPayload,
    DensePayload,
    Kind,
    Payload,
    QSGDPayload,
    SignSparsePayload,
    SparsePayload,
)

__all__ = ["FORMAT_VERSION", "HEADER_SIZE", "MAGIC", "from_bytes", "max_encoded_size", "to_bytes"]

MAGIC = b"CAMS"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBBBI")
HEADER_SIZE = _HEADER.size
_U32 = struct.Struct("<I")
_MAX_DIM = 2**32 - 1

_VALUE_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
_VALUE_CODES = {torch.float32: 0, torch.float16: 1}
_TORCH_OF = {0: torch.float32, 1: torch.float16}
_INDEX_CODES = {name: i for i, name in enumerate(INDEX_CODINGS)}
_F32 = np.dtype("<f4")
_U32_DT = np.dtype("<u4")


# ----------------------------------------------------------------------------------------------- encoding
def to_bytes(payload: Payload) -> bytes:
    """Serialise a payload (moved to the CPU) into the versioned wire format."""
    kind = Kind(payload.kind)
    value_code, index_code = 0, 0
    if kind == Kind.IDENTITY:
        value_code = _value_code(payload.values)
        body = [_values_bytes(payload.values)]
    elif kind in SPARSE_KINDS:
        value_code = _value_code(payload.values)
        index_code = _index_code(payload.index_coding)
        body = [
            _U32.pack(payload.indices.numel()),
            _indices_bytes(payload.indices, payload.index_coding),
            _values_bytes(payload.values),
        ]
    elif kind == Kind.BLOCKSIGN:
        body = [
            _U32.pack(len(payload.block_sizes)),
            np.asarray(payload.block_sizes, dtype=_U32_DT).tobytes(),
            _values_bytes(payload.scales.float()),
            _cpu_numpy(payload.signs).tobytes(),
        ]
    elif kind == Kind.SIGNTOPK:
        index_code = _index_code(payload.index_coding)
        body = [
            _U32.pack(payload.indices.numel()),
            _indices_bytes(payload.indices, payload.index_coding),
            _values_bytes(payload.scale.float().reshape(1)),
            _cpu_numpy(payload.signs).tobytes(),
        ]
    elif kind == Kind.QSGD:
        width = payload.levels.bit_length()
        body = [
            _U32.pack(payload.levels),
            _U32.pack(payload.bucket_size),
            _values_bytes(payload.norms.float()),
            _cpu_numpy(payload.signs).tobytes(),
            pack_uint(_cpu_numpy(payload.magnitudes), width).tobytes(),
        ]
    else:  # pragma: no cover - Kind is closed
        raise PayloadError(f"cannot serialise payload kind {kind!r}")
    if not 0 < payload.dim <= _MAX_DIM:
        raise PayloadError(f"dimension must be in [1, {_MAX_DIM}], got {payload.dim}")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, int(kind), value_code, index_code, payload.dim)
    return b"".join([header, *body])


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
class _Reader:
    """Cursor over the body that only hands out views after checking the bytes are there."""

    def __init__(self, data: bytes, offset: int) -> None:
        self.data = memoryview(data)
        self.offset = offset

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise PayloadError(
                f"truncated payload: {what} needs {n} more bytes, only {self.remaining} left "
                f"(payload is {len(self.data)} bytes)"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.data, self.offset)
        self.offset += 4
        return value

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        n = dtype.itemsize * count
        self.need(n, what)
        arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += n
        return arr

    def finish(self) -> None:
        if self.remaining:
            raise PayloadError(
                f"trailing bytes: payload should end at byte {self.offset} but has {len(self.data)} bytes"
            )


def from_bytes(
    data: bytes | bytearray | memoryview,
    expected_dim: int,
    *,
    expected_kind: Kind | None = None,
    device: torch.device | str = "cpu",
) -> Payload:
    """Parse and validate a payload for a model of ``expected_dim`` parameters.

    Raises
    ------
    PayloadError
        On anything malformed: short or long input, bad magic or version, unknown kind, dtype or index
        coding, a dimension other than ``expected_dim``, a kind other than ``expected_kind``, counts that
        exceed the dimension, indices out of range, duplicated or unsorted, non-finite values, QSGD levels
        above s, or non-zero padding bits.
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
    try:
        kind = Kind(kind_code)
    except ValueError:
        raise PayloadError(f"unknown payload kind {kind_code}; known: {[int(k) for k in Kind]}") from None
    if expected_kind is not None and kind != expected_kind:
        raise PayloadError(f"wrong payload kind: expected {Kind(expected_kind).name}, got {kind.name}")
    if dim != expected_dim:
        raise PayloadError(f"dimension mismatch: expected {expected_dim}, got {dim}")
    if value_code not in _VALUE_DTYPES:
        raise PayloadError(f"unknown value dtype code {value_code}; known: {sorted(_VALUE_DTYPES)}")
    if index_code >= len(INDEX_CODINGS):
        raise PayloadError(f"unknown index coding {index_code}; known: {list(range(len(INDEX_CODINGS)))}")
    if kind not in (Kind.IDENTITY, *SPARSE_KINDS) and value_code != 0:
        raise PayloadError(f"{kind.name} payloads carry float32 scales; got value dtype code {value_code}")
    if kind not in (Kind.SIGNTOPK, *SPARSE_KINDS) and index_code != 0:
        raise PayloadError(f"{kind.name} payloads have no indices; got index coding code {index_code}")
    reader = _Reader(data, HEADER_SIZE)
    value_dtype = _VALUE_DTYPES[value_code]
    coding = INDEX_CODINGS[index_code]

    if kind == Kind.IDENTITY:
        values = _finite(reader.array(value_dtype, dim, "values"), "values")
        payload: Payload = DensePayload(dim, _tensor(values))
    elif kind in SPARSE_KINDS:
        nnz = _count(reader.u32("nnz"), dim, "nnz")
        indices = _read_indices(reader, nnz, dim, coding)
        values = _finite(reader.array(value_dtype, nnz, "values"), "values")
        payload = SparsePayload(kind, dim, indices, _tensor(values), coding)
    elif kind == Kind.BLOCKSIGN:
        n_blocks = _count(reader.u32("n_blocks"), dim, "n_blocks", minimum=1)
        sizes = reader.array(_U32_DT, n_blocks, "block sizes")
        if sizes.min() < 1 or int(sizes.sum(dtype=np.int64)) != dim:
            raise PayloadError(
                f"block sizes must be positive and sum to the dimension {dim}; got sum "
                f"{int(sizes.sum(dtype=np.int64))}, min {int(sizes.min())}"
            )
        scales = _finite(reader.array(_F32, n_blocks, "scales"), "scales")
        if np.any(scales < 0):
            raise PayloadError("block scales must be >= 0 (they are mean absolute values)")
        signs = _packed_bits(reader, dim, "signs")
        payload = BlockSignPayload(dim, tuple(int(s) for s in sizes), _tensor(scales), _tensor(signs))
    elif kind == Kind.SIGNTOPK:
        nnz = _count(reader.u32("nnz"), dim, "nnz")
        indices = _read_indices(reader, nnz, dim, coding)
        scale = _finite(reader.array(_F32, 1, "scale"), "scale")
        if scale[0] < 0:
            raise PayloadError(f"sign-top-k scale must be >= 0, got {scale[0]}")
        signs = _packed_bits(reader, nnz, "signs")
        payload = SignSparsePayload(dim, indices, _tensor(scale).reshape(()), _tensor(signs), coding)
    else:  # QSGD
        levels = reader.u32("levels")
        if not 1 <= levels <= 2**15:
            raise PayloadError(f"QSGD levels must be in [1, 32768], got {levels}")
        bucket = _count(reader.u32("bucket size"), dim, "bucket size", minimum=1)
        n_buckets = -(-dim // bucket)
        norms = _finite(reader.array(_F32, n_buckets, "norms"), "norms")
        if np.any(norms < 0):
            raise PayloadError("QSGD bucket norms must be >= 0")
        signs = _packed_bits(reader, dim, "signs")
        width = levels.bit_length()
        packed = _packed_bits(reader, dim * width, "magnitudes")
        magnitudes = unpack_uint(packed, dim, width)
        if magnitudes.max(initial=0) > levels:
            raise PayloadError(f"QSGD magnitude {int(magnitudes.max())} exceeds the {levels} levels")
        payload = QSGDPayload(
            dim, levels, bucket, _tensor(norms), _tensor(signs), torch.from_numpy(magnitudes.astype(np.int32))
        )
    reader.finish()
    return payload if torch.device(device).type == "cpu" else payload.to(device)


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """Own, writable, native-endian copy (the input buffer may be read-only or reused)."""
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


def _count(value: int, dim: int, what: str, minimum: int = 0) -> int:
    if not minimum <= value <= dim:
        raise PayloadError(f"{what} must be in [{minimum}, {dim}] for dimension {dim}, got {value}")
    return value


def _finite(arr: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise PayloadError(f"non-finite {what}: element {bad} is {arr[bad]}")
    return arr


def _packed_bits(reader: _Reader, n_bits: int, what: str) -> np.ndarray:
    packed = reader.array(np.dtype(np.uint8), (n_bits + 7) // 8, what)
    pad = (-n_bits) % 8
    if pad and packed[-1] & ((1 << pad) - 1):
        raise PayloadError(f"{what}: the {pad} padding bits of the last byte must be zero")
    return packed


def _read_indices(reader: _Reader, nnz: int, dim: int, coding: str) -> torch.Tensor:
    if coding == "int32":
        idx = reader.array(_U32_DT, nnz, "indices").astype(np.int64)
        if nnz:
            steps = np.diff(idx)
            if np.any(steps == 0):
                dup = int(idx[1:][steps == 0][0])
                raise PayloadError(f"duplicate index {dup}: indices must be strictly increasing")
            if np.any(steps < 0):
                pos = int(np.flatnonzero(steps < 0)[0]) + 1
                raise PayloadError(f"unsorted indices at position {pos}: indices must be strictly increasing")
    else:
        n_bytes = reader.u32("index stream length")
        if not nnz <= n_bytes <= 5 * nnz:
            raise PayloadError(
                f"varint index stream of {nnz} indices must take [{nnz}, {5 * nnz}] bytes, got {n_bytes}"
            )
        gaps = _varint_decode(reader.array(np.dtype(np.uint8), n_bytes, "index stream"), nnz)
        idx = np.cumsum(gaps + 1) - 1  # gaps are >= 0, so indices are strictly increasing by construction
    if nnz and idx[-1] >= dim:
        raise PayloadError(f"index out of range: expected < {dim}, got {int(idx.max())}")
    return torch.from_numpy(idx.astype(np.int64, copy=False))


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
