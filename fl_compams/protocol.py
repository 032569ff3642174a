"""What the server and the clients must agree on: record keys, message routes, metric names.

Plain strings only (no flwr import), so ``strategies`` and ``clients`` share them without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fl_compams.algorithm import Outcome, Status
from fl_compams.config import client_keys

#: Global model (dense float32 tensors by name) in instructions; Flower's FedAvg default key.
ARRAYS = "arrays"
#: Instruction settings (the client part of the run config plus ``server-round``).
CONFIG = "config"
#: Reply record holding the compressed update: a ConfigRecord with the wire bytes under PAYLOAD_BYTES, the round
#: the reply answers under REPLY_ROUND and the highest status round the client applied under ACKED.
PAYLOAD = "payload"
PAYLOAD_BYTES = "bytes"
REPLY_ROUND = "round"
ACKED = "acked"
#: Instruction record with the statuses of a client's unacknowledged replies (design.md section 7): a ConfigRecord
#: of three equally long lists (omitted when there is none).
STATUSES = "statuses"
STATUS_FIELDS = ("rounds", "outcomes", "factors")
#: Reply metrics (a MetricRecord).
METRICS = "metrics"
#: Probe reply: the full local gradient (an ArrayRecord with one float32 vector under PROBE_GRADIENT).
PROBE_GRADIENT = "gradient"
#: Query route of the sigma_g^2 probe (``@app.query("probe")`` handles message type ``query.probe``).
PROBE_ROUTE = "probe"
PROBE_MESSAGE_TYPE = f"query.{PROBE_ROUTE}"
#: Query route the server uses once at start to learn each node's stable name (partition id or node name).
HELLO_ROUTE = "hello"
HELLO_MESSAGE_TYPE = f"query.{HELLO_ROUTE}"
PARTITION_ID = "partition-id"
NODE_NAME = "node-name"
NODE_INFO = "node-info"
#: Query route the server sends every connected node once the run has truly ended (after the last round's
#: results and checkpoint): the node removes the run's client state files unless its node config says
#: ``keep-state = true``. Its reply: a ConfigRecord under END_INFO with how many files were removed or kept.
END_ROUTE = "end"
END_MESSAGE_TYPE = f"query.{END_ROUTE}"
END_INFO = "end-info"
REMOVED = "removed"
KEPT = "kept"

# Metric names a client reports.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
RESIDUAL_NORM = "residual-norm"
RESIDUAL_NORM_IN = "residual-norm-in"
#: Norm of what the client folded back into its residual (a lost reply) and of what a server policy removed.
FOLDED_NORM = "ef-folded-norm"
REMOVED_NORM = "ef-removed-norm"
STATE_ROUNDS = "state-rounds"
LOCAL_VARIANCE = "local-variance"

#: Run-config keys a client needs (``config.client_keys()``: every key whose ``side`` is "client", compressor
#: keys included); the server sends them in every instruction, so clients work the same under ``flwr run`` and
#: under the in-process runner (where ``context.run_config`` is empty). Derived at each access, so a compressor
#: registered later is included.
CLIENT_KEYS: tuple[str, ...]


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "CLIENT_KEYS":
        return client_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def statuses_to_fields(statuses: tuple[Status, ...]) -> dict[str, list]:
    """The :data:`STATUSES` record's fields for an instruction."""
    return {
        "rounds": [int(s.round) for s in statuses],
        "outcomes": [int(s.outcome) for s in statuses],
        "factors": [float(s.factor) for s in statuses],
    }


def statuses_from_fields(fields: Mapping[str, Any]) -> tuple[Status, ...]:
    """Parse and check the :data:`STATUSES` record; raise ValueError naming what is wrong."""
    columns = [fields.get(name) for name in STATUS_FIELDS]
    if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1:
        raise ValueError(
            f"instruction statuses must be three equally long lists {STATUS_FIELDS}, got {dict(fields)}"
        )
    out = []
    for rnd, outcome, factor in zip(*columns, strict=True):
        if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
            raise ValueError(f"instruction status round must be an integer >= 0, got {rnd!r}")
        if outcome not in {int(o) for o in Outcome}:
            raise ValueError(
                f"instruction status outcome must be one of {[int(o) for o in Outcome]}, got {outcome!r}"
            )
        if not isinstance(factor, float | int) or not 0.0 <= float(factor) <= 1.0:
            raise ValueError(f"instruction status factor must be in [0, 1], got {factor!r}")
        out.append(Status(rnd, Outcome(outcome), float(factor)))
    return tuple(out)


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from the run seed and integers such as (partition id, round): splitmix64 mixing."""
    h = seed & 0xFFFFFFFFFFFFFFFF
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
