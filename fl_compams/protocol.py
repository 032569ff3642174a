"""What the server and the clients must agree on: record keys, message routes, metric names.

Plain strings only (no flwr import), so ``strategies`` and ``clients`` share them without importing each other.
"""

from __future__ import annotations

from fl_compams.config import client_keys

#: Global model (dense float32 tensors by name) in instructions; Flower's FedAvg default key.
ARRAYS = "arrays"
#: Instruction settings (the client part of the run config plus ``server-round``).
CONFIG = "config"
#: Reply record holding the compressed update: a ConfigRecord with the wire bytes under PAYLOAD_BYTES.
PAYLOAD = "payload"
PAYLOAD_BYTES = "bytes"
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

# Metric names a client reports.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
RESIDUAL_NORM = "residual-norm"
RESIDUAL_NORM_IN = "residual-norm-in"
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


def node_label(partition_id: int, node_name: str, node_id: int) -> str:
    """Stable name of a node in results: ``partition-<id>``, else ``node-<name>``, else ``node-<node id>``."""
    if partition_id >= 0:
        return f"partition-{partition_id}"
    return f"node-{node_name}" if node_name else f"node-{node_id}"


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from the run seed and integers such as (partition id, round): splitmix64 mixing."""
    h = seed & 0xFFFFFFFFFFFFFFFF
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
