"""The COMP-AMS ClientApp: local update, error feedback, compression, and the payload bytes as the reply.

Per round (Li, Karimi & Li, Algorithm 2, worker side): restore e from ``context.state``; compute the update u at
the received model (H local steps; H = 1 is one minibatch gradient); ``payload = C(u + e)``;
``e' = u + e - decode(payload)``; store e'; reply with the payload's wire bytes and metrics.

Data: a partition of the central data set (node config ``partition-id``, ``num-partitions``) or the node's own
``.npz`` file (``data-file``), see :mod:`tasks.local_data`. State: ``context.state``, mirrored to node-local disk
when the node config sets ``state-dir`` so that it survives a SuperNode restart, see :mod:`clients.state_io`.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import baselines, state_io
from fl_compams import protocol
from fl_compams.codec import to_bytes
from fl_compams.config import ExperimentConfig, build_client_optimizer, build_compressor, parse_config
from fl_compams.error_feedback import ef_step
from fl_compams.flat import ParamSpec, flatten
from tasks.local_data import node_data
from tasks.task import model_for_task, resolve_device, task_shape
from tasks.training import evaluate, full_gradient, local_update

app = ClientApp()


def _setup(msg: Message, context: Context):
    """Config, device, this node's data and the received model, from the message and the node config."""
    record = msg.content[protocol.CONFIG]
    cfg = parse_config({k: record[k] for k in protocol.CLIENT_KEYS if k in record})
    device = resolve_device(cfg.train.device)
    input_shape, num_classes = task_shape(cfg.data)
    data = node_data(cfg.data, context.node_config, cfg.seed, device, input_shape, num_classes)
    # pid seeds this node's randomness: its partition id if it has one
    pid, x, y = data.seed_id, data.x, data.y
    model = model_for_task(cfg.data, cfg.seed)  # architecture only: the weights come from the message
    model.load_state_dict(msg.content[protocol.ARRAYS].to_torch_state_dict())
    model.to(device)
    server_round = int(record.get("server-round", 0))
    return cfg, device, pid, server_round, x, y, model


def _generator(cfg: ExperimentConfig, pid: int, server_round: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(protocol.derive_seed(cfg.seed, pid, server_round, salt))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One COMP-AMS worker step."""
    cfg, device, pid, server_round, x, y, model = _setup(msg, context)
    spec = ParamSpec.from_module(model)
    if spec.buffer_dim:
        raise ValueError(
            "models with non-trainable buffers (e.g. BatchNorm statistics) are not supported yet"
        )
    state_io.restore_from_disk(context, spec.dim)  # after a SuperNode restart (node config state-dir)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(protocol.derive_seed(cfg.seed, pid, server_round, 1))  # dropout masks
        update, loss = local_update(
            model,
            x,
            y,
            steps=cfg.train.local_steps,
            lr=cfg.train.local_lr,
            batch_size=cfg.train.batch_size,
            generator=_generator(cfg, pid, server_round, 0),
        )
    if cfg.algorithm != "compams":  # Flower's own FedAvg / FedAdam: reply with the trained dense model
        theta0 = flatten(msg.content[protocol.ARRAYS].to_torch_state_dict(), spec).to(device)
        metrics = {protocol.NUM_EXAMPLES: int(x.shape[0]), protocol.TRAIN_LOSS: float(loss)}
        lr_steps = cfg.train.local_lr * cfg.train.local_steps
        return baselines.dense_model_reply(msg, spec, theta0, update, lr_steps, metrics)
    client_opt = build_client_optimizer(cfg.train)
    if client_opt is not None:  # QAdam: send the local Adam step instead of the gradient
        update = baselines.local_adam_step(context.state, update, client_opt)
    compressor = build_compressor(cfg.compression, spec.block_sizes)
    residual = (
        state_io.load_residual(context.state, spec.dim, device) if cfg.compression.error_feedback else None
    )
    rng = torch.Generator(device=device).manual_seed(protocol.derive_seed(cfg.seed, pid, server_round, 2))
    residual_in = float(residual.norm()) if residual is not None else 0.0
    payload, residual = ef_step(compressor, update, residual, rng)
    data = to_bytes(payload)
    if residual is not None:
        state_io.save_residual(context.state, residual)
    rounds = state_io.bump_rounds(context.state)
    state_io.save_to_disk(context, spec.dim)
    metrics = {
        protocol.NUM_EXAMPLES: int(x.shape[0]),
        protocol.TRAIN_LOSS: float(loss),
        protocol.RESIDUAL_NORM: float(residual.norm()) if residual is not None else 0.0,
        protocol.RESIDUAL_NORM_IN: residual_in,
        protocol.STATE_ROUNDS: rounds,
    }
    content = RecordDict(
        {
            protocol.PAYLOAD: ConfigRecord({protocol.PAYLOAD_BYTES: data}),
            protocol.METRICS: MetricRecord(metrics),
        }
    )
    return Message(content, reply_to=msg)


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
