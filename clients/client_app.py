"""The COMP-AMS ClientApp: records in, one worker step of :mod:`fl_compams.algorithm`, records out.

Per round (Li, Karimi & Li, Algorithm 2, worker side): restore the worker state from ``context.state``; apply
the statuses of earlier replies the instruction carries (``worker_begin``: a lost reply is folded back into e);
compute the update u at the received model (H local steps; H = 1 is one minibatch gradient);
``payload = C(u + e)``, ``e' = u + e - decode(payload)`` (``worker_end``); store the state; reply with the
payload's wire bytes, the round, the acknowledgement and metrics.

Data: a partition of the central data set (node config ``partition-id``, ``num-partitions``) or the node's own
``.npz`` file (``data-file``), see :mod:`tasks.local_data`. State: ``context.state``, mirrored to node-local disk
when the node config sets ``state-dir`` so that it survives a SuperNode restart and a resumed run (it is filed
under the run's ``out-dir`` and ``run-name`` from the run config), see :mod:`clients.state_io`.
"""

from __future__ import annotations

import math

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import baselines, model_buffers, node_cache, state_io
from fl_compams import protocol
from fl_compams.algorithm import FLOWER_BASELINES, Instruction, worker_begin, worker_end
from fl_compams.config import ExperimentConfig, build_algorithm
from fl_compams.downlink import ReplicaMismatch, receive
from fl_compams.flat import ParamSpec, flatten, unflatten
from fl_compams.laq import LazyInstruction
from tasks.training import evaluate, full_gradient, local_update

app = ClientApp()


def _setup(msg: Message, context: Context):
    """Config, device, this node's data and the received model, from the message and the node config.

    Everything but the weights comes from the per-process cache (:mod:`clients.node_cache`, keyed by run, node
    and config); the model holds the message's weights, or the seeded initial ones when it has none.
    """
    record = msg.content[protocol.CONFIG]
    # two-way compression: the model is absent unless a dense resync (train loads the replica)
    weights = msg.content[protocol.ARRAYS].to_torch_state_dict() if protocol.ARRAYS in msg.content else None
    node = node_cache.setup(record, context, weights)
    # pid seeds this node's randomness: its partition id if it has one
    pid, x, y = node.data.seed_id, node.data.x, node.data.y
    server_round = int(record.get("server-round", 0))
    return node.cfg, node.device, pid, server_round, x, y, node.model


def _generator(cfg: ExperimentConfig, pid: int, server_round: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(protocol.derive_seed(cfg.seed, pid, server_round, salt))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One worker round: records in, ``worker_begin`` / local training / ``worker_end``, records out."""
    cfg, device, pid, server_round, x, y, model = _setup(msg, context)
    spec = ParamSpec.from_module(model)
    model_buffers.check_supported(cfg, spec)  # buffers travel dense beside the payload, or stay local
    algorithm = None if cfg.algorithm in FLOWER_BASELINES else build_algorithm(cfg, spec.block_sizes)
    qsparse = algorithm.qsparse if algorithm is not None else None
    steps = qsparse.period(pid) if qsparse is not None else cfg.train.local_steps  # Qsparse's H_r
    if algorithm is None:  # Flower's own FedAvg / FedAdam: reply with the trained dense model
        update, loss = _local_update(cfg, device, pid, server_round, x, y, model, steps)
        metrics = {protocol.NUM_EXAMPLES: int(x.shape[0]), protocol.TRAIN_LOSS: float(loss)}
        theta0 = flatten(msg.content[protocol.ARRAYS].to_torch_state_dict(), spec).to(device)
        lr_steps = cfg.train.local_lr * cfg.train.local_steps
        return baselines.dense_model_reply(msg, spec, theta0, update, lr_steps, metrics)
    # node config state-dir: a restarted SuperNode, or the first round of a resumed run
    state_io.restore_from_disk(context, spec.dim, server_round=server_round)
    worker = state_io.load_worker_state(context.state, spec.dim, device)
    instruction = Instruction(server_round, _statuses(msg), _downlink(msg), _lazy(msg))
    if instruction.downlink is not None:  # two-way: bring the replica to the public model and train there
        try:
            worker = _receive(msg, worker, instruction.downlink, spec, device, cfg.train.state_dtype)
        except ReplicaMismatch as err:  # never train on a model the node cannot vouch for: ask for the model
            record = ConfigRecord({protocol.REPLY_ROUND: server_round, protocol.RESYNC: str(err)[:500]})
            return Message(RecordDict({protocol.PAYLOAD: record}), reply_to=msg)
        model.load_state_dict(unflatten(worker.replica.cpu(), spec))
    model_buffers.use_local(context, model, spec, cfg)  # FedBN: this client's own statistics
    update, loss = _local_update(cfg, device, pid, server_round, x, y, model, steps)
    metrics = {protocol.NUM_EXAMPLES: int(x.shape[0]), protocol.TRAIN_LOSS: float(loss)}
    buffer_record, buffer_bytes = model_buffers.after_training(context, model, spec, cfg)
    worker, begun = worker_begin(algorithm, worker, instruction, dim=spec.dim, device=device)
    residual_in = float(worker.residual.norm()) if worker.residual is not None else 0.0
    rng = torch.Generator(device=device).manual_seed(protocol.derive_seed(cfg.seed, pid, server_round, 2))
    if qsparse is not None:  # the work this reply carries (asynchronous: that of the last contact)
        sent, age = qsparse.age(worker.local_change, update.shape, round=server_round, steps=steps)
        metrics |= {protocol.WORK_STEPS: sent, protocol.STALENESS: age}
    reply, worker = worker_end(
        algorithm, worker, update, round=server_round, rng=rng, acked=begun.acked, steps=steps
    )
    state_io.save_worker_state(context.state, worker, cfg.train.state_dtype)
    state_io.save_to_disk(context, spec.dim, server_round=server_round, store=cfg.train.state_store)
    stored = state_io.state_bytes(worker, cfg.train.state_dtype)  # as stored: state-dtype's bytes
    metrics |= {
        protocol.RESIDUAL_NORM: float(worker.residual.norm()) if worker.residual is not None else 0.0,
        protocol.RESIDUAL_NORM_IN: residual_in,
        protocol.FOLDED_NORM: begun.folded_norm,
        protocol.REMOVED_NORM: begun.removed_norm,
        protocol.STATE_ROUNDS: worker.rounds,
        **{protocol.STATE_BYTES[slot]: n for slot, n in stored.items() if n},
    }
    if buffer_bytes:
        metrics[protocol.STATE_BYTES[protocol.BUFFER_SLOT]] = buffer_bytes
    record = ConfigRecord(
        {
            protocol.PAYLOAD_BYTES: reply.payload,
            protocol.REPLY_ROUND: reply.round,
            protocol.ACKED: reply.acked,
        }
    )
    if worker.replica_version is not None and instruction.downlink is not None:
        record[protocol.REPLICA] = str(worker.replica_version)  # the version it trained at
    if reply.skip:  # LAQ: a skip is this flag and an empty payload
        record[protocol.SKIP] = True
    content = RecordDict({protocol.PAYLOAD: record, protocol.METRICS: MetricRecord(metrics)})
    if buffer_record is not None and not reply.skip:  # buffers = "average": dense, beside the payload
        content[protocol.BUFFERS] = buffer_record
    return Message(content, reply_to=msg)


def _local_update(cfg: ExperimentConfig, device, pid: int, server_round: int, x, y, model, steps: int):
    """The one local-training loop, with this node's seeded minibatches and dropout masks.

    Deterministic LAQ (``laq-stochastic = false``) takes the gradient of the whole local data set.
    """
    full_batch = cfg.algorithm == "laq" and not cfg.laq.laq_stochastic
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(protocol.derive_seed(cfg.seed, pid, server_round, 1))  # dropout masks
        return local_update(
            model,
            x,
            y,
            steps=steps,
            lr=cfg.train.local_lr,
            batch_size=int(x.shape[0]) if full_batch else cfg.train.batch_size,
            generator=_generator(cfg, pid, server_round, 0),
        )


def _downlink(msg: Message):
    """The two-way instruction (broadcasts since this node's replica, or a dense resync); None = one-way."""
    if protocol.DOWNLINK not in msg.content:
        return None
    return protocol.downlink_from_fields(dict(msg.content[protocol.DOWNLINK]))


def _receive(msg: Message, worker, instruction, spec: ParamSpec, device, dtype: str = "float32"):
    """The worker state with its replica at the instruction's target (raises ReplicaMismatch)."""
    dense = None
    if instruction.dense and protocol.ARRAYS in msg.content:
        dense = flatten(msg.content[protocol.ARRAYS].to_torch_state_dict(), spec).to(device)
    replica, version = receive(
        worker.replica, worker.replica_version, instruction, dense, dim=spec.dim, block_sizes=spec.block_sizes,
        dtype=dtype,
    )  # fmt: skip
    return worker._replace(replica=replica, replica_version=version)


def _statuses(msg: Message) -> tuple:
    """The statuses of this node's earlier replies sent with the instruction (none on first contact)."""
    if protocol.STATUSES not in msg.content:
        return ()
    return protocol.statuses_from_fields(dict(msg.content[protocol.STATUSES]))


def _lazy(msg: Message):
    """LAQ's part of the instruction (the skip rule's history term, the reset flag), if sent."""
    if protocol.LAZY not in msg.content:
        return None
    record = msg.content[protocol.LAZY]
    threshold, reset = record.get(protocol.LAZY_THRESHOLD), record.get(protocol.LAZY_RESET)
    if (
        not isinstance(threshold, float)
        or not math.isfinite(threshold)
        or threshold < 0
        or not isinstance(reset, bool)
    ):
        raise ValueError(f"instruction {protocol.LAZY!r} record is malformed: {dict(record)}")
    return LazyInstruction(threshold, reset)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received model on this node's training partition."""
    _, _, _, _, x, y, model = _setup(msg, context)
    loss, acc = evaluate(model, x, y)
    metrics = MetricRecord({protocol.NUM_EXAMPLES: int(x.shape[0]), "loss": loss, "accuracy": acc})
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=msg)


@app.query(protocol.HELLO_ROUTE)
def hello(msg: Message, context: Context) -> Message:
    """Tell the server this node's stable name (partition id, or the ``node-name`` node-config key)."""
    info = ConfigRecord(
        {
            protocol.PARTITION_ID: int(context.node_config.get("partition-id", -1)),
            protocol.NODE_NAME: str(context.node_config.get("node-name", "")),
        }
    )
    return Message(RecordDict({protocol.NODE_INFO: info}), reply_to=msg)


@app.query(protocol.END_ROUTE)
def end(msg: Message, context: Context) -> Message:
    """The run has ended: remove this node's state files of the run unless ``keep-state = true`` (state_io)."""
    removed, kept = state_io.end_of_run(context)
    info = ConfigRecord({protocol.REMOVED: removed, protocol.KEPT: kept})
    return Message(RecordDict({protocol.END_INFO: info}), reply_to=msg)


@app.query(protocol.PROBE_ROUTE)
def probe(msg: Message, context: Context) -> Message:
    """The sigma_g^2 probe: full local gradient over the whole partition and the local minibatch variance."""
    cfg, _, _, _, x, y, model = _setup(msg, context)
    grad, variance = full_gradient(model, x, y, batch_size=cfg.train.batch_size)
    content = RecordDict(
        {
            protocol.PROBE_GRADIENT: ArrayRecord({protocol.PROBE_GRADIENT: Array(grad.cpu().numpy())}),
            protocol.METRICS: MetricRecord(
                {protocol.NUM_EXAMPLES: int(x.shape[0]), protocol.LOCAL_VARIANCE: variance}
            ),
        }
    )
    return Message(content, reply_to=msg)
