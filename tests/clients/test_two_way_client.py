"""The ClientApp under two-way compression: it trains at its replica, echoes the version, asks for a resync.

The ClientApp's own ``train`` handler with instructions built as the strategy builds them (``protocol`` records
from :func:`fl_compams.algorithm.instruction_for`), on the default digits model.
"""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import state_io
from clients.client_app import train
from fl_compams import ParamSpec, flatten, parse_config, protocol, unflatten
from fl_compams.algorithm import instruction_for
from fl_compams.config import build_algorithm
from fl_compams.downlink import broadcast, observe
from fl_compams.server import init_server_state
from strategies import validate
from tasks.task import model_for_task

SETTINGS = {"seed": 3, "batch-size": 8, "downlink-compressor": "blocksign"}
NODE = {"partition-id": 1, "num-partitions": 4}


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1


def setup():
    cfg = parse_config(SETTINGS)
    model = model_for_task(cfg.data, cfg.seed)
    spec = ParamSpec.from_module(model)
    algorithm = build_algorithm(cfg, spec.block_sizes)
    state = init_server_state(flatten(model.state_dict(), spec), algorithm.server_opt, two_way=True)
    return cfg, spec, algorithm, state


def message(cfg, spec, state, rnd, label="partition-1"):
    """The instruction the strategy sends: settings, the downlink record, the public model only on a resync."""
    flat = cfg.to_flat()
    settings = {k: flat[k] for k in protocol.CLIENT_KEYS if k not in protocol.OPTIONAL_CLIENT_KEYS}
    instruction = instruction_for(state, label, rnd)
    content = RecordDict({protocol.CONFIG: ConfigRecord({**settings, "server-round": rnd})})
    content[protocol.DOWNLINK] = ConfigRecord(protocol.downlink_to_fields(instruction.downlink))
    if instruction.downlink.dense:
        content[protocol.ARRAYS] = ArrayRecord(unflatten(state.downlink.public, spec))
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7), instruction


def context():
    return Context(run_id=1, node_id=7, node_config=dict(NODE), state=RecordDict(), run_config={})


def test_client_trains_at_its_replica_and_follows_the_broadcasts():
    cfg, spec, algorithm, state = setup()
    ctx = context()
    msg, instruction = message(cfg, spec, state, 1)
    assert instruction.downlink.dense  # first contact: the dense model
    first = train(msg, ctx).content[protocol.PAYLOAD]
    assert first[protocol.REPLICA] == str(state.downlink.version) and protocol.PAYLOAD_BYTES in first
    echo = validate.replica_echo(RecordDict({protocol.PAYLOAD: first}))
    # two rounds move theta; the node (absent) is told the two broadcasts since its version
    down = observe(state.downlink, [("partition-1", echo)])
    theta = state.theta
    for rnd in (1, 2):
        new = theta + 0.01 * torch.randn(spec.dim, generator=torch.Generator().manual_seed(rnd))
        down = broadcast(algorithm.downlink, down, theta, new, rnd)
        theta = new
    state = state._replace(theta=theta, downlink=down)
    msg, instruction = message(cfg, spec, state, 3)
    assert not instruction.downlink.dense and len(instruction.downlink.steps) == 2
    assert protocol.ARRAYS not in msg.content
    reply = train(msg, ctx).content[protocol.PAYLOAD]
    assert reply[protocol.REPLICA] == str(down.version)
    held = state_io.load_worker_state(ctx.state, spec.dim, torch.device("cpu"))
    assert torch.equal(held.replica, down.public) and held.replica_version == down.version


def test_client_without_a_matching_replica_asks_for_a_resync_and_trains_nothing():
    cfg, spec, algorithm, state = setup()
    new = state.theta + 0.01
    down = observe(state.downlink, [("partition-1", state.downlink.version)])  # the server thinks it has v0
    state = state._replace(theta=new, downlink=broadcast(algorithm.downlink, down, state.theta, new, 1))
    msg, instruction = message(cfg, spec, state, 2)
    assert not instruction.downlink.dense
    ctx = context()  # a node that lost its state
    content = train(msg, ctx).content
    assert protocol.PAYLOAD_BYTES not in content[protocol.PAYLOAD]
    assert "no replica" in validate.resync_request(content)
    assert state_io.COUNTERS_RECORD not in ctx.state  # nothing trained, nothing stored


def test_dense_model_that_is_not_the_target_is_refused():
    cfg, spec, _, state = setup()
    msg, _ = message(cfg, spec, state, 1)
    tampered = state.downlink.public.clone()
    tampered[0] += 1.0
    msg.content[protocol.ARRAYS] = ArrayRecord(unflatten(tampered, spec))
    assert "digest" in validate.resync_request(train(msg, context()).content)
