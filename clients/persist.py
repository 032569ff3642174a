"""Client state on node-local disk, so a node continues with its error-feedback residual after a restart.

Opt-in with the SuperNode's node config ``state-dir='/path'``. After every training round the ClientApp writes the
node's state, i.e. every array it keeps in ``context.state`` (the EF residual, QAdam's local moments, ...) and the
rounds counter, to ``<state-dir>/run-<run key>/<node key>.state``; a ClientApp whose ``context.state`` is empty
(the first round after a SuperNode restart, or of a resumed run) reads it back. The run key names the run, not
Flower's run id, which changes when a run is resumed (:func:`clients.state_io.run_key`). The file it replaces is
kept as ``<node key>.state.prev`` when it is the state of an earlier round, so a server that resumes one round
behind its clients finds the state they had before that round (:func:`write_state`).

File format, version 2 (integers little-endian; no pickle, no numpy object arrays)::

    offset  size     field
    0       8        magic  b"CAMSEFST"
    8       2        format version (u16) = 2
    10      2        flags (u16) = 0 (reserved)
    12      8        Flower run id of the writer (u64; informative: a resumed run gets a new run id)
    20      8        node id of the writer (u64; informative: a restarted SuperNode gets a new node id)
    28      8        server round after whose training the state was written (u64)
    36      8        rounds the state has seen (u64)
    44      8        model dimension d the state belongs to (u64)
    52      2        length j of the run key (u16)
    54      2        length k of the node key (u16)
    56      2        number of arrays (u16)
    58      j        run key, UTF-8 (``<run-name>-<16 hex digits>``, or ``flower-run-<id>``)
    58 + j  k        node key, UTF-8 (``partition-3``, ``node-<node-name>`` or ``node-<node id>``)
    then, per array:
            2 + r    length and UTF-8 name of its record in context.state (``ef``)
            2 + a    length and UTF-8 name of the array in that record (``residual``)
            1        dtype code (see ``DTYPES``; the EF residual is float32, code 2)
            1        number of dimensions n
            8 * n    shape (u64 each)
            ...      the values, little-endian, C order
    end-32  32       SHA-256 of every byte before it

So the file of one EF residual of the digits CNN (d = 151,306) for node key ``partition-0`` in a run keyed
``exp-0123456789abcdef`` (20 bytes) is 58 + 20 + 11 + (2 + 2 + 2 + 8 + 1 + 1 + 8) + 4 d + 32 = 605,369 bytes.
Version 1 files (keyed by Flower's run id, without a run key or round) are refused: they cannot be matched to a
run, and they lie in ``run-<run id>`` directories that version 2 never reads.

Writes are atomic: the bytes go to a temporary file in the same directory, which is flushed, fsync'ed and then
renamed over the old file with ``os.replace``, so a crash leaves either the old or the new file, never a torn one.
Reading never raises for a bad file: a truncated, corrupted, foreign, wrong-version, wrong-run, wrong-node or
wrong-dimension file gives a :class:`StateFileWarning` naming the file and the problem, and ``None`` (the client
then starts from a zero residual, as on first participation).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "MAGIC",
    "PersistedState",
    "StateFileWarning",
    "arrays_of",
    "decode_state",
    "encode_state",
    "previous_path",
    "read_state",
    "safe_name",
    "state_path",
    "write_state",
]

log = logging.getLogger(__name__)

MAGIC = b"CAMSEFST"
FORMAT_VERSION = 2
#: dtype code -> numpy dtype (little-endian); the codes are part of the file format: never renumber them.
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f2"),
    2: np.dtype("<f4"),
    3: np.dtype("<f8"),
    4: np.dtype("i1"),
    5: np.dtype("<i2"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
    8: np.dtype("u1"),
    9: np.dtype("<u2"),
    10: np.dtype("<u4"),
    11: np.dtype("<u8"),
    12: np.dtype("?"),
}
_CODES = {dt: code for code, dt in DTYPES.items()}
_HEADER = struct.Struct("<8sHHQQQQQHHH")
_DIGEST = hashlib.sha256().digest_size
_U64 = 0xFFFFFFFFFFFFFFFF
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

Arrays = dict[str, dict[str, np.ndarray]]


class StateFileWarning(RuntimeWarning):
    """A client state file could not be used (or written); the client continues with a fresh state."""


@dataclass(frozen=True, eq=False)
class PersistedState:
    """What a state file holds.

    Attributes
    ----------
    run_key : str
        The run the state belongs to, stable across resumes (:func:`clients.state_io.run_key`).
    node_key : str
        The node's stable key (see :func:`state_path`).
    round : int
        The server round after whose training the state was written.
    rounds : int
        Training rounds this state has seen.
    dim : int
        Dimension of the model the state belongs to.
    arrays : dict
        ``{record name: {array name: numpy array}}``, the ArrayRecords of ``context.state``.
    run_id, node_id : int
        Flower's run id and the node id of the SuperNode that wrote the file (informative only).
    """

    run_key: str
    node_key: str
    round: int
    rounds: int
    dim: int
    arrays: Arrays = field(default_factory=dict)
    run_id: int = 0
    node_id: int = 0


def safe_name(text: str) -> str:
    """``text`` with every character other than ``A-Z a-z 0-9 . _ -`` replaced by ``_`` (no path separators)."""
    return _UNSAFE.sub("_", text)


def state_path(state_dir: str | Path, run_key: str, node_key: str) -> Path:
    """``<state-dir>/run-<run key>/<node key>.state``, both keys through :func:`safe_name`."""
    return Path(state_dir).expanduser() / f"run-{safe_name(run_key)}" / f"{safe_name(node_key)}.state"


def previous_path(path: str | Path) -> Path:
    """Where :func:`write_state` keeps the state a file held before its last write: ``<file>.prev``."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def _name(text: str, what: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError(f"{what} is {len(data)} bytes long, at most 65535 are allowed")
    return struct.pack("<H", len(data)) + data


def encode_state(state: PersistedState) -> bytes:
    """The bytes of a state file (format version 2) for ``state``.

    Raises
    ------
    ValueError
        For a negative round, round count or dimension, an unsupported dtype, too many arrays or too long names.
    """
    if min(state.round, state.rounds, state.dim) < 0:
        raise ValueError(
            f"round, rounds and dim must be >= 0, got {state.round}, {state.rounds} and {state.dim}"
        )
    entries = [(rec, name, arr) for rec, arrays in state.arrays.items() for name, arr in arrays.items()]
    if len(entries) > 0xFFFF:
        raise ValueError(f"{len(entries)} arrays, at most 65535 are allowed")
    run_key, node_key = _name(state.run_key, "run key"), _name(state.node_key, "node key")
    parts = [
        _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            0,
            state.run_id & _U64,
            state.node_id & _U64,
            state.round,
            state.rounds,
            state.dim,
            len(run_key) - 2,
            len(node_key) - 2,
            len(entries),
        ),
        run_key[2:],
        node_key[2:],
    ]
    for rec, name, arr in entries:
        arr = np.asarray(arr)
        code = _CODES.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
        if code is None:
            raise ValueError(f"array {rec}/{name} has dtype {arr.dtype}; supported: bool, ints, floats")
        if arr.ndim > 255:
            raise ValueError(f"array {rec}/{name} has {arr.ndim} dimensions, at most 255 are allowed")
        parts += [
            _name(rec, "record name"),
            _name(name, "array name"),
            struct.pack(f"<BB{arr.ndim}Q", code, arr.ndim, *arr.shape),
            np.ascontiguousarray(arr, dtype=DTYPES[code]).tobytes(),
        ]
    data = b"".join(parts)
    return data + hashlib.sha256(data).digest()


class _Reader:
    """Bounds-checked reads from the verified body of a state file."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise ValueError(f"length mismatch: {what} needs {n} bytes, {len(self.data) - self.pos} are left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def utf8(self, n: int, what: str) -> str:
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"the {what} is not UTF-8 ({err})") from err

    def text(self, what: str) -> str:
        (n,) = struct.unpack("<H", self.take(2, what))
        return self.utf8(n, what)


def _check_version(version: int) -> None:
    if version == 1:
        raise ValueError(
            "format version 1 is not supported any more: it was keyed by Flower's run id, which changes when "
            "a run is resumed, and it cannot be matched to a run (this code reads version 2)"
        )
    if version != FORMAT_VERSION:
        raise ValueError(
            f"format version {version} is not supported (this code reads version {FORMAT_VERSION})"
        )


def decode_state(data: bytes) -> PersistedState:
    """Parse and verify the bytes of a state file.

    Raises
    ------
    ValueError
        With what is wrong: too short, not a state file, unsupported version, checksum mismatch, inconsistent
        lengths, unknown flags or dtype codes, non-finite floating-point values.
    """
    if len(data) < 10:
        raise ValueError(f"truncated: {len(data)} bytes, shorter than the magic and format version")
    magic, (version,) = data[:8], struct.unpack_from("<H", data, 8)
    if magic != MAGIC:
        raise ValueError(f"not a COMP-AMS client state file (magic {magic!r}, expected {MAGIC!r})")
    _check_version(version)  # before the length check: version 1 has a shorter header
    if len(data) < _HEADER.size + _DIGEST:
        raise ValueError(
            f"truncated: {len(data)} bytes, shorter than the {_HEADER.size + _DIGEST}-byte minimum"
        )
    _, _, flags, run_id, node_id, rnd, rounds, dim, run_len, node_len, count = _HEADER.unpack_from(data)
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch: the file is truncated or corrupted")
    if flags:
        raise ValueError(f"unknown flags {flags:#06x}")
    reader = _Reader(body, _HEADER.size)
    run_key = reader.utf8(run_len, "run key")
    node_key = reader.utf8(node_len, "node key")
    arrays: Arrays = {}
    for _ in range(count):
        rec, name = reader.text("record name"), reader.text("array name")
        code, ndim = struct.unpack("<BB", reader.take(2, f"dtype of {rec}/{name}"))
        if code not in DTYPES:
            raise ValueError(f"unknown dtype code {code} for array {rec}/{name}")
        shape = struct.unpack(f"<{ndim}Q", reader.take(8 * ndim, f"shape of {rec}/{name}"))
        dtype = DTYPES[code]
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        arr = np.frombuffer(reader.take(nbytes, f"values of {rec}/{name}"), dtype=dtype).reshape(shape)
        arr = arr.astype(dtype.newbyteorder("="), copy=True)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"array {rec}/{name} contains NaN or infinite values")
        arrays.setdefault(rec, {})[name] = arr
    if reader.pos != len(body):
        raise ValueError(f"length mismatch: {len(body) - reader.pos} unexpected bytes after the last array")
    return PersistedState(run_key, node_key, rnd, rounds, dim, arrays, run_id, node_id)


def _peek(path: Path) -> tuple[str, str, int] | None:
    """Run key, node key and round from the header of the file at ``path`` (no checksum); None if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                return None
            magic, version, _, _, _, rnd, _, _, run_len, node_len, _ = _HEADER.unpack(head)
            if magic != MAGIC or version != FORMAT_VERSION:
                return None
            keys = f.read(run_len + node_len)
        return keys[:run_len].decode("utf-8"), keys[run_len:].decode("utf-8"), rnd
    except (OSError, UnicodeDecodeError):
        return None


def write_state(path: str | Path, state: PersistedState, *, durable: bool = True) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same directory, fsync, ``os.replace``).

    If ``path`` holds a state of the same run and node from an earlier round, it becomes
    :func:`previous_path` first: the state the node had before this round, which a server that resumes from a
    checkpoint one round behind needs. A file of the same or a later round (a state the server has forgotten,
    see :func:`clients.state_io.restore_from_disk`) is replaced without being kept. A crash between the two
    renames leaves the previous file only; :func:`clients.state_io.restore_from_disk` then reads that one.

    ``durable = False`` (state kept on disk only to save memory, in a run-scoped temporary directory, which a
    restart does not read) skips the fsync and the previous file; the write is still atomic.

    Raises
    ------
    OSError
        If the directory cannot be created or the file cannot be written; the temporary file is removed.
    """
    path = Path(path)
    data = encode_state(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        old = _peek(path) if durable else None
        if old is not None and old[:2] == (state.run_key, state.node_key) and old[2] < state.round:
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_state(path: str | Path, *, run_key: str, node_key: str, dim: int | None) -> PersistedState | None:
    """The state saved at ``path`` if it is valid for this run, node and model; else ``None``.

    Parameters
    ----------
    path
        The state file (see :func:`state_path`).
    run_key, node_key
        The file must have been written for this run key and this node key.
    dim
        The model dimension the state must belong to (``None``: do not check).

    Returns
    -------
    PersistedState or None
        ``None`` when the file does not exist (silently: a fresh start) or cannot be used (with a
        :class:`StateFileWarning` naming the file and the reason). Never raises for a bad file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        return _unusable(path, f"cannot be read ({type(err).__name__}: {err})")
    try:
        state = decode_state(data)
    except ValueError as err:
        return _unusable(path, str(err))
    if state.run_key != run_key:
        return _unusable(path, f"belongs to run {state.run_key!r}, not to run {run_key!r}")
    if state.node_key != node_key:
        return _unusable(path, f"belongs to node {state.node_key!r}, not to {node_key!r}")
    if dim is not None and state.dim != dim:
        return _unusable(path, f"belongs to a model of dimension {state.dim}, this model has {dim}")
    return state


def arrays_of(records: Mapping[str, Mapping[str, object]]) -> Arrays:
    """``{record: {name: numpy array}}`` from ArrayRecords (anything with ``.numpy()`` values)."""
    return {rec: {name: arr.numpy() for name, arr in arrays.items()} for rec, arrays in records.items()}


def _unusable(path: Path, reason: str) -> None:
    message = f"client state file {str(path)!r} is not used ({reason}); starting from a fresh (zero) state"
    log.warning(message)
    warnings.warn(message, StateFileWarning, stacklevel=3)
    return None
