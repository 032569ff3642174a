"""Client state in Flower's ``context.state``: the EF residual and how many rounds the state has seen.

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

log = logging.getLogger(__name__)

RESIDUAL_RECORD = "ef"
RESIDUAL_KEY = "residual"
COUNTERS_RECORD = "counters"
ROUNDS_KEY = "rounds"
STATE_DIR_KEY = "state-dir"


def load_residual(state: RecordDict, dim: int, device: torch.device) -> torch.Tensor:
    """The stored residual, or zeros (e_1 = 0) on first participation or if the model size changed."""
    if RESIDUAL_RECORD in state:
        arr = state[RESIDUAL_RECORD][RESIDUAL_KEY].numpy()
        if arr.shape == (dim,):
            return torch.from_numpy(arr.astype(np.float32, copy=True)).to(device)
    return torch.zeros(dim, dtype=torch.float32, device=device)


def save_residual(state: RecordDict, residual: torch.Tensor) -> None:
    """Store the residual (float32) in the node's state."""
    state[RESIDUAL_RECORD] = ArrayRecord({RESIDUAL_KEY: Array(residual.detach().cpu().numpy())})


def bump_rounds(state: RecordDict) -> int:
    """Count one more round in this node's state and return the new count."""
    rounds = int(state[COUNTERS_RECORD][ROUNDS_KEY]) + 1 if COUNTERS_RECORD in state else 1
    state[COUNTERS_RECORD] = ConfigRecord({ROUNDS_KEY: rounds})
    return rounds


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
