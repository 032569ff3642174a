"""Checkpoints of the server's whole state in a versioned binary format (no pickle), written atomically.

Layout: ``magic "CAMSCKPT" | version u16 | header length u32 | header (UTF-8 JSON) | tensor bytes | sha256``.
The JSON header holds the scalar state (round, optimizer step and kind, the statuses clients have not
acknowledged, the recent reply norms of the adaptive bound, run counters, anything the caller adds)
and a table of tensors (name, dtype, shape, byte offset, byte length); the trailing SHA-256 covers everything
before it, so a truncated or corrupted file is detected, never half-loaded. Files are written to a temporary
name and renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from fl_compams.algorithm import Outcome, Status
from fl_compams.downlink import Broadcast, Downlink, Version, parse_version
from fl_compams.laq import LazyServer
from fl_compams.server import ServerState
from fl_compams.server_opt import AdamState, SGDState

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

MAGIC = b"CAMSCKPT"
#: 2 added the statuses clients have not acknowledged (``unacked``), 3 the recent reply norms of the adaptive
#: reply bound (``recent_norms``), 4 the two-way downlink (header key ``downlink``, tensors ``downlink.*``) and
#: LAQ's server state (header key ``lazy``, tensors ``lazy.*``). Older files are migrated on load: version 1
#: predates acknowledged client state (no status was outstanding); versions 1 and 2 predate the adaptive bound
#: (its history starts empty, so the first rounds after the resume bound as the first rounds of a run do);
#: versions 1 to 3 predate the downlink (one-way) and LAQ (no LAQ state). 5 added the model's buffers (tensor
#: ``buffers``, BatchNorm statistics, :mod:`fl_compams.buffers`); a version-4 reader would drop them silently, so
#: the version says so. Versions 1 to 4 predate models with buffers (the run refused them): no buffers.
VERSION = 5
_READABLE = (1, 2, 3, 4, 5)
_PREFIX = struct.Struct("<8sHI")
_DIGEST = 32
_NAME = re.compile(r"^round-(\d{6,})\.ckpt$")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "uint8": torch.uint8}
_OPT_STATES = {"AdamState": AdamState, "SGDState": SGDState}


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupted, of another format version, or inconsistent."""


def _opt_tensors(opt_state) -> dict[str, torch.Tensor]:
    return {f"opt.{k}": v for k, v in opt_state._asdict().items() if isinstance(v, torch.Tensor)}


def save_checkpoint(directory: Path | str, state: ServerState, extra: dict[str, Any] | None = None) -> Path:
    """Write ``round-<r>.ckpt`` for ``state`` into ``directory`` atomically; return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        "theta": state.theta,
        **_opt_tensors(state.opt_state),
        **_downlink_tensors(state.downlink),
        **_lazy_tensors(state.lazy),
        **({} if state.buffers is None else {"buffers": state.buffers}),
    }
    table, chunks, offset = [], [], 0
    for name, t in tensors.items():
        data = t.detach().cpu().contiguous().numpy().tobytes()
        dtype = str(t.dtype).removeprefix("torch.")
        table.append(
            {"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": len(data)}
        )
        chunks.append(data)
        offset += len(data)
    scalars = {k: v for k, v in state.opt_state._asdict().items() if not isinstance(v, torch.Tensor)}
    header = {
        "round": state.round,
        "unacked": {
            label: [[int(st.round), int(st.outcome), float(st.factor)] for st in statuses]
            for label, statuses in state.unacked.items()
        },
        "recent_norms": [[float(n) for n in norms] for norms in state.recent_norms],
        **_lazy_header(state.lazy),
        "opt_state_type": type(state.opt_state).__name__,
        **_downlink_header(state.downlink),
        "opt_scalars": scalars,
        "tensors": table,
        "extra": extra or {},
    }
    head = json.dumps(header, sort_keys=True).encode()
    body = b"".join([_PREFIX.pack(MAGIC, VERSION, len(head)), head, *chunks])
    path = directory / f"round-{state.round:06d}.ckpt"
    tmp = directory / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(body + hashlib.sha256(body).digest())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(
    path: Path | str, device: torch.device | str = "cpu", *, dim: int | None = None
) -> tuple[ServerState, dict[str, Any]]:
    """Read and verify a checkpoint; return the server state and the caller's ``extra`` dict.

    Besides the checksum, the header is checked field by field before it is used (a file with a valid
    checksum may still have been written by something else): every tensor's table entry (a known dtype, a
    shape whose size matches its byte count, inside the file), a 1-D ``theta`` (of ``dim`` parameters when
    given), optimizer tensors of theta's shape, a float32 vector of buffers if any (its length is the caller's
    check: the spec's ``buffer_dim``), integer counters >= 0, well-formed statuses, a dict ``extra``.
    Anything else raises :class:`CheckpointError`, so :func:`latest_checkpoint` skips the file.
    """
    raw = Path(path).read_bytes()
    if len(raw) < _PREFIX.size + _DIGEST:
        raise CheckpointError(f"{path}: truncated ({len(raw)} bytes)")
    body, digest = raw[:-_DIGEST], raw[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted file)")
    magic, version, head_len = _PREFIX.unpack_from(body)
    if magic != MAGIC:
        raise CheckpointError(f"{path}: not a COMP-AMS checkpoint (magic {magic!r})")
    if version not in _READABLE:
        raise CheckpointError(
            f"{path}: format version {version}, this code reads versions {list(_READABLE)}; use the fl-compams "
            "release that wrote it to finish the run"
        )
    try:
        header = json.loads(body[_PREFIX.size : _PREFIX.size + head_len])
        data = body[_PREFIX.size + head_len :]
        _require(isinstance(header, dict), "the header is not a JSON object")
        tensors = {}
        for entry in header["tensors"]:
            tensors[entry["name"]] = _read_tensor(entry, data).to(device)
        theta = tensors["theta"]
        _require(theta.dim() == 1, f"theta must be a vector, got shape {tuple(theta.shape)}")
        _require(
            dim is None or theta.numel() == dim, f"theta has {theta.numel()} parameters, the model has {dim}"
        )
        opt_cls = _OPT_STATES[header["opt_state_type"]]
        scalars = header["opt_scalars"]
        _require(isinstance(scalars, dict), "opt_scalars is not a JSON object")
        for name, value in scalars.items():
            _require(_is_count(value), f"optimizer counter {name!r} must be an integer >= 0, got {value!r}")
        opt_tensors = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}
        down = _downlink(header.get("downlink"), tensors, theta)
        lazy = _lazy_state(header.get("lazy"), tensors, theta)
        for name, t in opt_tensors.items():
            _require(
                t.shape == theta.shape,
                f"optimizer tensor {name!r} has shape {tuple(t.shape)}, theta's is {tuple(theta.shape)}",
            )
        fields = {**scalars, **opt_tensors}
        _require(
            set(fields) == set(opt_cls._fields),
            f"{opt_cls.__name__} needs {sorted(opt_cls._fields)}, got {sorted(fields)}",
        )
        opt_state = opt_cls(**fields)
        unacked = header.get("unacked", {})
        _require(isinstance(unacked, dict), "unacked is not a JSON object")
        unacked = {str(label): _statuses(label, entries) for label, entries in unacked.items()}
        _require(_is_count(header["round"]), f"round must be an integer >= 0, got {header['round']!r}")
        extra = header["extra"]
        _require(isinstance(extra, dict), f"extra must be a JSON object, got {type(extra).__name__}")
        recent = header.get("recent_norms", [])
        _require(isinstance(recent, list), "recent_norms is not a list")
        recent = tuple(_norms(norms) for norms in recent)
        buffers = tensors.get("buffers")
        _require(
            buffers is None or (buffers.dim() == 1 and buffers.dtype == torch.float32),
            "buffers must be a float32 vector",
        )
        state = ServerState(header["round"], theta, opt_state, unacked, recent, down, lazy, buffers)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except (KeyError, TypeError, ValueError, RecursionError) as err:  # RecursionError: absurdly nested JSON
        raise CheckpointError(f"{path}: malformed header ({type(err).__name__}: {err})") from err
    return state, extra


def _downlink_tensors(down: Downlink | None) -> dict[str, torch.Tensor]:
    if down is None:
        return {}
    log = {
        f"downlink.log.{i}": torch.frombuffer(bytearray(b.payload), dtype=torch.uint8)
        for i, b in enumerate(down.log)
    }
    return {"downlink.public": down.public, "downlink.residual": down.residual, **log}


def _downlink_header(down: Downlink | None) -> dict[str, Any]:
    if down is None:
        return {}
    return {
        "downlink": {
            "version": str(down.version),
            "log": [[str(b.source), str(b.target)] for b in down.log],
            "replicas": {label: str(v) for label, v in down.replicas.items()},
        }
    }


def _lazy_tensors(lazy: LazyServer | None) -> dict[str, torch.Tensor]:
    """LAQ's aggregate and each client's last upload (``lazy.q.<i>``, i = position in the header's labels)."""
    if lazy is None:
        return {}
    return {"lazy.nabla": lazy.nabla, **{f"lazy.q.{i}": lazy.q[label] for i, label in enumerate(lazy.q)}}


def _lazy_header(lazy: LazyServer | None) -> dict[str, Any]:
    if lazy is None:
        return {}
    return {
        "lazy": {
            "labels": list(lazy.q),
            "contact": {label: int(r) for label, r in lazy.contact.items()},
            "changes": [float(c) for c in lazy.changes],
        }
    }


def _version(text: Any) -> Version:
    try:
        return parse_version(text)
    except ValueError as err:
        raise CheckpointError(f"downlink: {err}") from None


def _downlink(head: Any, tensors: dict[str, torch.Tensor], theta: torch.Tensor) -> Downlink | None:
    """The downlink slot (version 4) from the header and the ``downlink.*`` tensors; None for a one-way run."""
    if head is None:
        _require(
            not any(k.startswith("downlink.") for k in tensors), "downlink tensors without a downlink header"
        )
        return None
    _require(isinstance(head, dict), "downlink is not a JSON object")
    public, residual = tensors["downlink.public"], tensors["downlink.residual"]
    for name, t in (("public", public), ("residual", residual)):
        _require(
            t.shape == theta.shape and t.dtype == theta.dtype,
            f"downlink {name} must be like theta {tuple(theta.shape)}, got {tuple(t.shape)} {t.dtype}",
        )
    entries = head["log"]
    _require(isinstance(entries, list), "downlink log is not a list")
    log = []
    for i, entry in enumerate(entries):
        _require(
            isinstance(entry, list) and len(entry) == 2, f"downlink log entry {i} is not [source, target]"
        )
        data = tensors[f"downlink.log.{i}"]
        _require(data.dtype == torch.uint8 and data.dim() == 1, f"downlink log payload {i} is not bytes")
        log.append(Broadcast(_version(entry[0]), _version(entry[1]), data.cpu().numpy().tobytes()))
    replicas = head["replicas"]
    _require(isinstance(replicas, dict), "downlink replicas is not a JSON object")
    return Downlink(
        public,
        residual,
        _version(head["version"]),
        tuple(log),
        MappingProxyType({str(label): _version(v) for label, v in replicas.items()}),
    )


def _lazy_state(entry: Any, tensors: dict[str, torch.Tensor], theta: torch.Tensor) -> LazyServer | None:
    """LAQ's server state from the header's ``lazy`` entry and the ``lazy.*`` tensors, checked."""
    names = {k for k in tensors if k.startswith("lazy.")}
    if entry is None:
        _require(not names, f"tensors {sorted(names)} without a 'lazy' header entry")
        return None
    _require(isinstance(entry, dict), "lazy is not a JSON object")
    labels, contact, changes = entry["labels"], entry["contact"], entry["changes"]
    _require(
        isinstance(labels, list)
        and all(isinstance(x, str) for x in labels)
        and len(set(labels)) == len(labels),
        "lazy labels must be a list of distinct strings",
    )
    _require(
        isinstance(contact, dict) and all(_is_count(r) for r in contact.values()),
        "lazy contact must map labels to rounds >= 0",
    )
    _require(set(labels) <= set(contact), "every client with a stored upload must have a contact round")
    _require(
        isinstance(changes, list) and all(_is_number(c) and c >= 0 for c in changes),
        "lazy changes must be a list of finite numbers >= 0",
    )
    expected = {"lazy.nabla", *(f"lazy.q.{i}" for i in range(len(labels)))}
    _require(names == expected, f"lazy tensors must be {sorted(expected)}, got {sorted(names)}")
    for name in expected:
        t = tensors[name]
        _require(
            t.shape == theta.shape,
            f"tensor {name} has shape {tuple(t.shape)}, theta's is {tuple(theta.shape)}",
        )
    q = {label: tensors[f"lazy.q.{i}"] for i, label in enumerate(labels)}
    return LazyServer(tensors["lazy.nabla"], q, dict(contact), tuple(float(c) for c in changes))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckpointError(message)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_tensor(entry: Any, data: bytes) -> torch.Tensor:
    """One tensor of the table, after checking its entry against itself and the file."""
    _require(isinstance(entry, dict), f"tensor table entry {entry!r} is not a JSON object")
    name, dtype, shape = entry["name"], _DTYPES[entry["dtype"]], entry["shape"]
    start, n = entry["offset"], entry["nbytes"]
    _require(isinstance(name, str), f"tensor name {name!r} is not a string")
    _require(
        isinstance(shape, list) and all(_is_count(s) for s in shape),
        f"tensor {name}: shape {shape!r} is not a list of integers >= 0",
    )
    _require(_is_count(start) and _is_count(n), f"tensor {name}: offset and nbytes must be integers >= 0")
    _require(
        n == math.prod(shape) * dtype.itemsize,
        f"tensor {name}: {n} bytes for a {entry['dtype']} tensor of shape {shape}",
    )
    _require(start + n <= len(data), f"tensor {name} runs past the end of the file")
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    arr = np.frombuffer(data, dtype=np_dtype, count=n // dtype.itemsize, offset=start)
    return torch.from_numpy(arr.copy()).reshape(shape)


def _statuses(label: str, entries: Any) -> tuple[Status, ...]:
    _require(isinstance(entries, list), f"statuses of {label!r} are not a list")
    out = []
    for entry in entries:
        _require(
            isinstance(entry, list) and len(entry) == 3,
            f"a status of {label!r} is not [round, outcome, factor]",
        )
        rnd, outcome, factor = entry
        _require(_is_count(rnd), f"a status round of {label!r} must be an integer >= 0, got {rnd!r}")
        _require(
            isinstance(factor, int | float) and 0.0 <= factor <= 1.0,
            f"a status factor of {label!r} must be in [0, 1], got {factor!r}",
        )
        out.append(Status(rnd, Outcome(outcome), float(factor)))
    return tuple(out)


def _norms(norms: Any) -> tuple[float, ...]:
    _require(
        isinstance(norms, list)
        and all(
            isinstance(n, int | float) and not isinstance(n, bool) and math.isfinite(n) and n >= 0
            for n in norms
        ),
        f"recent_norms must be lists of finite numbers >= 0, got {norms!r}",
    )
    return tuple(float(n) for n in norms)


def latest_checkpoint(
    directory: Path | str,
    device: torch.device | str = "cpu",
    *,
    dim: int | None = None,
    check: Callable[[ServerState, dict[str, Any]], None] | None = None,
) -> tuple[ServerState, dict[str, Any], Path] | None:
    """The newest checkpoint in ``directory`` that verifies; unusable newer ones are skipped with a warning.

    ``dim``: the model's parameter count (see :func:`load_checkpoint`); ``check``: the caller's own check of
    the state and ``extra``, raising :class:`CheckpointError` for a checkpoint to skip.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = sorted(
        (int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) is not None
    )
    for _, path in reversed(candidates):
        try:
            state, extra = load_checkpoint(path, device, dim=dim)
            if check is not None:
                try:
                    check(state, extra)
                except CheckpointError as err:
                    raise CheckpointError(f"{path}: {err}") from None
        except CheckpointError as err:
            warnings.warn(f"skipping unusable checkpoint: {err}; trying the previous one", stacklevel=2)
            continue
        return state, extra, path
    return None
