"""ClientApps for the hostile-client test (imported by Ray workers too): one attacker among honest nodes.

``app``: the node with partition ``HOSTILE`` attacks in every message it answers; the others are the real
ClientApp. ``absent_app``: the same node only fails (an error reply every round), so a run with it is the clean
run of the honest nodes on the same partitions.

The attacker, round r of its training replies (each built from an honest reply, so only the attack differs):

- r % 4 == 1: metrics with a list ``residual-norm``;
- r % 4 == 2: metrics with ``residual-norm = inf`` and ``train-loss = nan``;
- r % 4 == 3: a replayed reply (it claims to answer the previous round);
- r % 4 == 0: a payload with every value ``+-BIG`` (enormous but finite), with metrics named like the
  server's own fields (``uplink-bytes``, ``payload-bytes``, ``downlink-bytes``, snake_case too) and a pile of
  unknown ones.

None of it should reach the model, so the run should match the honest nodes' run.
Its hello reply claims a string partition id and a 10,000-character name; its probe replies alternate between a
gradient of the wrong length, a float64 gradient, a gradient with a NaN and a reply without metrics.
"""

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import client_app as real
from fl_compams import protocol
from fl_compams.codec import from_bytes, to_bytes

HOSTILE = 9
BIG = 1e30
_PROBES = "hostile-probes"
#: Client metrics named like fields the server measures itself.
COLLIDING = {"uplink-bytes": 1, "payload-bytes": 1, "downlink-bytes": 1, "uplink_bytes": 1, "failure": 1.0}


def _pid(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _round(msg: Message) -> int:
    return int(msg.content[protocol.CONFIG]["server-round"])


def _with(reply: Message, msg: Message, fields: dict | None = None, **metrics) -> Message:
    """``reply`` with some fields of its payload record and/or some metrics replaced."""
    record = reply.content[protocol.PAYLOAD]
    fields = {**{k: record[k] for k in record.keys()}, **(fields or {})}
    content = RecordDict(
        {
            protocol.PAYLOAD: ConfigRecord(fields),
            protocol.METRICS: MetricRecord({**reply.content[protocol.METRICS], **metrics}),
        }
    )
    return Message(content, reply_to=msg)


def _enormous(data: bytes, dim: int) -> bytes:
    """The same payload kind and support with every value replaced by +-BIG (Top-k's values)."""
    payload = from_bytes(data, dim)
    values = payload.values.sign() * BIG
    values[values == 0] = BIG
    return to_bytes(type(payload)(payload.kind, payload.dim, payload.indices, values, payload.index_coding))


def train(msg: Message, context: Context) -> Message:
    reply = real.train(msg, context)
    if _pid(context) != HOSTILE:
        return reply
    rnd = _round(msg)
    if rnd % 4 == 1:
        return _with(reply, msg, **{protocol.RESIDUAL_NORM: [1.0, 2.0]})
    if rnd % 4 == 2:
        return _with(reply, msg, **{protocol.RESIDUAL_NORM: math.inf, protocol.TRAIN_LOSS: math.nan})
    if rnd % 4 == 3:
        return _with(reply, msg, {protocol.REPLY_ROUND: rnd - 1})
    dim = sum(int(np.prod(a.shape)) for a in msg.content[protocol.ARRAYS].values())
    enormous = _enormous(reply.content[protocol.PAYLOAD][protocol.PAYLOAD_BYTES], dim)
    return _with(
        reply,
        msg,
        {protocol.PAYLOAD_BYTES: enormous},
        **COLLIDING,
        **{f"junk-{i}": float(i) for i in range(50)},
    )


def hello(msg: Message, context: Context) -> Message:
    if _pid(context) != HOSTILE:
        return real.hello(msg, context)
    info = ConfigRecord({protocol.PARTITION_ID: "9; or any", protocol.NODE_NAME: "x" * 10_000})
    return Message(RecordDict({protocol.NODE_INFO: info}), reply_to=msg)


def probe(msg: Message, context: Context) -> Message:
    reply = real.probe(msg, context)
    if _pid(context) != HOSTILE:
        return reply
    grad = reply.content[protocol.PROBE_GRADIENT][protocol.PROBE_GRADIENT].numpy()
    metrics = reply.content[protocol.METRICS]
    seen = context.state[_PROBES]["n"] if _PROBES in context.state else 0  # probes carry no round number
    context.state[_PROBES] = ConfigRecord({"n": seen + 1})
    attack = seen % 4
    if attack == 0:
        grad = grad[:-1]
    elif attack == 1:
        grad = grad.astype(np.float64)
    elif attack == 2:
        grad = grad.copy()
        grad[0] = np.nan
    else:
        metrics = None
    content = RecordDict({protocol.PROBE_GRADIENT: ArrayRecord({protocol.PROBE_GRADIENT: Array(grad)})})
    if metrics is not None:
        content[protocol.METRICS] = metrics
    return Message(content, reply_to=msg)


app = ClientApp()
app.train()(train)
app.query(protocol.HELLO_ROUTE)(hello)
app.query(protocol.PROBE_ROUTE)(probe)

absent_app = ClientApp()


@absent_app.train()
def absent_train(msg: Message, context: Context) -> Message:
    if _pid(context) == HOSTILE:
        raise RuntimeError("this node takes no part in the clean run")
    return real.train(msg, context)


absent_app.query(protocol.HELLO_ROUTE)(real.hello)


@absent_app.query(protocol.PROBE_ROUTE)
def absent_probe(msg: Message, context: Context) -> Message:
    if _pid(context) == HOSTILE:
        raise RuntimeError("this node takes no part in the clean run")
    return real.probe(msg, context)
