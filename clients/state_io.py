"""Client state in Flower's ``context.state``: the worker state of the algorithm layer, slot by slot.

Slots (:class:`fl_compams.algorithm.WorkerState`): the EF residual (``ef``), the reply whose status has not
arrived yet (``pending``: its round and wire bytes), QAdam's local moments (``qadam``) and the rounds counter.

State lives only here (never in module globals or actor attributes: Ray reuses processes across virtual
clients, and deployment starts a new process per message). With the node config key ``state-dir`` it is also
mirrored to node-local disk after every training round (:mod:`clients.persist`), and restored from there when a
restarted SuperNode's ``context.state`` is empty.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from clients import persist
from fl_compams import nodes
from fl_compams.algorithm import Pending, WorkerState
from fl_compams.client_opt import LocalAdamState

log = logging.getLogger(__name__)

RESIDUAL_RECORD = "ef"
RESIDUAL_KEY = "residual"
PENDING_RECORD = "pending"
ADAM_RECORD = "qadam"
COUNTERS_RECORD = "counters"
ROUNDS_KEY = "rounds"
STATE_DIR_KEY = "state-dir"


def _tensor(arr: np.ndarray, dtype: np.dtype, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(arr.astype(dtype, copy=True)).to(device)


def load_worker_state(state: RecordDict, dim: int, device: torch.device) -> WorkerState:
    """Read the node's :class:`~fl_compams.algorithm.WorkerState` from ``context.state``.

    Slots are empty on first participation; a residual or moments of another model size are dropped (a new
    model starts fresh).
    """
    residual = pending = local = None
    if RESIDUAL_RECORD in state:
        arr = state[RESIDUAL_RECORD][RESIDUAL_KEY].numpy()
        if arr.shape == (dim,):
            residual = _tensor(arr, np.float32, device)
    if PENDING_RECORD in state and residual is not None:
        rec = state[PENDING_RECORD]
        pending = Pending(int(rec["round"].numpy()[0]), rec["payload"].numpy().astype(np.uint8).tobytes())
    if ADAM_RECORD in state:
        rec = state[ADAM_RECORD]
        m, v = rec["m"].numpy(), rec["v"].numpy()
        if m.shape == (dim,) and v.shape == (dim,):
            step = int(rec["step"].numpy()[0])
            local = LocalAdamState(step, _tensor(m, np.float32, device), _tensor(v, np.float32, device))
    rounds = int(state[COUNTERS_RECORD][ROUNDS_KEY]) if COUNTERS_RECORD in state else 0
    return WorkerState(residual=residual, pending=pending, local_opt=local, rounds=rounds)


def save_worker_state(state: RecordDict, worker: WorkerState) -> None:
    """Store every slot of ``worker`` in ``context.state`` (arrays as float32 / int64 / uint8 records)."""
    as_array = lambda t: Array(t.detach().cpu().numpy())  # noqa: E731
    for record in (RESIDUAL_RECORD, PENDING_RECORD, ADAM_RECORD):
        if record in state:
            del state[record]
    if worker.residual is not None:
        state[RESIDUAL_RECORD] = ArrayRecord({RESIDUAL_KEY: as_array(worker.residual)})
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
    state[COUNTERS_RECORD] = ConfigRecord({ROUNDS_KEY: int(worker.rounds)})


def state_bytes(worker: WorkerState) -> dict[str, int]:
    """Bytes of each slot of a worker's state (design.md section 7, "State size")."""
    sizes = {
        "residual": worker.residual.numel() * worker.residual.element_size()
        if worker.residual is not None
        else 0,
        "pending": len(worker.pending.payload) if worker.pending is not None else 0,
        "local_opt": 0,
    }
    if worker.local_opt is not None:
        sizes["local_opt"] = sum(
            t.numel() * t.element_size() for t in (worker.local_opt.m, worker.local_opt.v)
        )
    return sizes


def state_file(context: Context) -> Path | None:
    """Where this node's state is mirrored, or ``None`` when the node config sets no ``state-dir``."""
    state_dir = context.node_config.get(STATE_DIR_KEY)
    if not state_dir:
        return None
    return persist.state_path(
        str(state_dir), context.run_id, nodes.label_of_config(context.node_config, context.node_id)
    )


def restore_from_disk(context: Context, dim: int) -> bool:
    """Load the mirrored state into an empty ``context.state`` (after a SuperNode restart); True if restored.

    Does nothing without ``state-dir`` or when ``context.state`` already holds this node's state. A missing file
    is a fresh start; an unusable one gives a :class:`clients.persist.StateFileWarning` and a fresh start.
    """
    path = state_file(context)
    if path is None or COUNTERS_RECORD in context.state:
        return False
    key = nodes.label_of_config(context.node_config, context.node_id)
    saved = persist.read_state(path, run_id=context.run_id, node_key=key, dim=dim)
    if saved is None:
        return False
    for record, arrays in saved.arrays.items():
        context.state[record] = ArrayRecord({name: Array(arr) for name, arr in arrays.items()})
    context.state[COUNTERS_RECORD] = ConfigRecord({ROUNDS_KEY: int(saved.rounds)})
    log.info(
        "restored client state from %s (%d rounds, records %s)", path, saved.rounds, sorted(saved.arrays)
    )
    return True


def save_to_disk(context: Context, dim: int) -> None:
    """Mirror ``context.state`` (all its arrays: residual, local moments, ...; and the rounds) to the state file.

    Does nothing without ``state-dir``. The write is atomic. A failed write gives a
    :class:`clients.persist.StateFileWarning` and the round goes on: the state is still in memory, it just would
    not survive a restart.
    """
    path = state_file(context)
    if path is None:
        return
    key = nodes.label_of_config(context.node_config, context.node_id)
    if key == f"node-{context.node_id}":
        log.warning(
            "state-dir is set but the node config has neither partition-id nor node-name: the state file is "
            "keyed by the node id, which changes when the SuperNode restarts; set node-name='<unique name>'"
        )
    state = context.state
    rounds = int(state[COUNTERS_RECORD][ROUNDS_KEY]) if COUNTERS_RECORD in state else 0
    arrays = persist.arrays_of(state.array_records)
    record = persist.PersistedState(context.run_id, context.node_id, key, rounds, dim, arrays)
    try:
        persist.write_state(path, record)
    except OSError as err:
        message = f"could not write the client state file {str(path)!r} ({type(err).__name__}: {err})"
        log.warning(message)
        warnings.warn(message, persist.StateFileWarning, stacklevel=2)
