"""CompAMS aggregation on constructed replies: exact arithmetic, and bad replies dropped without effect."""

import math

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_compams import ParamSpec, build_compressor, parse_config, protocol, to_bytes
from fl_compams.algorithm import Outcome
from fl_compams.config import build_algorithm
from fl_compams.server import init_server_state
from strategies.comp_ams import CompAMS
from strategies.wire import wire_bytes

SPEC = ParamSpec(("w", "b"), ((4, 5), (5,)), ("float32", "float32"), (True, True))  # d = 25, blocks 20 + 5


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower refuses to build messages outside a run until these are set (flower-guide.md section 1).
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1


def make_strategy(**overrides):
    cfg = parse_config({"server-lr": 0.1, **overrides})
    algorithm = build_algorithm(cfg, SPEC.block_sizes)
    theta0 = torch.linspace(-1, 1, SPEC.dim)
    return CompAMS(cfg, SPEC, algorithm, init_server_state(theta0, algorithm.server_opt)), theta0


def instruction(node):
    return Message(
        content=RecordDict({"x": ConfigRecord({"a": 1})}), message_type=MessageType.TRAIN, dst_node_id=node
    )


def reply(node, data, n=10, loss=1.0, **extra_metrics):
    content = RecordDict(
        {
            protocol.PAYLOAD: ConfigRecord({protocol.PAYLOAD_BYTES: data}),
            protocol.METRICS: MetricRecord(
                {protocol.NUM_EXAMPLES: n, protocol.TRAIN_LOSS: loss, **extra_metrics}
            ),
        }
    )
    return Message(content, reply_to=instruction(node))


def updates(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SPEC.dim, generator=g) for _ in range(n)]


def step_one(theta0, g_bar, lr=0.1, b1=0.9, b2=0.999, eps=1e-8):
    return theta0 - lr * (1 - b1) * g_bar / torch.sqrt((1 - b2) * g_bar**2 + eps)


@pytest.mark.parametrize("compressor", ["topk", "blocksign"])
def test_aggregation_equals_hand_computation(compressor):
    strategy, theta0 = make_strategy(compressor=compressor, **{"topk-k": 3})
    xs = updates()
    payloads = [strategy.compressor.encode(x) for x in xs]
    replies = [reply(100 + i, to_bytes(p)) for i, p in enumerate(payloads)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # hand computation of C(x): Top-3 by magnitude, or per-block mean |x| with signs
    hand = []
    for x in xs:
        if compressor == "topk":
            c = torch.zeros_like(x)
            idx = torch.argsort(x.abs(), descending=True)[:3]
            c[idx] = x[idx]
        else:
            c = torch.cat([torch.where(b >= 0, 1.0, -1.0) * b.abs().mean() for b in torch.split(x, (20, 5))])
        hand.append(c)
    g_bar = sum(hand) / 3
    expected = step_one(theta0, g_bar)
    assert torch.allclose(strategy.state.theta, expected, atol=1e-6)
    sd = arrays.to_torch_state_dict()
    assert torch.allclose(torch.cat([sd["w"].reshape(-1), sd["b"]]), expected, atol=1e-6)
    assert metrics["clients-ok"] == 3 and metrics["clients-failed"] == 0
    traffic = strategy.traffic[1]
    assert traffic.uplink_bytes == {f"node-{100 + i}": wire_bytes(r.content) for i, r in enumerate(replies)}
    assert traffic.uplink_theory_bits == 3 * strategy.compressor.theory_bits(SPEC.dim)


def test_num_examples_weighting():
    strategy, theta0 = make_strategy(compressor="identity", weighting="num-examples")
    xs = updates(1, 2)
    replies = [
        reply(1, to_bytes(strategy.compressor.encode(xs[0])), n=1),
        reply(2, to_bytes(strategy.compressor.encode(xs[1])), n=3),
    ]
    strategy.aggregate_train(1, replies)
    assert torch.allclose(strategy.state.theta, step_one(theta0, 0.25 * xs[0] + 0.75 * xs[1]), atol=1e-6)


def bad_replies(strategy):
    good = to_bytes(strategy.compressor.encode(updates(9, 1)[0]))
    other_dim = to_bytes(build_compressor(strategy.config.compression).encode(torch.randn(26)))
    blocksign = to_bytes(
        build_compressor(parse_config({"compressor": "blocksign"}).compression).encode(torch.randn(25))
    )
    nan_values = bytearray(good)
    nan_values[-4:] = bytes.fromhex("0000c07f")  # float32 NaN in the last value
    err = Message(Error(code=0, reason="ValueError: boom"), reply_to=instruction(205))
    no_payload = Message(
        RecordDict({protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 1})}), reply_to=instruction(206)
    )
    return {
        200: reply(200, good[:-3]),
        201: reply(201, other_dim),
        202: reply(202, blocksign),
        203: reply(203, bytes(nan_values)),
        204: reply(204, good, loss=math.inf),
        205: err,
        206: no_payload,
        207: reply(207, good + b"\x00"),
    }, {
        200: "truncated payload",
        201: "dimension mismatch: expected 25, got 26",
        202: "wrong payload kind: expected TOPK, got BLOCKSIGN",
        203: "non-finite values",
        204: "'train-loss' must be a finite number",
        205: "client error: ValueError: boom",
        206: "reply has no 'payload' ConfigRecord",
        207: "trailing bytes",
    }


def test_bad_replies_are_dropped_reported_and_never_touch_the_model():
    strategy, _ = make_strategy(**{"topk-k": 3})
    xs = updates(2, 2)
    good = [reply(i, to_bytes(strategy.compressor.encode(x))) for i, x in enumerate(xs)]
    bad, reasons = bad_replies(strategy)
    strategy.aggregate_train(1, [good[0], *bad.values(), good[1]])

    clean, _ = make_strategy(**{"topk-k": 3})
    clean.aggregate_train(1, good)
    assert torch.equal(strategy.state.theta, clean.state.theta)
    assert all(
        torch.equal(a, b)
        for a, b in zip(strategy.state.opt_state[1:], clean.state.opt_state[1:], strict=True)
    )
    traffic = strategy.traffic[1]
    assert traffic.ok == ["node-0", "node-1"]
    assert set(traffic.failures) == {f"node-{n}" for n in reasons}
    for node, reason in reasons.items():
        label = f"node-{node}"
        assert reason in traffic.failures[label], (node, traffic.failures[label])
        assert traffic.per_client[label]["failure"] == traffic.failures[label]


def test_round_with_only_bad_replies_keeps_model_and_state():
    strategy, theta0 = make_strategy(**{"topk-k": 3})
    bad, _ = bad_replies(strategy)
    arrays, metrics = strategy.aggregate_train(1, list(bad.values()))
    assert arrays is None and metrics["clients-failed"] == len(bad) and metrics["clients-ok"] == 0
    assert torch.equal(strategy.state.theta, theta0) and strategy.state.opt_state.step == 0


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        return []  # nodes that do not answer the hello are named by their node id


def test_configure_train_sends_client_settings_and_measures_downlink():
    strategy, _ = make_strategy(compressor="blocksign", **{"fraction-train": 0.5})
    messages = list(
        strategy.configure_train(3, strategy.current_arrays(), ConfigRecord(), FakeGrid([1, 2, 3, 4]))
    )
    assert len(messages) == 2
    config = messages[0].content[protocol.CONFIG]
    assert config["compressor"] == "blocksign" and config["server-round"] == 3
    assert set(protocol.CLIENT_KEYS) - set(protocol.OPTIONAL_CLIENT_KEYS) == set(config.keys()) - {
        "server-round"
    }
    size = wire_bytes(messages[0].content)
    assert strategy.traffic[3].downlink_bytes == {f"node-{m.metadata.dst_node_id}": size for m in messages}
    assert size > 4 * SPEC.dim


def test_reply_order_does_not_change_the_result():
    strategy_a, _ = make_strategy(**{"topk-k": 5})
    strategy_b, _ = make_strategy(**{"topk-k": 5})
    replies = [
        reply(n, to_bytes(strategy_a.compressor.encode(x)))
        for n, x in zip((5, 3, 9, 1), updates(4, 4), strict=True)
    ]
    strategy_a.aggregate_train(1, replies)
    strategy_b.aggregate_train(1, list(reversed(replies)))
    assert torch.equal(strategy_a.state.theta, strategy_b.state.theta)  # bitwise: same summation order


def test_labels_name_clients_in_results():
    strategy, _ = make_strategy(compressor="identity")
    strategy.names.labels.update({11: "partition-1", 10: "partition-0"})
    strategy.aggregate_train(
        1,
        [
            reply(n, to_bytes(strategy.compressor.encode(x)))
            for n, x in zip((11, 10), updates(5, 2), strict=True)
        ],
    )
    assert list(strategy.traffic[1].per_client) == ["partition-0", "partition-1"]


@pytest.mark.parametrize("action", ["clip", "reject"])
def test_max_update_norm_clips_or_rejects(action):
    strategy, theta0 = make_strategy(
        compressor="identity",
        **{"update-norm-bound": "fixed", "max-update-norm": 1.0, "update-norm-action": action},
    )
    small = torch.full((SPEC.dim,), 0.1)  # norm 0.5
    big = torch.full((SPEC.dim,), 2.0)  # norm 10
    strategy.aggregate_train(
        1,
        [
            reply(1, to_bytes(strategy.compressor.encode(small))),
            reply(2, to_bytes(strategy.compressor.encode(big))),
        ],
    )
    traffic = strategy.traffic[1]
    if action == "clip":
        assert traffic.clipped == ["node-2"] and not traffic.failures
        expected = (small + big / 10.0) / 2
    else:
        assert traffic.ok == ["node-1"]
        assert "exceeds the reply bound 1 (update-norm-bound = 'fixed')" in traffic.failures["node-2"]
        expected = small
    assert torch.allclose(strategy.state.theta, step_one(theta0, expected), atol=1e-6)


def test_min_valid_replies_leaves_model_and_optimizer_unchanged():
    strategy, theta0 = make_strategy(compressor="identity", **{"min-valid-replies": 3})
    replies = [
        reply(n, to_bytes(strategy.compressor.encode(x))) for n, x in zip((1, 2), updates(6, 2), strict=True)
    ]
    arrays, metrics = strategy.aggregate_train(4, replies)
    assert arrays is None and metrics["update-applied"] == 0 and metrics["clients-ok"] == 2
    assert torch.equal(strategy.state.theta, theta0) and strategy.state.opt_state.step == 0
    assert strategy.state.round == 4


def test_oversize_payload_is_rejected_before_parsing():
    strategy, _ = make_strategy()
    strategy.aggregate_train(1, [reply(1, b"CAMS" + b"\x00" * (10 * SPEC.dim + 200))])
    assert "oversize payload" in strategy.traffic[1].failures["node-1"]


# ------------------------------------------------------------------------ hostile replies (issue 10)
@pytest.mark.parametrize(
    "name,value,reason",
    [
        (
            protocol.RESIDUAL_NORM,
            [1.0, 2.0],
            "metric 'residual-norm' must be a finite number >= 0, got [1.0, 2.0]",
        ),
        (protocol.RESIDUAL_NORM, math.inf, "metric 'residual-norm' must be a finite number >= 0, got inf"),
        (protocol.RESIDUAL_NORM, -1.0, "metric 'residual-norm' must be a finite number >= 0, got -1.0"),
        (protocol.RESIDUAL_NORM_IN, math.nan, "metric 'residual-norm-in' must be a finite number >= 0"),
        (protocol.FOLDED_NORM, [0.0], "metric 'ef-folded-norm' must be a finite number >= 0"),
        (protocol.REMOVED_NORM, -math.inf, "metric 'ef-removed-norm' must be a finite number >= 0"),
        (protocol.STATE_ROUNDS, 1.5, "metric 'state-rounds' must be an integer >= 0, got 1.5"),
        (protocol.STATE_ROUNDS, -2, "metric 'state-rounds' must be an integer >= 0, got -2"),
        (protocol.NUM_EXAMPLES, 2.0, "metric 'num-examples' must be an integer >= 0, got 2.0"),
        (protocol.NUM_EXAMPLES, [3], "metric 'num-examples' must be an integer >= 0, got [3]"),
        (protocol.TRAIN_LOSS, [0.5], "metric 'train-loss' must be a finite number, got [0.5]"),
    ],
)
def test_a_bad_metric_drops_that_reply_only(name, value, reason):
    strategy, _ = make_strategy(**{"topk-k": 3})
    xs = updates(2, 3)
    good = [reply(i, to_bytes(strategy.compressor.encode(x))) for i, x in enumerate(xs[:2])]
    bad = reply(9, to_bytes(strategy.compressor.encode(xs[2])), **{name: value})
    strategy.aggregate_train(1, [good[0], bad, good[1]])  # never raises

    clean, _ = make_strategy(**{"topk-k": 3})
    clean.aggregate_train(1, good)
    assert torch.equal(strategy.state.theta, clean.state.theta)
    traffic = strategy.traffic[1]
    assert traffic.ok == ["node-0", "node-1"] and reason in traffic.failures["node-9"]
    assert strategy.state.unacked["node-9"][-1].outcome == Outcome.LOST  # its client folds it back


def test_client_metrics_never_overwrite_server_fields_and_unknown_ones_are_left_out():
    from strategies.traffic import traffic_row

    strategy, _ = make_strategy(**{"topk-k": 3})
    data = to_bytes(strategy.compressor.encode(updates(3, 1)[0]))
    colliding = {"uplink-bytes": 1, "payload-bytes": 2, "downlink-bytes": 3, "uplink_bytes": 4, "failure": 5}
    msg = reply(1, data, **colliding, **{"made-up": 7.0, protocol.RESIDUAL_NORM: 0.5})
    strategy.configure_train(1, strategy.current_arrays(), ConfigRecord(), FakeGrid([1]))
    strategy.aggregate_train(1, [msg])
    row = traffic_row(strategy.traffic[1], {"up": 0, "down": 0})["clients"]["node-1"]
    assert row["uplink_bytes"] == wire_bytes(msg.content) > len(data) == row["payload_bytes"]
    assert row["downlink_bytes"] == strategy.traffic[1].downlink_bytes["node-1"] > 4 * SPEC.dim
    assert row == {
        "uplink_bytes": row["uplink_bytes"],
        "payload_bytes": len(data),
        "downlink_bytes": row["downlink_bytes"],
        "num_examples": 10,
        "train_loss": 1.0,
        "residual_norm": 0.5,
    }


def test_claimed_num_examples_are_capped_at_max_num_examples():
    strategy, theta0 = make_strategy(
        compressor="identity", weighting="num-examples", **{"max-num-examples": 30}
    )
    xs = updates(1, 2)
    enc = lambda x: to_bytes(strategy.compressor.encode(x))  # noqa: E731
    strategy.aggregate_train(1, [reply(1, enc(xs[0]), n=10), reply(2, enc(xs[1]), n=10**12)])
    assert torch.allclose(strategy.state.theta, step_one(theta0, 0.25 * xs[0] + 0.75 * xs[1]), atol=1e-6)
    rows = strategy.traffic[1].per_client
    assert rows["node-2"]["num_examples"] == 30 and rows["node-2"]["num_examples_claimed"] == 10**12
    assert rows["node-1"]["num_examples"] == 10 and "num_examples_claimed" not in rows["node-1"]


def test_blocksign_payload_must_have_the_models_block_layout():
    from fl_compams.compressors.blocksign import BlockSign

    strategy, _ = make_strategy(compressor="blocksign")
    x = updates(3, 1)[0]
    layouts = {1: SPEC.block_sizes, 2: (1,) * SPEC.dim, 3: (5, 20), 4: None}
    replies = [reply(n, to_bytes(BlockSign(b).encode(x))) for n, b in layouts.items()]
    strategy.aggregate_train(1, replies)
    traffic = strategy.traffic[1]
    assert traffic.ok == ["node-1"]
    assert "block layout: expected the model's 2 blocks, got 25 blocks" in traffic.failures["node-2"]
    assert "block layout: block 0 must have the model's size 20, got 5" in traffic.failures["node-3"]
    assert "block layout: expected the model's 2 blocks, got 1 blocks" in traffic.failures["node-4"]


# ------------------------------------------------------------------------------------------ two-way compression
def two_way_reply(node, data, version):
    msg = reply(node, data)
    msg.content[protocol.PAYLOAD][protocol.REPLICA] = version
    return msg


def test_two_way_sends_broadcasts_to_known_replicas_and_the_dense_model_otherwise():
    strategy, theta0 = make_strategy(**{"downlink-compressor": "blocksign", "topk-k": 3})
    strategy.state = init_server_state(theta0, strategy.algorithm.server_opt, two_way=True)
    grid = FakeGrid([1, 2, 3, 4])
    first = list(strategy.configure_train(1, strategy.current_arrays(), ConfigRecord(), grid))
    assert all(protocol.ARRAYS in m.content for m in first) and strategy.traffic[1].downlink_resyncs == 4
    strategy._sent.pop(1)  # the fake grid never sent them (no message ids to map replies back)
    v0 = str(strategy.state.downlink.version)
    data = [to_bytes(strategy.compressor.encode(x)) for x in updates(2, 3)]
    resync = Message(
        RecordDict(
            {protocol.PAYLOAD: ConfigRecord({protocol.REPLY_ROUND: 1, protocol.RESYNC: "no replica"})}
        ),
        reply_to=instruction(4),
    )
    bad_echo = two_way_reply(3, data[2], "not-a-version")
    strategy.aggregate_train(
        1, [two_way_reply(1, data[0], v0), two_way_reply(2, data[1], v0), bad_echo, resync]
    )
    traffic = strategy.traffic[1]
    assert "replica mismatch" in traffic.failures["node-4"] and "'replica'" in traffic.failures["node-3"]
    down = strategy.state.downlink
    assert down.version.round == 1 and set(down.replicas) == {"node-1", "node-2"}
    sd = strategy.current_arrays().to_torch_state_dict()  # what clients hold (and what is evaluated)
    assert torch.equal(torch.cat([sd["w"].reshape(-1), sd["b"]]), down.public)
    assert not torch.equal(down.public, strategy.state.theta)
    second = list(strategy.configure_train(2, strategy.current_arrays(), ConfigRecord(), grid))
    dense = {m.metadata.dst_node_id: protocol.ARRAYS in m.content for m in second}
    assert dense == {1: False, 2: False, 3: True, 4: True} and strategy.traffic[2].downlink_resyncs == 2
    node1 = next(m for m in second if m.metadata.dst_node_id == 1)
    chain = protocol.downlink_from_fields(dict(node1.content[protocol.DOWNLINK]))
    assert [str(s.source) for s in chain.steps] == [v0] and chain.target == down.version
    assert strategy.traffic[2].downlink_theory_bits == 2 * 32 * SPEC.dim + 2 * (SPEC.dim + 2 * 32)
    sizes = strategy.traffic[2].downlink_bytes
    assert sizes["node-1"] < sizes["node-3"] - 4 * SPEC.dim


def skip_reply(node):
    content = RecordDict(
        {
            protocol.PAYLOAD: ConfigRecord({protocol.PAYLOAD_BYTES: b"", protocol.SKIP: True}),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 1.0}),
        }
    )
    return Message(content, reply_to=instruction(node))


def test_a_skip_to_an_algorithm_that_cannot_skip_is_dropped_and_never_moves_the_model():
    strategy, _ = make_strategy(**{"topk-k": 3})
    good = reply(0, to_bytes(strategy.compressor.encode(updates(4, 1)[0])))
    strategy.aggregate_train(1, [good, skip_reply(1)])
    clean, _ = make_strategy(**{"topk-k": 3})
    clean.aggregate_train(1, [good])
    assert torch.equal(strategy.state.theta, clean.state.theta)
    assert "cannot skip" in strategy.traffic[1].failures["node-1"]
    assert [s.outcome for s in strategy.state.unacked["node-1"]] == [Outcome.LOST]


def test_laq_counts_skips_apart_from_failures_and_steps_with_the_stale_aggregate():
    strategy, theta0 = make_strategy(algorithm="laq", **{"laq-bits": 2})
    upload = reply(0, to_bytes(strategy.compressor.encode(updates(5, 1)[0])))
    _, metrics = strategy.aggregate_train(1, [upload, skip_reply(1)])
    assert metrics["clients-ok"] == 2 and metrics["clients-skipped"] == 1 and metrics["clients-failed"] == 0
    assert strategy.traffic[1].per_client["node-1"]["skipped"] is True
    assert strategy.traffic[1].uplink_theory_bits == (32 + 2 * SPEC.dim) + 1
    theta1 = strategy.state.theta.clone()
    _, metrics = strategy.aggregate_train(
        2, [skip_reply(0), skip_reply(1)]
    )  # all skip: nabla is stale, not 0
    assert metrics["clients-skipped"] == 2 and torch.allclose(
        theta1 - strategy.state.theta, theta0 - theta1, atol=1e-6
    )
    bad = RecordDict({**skip_reply(0).content})
    bad[protocol.PAYLOAD] = ConfigRecord({protocol.PAYLOAD_BYTES: b"\x00", protocol.SKIP: True})
    strategy.aggregate_train(3, [Message(bad, reply_to=instruction(0))])
    assert "empty payload" in strategy.traffic[3].failures["node-0"]
