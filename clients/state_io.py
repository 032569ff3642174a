"""Client state in Flower's ``context.state``: the worker state of the algorithm layer, slot by slot.

Slots (:class:`fl_compams.algorithm.WorkerState`): the EF residual (``ef``), the reply whose status has not
arrived yet (``pending``: its round and wire bytes), QAdam's local moments (``qadam``), asynchronous Qsparse's
unsent local work (``qsparse``: the change, its round and steps), LAQ's last upload, error norms and clock
(``laq``), the rounds counter, and with two-way compression the public model the node holds and its version
(``replica``), dist-EF-SGDM's momentum (``momentum``).

State lives only here (never in module globals or actor attributes: Ray reuses processes across virtual
clients, and deployment starts a new process per message). With the node config key ``state-dir`` it is also
mirrored to node-local disk after every training round (:mod:`clients.persist`), filed under the run key (the
run's ``out-dir`` and ``run-name``, which a resumed run keeps, unlike Flower's run id), and restored from there
when ``context.state`` is empty: after a SuperNode restart, or in the first round of a resumed run. A state newer
than the server's round (the server resumed from an older checkpoint) is rolled back to the state before its last
round when that is on disk, else dropped (:func:`restore_from_disk`).

Compact state (config keys ``state-dtype``, ``state-store``; design.md section 7, "State size"): the EF residual
may be stored in float16 (scaled by a power of two) or bfloat16 (:mod:`fl_compams.precision`), and the rounded
values are the ones the next round uses; and every array may live on node-local disk between rounds instead of in
``context.state`` (the same file format as the mirror, in ``state-dir`` or else a run-scoped temporary
directory), with only the rounds counter and the file's path left in memory. ``state-bytes-<slot>`` reports the
bytes each slot takes where it is stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from clients import persist
from fl_compams import nodes, precision
from fl_compams.algorithm import Pending, WorkerState
from fl_compams.client_opt import LocalAdamState, MomentumState
from fl_compams.downlink import Version
from fl_compams.laq import LazyWorker
from fl_compams.qsparse import LocalChange

log = logging.getLogger("flwr").getChild(__name__)  # a child of Flower's logger: shown in the SuperNode's log

RESIDUAL_RECORD = "ef"
RESIDUAL_KEY = "residual"
PENDING_RECORD = "pending"
ADAM_RECORD = "qadam"
LOCAL_CHANGE_RECORD = "qsparse"
LAZY_RECORD = "laq"
COUNTERS_RECORD = "counters"
#: Two-way compression: the public model the node holds and its version; dist-EF-SGDM's momentum buffer.
REPLICA_RECORD = "replica"
MOMENTUM_RECORD = "momentum"
ROUNDS_KEY = "rounds"
STATE_DIR_KEY = "state-dir"
#: Node-config key: ``true`` keeps the run's state files when the run ends (a run that will be resumed later).
KEEP_STATE_KEY = "keep-state"
#: Run-config keys that name a run (Flower gives every ClientApp the run config; the in-process runner too).
RUN_NAME_KEY = "run-name"
OUT_DIR_KEY = "out-dir"
#: state-store = "disk": in context.state, the record naming the file that holds the arrays, and its keys.
STORE_RECORD = "store"
STORE_PATH_KEY = "path"
STORE_TEMP_KEY = "temporary"
#: A vector stored in float16 (the residual, the replica's ``model``) keeps its power-of-two scale exponent beside
#: it, ``<name>-exp2``; one in bfloat16 is kept as its raw 16-bit patterns, ``<name>-bfloat16`` (numpy, hence
#: Flower's Array and the state file format, has no bfloat16).
EXPONENT_SUFFIX = "-exp2"
BFLOAT16_SUFFIX = "-bfloat16"


def _tensor(arr: np.ndarray, dtype: np.dtype, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(arr.astype(dtype, copy=True)).to(device)


def load_worker_state(state: RecordDict, dim: int, device: torch.device) -> WorkerState:
    """Read the node's :class:`~fl_compams.algorithm.WorkerState` from ``context.state``.

    Slots are empty on first participation; a residual or moments of another model size are dropped (a new
    model starts fresh).
    """
    residual = pending = local = None
    if RESIDUAL_RECORD in state:
        residual = _unpack(state[RESIDUAL_RECORD], RESIDUAL_KEY, dim, device)
    lazy = _load_lazy(state, dim, device)
    if PENDING_RECORD in state and (residual is not None or lazy is not None):
        rec = state[PENDING_RECORD]
        pending = Pending(int(rec["round"].numpy()[0]), rec["payload"].numpy().astype(np.uint8).tobytes())
    if ADAM_RECORD in state:
        rec = state[ADAM_RECORD]
        m, v = rec["m"].numpy(), rec["v"].numpy()
        if m.shape == (dim,) and v.shape == (dim,):
            step = int(rec["step"].numpy()[0])
            local = LocalAdamState(step, _tensor(m, np.float32, device), _tensor(v, np.float32, device))
    change = None
    if LOCAL_CHANGE_RECORD in state:
        rec = state[LOCAL_CHANGE_RECORD]
        arr = rec["change"].numpy()
        if arr.shape == (dim,):
            change = LocalChange(
                int(rec["round"].numpy()[0]), int(rec["steps"].numpy()[0]), _tensor(arr, np.float32, device)
            )
    rounds = int(state[COUNTERS_RECORD][ROUNDS_KEY]) if COUNTERS_RECORD in state else 0
    replica, version = _load_replica(state, dim, device)
    momentum = None
    if MOMENTUM_RECORD in state:
        m = state[MOMENTUM_RECORD]["m"].numpy()
        if m.shape == (dim,):
            momentum = MomentumState(_tensor(m, np.float32, device))
    return WorkerState(
        residual=residual,
        pending=pending,
        local_opt=local,
        rounds=rounds,
        local_change=change,
        replica=replica,
        replica_version=version,
        momentum=momentum,
        lazy=lazy,
    )


def _unpack(rec: ArrayRecord, name: str, dim: int, device: torch.device) -> torch.Tensor | None:
    """The vector ``name`` of ``rec`` as float32, from whichever dtype it was stored in; None if of another size."""
    if name + BFLOAT16_SUFFIX in rec:
        bits = rec[name + BFLOAT16_SUFFIX].numpy()
        if bits.shape != (dim,):
            return None
        values = torch.from_numpy(bits.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)
        return precision.decode(values).to(device)
    arr = rec[name].numpy()
    if arr.shape != (dim,):
        return None
    if arr.dtype == np.float16:
        exp = name + EXPONENT_SUFFIX
        return precision.decode(
            torch.from_numpy(arr.copy()).to(device), int(rec[exp].numpy()[0]) if exp in rec else 0
        )
    return _tensor(arr, np.float32, device)


def _pack(name: str, vector: torch.Tensor, dtype: str) -> dict[str, Array]:
    """The arrays that store ``vector`` in ``dtype`` (:func:`fl_compams.precision.encode`; float32: as it is)."""
    values, k = precision.encode(vector.detach(), dtype)
    if dtype == "bfloat16":
        return {name + BFLOAT16_SUFFIX: Array(values.cpu().view(torch.int16).numpy().view(np.uint16))}
    arrays = {name: Array(values.cpu().numpy())}
    if dtype == "float16":
        arrays[name + EXPONENT_SUFFIX] = Array(np.array([k], dtype=np.int64))
    return arrays


def _stored_nbytes(vector: torch.Tensor | None, dtype: str) -> int:
    """Bytes :func:`_pack` stores ``vector`` in: its elements in ``dtype``, plus float16's 8-byte exponent."""
    if vector is None:
        return 0
    return vector.numel() * precision.itemsize(dtype) + (8 if dtype == "float16" else 0)


def _load_replica(
    state: RecordDict, dim: int, device: torch.device
) -> tuple[torch.Tensor | None, Version | None]:
    """The replica and its version; none if absent or of another model size (the server then resyncs)."""
    if REPLICA_RECORD not in state:
        return None, None
    rec = state[REPLICA_RECORD]
    model = _unpack(rec, "model", dim, device)
    if model is None:
        return None, None
    digest = rec["digest"].numpy().astype(np.uint8).tobytes().decode("ascii", errors="replace")
    return model, Version(int(rec["round"].numpy()[0]), digest)


def _load_lazy(state: RecordDict, dim: int, device: torch.device) -> LazyWorker | None:
    """LAQ's slot: last applied upload (absent = zeros), error norms, history term, clock."""
    if LAZY_RECORD not in state:
        return None
    rec = state[LAZY_RECORD]
    q = None
    if "q" in rec:
        arr = rec["q"].numpy()
        if arr.shape != (dim,):
            return None  # another model: start fresh
        q = _tensor(arr, np.float32, device)
    eps_hat, threshold, sent_eps = (float(v) for v in rec["scalars"].numpy())
    return LazyWorker(q, eps_hat, int(rec["clock"].numpy()[0]), threshold, sent_eps)


def save_worker_state(state: RecordDict, worker: WorkerState, dtype: str = "float32") -> None:
    """Store every slot of ``worker`` in ``context.state`` (arrays as float32 / int64 / uint8 records).

    ``dtype`` (config ``state-dtype``) is the storage of the residual and the replica: float32 keeps them as
    they are; float16 and bfloat16 round them (:mod:`fl_compams.precision`), and :func:`load_worker_state` then
    reads the rounded values. The replica is the public model, which two-way runs keep representable in
    ``dtype`` (:mod:`fl_compams.downlink`): it is stored exactly.
    """
    as_array = lambda t: Array(t.detach().cpu().numpy())  # noqa: E731
    for record in (
        RESIDUAL_RECORD,
        PENDING_RECORD,
        ADAM_RECORD,
        LOCAL_CHANGE_RECORD,
        REPLICA_RECORD,
        MOMENTUM_RECORD,
        LAZY_RECORD,
    ):
        if record in state:
            del state[record]
    if worker.residual is not None:
        state[RESIDUAL_RECORD] = ArrayRecord(_pack(RESIDUAL_KEY, worker.residual, dtype))
    if worker.pending is not None:
        state[PENDING_RECORD] = ArrayRecord(
            {
                "round": Array(np.array([worker.pending.round], dtype=np.int64)),
                "payload": Array(np.frombuffer(worker.pending.payload, dtype=np.uint8).copy()),
            }
        )
    if worker.local_opt is not None:
        state[ADAM_RECORD] = ArrayRecord(
            {
                "m": as_array(worker.local_opt.m),
                "v": as_array(worker.local_opt.v),
                "step": Array(np.array([worker.local_opt.step], dtype=np.int64)),
            }
        )
    if worker.local_change is not None:
        state[LOCAL_CHANGE_RECORD] = ArrayRecord(
            {
                "change": as_array(worker.local_change.change),
                "round": Array(np.array([worker.local_change.round], dtype=np.int64)),
                "steps": Array(np.array([worker.local_change.steps], dtype=np.int64)),
            }
        )
    if worker.replica is not None and worker.replica_version is not None:
        state[REPLICA_RECORD] = ArrayRecord(
            {
                **_pack("model", worker.replica, dtype),
                "round": Array(np.array([worker.replica_version.round], dtype=np.int64)),
                "digest": Array(
                    np.frombuffer(worker.replica_version.digest.encode("ascii"), dtype=np.uint8).copy()
                ),
            }
        )
    if worker.momentum is not None:
        state[MOMENTUM_RECORD] = ArrayRecord({"m": as_array(worker.momentum.m)})
    if worker.lazy is not None:
        lz = worker.lazy
        arrays = {
            "scalars": Array(np.array([lz.eps_hat, lz.threshold, lz.sent_eps], dtype=np.float64)),
            "clock": Array(np.array([lz.clock], dtype=np.int64)),
        }
        if lz.q is not None:
            arrays["q"] = as_array(lz.q)
        state[LAZY_RECORD] = ArrayRecord(arrays)
    state[COUNTERS_RECORD] = ConfigRecord({ROUNDS_KEY: int(worker.rounds)})


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def state_bytes(worker: WorkerState, dtype: str = "float32") -> dict[str, int]:
    """Bytes of each slot of a worker's state, by ``protocol.STATE_SLOTS`` name (design.md section 7, "State size").

    Tensors count their elements at the size they are stored in (the residual and the replica in ``dtype``,
    config ``state-dtype``, plus float16's 8-byte scale exponent; the rest float32); the pending reply its wire
    bytes; LAQ's slot its last upload plus its three float64 scalars and the clock.
    """
    w = worker
    lazy = w.lazy
    return {
        "residual": _stored_nbytes(w.residual, dtype),
        "pending": len(w.pending.payload) if w.pending is not None else 0,
        "local_opt": _nbytes(w.local_opt.m, w.local_opt.v) if w.local_opt is not None else 0,
        "local_change": _nbytes(w.local_change.change) if w.local_change is not None else 0,
        "replica": _stored_nbytes(w.replica, dtype),
        "momentum": _nbytes(w.momentum.m) if w.momentum is not None else 0,
        "lazy": _nbytes(lazy.q) + 4 * 8 if lazy is not None else 0,
    }


def run_key_for(out_dir: str, run_name: str, run_id: int) -> str:
    """The key a run's client state is filed under: ``<run-name>-<16 hex digits of SHA-256 of both names>``.

    A resumed run has the same ``out-dir`` and ``run-name`` (the server refuses to resume with any other) but a
    new Flower run id, so the key survives a server restart where the run id would not; the digest tells apart
    runs of the same name in different ``out-dir``. An empty ``run-name`` (a timestamped run, which cannot be
    resumed) gives ``flower-run-<run id>``: such a state need not outlive the Flower run.
    """
    if not run_name:
        return f"flower-run-{run_id & 0xFFFFFFFFFFFFFFFF}"
    digest = hashlib.sha256(json.dumps([out_dir, run_name]).encode("utf-8")).hexdigest()[:16]
    return f"{persist.safe_name(run_name)[:64]}-{digest}"


def run_key(context: Context) -> str:
    """:func:`run_key_for` of the run config in ``context`` (``out-dir``, ``run-name``) and Flower's run id."""
    cfg = context.run_config
    return run_key_for(str(cfg.get(OUT_DIR_KEY, "")), str(cfg.get(RUN_NAME_KEY, "")), context.run_id)


def state_file(context: Context) -> Path | None:
    """Where this node's state is mirrored, or ``None`` when the node config sets no ``state-dir``."""
    state_dir = context.node_config.get(STATE_DIR_KEY)
    if not state_dir:
        return None
    return persist.state_path(
        str(state_dir), run_key(context), nodes.label_of_config(context.node_config, context.node_id)
    )


def restore_from_disk(context: Context, dim: int, *, server_round: int) -> bool:
    """Load the mirrored state into an empty ``context.state`` (a restarted SuperNode, a resumed run).

    Does nothing without ``state-dir`` or when ``context.state`` already holds this node's state. A missing file
    is a fresh start; an unusable one gives a :class:`clients.persist.StateFileWarning` and a fresh start.

    A state written in round ``server_round`` or later is one the server has forgotten: it resumed from a
    checkpoint older than the node's last training (a server that died mid-round), or a new run reuses this
    run's name. The node then goes back to the state it had before that training, which is what the server's
    state expects (exact: the instruction repeats the statuses of that state's pending reply): nothing, if it
    was the node's first round, else the previous file kept by :func:`clients.persist.write_state`. If that is
    not on disk or is itself too new (the checkpoint is more than one of the node's rounds behind), the node
    starts fresh, with a warning; ``checkpoint-every = 1`` avoids this.

    Logs one line either way: the round the restored state came from and its file's size, or why the node starts
    fresh (Flower's logger, so the line is in the SuperNode's log).

    Returns True if a state was restored.
    """
    if STORE_RECORD in context.state:  # state-store = "disk": the arrays are in the file the record names
        return _load_from_store(context, dim)
    path = state_file(context)
    if COUNTERS_RECORD in context.state:
        return False
    if path is None:  # debug only: every virtual client of a simulation starts here
        log.debug("no client state in memory and no state-dir: starting from a fresh (zero) state")
        return False
    key = run_key(context)
    node = nodes.label_of_config(context.node_config, context.node_id)
    read = lambda p: persist.read_state(p, run_key=key, node_key=node, dim=dim)  # noqa: E731
    latest, older = path, persist.previous_path(path)
    if not latest.exists() and older.exists():  # a crash between write_state's two renames
        latest, older = older, None
    found = latest.exists()
    saved = read(latest)
    if saved is not None and saved.round >= server_round:
        before = read(older) if older is not None and saved.rounds > 1 else None
        saved, latest = _state_before(saved, before, server_round, latest), older
    if saved is None:
        why = "no state file" if not found else "no usable state (see the line above)"
        log.info(
            "%s: %s at %s; starting from a fresh (zero) state in round %d", node, why, path, server_round
        )
        return False
    for record, arrays in saved.arrays.items():
        context.state[record] = ArrayRecord({name: Array(arr) for name, arr in arrays.items()})
    context.state[COUNTERS_RECORD] = ConfigRecord({ROUNDS_KEY: int(saved.rounds)})
    log.info(
        "%s: restored the client state of round %d from %s (%d bytes, %d rounds, records %s) for round %d",
        node,
        saved.round,
        latest,
        latest.stat().st_size,
        saved.rounds,
        sorted(saved.arrays),
        server_round,
    )
    return True


def _state_before(
    saved: persist.PersistedState, previous: persist.PersistedState | None, server_round: int, path: Path
) -> persist.PersistedState | None:
    """The state the node had before the training that wrote ``saved``, if it is older than ``server_round``."""
    ahead = f"the state in {str(path)!r} is of round {saved.round}, but the server is at round {server_round}"
    if saved.rounds <= 1:
        log.info("%s; it was the node's first round, so the node starts fresh, as the server expects", ahead)
        return None
    if previous is not None and previous.rounds == saved.rounds - 1 and previous.round < server_round:
        log.info("%s; restoring the state the node had before it (round %d)", ahead, previous.round)
        return previous
    message = (
        f"{ahead} (it resumed from an older checkpoint, or a new run reuses this run-name and out-dir) and the "
        "state before it is not on disk or is too new: starting from a fresh (zero) state; with "
        "checkpoint-every = 1 a resumed server is never more than one round behind its clients"
    )
    log.warning(message)
    warnings.warn(message, persist.StateFileWarning, stacklevel=3)
    return None


def temporary_root() -> Path:
    """Where ``state-store = "disk"`` keeps state without a ``state-dir``: ``<tmp>/fl-compams-state-<uid>``."""
    return Path(tempfile.gettempdir()) / f"fl-compams-state-{os.getuid()}"


def save_to_disk(context: Context, dim: int, *, server_round: int, store: str = "memory") -> None:
    """Mirror ``context.state`` (all its arrays: residual, local moments, ...; and the rounds) to the state file.

    ``server_round`` is the round whose training produced the state. Does nothing without ``state-dir``, unless
    ``store = "disk"`` (config ``state-store``): the arrays then go to the state file (``state-dir``'s, else one
    in :func:`temporary_root` under the run key, written without fsync) and leave ``context.state``, which keeps
    the rounds counter and the file's path (:data:`STORE_RECORD`) for :func:`restore_from_disk` to read back.
    The write is atomic and keeps the previous state (:func:`clients.persist.write_state`). A failed write gives
    a :class:`clients.persist.StateFileWarning` and the round goes on: the state stays in memory, it just would
    not survive a restart.
    """
    if store not in ("memory", "disk"):
        raise ValueError(f"state store must be 'memory' or 'disk', got {store!r}")
    if STORE_RECORD in context.state:
        del context.state[STORE_RECORD]
    path = state_file(context)
    temporary = path is None and store == "disk"
    if temporary:
        root = temporary_root()
        root.mkdir(mode=0o700, exist_ok=True)
        path = persist.state_path(
            root, run_key(context), nodes.label_of_config(context.node_config, context.node_id)
        )
    if path is None:
        return
    key = nodes.label_of_config(context.node_config, context.node_id)
    if temporary:
        pass  # a run-scoped file: no restart reads it, so the run and node keys need not be stable
    elif key == f"node-{context.node_id}":
        log.warning(
            "state-dir is set but the node config has neither partition-id nor node-name: the state file is "
            "keyed by the node id, which changes when the SuperNode restarts; set node-name='<unique name>'"
        )
    run = run_key(context)
    if not context.run_config.get(RUN_NAME_KEY):
        log.info(
            "run-name is empty (a timestamped run, which cannot be resumed): the client state is filed under "
            "Flower's run id (%s), so it survives a SuperNode restart but not a server restart",
            run,
        )
    state = context.state
    rounds = int(state[COUNTERS_RECORD][ROUNDS_KEY]) if COUNTERS_RECORD in state else 0
    arrays = persist.arrays_of(state.array_records)
    record = persist.PersistedState(
        run, key, server_round, rounds, dim, arrays, run_id=context.run_id, node_id=context.node_id
    )
    try:
        persist.write_state(path, record, durable=not temporary)
    except OSError as err:
        message = f"could not write the client state file {str(path)!r} ({type(err).__name__}: {err})"
        log.warning(message)
        warnings.warn(message, persist.StateFileWarning, stacklevel=2)
        return
    if store == "disk":
        for name in list(state.array_records):
            del state[name]
        state[STORE_RECORD] = ConfigRecord({STORE_PATH_KEY: str(path), STORE_TEMP_KEY: temporary})


def _load_from_store(context: Context, dim: int) -> bool:
    """``state-store = "disk"``: read the arrays back from the file :data:`STORE_RECORD` names.

    A missing or unusable file (:func:`clients.persist.read_state`) gives a :class:`clients.persist.StateFileWarning`
    and a fresh (zero) state, as a lost mirror does. Returns True if the arrays were restored.
    """
    state = context.state
    path = Path(str(state[STORE_RECORD][STORE_PATH_KEY]))
    del state[STORE_RECORD]
    node = nodes.label_of_config(context.node_config, context.node_id)
    saved = (
        persist.read_state(path, run_key=run_key(context), node_key=node, dim=dim) if path.exists() else None
    )
    if saved is None:
        message = f"{node}: the client state stored in {str(path)!r} is gone or unusable; starting fresh"
        log.warning(message)
        warnings.warn(message, persist.StateFileWarning, stacklevel=3)
        state.clear()
        return False
    for record, arrays in saved.arrays.items():
        state[record] = ArrayRecord({name: Array(arr) for name, arr in arrays.items()})
    return True


def keep_state(context: Context) -> bool:
    """The node config's ``keep-state``: true (TOML ``true`` or the string "true"); anything unclear keeps too."""
    value = context.node_config.get(KEEP_STATE_KEY, False)
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("false", "0", "no", ""):
        return False
    if str(value).strip().lower() not in ("true", "1", "yes"):  # a typo never deletes anything
        log.warning("node config keep-state = %r is not true or false: keeping the client state files", value)
    return True


def end_of_run(context: Context) -> tuple[int, int]:
    """The run has ended (the server's final query): remove this node's state files of the run, or keep them.

    Removes ``<node key>.state`` and ``.prev`` (and the run's directory once it is empty) unless the node config
    sets ``keep-state = true``; clears ``context.state`` either way (Flower keeps finished runs' contexts in the
    SuperNode's memory). Logs one line. Returns ``(files removed, files kept)``; a file that cannot be removed
    counts as kept, with a warning.
    """
    stored = context.state[STORE_RECORD] if STORE_RECORD in context.state else None
    context.state.clear()
    temporary = 0
    if stored is not None and bool(stored[STORE_TEMP_KEY]):  # run-scoped: never kept
        temporary = _remove_temporary(Path(str(stored[STORE_PATH_KEY])))
    path = state_file(context)
    if path is None:
        return temporary, 0
    files = [p for p in (path, persist.previous_path(path)) if p.exists()]
    if keep_state(context):
        log.info(
            "run ended: keeping %d client state file(s) in %s (keep-state = true)", len(files), path.parent
        )
        return 0, len(files)
    removed = 0
    for p in files:
        try:
            p.unlink()
            removed += 1
        except OSError as err:
            log.warning("run ended, but the client state file %s could not be removed (%s)", p, err)
    try:
        path.parent.rmdir()  # only when empty: other nodes sharing the state-dir may still have files there
    except OSError:
        pass
    log.info("run ended: removed %d client state file(s) of %s", removed, path.parent)
    return removed + temporary, len(files) - removed


def _remove_temporary(path: Path) -> int:
    """Remove a run-scoped state file (and its run directory once empty); the number of files removed."""
    try:
        path.unlink()
    except OSError:
        return 0
    try:
        path.parent.rmdir()
    except OSError:
        pass
    return 1
