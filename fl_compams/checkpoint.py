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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_compams.algorithm import Outcome, Status
from fl_compams.server import ServerState
from fl_compams.server_opt import AdamState, SGDState

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

MAGIC = b"CAMSCKPT"
#: 2 added the statuses clients have not acknowledged (``unacked``), 3 the recent reply norms of the adaptive
#: reply bound (``recent_norms``). Older files are migrated on load: version 1 predates acknowledged client
#: state (no status was outstanding); versions 1 and 2 predate the adaptive bound (its history starts empty,
#: so the first rounds after the resume bound as the first rounds of a run do).
VERSION = 3
_READABLE = (1, 2, 3)
_PREFIX = struct.Struct("<8sHI")
_DIGEST = 32
_NAME = re.compile(r"^round-(\d{6,})\.ckpt$")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}
_OPT_STATES = {"AdamState": AdamState, "SGDState": SGDState}


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupted, of another format version, or inconsistent."""


def _opt_tensors(opt_state) -> dict[str, torch.Tensor]:
    return {f"opt.{k}": v for k, v in opt_state._asdict().items() if isinstance(v, torch.Tensor)}


def save_checkpoint(directory: Path | str, state: ServerState, extra: dict[str, Any] | None = None) -> Path:
    """Write ``round-<r>.ckpt`` for ``state`` into ``directory`` atomically; return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"theta": state.theta, **_opt_tensors(state.opt_state)}
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
        "opt_state_type": type(state.opt_state).__name__,
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
    path: Path | str, device: torch.device | str = "cpu"
) -> tuple[ServerState, dict[str, Any]]:
    """Read and verify a checkpoint; return the server state and the caller's ``extra`` dict."""
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
        tensors = {}
        for entry in header["tensors"]:
            start, n = entry["offset"], entry["nbytes"]
            if start + n > len(data):
                raise CheckpointError(f"{path}: tensor {entry['name']} runs past the end of the file")
            dtype = _DTYPES[entry["dtype"]]
            arr = np.frombuffer(
                data, dtype=torch.empty(0, dtype=dtype).numpy().dtype, count=n // dtype.itemsize, offset=start
            )
            tensors[entry["name"]] = torch.from_numpy(arr.copy()).reshape(entry["shape"]).to(device)
        opt_cls = _OPT_STATES[header["opt_state_type"]]
        fields = {**header["opt_scalars"], **{k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}}
        opt_state = opt_cls(**fields)
        unacked = {
            str(label): tuple(Status(int(r), Outcome(int(o)), float(f)) for r, o, f in entries)
            for label, entries in header.get("unacked", {}).items()
        }
        recent = tuple(tuple(float(n) for n in norms) for norms in header.get("recent_norms", []))
        if not all(math.isfinite(n) and n >= 0 for norms in recent for n in norms):
            raise CheckpointError(f"{path}: recent_norms must be finite numbers >= 0")
        state = ServerState(int(header["round"]), tensors["theta"], opt_state, unacked, recent)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: malformed header ({err})") from err
    return state, header["extra"]


def latest_checkpoint(
    directory: Path | str, device: torch.device | str = "cpu"
) -> tuple[ServerState, dict[str, Any], Path] | None:
    """The newest checkpoint in ``directory`` that verifies; corrupt newer ones are skipped with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = sorted(
        (int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) is not None
    )
    for _, path in reversed(candidates):
        try:
            state, extra = load_checkpoint(path, device)
        except CheckpointError as err:
            warnings.warn(f"skipping unusable checkpoint: {err}; trying the previous one", stacklevel=2)
            continue
        return state, extra, path
    return None
