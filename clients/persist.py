"""Client state on node-local disk, so a restarted SuperNode continues with its error-feedback residual.

Opt-in with the SuperNode's node config ``state-dir='/path'``. After every training round the ClientApp writes the
node's state (the EF residual and the rounds counter) to ``<state-dir>/run-<run id>/<node key>.state``; a
ClientApp whose ``context.state`` is empty (first round after a SuperNode restart) reads it back.

File format, version 1 (all integers little-endian; no pickle, no numpy object arrays)::

    offset  size     field
    0       8        magic  b"CAMSEFST"
    8       2        format version (u16) = 1
    10      2        flags (u16); bit 0 = a residual follows
    12      8        run id (u64)
    20      8        node id of the writer (u64; informative: a restarted SuperNode gets a new node id)
    28      8        rounds the state has seen (u64)
    36      8        residual dimension d (u64; 0 without a residual)
    44      2        length k of the node key (u16)
    46      k        node key, UTF-8 (``partition-3``, ``node-<node-name>`` or ``node-<node id>``)
    46+k    4*d      residual, float32
    end-32  32       SHA-256 of every byte before it

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "PersistedState",
    "StateFileWarning",
    "decode_state",
    "encode_state",
    "read_state",
    "state_path",
    "write_state",
]

log = logging.getLogger(__name__)

MAGIC = b"CAMSEFST"
FORMAT_VERSION = 1
FLAG_RESIDUAL = 1
_HEADER = struct.Struct("<8sHHQQQQH")
_DIGEST = hashlib.sha256().digest_size
_U64 = 0xFFFFFFFFFFFFFFFF
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class StateFileWarning(RuntimeWarning):
    """A client state file could not be used; the client continues with a fresh (zero) residual."""


@dataclass(frozen=True, eq=False)
class PersistedState:
    """What a state file holds.

    Attributes
    ----------
    run_id, node_id : int
        The run, and the node id of the SuperNode that wrote the file.
    node_key : str
        The node's stable key (see :func:`state_path`).
    rounds : int
        Training rounds this state has seen.
    residual : numpy.ndarray or None
        The float32 EF residual (``None`` when error feedback is off).
    """

    run_id: int
    node_id: int
    node_key: str
    rounds: int
    residual: np.ndarray | None


def state_path(state_dir: str | Path, run_id: int, node_key: str) -> Path:
    """``<state-dir>/run-<run id>/<node key>.state``; characters other than ``A-Z a-z 0-9 . _ -`` become ``_``."""
    return Path(state_dir).expanduser() / f"run-{run_id & _U64}" / f"{_UNSAFE.sub('_', node_key)}.state"


def encode_state(state: PersistedState) -> bytes:
    """The bytes of a state file (format version 1) for ``state``."""
    key = state.node_key.encode("utf-8")
    if len(key) > 0xFFFF:
        raise ValueError(f"node key is {len(key)} bytes long, at most 65535 are allowed")
    if state.rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {state.rounds}")
    if state.residual is None:
        flags, body = 0, b""
    else:
        residual = np.ascontiguousarray(state.residual, dtype="<f4")
        if residual.ndim != 1:
            raise ValueError(f"the residual must be a vector, got shape {residual.shape}")
        flags, body = FLAG_RESIDUAL, residual.tobytes()
    dim = 0 if state.residual is None else len(body) // 4
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, flags, state.run_id & _U64, state.node_id & _U64, state.rounds, dim, len(key)
    )
    data = header + key + body
    return data + hashlib.sha256(data).digest()


def decode_state(data: bytes) -> PersistedState:
    """Parse and verify the bytes of a state file.

    Raises
    ------
    ValueError
        With what is wrong: too short, not a state file, unsupported version, checksum mismatch, inconsistent
        lengths, unknown flags, non-finite residual.
    """
    if len(data) < _HEADER.size + _DIGEST:
        raise ValueError(
            f"truncated: {len(data)} bytes, shorter than the {_HEADER.size + _DIGEST}-byte minimum"
        )
    magic, version, flags, run_id, node_id, rounds, dim, key_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not a COMP-AMS client state file (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"format version {version} is not supported (this code reads version {FORMAT_VERSION})"
        )
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch: the file is truncated or corrupted")
    if flags & ~FLAG_RESIDUAL:
        raise ValueError(f"unknown flags {flags:#06x}")
    has_residual = bool(flags & FLAG_RESIDUAL)
    expected = _HEADER.size + key_len + (4 * dim if has_residual else 0)
    if len(body) != expected or (not has_residual and dim):
        raise ValueError(
            f"length mismatch: {len(body)} bytes before the checksum, the header says {expected}"
        )
    key_end = _HEADER.size + key_len
    try:
        node_key = body[_HEADER.size : key_end].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"the node key is not UTF-8 ({err})") from err
    residual = None
    if has_residual:
        residual = np.frombuffer(body, dtype="<f4", count=dim, offset=key_end).astype(np.float32)
        if not np.isfinite(residual).all():
            raise ValueError("the residual contains NaN or infinite values")
    return PersistedState(run_id, node_id, node_key, rounds, residual)


def write_state(path: str | Path, state: PersistedState) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same directory, fsync, ``os.replace``).

    Raises
    ------
    OSError
        If the directory cannot be created or the file cannot be written; the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(encode_state(state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_state(path: str | Path, *, run_id: int, node_key: str, dim: int | None) -> PersistedState | None:
    """The state saved at ``path`` if it is valid for this run, node and model; else ``None``.

    Parameters
    ----------
    path
        The state file (see :func:`state_path`).
    run_id, node_key
        The file must have been written for this run and this node key.
    dim
        The model dimension a saved residual must have (``None``: do not check).

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
    if state.run_id != run_id & _U64:
        return _unusable(path, f"belongs to run {state.run_id}, not to run {run_id & _U64}")
    if state.node_key != node_key:
        return _unusable(path, f"belongs to node {state.node_key!r}, not to {node_key!r}")
    if dim is not None and state.residual is not None and state.residual.shape != (dim,):
        return _unusable(
            path, f"holds a residual of dimension {state.residual.shape[0]}, the model has {dim}"
        )
    return state


def _unusable(path: Path, reason: str) -> None:
    message = f"client state file {str(path)!r} is not used ({reason}); starting from a zero residual"
    log.warning(message)
    warnings.warn(message, StateFileWarning, stacklevel=3)
    return None
