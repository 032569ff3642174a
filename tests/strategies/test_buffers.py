"""Model buffers (BatchNorm statistics) through the ClientApp's train() and CompAMS, on digits with a BN CNN.

Rounds are driven in-process: the instruction the strategy would send (the settings and
``strategy.current_arrays()``), the real ``train`` handler per client, then ``strategy.aggregate_train``.
"""

import copy
import math

import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import model_buffers
from clients.client_app import train
from fl_compams import ParamSpec, buffers, flatten, parse_config, protocol
from fl_compams.checkpoint import VERSION, load_checkpoint, save_checkpoint
from fl_compams.config import build_algorithm
from fl_compams.errors import ConfigError, PayloadError
from fl_compams.server import init_server_state
from strategies.comp_ams import CompAMS
from strategies.server_app import _check_extra, run_server
from strategies.wire import wire_bytes
from tasks.task import model_for_task

NODES = 3
BASE = {"model": "digits-bn-cnn", "seed": 1, "batch-size": 16, "weighting": "num-examples"}
SPEC = ParamSpec.from_module(model_for_task(parse_config(BASE).data, 0))
# the packed float32 vector: 1.running_mean [0, 32), 1.running_var [32, 64), 4.running_mean, 4.running_var


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1


def make(**overrides):
    cfg = parse_config({**BASE, **overrides})
    model = model_for_task(cfg.data, cfg.seed)
    spec = ParamSpec.from_module(model)
    algorithm = build_algorithm(cfg, spec.block_sizes)
    sd = model.state_dict()
    state = init_server_state(
        flatten(sd, spec), algorithm.server_opt, buffers=flatten(sd, spec, trainable=False)
    )
    contexts = [
        Context(
            run_id=1,
            node_id=10 + i,
            node_config={"partition-id": i, "num-partitions": NODES},
            state=RecordDict(),
            run_config={},
        )
        for i in range(NODES)
    ]
    return CompAMS(cfg, spec, algorithm, state), contexts


def instructions(strategy, rnd):
    settings = {**strategy.client_config(), "server-round": rnd}
    content = RecordDict(
        {protocol.ARRAYS: strategy.current_arrays(), protocol.CONFIG: ConfigRecord(settings)}
    )
    return [
        Message(content=content, message_type=MessageType.TRAIN, dst_node_id=10 + i) for i in range(NODES)
    ]


def client_replies(strategy, contexts, rnd):
    return [train(m, ctx) for m, ctx in zip(instructions(strategy, rnd), contexts, strict=True)]


def reply_buffers(reply):
    packed = {k: torch.from_numpy(v.numpy().copy()) for k, v in reply.content[protocol.BUFFERS].items()}
    return buffers.unpack(SPEC, packed)


def server_buffers(strategy):
    sd = strategy.current_arrays().to_torch_state_dict()
    return {name: sd[name] for name in strategy.spec.buffer_names}


def test_server_averages_the_applied_replies_buffers_and_broadcasts_them():
    strategy, contexts = make(compressor="topk", **{"topk-ratio": 0.05})
    spec = strategy.spec
    assert strategy.state.opt_state.m.shape == (spec.dim,)  # AMSGrad's moments: trainable parameters only
    for rnd in (1, 2):
        replies = client_replies(strategy, contexts, rnd)
        sent = [reply_buffers(r) for r in replies]
        counts = [r.content[protocol.METRICS][protocol.NUM_EXAMPLES] for r in replies]
        _, metrics = strategy.aggregate_train(rnd, replies)
        assert metrics["clients-ok"] == NODES
        weights = [c / sum(counts) for c in counts]
        got = server_buffers(strategy)
        for name in spec.buffer_names:
            expected = sum(w * b[name].double() for w, b in zip(weights, sent, strict=True))
            if name.endswith("num_batches_tracked"):
                assert got[name].dtype == torch.int64 and int(got[name]) == rnd  # one batch per round each
            else:
                assert torch.allclose(got[name].double(), expected, rtol=1e-6, atol=1e-7)
                # a convex combination: inside the clients' range, coordinate by coordinate
                stacked = torch.stack([b[name] for b in sent])
                assert (got[name] >= stacked.min(0).values - 1e-6).all()
                assert (got[name] <= stacked.max(0).values + 1e-6).all()
        # the clients' statistics differ (their data differ), so the average is not any one of them
        assert not torch.equal(sent[0][spec.buffer_names[0]], sent[1][spec.buffer_names[0]])
        traffic = strategy.traffic[rnd]
        per_set = buffers.theory_bits(spec)
        assert per_set == 32 * (spec.buffer_dim - 2) + 64 * 2
        assert traffic.uplink_theory_bits == NODES * (strategy.compressor.theory_bits(spec.dim) + per_set)
        for i, r in enumerate(replies):  # the measured uplink holds the dense buffers
            without = RecordDict({k: v for k, v in r.content.items() if k != protocol.BUFFERS})
            extra = traffic.uplink_bytes[f"node-{10 + i}"] - wire_bytes(without)
            assert extra >= 4 * (spec.buffer_dim - 2) + 8 * 2
    # the next broadcast carries the average: a client trains from it (its counter continues from 2)
    replies = client_replies(strategy, contexts, 3)
    assert all(int(reply_buffers(r)["1.num_batches_tracked"]) == 3 for r in replies)


def corrupt(reply, name, edit):
    """Replace (or with ``edit = None`` remove) one vector of the reply's packed buffers."""
    record = reply.content[protocol.BUFFERS]
    if edit is None:
        del record[name]
    else:
        record[name] = Array(edit(record[name].numpy().copy()) if callable(edit) else edit)
    return reply


def _set(lo, hi, value):
    def edit(a):
        a[lo:hi] = value
        return a

    return edit


BAD = {
    "nan mean": lambda r: corrupt(r, "float32", _set(3, 4, math.nan)),
    "infinite variance": lambda r: corrupt(r, "float32", _set(40, 41, math.inf)),
    "negative variance": lambda r: corrupt(r, "float32", _set(32, 64, -1.0)),
    "short vector": lambda r: corrupt(r, "float32", torch.ones(191).numpy()),
    "wrong dtype": lambda r: corrupt(r, "float32", torch.ones(192, dtype=torch.float64).numpy()),
    "negative counter": lambda r: corrupt(r, "int64", _set(0, 1, -3)),
    "missing vector": lambda r: corrupt(r, "int64", None),
    "extra vector": lambda r: corrupt(r, "float64", torch.zeros(4, dtype=torch.float64).numpy()),
    "no buffers record": lambda r: Message(
        RecordDict({k: v for k, v in r.content.items() if k != protocol.BUFFERS}), reply_to=_to(r)
    ),
}


def _to(reply):
    return Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=reply.metadata.src_node_id)


@pytest.fixture(scope="module")
def round_one():
    """Round 1's replies with buffers = "average" and the identity compressor (made once: training is slow)."""
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    strategy, contexts = make(compressor="identity")
    return client_replies(strategy, contexts, 1)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_corrupt_buffer_set_drops_that_reply_only(kind, round_one):
    strategy, _ = make(compressor="identity")
    clean, _ = make(compressor="identity")
    replies = copy.deepcopy(round_one)
    good = [reply_buffers(r) for r in replies[:2]]
    counts = [r.content[protocol.METRICS][protocol.NUM_EXAMPLES] for r in replies[:2]]
    bad = BAD[kind](replies[2])
    _, metrics = strategy.aggregate_train(1, [*replies[:2], bad])
    assert metrics["clients-ok"] == 2 and metrics["clients-failed"] == 1
    (reason,) = strategy.traffic[1].failures.values()
    assert "buffer" in reason
    # the model moved as if the bad reply had never come, and the buffers average the two good ones only
    clean.aggregate_train(1, replies[:2])
    assert torch.equal(strategy.state.theta, clean.state.theta)
    weights = [c / sum(counts) for c in counts]
    mean = server_buffers(strategy)["1.running_mean"]
    expected = sum(w * b["1.running_mean"].double() for w, b in zip(weights, good, strict=True))
    assert torch.allclose(mean.double(), expected, rtol=1e-6, atol=1e-7)


def test_no_round_applied_keeps_the_buffers(round_one):
    strategy, _ = make(compressor="identity", **{"min-valid-replies": 3})
    before = strategy.state.buffers.clone()
    replies = copy.deepcopy(round_one)
    strategy.aggregate_train(1, replies[:2])  # 2 valid < 3: nothing applied
    assert torch.equal(strategy.state.buffers, before)


def test_local_buffers_stay_on_the_client_and_count_in_its_state():
    strategy, contexts = make(compressor="topk", buffers="local")
    initial = strategy.state.buffers.clone()
    assert strategy.client_config()["buffers"] == "local"
    for rnd in (1, 2):
        replies = client_replies(strategy, contexts, rnd)
        assert all(protocol.BUFFERS not in r.content for r in replies)
        _, metrics = strategy.aggregate_train(rnd, replies)
        assert metrics["clients-ok"] == NODES
        assert torch.equal(strategy.state.buffers, initial)  # the server never learns them
        for r in replies:
            assert (
                r.content[protocol.METRICS]["state-bytes-buffers"] == 4 * (strategy.spec.buffer_dim - 2) + 16
            )
        assert (
            strategy.traffic[rnd].state_bytes()["buffers"]["max"] == 4 * (strategy.spec.buffer_dim - 2) + 16
        )
    for (
        ctx
    ) in contexts:  # each trained from its own statistics: two batches counted, not one from the broadcast
        own = ctx.state[model_buffers.RECORD]
        assert int(own["1.num_batches_tracked"].numpy()) == 2
    means = [ctx.state[model_buffers.RECORD]["1.running_mean"].numpy() for ctx in contexts]
    assert not (means[0] == means[1]).all()


def test_local_mode_drops_a_reply_that_sends_buffers(round_one):
    replies = copy.deepcopy(round_one)  # made with buffers = "average"
    local, _ = make(compressor="identity", buffers="local")
    _, metrics = local.aggregate_train(1, replies)
    assert metrics["clients-ok"] == 0 and metrics["clients-failed"] == NODES
    assert all("none is expected" in reason for reason in local.traffic[1].failures.values())


def test_default_instruction_does_not_carry_the_buffers_key():
    strategy, _ = make()
    assert "buffers" not in strategy.client_config()


def test_checkpoint_holds_the_buffers_and_resume_checks_their_length(tmp_path, round_one):
    strategy, _ = make(compressor="identity")
    strategy.aggregate_train(1, copy.deepcopy(round_one))
    assert VERSION == 5
    back, _ = load_checkpoint(save_checkpoint(tmp_path, strategy.state))
    assert torch.equal(back.buffers, strategy.state.buffers)
    extra = {"config": {}, "totals": {"up": 0, "down": 0, "probe": 0}}
    _check_extra(back, extra, strategy.spec.buffer_dim)
    with pytest.raises(ValueError, match="buffer values"):
        _check_extra(back, extra, strategy.spec.buffer_dim + 1)
    with pytest.raises(ValueError, match="buffer values"):
        _check_extra(back._replace(buffers=None), extra, strategy.spec.buffer_dim)


def test_buffer_checks_name_the_problem():
    strategy, _ = make()
    spec = strategy.spec
    good = {
        n: t
        for n, t in model_for_task(strategy.config.data, 0).state_dict().items()
        if n in spec.buffer_names
    }
    buffers.check(spec, good)
    packed = buffers.pack(spec, good)
    assert {k: tuple(v.shape) for k, v in packed.items()} == {"float32": (192,), "int64": (2,)}
    back = buffers.unpack(spec, packed)
    assert list(back) == list(spec.buffer_names) and all(torch.equal(back[n], good[n]) for n in good)
    with pytest.raises(PayloadError, match=r"running_var.*negative"):
        buffers.check(spec, {**good, "4.running_var": -good["4.running_var"] - 1})


class NoGrid:
    """A grid that fails on any use: the refusal must come before the first message."""

    def __getattr__(self, name):
        raise AssertionError(f"the grid was used ({name}) before the refusal")


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"algorithm": "flower-fedavg"}, "Flower's own strategy"),
        ({"algorithm": "flower-fedadam"}, "Flower's own strategy"),
        ({"downlink-compressor": "blocksign"}, "two-way compression"),
    ],
)
def test_runs_that_cannot_carry_buffers_are_refused_before_round_1(tmp_path, settings, match):
    config = {"model": "digits-bn-cnn", "out-dir": str(tmp_path), "run-name": "x", **settings}
    with pytest.raises(ConfigError, match=match):
        run_server(NoGrid(), config)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
