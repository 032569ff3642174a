"""What the server and the clients must agree on: record keys, message routes, metric names.

Plain strings only (no flwr import), so ``strategies`` and ``clients`` share them without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fl_compams.algorithm import Outcome, Status
from fl_compams.config import client_keys
from fl_compams.downlink import Broadcast, DownInstruction, parse_version

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
#: LAQ (fl_compams.laq): the instruction's ConfigRecord with the round's history term of the skip rule and the
#: reset flag, and the reply field (in PAYLOAD) that marks a skip (then PAYLOAD_BYTES is empty).
LAZY = "lazy"
LAZY_THRESHOLD = "threshold"
LAZY_RESET = "reset"
SKIP = "skip"
#: Reply record (an ArrayRecord) with the model's buffers, dense, by name (``buffers = "average"``,
#: fl_compams.buffers): float32 statistics and int64 counters, beside the compressed payload.
BUFFERS = "buffers"
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
#: Qsparse-local-SGD: local steps behind a reply (0 = a first asynchronous contact, no work yet) and its age.
WORK_STEPS = "work-steps"
STALENESS = "staleness"
LOCAL_VARIANCE = "local-variance"
#: Bytes of each slot of a client's state after its reply (design.md section 7, "State size"), one metric per
#: slot that holds anything: ``state-bytes-<slot>``.
STATE_SLOTS = ("residual", "pending", "local_opt", "local_change", "replica", "momentum", "lazy")
#: ``buffers = "local"`` (FedBN): the client's own model buffers, kept beside the worker state (clients.buffers).
BUFFER_SLOT = "buffers"
STATE_BYTES = {slot: f"state-bytes-{slot.replace('_', '-')}" for slot in (*STATE_SLOTS, BUFFER_SLOT)}

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


# --- Two-way compression (design.md section 7; fl_compams.downlink).
#: Instruction record (a ConfigRecord): the target version and either DOWN_DENSE = True (the public model is in
#: ARRAYS: a resync) or the chain of broadcasts to apply, DOWN_SOURCES (versions) and DOWN_PAYLOADS (wire bytes).
DOWNLINK = "downlink"
DOWN_TARGET = "target"
DOWN_DENSE = "dense"
DOWN_SOURCES = "sources"
DOWN_PAYLOADS = "payloads"
#: Reply fields (in the PAYLOAD record): the replica version the client trained at, or, instead of a payload, why
#: the client could not reach the target (it asks for the dense model and did not train).
REPLICA = "replica"
RESYNC = "resync"
#: Client keys sent only when they differ from their default (clients fill in the default), so that a key for a
#: new algorithm part leaves the default instruction's bytes unchanged.
OPTIONAL_CLIENT_KEYS = ("client-momentum", "buffers", "state-dtype", "state-store")


def downlink_to_fields(instruction: DownInstruction) -> dict[str, Any]:
    """The :data:`DOWNLINK` record's fields for an instruction."""
    if instruction.dense:
        return {DOWN_TARGET: str(instruction.target), DOWN_DENSE: True}
    return {
        DOWN_TARGET: str(instruction.target),
        DOWN_DENSE: False,
        DOWN_SOURCES: [str(step.source) for step in instruction.steps],
        DOWN_PAYLOADS: [step.payload for step in instruction.steps],
    }


def downlink_from_fields(fields: Mapping[str, Any]) -> DownInstruction:
    """Parse the :data:`DOWNLINK` record; raise ValueError naming what is wrong."""
    target = parse_version(fields.get(DOWN_TARGET))
    dense = fields.get(DOWN_DENSE)
    if not isinstance(dense, bool):
        raise ValueError(f"downlink instruction: {DOWN_DENSE!r} must be true or false, got {dense!r}")
    if dense:
        return DownInstruction(target, dense=True)
    sources, payloads = fields.get(DOWN_SOURCES, []), fields.get(DOWN_PAYLOADS, [])
    if not (isinstance(sources, list) and isinstance(payloads, list) and len(sources) == len(payloads)):
        raise ValueError("downlink instruction: sources and payloads must be two equally long lists")
    if not all(isinstance(p, bytes) for p in payloads):
        raise ValueError("downlink instruction: payloads must be bytes")
    versions = [parse_version(s) for s in sources]
    steps = tuple(
        Broadcast(v, nxt, p) for v, nxt, p in zip(versions, [*versions[1:], target], payloads, strict=True)
    )
    return DownInstruction(target, steps)


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from the run seed and integers such as (partition id, round): splitmix64 mixing."""
    h = seed & 0xFFFFFFFFFFFFFFFF
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
