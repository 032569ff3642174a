"""Client state in Flower's ``context.state``: the EF residual and how many rounds the state has seen.

State lives only here (never in module globals or actor attributes: Ray reuses processes across virtual
clients, and deployment starts a new process per message).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

RESIDUAL_RECORD = "ef"
RESIDUAL_KEY = "residual"
COUNTERS_RECORD = "counters"
ROUNDS_KEY = "rounds"


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
