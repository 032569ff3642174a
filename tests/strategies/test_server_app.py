"""ServerApp checks that fail before round 1, and hostile hello, probe and baseline replies."""

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_compams import ConfigError, ParamSpec, parse_config, protocol
from strategies.server_app import (
    MeasuringGrid,
    StableOrderGrid,
    discover_nodes,
    probe_heterogeneity,
    run_server,
)


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes
        self.sent = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout):
        self.sent += 1
        return []


def test_bad_run_config_stops_before_any_message():
    grid = FakeGrid([1, 2])
    with pytest.raises(ConfigError, match="'beta2'"):
        run_server(grid, {"beta2": 1.0})
    assert grid.sent == 0


def test_more_required_nodes_than_connected_is_an_error():
    with pytest.raises(ConfigError, match="min-train-nodes = 5 but only 2 nodes are connected"):
        discover_nodes(FakeGrid([1, 2]), parse_config({"min-train-nodes": 5}), timeout=1.0, wait_s=0.2)


def test_min_valid_replies_above_the_sample_is_an_error():
    cfg = parse_config({"min-valid-replies": 4, "fraction-train": 0.5})
    with pytest.raises(ConfigError, match="min-valid-replies = 4 exceeds the 2 clients sampled per round"):
        discover_nodes(FakeGrid([1, 2, 3, 4]), cfg, timeout=1.0)


def test_unanswered_hello_falls_back_to_node_ids_and_stable_order():
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    labels = discover_nodes(FakeGrid([30, 10, 20]), parse_config(), timeout=1.0).labels
    assert labels == {30: "node-30", 10: "node-10", 20: "node-20"}
    grid = StableOrderGrid(FakeGrid([7, 5, 6]), {7: "partition-0", 6: "partition-10", 5: "partition-2"})
    assert grid.get_node_ids() == [7, 5, 6]


# ------------------------------------------------------------------------ hostile nodes (issue 10)
class AnsweringGrid(FakeGrid):
    """Answers every message to node n with ``answers[n]`` (a RecordDict; None = no answer)."""

    def __init__(self, answers):
        super().__init__(list(answers))
        self.answers = answers

    def send_and_receive(self, messages, timeout=None):
        self.sent += 1
        return [
            Message(self.answers[m.metadata.dst_node_id], reply_to=m)
            for m in messages
            if self.answers[m.metadata.dst_node_id] is not None
        ]


def hello(pid=-1, name="", **fields):
    return RecordDict(
        {protocol.NODE_INFO: ConfigRecord({protocol.PARTITION_ID: pid, protocol.NODE_NAME: name, **fields})}
    )


def test_malformed_or_duplicate_hello_claims_are_named_by_node_id():
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    answers = {
        11: hello(0),
        12: hello(0),  # the same partition as node 11: the first claim (by node id) wins
        30: hello(1),
        20: hello(1),
        13: RecordDict(),  # no node-info
        14: hello("3"),
        15: hello(-5),
        16: hello(2.0),
        17: hello(-1, "x" * 65),
        18: hello(-1, "bad\nname"),
        19: hello(-1, "12"),  # all digits: would pose as a node id
        21: hello(-1, "edge-a"),
        22: hello(-1, "edge-a"),
        23: hello(True),
        24: RecordDict({protocol.NODE_INFO: ConfigRecord({protocol.PARTITION_ID: 4})}),  # no node-name
        25: hello(-1, 5),
        26: hello(-1, "../../etc"),
        27: None,  # no answer at all
    }
    labels = discover_nodes(AnsweringGrid(answers), parse_config(), timeout=1.0).labels
    good = {11: "partition-0", 20: "partition-1", 21: "node-edge-a"}
    assert labels == {n: good.get(n, f"node-{n}") for n in answers}
    assert len(set(labels.values())) == len(labels)


def probe_answer(grad=None, variance=0.5, *, metrics=True, array=None):
    content = RecordDict(
        {protocol.PROBE_GRADIENT: ArrayRecord({protocol.PROBE_GRADIENT: array or Array(grad)})}
    )
    if metrics:
        content[protocol.METRICS] = MetricRecord(
            {} if variance is None else {protocol.LOCAL_VARIANCE: variance}
        )
    return content


def lying_array(dim):
    """Metadata of a float32 vector of ``dim`` but a .npy header claiming 10^10 elements."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**10,)})
    return Array(dtype="float32", shape=(dim,), stype="numpy.ndarray", data=buf.getvalue() + b"\0" * 4 * dim)


def test_malformed_probe_replies_leave_that_node_out():
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    arrays = ArrayRecord({"w": torch.zeros(4, 5), "b": torch.zeros(5)})  # d = 25
    rng = np.random.default_rng(0)
    g1, g2 = rng.standard_normal(25).astype(np.float32), rng.standard_normal(25).astype(np.float32)
    nan = g1.copy()
    nan[3] = np.nan
    answers = {
        1: probe_answer(g1, 0.5),
        2: probe_answer(g2, 1.5),
        3: probe_answer(g1[:-1]),  # wrong length
        4: probe_answer(g1.astype(np.float64)),
        5: probe_answer(nan),
        6: probe_answer(g1, metrics=False),
        7: probe_answer(g1, variance=None),
        8: probe_answer(g1, variance=math.inf),
        9: probe_answer(g1, variance=[1.0]),
        10: probe_answer(array=lying_array(25)),
        13: probe_answer(
            array=Array(
                dtype="float32",
                shape=(25,),
                stype="numpy.ndarray",
                data=b"\x93NUMPY\x01\x00\x10\x00{bad(((   }\n",
            )
        ),
        11: RecordDict({protocol.PROBE_GRADIENT: ArrayRecord({"other": Array(g1)})}),
        12: RecordDict(),
    }
    out = probe_heterogeneity(AnsweringGrid(answers), arrays, ConfigRecord(), timeout=1.0)
    mean = (g1.astype(np.float64) + g2) / 2
    assert out["probe_clients"] == 2 and out["sigma2"] == 1.0
    assert out["sigma_g2"] == pytest.approx(((g1 - mean) ** 2).sum(), rel=1e-6)
    assert out["probe_bytes"] > 0


def test_flower_baseline_replies_are_checked_before_flower_averages_them():
    from flwr.serverapp.strategy import FedAvg

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    spec = ParamSpec(("w", "b"), ((4, 5), (5,)), ("float32", "float32"), (True, True))

    def dense(w=None, n=10, loss=0.5, extra_records=None, **metrics):
        arrays = {"w": torch.ones(4, 5) if w is None else w, "b": torch.ones(5)}
        return RecordDict(
            {
                protocol.ARRAYS: ArrayRecord(arrays),
                protocol.METRICS: MetricRecord(
                    {protocol.NUM_EXAMPLES: n, protocol.TRAIN_LOSS: loss, **metrics}
                ),
                **(extra_records or {}),
            }
        )

    answers = {
        1: dense(),
        2: dense(n=10**9),  # capped at max-num-examples
        3: dense(loss=[0.5]),
        4: dense(w=torch.ones(5, 4)),
        5: dense(w=torch.full((4, 5), math.nan)),
        6: dense(**{"uplink-bytes": 1, "junk": 2.0}),  # passed on with the metrics Flower needs only
        7: dense(n=0),  # Flower would divide by a zero total weight
        8: dense(extra_records={"more": MetricRecord({"a": 1})}),
        9: dense(w=torch.ones(4, 5, dtype=torch.float64)),
    }
    cfg = parse_config({"algorithm": "flower-fedavg", "max-num-examples": 100})
    grid = MeasuringGrid(AnsweringGrid(answers), {}, cfg, spec)
    messages = [Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=n) for n in answers]
    passed = grid.send_and_receive(messages)
    assert [r.metadata.src_node_id for r in passed] == [1, 2, 6]
    assert [dict(r.content[protocol.METRICS]) for r in passed] == [
        {protocol.NUM_EXAMPLES: n, protocol.TRAIN_LOSS: 0.5} for n in (10, 100, 10)
    ]
    traffic = grid.traffic[1]
    assert traffic.ok == ["node-1", "node-2", "node-6"]
    assert set(traffic.failures) == {f"node-{n}" for n in (3, 4, 5, 7, 8, 9)}
    assert "metric 'train-loss' must be a finite number" in traffic.failures["node-3"]
    assert "array 'w' must be float32 of shape (4, 5)" in traffic.failures["node-4"]
    assert "array 'w' has non-finite values" in traffic.failures["node-5"]
    arrays, _ = FedAvg().aggregate_train(1, passed)  # Flower's own averaging accepts what is passed on
    assert np.allclose(arrays["w"].numpy(), 1.0)


def existing_run(tmp_path, name="r"):
    run_dir = tmp_path / name
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"round": 0, "accuracy": 0.1}\n{"round": 1, "accuracy": 0.2}\n')
    (run_dir / "checkpoints" / "round-000001.ckpt").write_bytes(b"not a checkpoint")
    return run_dir, (run_dir / "metrics.jsonl").read_text()


def test_reusing_a_run_name_without_resume_refuses_and_keeps_the_results(tmp_path):
    run_dir, metrics = existing_run(tmp_path)
    grid = FakeGrid([1, 2])
    with pytest.raises(
        ConfigError, match=r"run directory .*/r already exists .* never overwritten.*resume = true"
    ):
        run_server(grid, {"out-dir": str(tmp_path), "run-name": "r"})
    assert grid.sent == 0 and (run_dir / "metrics.jsonl").read_text() == metrics
    assert (run_dir / "checkpoints" / "round-000001.ckpt").exists()


def test_resume_without_a_usable_checkpoint_keeps_the_old_results(tmp_path):
    from fl_compams.checkpoint import save_checkpoint
    from fl_compams.flat import flatten
    from fl_compams.server import init_server_state
    from fl_compams.server_opt import AMSGrad
    from tasks.task import load_data, make_model

    run_dir, metrics = existing_run(tmp_path)
    cfg = parse_config()
    model = make_model(cfg.data, load_data(cfg.data, seed=0), 0)
    theta = flatten(model.state_dict(), ParamSpec.from_module(model))
    good_extra = {"config": cfg.to_flat(), "totals": {"up": 1, "down": 2, "probe": 0}}
    state = init_server_state(theta, AMSGrad())
    save_checkpoint(run_dir / "checkpoints", state._replace(round=2), {**good_extra, "totals": {"up": "x"}})
    save_checkpoint(run_dir / "checkpoints", state._replace(round=3, theta=theta[:-1]), good_extra)
    with (
        pytest.warns(UserWarning) as caught,
        pytest.raises(ConfigError, match="resume: no usable checkpoint"),
    ):
        run_server(FakeGrid([1, 2]), {"out-dir": str(tmp_path), "run-name": "r", "resume": True})
    reasons = " | ".join(str(w.message) for w in caught)
    assert f"theta has {theta.numel() - 1} parameters, the model has {theta.numel()}" in reasons
    assert "'totals' must hold the byte counters" in reasons and "round-000001.ckpt" in reasons
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_a_restarted_node_gets_its_label_back_and_its_statuses():
    # Flower gives a restarted SuperNode a new node id; its claim on a label whose node has left is its return,
    # so the statuses of the replies it sent before the restart reach it (else it would fold back applied ones).
    from fl_compams import to_bytes
    from fl_compams.config import build_algorithm
    from fl_compams.flat import ParamSpec
    from fl_compams.server import init_server_state
    from strategies.comp_ams import CompAMS
    from strategies.naming import NodeNames

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    grid = AnsweringGrid({5: hello(0), 6: hello(1)})
    names = NodeNames()
    names.learn(grid, grid.get_node_ids(), timeout=1.0)
    assert names.labels == {5: "partition-0", 6: "partition-1"}
    spec = ParamSpec(("w",), ((8,),), ("float32",), (True,))
    cfg = parse_config({"topk-k": 2})
    algorithm = build_algorithm(cfg, spec.block_sizes)
    strategy = CompAMS(
        cfg, spec, algorithm, init_server_state(torch.zeros(8), algorithm.server_opt), names=names
    )
    sent = list(strategy.configure_train(1, strategy.current_arrays(), ConfigRecord(), grid))
    for i, m in enumerate(sent):  # what the Grid does when it sends them
        m.metadata.__dict__["_message_id"] = f"instruction-{i}"
    payload = to_bytes(algorithm.compressor.encode(torch.arange(8.0)))
    replies = [
        Message(
            RecordDict(
                {
                    protocol.PAYLOAD: ConfigRecord(
                        {protocol.PAYLOAD_BYTES: payload, protocol.REPLY_ROUND: 1}
                    ),
                    protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 3, protocol.TRAIN_LOSS: 1.0}),
                }
            ),
            reply_to=m,
        )
        for m in sent
    ]
    strategy.aggregate_train(1, replies)
    restarted = AnsweringGrid({5: hello(0), 9: hello(1), 10: hello(1)})  # node 6 came back as 9; 10 copies it
    messages = list(strategy.configure_train(2, strategy.current_arrays(), ConfigRecord(), restarted))
    assert names.labels[9] == "partition-1" and names.labels[10] == "node-10"
    by_node = {m.metadata.dst_node_id: m for m in messages}
    statuses = protocol.statuses_from_fields(dict(by_node[9].content[protocol.STATUSES]))
    assert [(s.round, int(s.outcome)) for s in statuses] == [(1, 1)]  # round 1 applied: commit, no fold-back
    assert protocol.STATUSES not in by_node[10].content


def test_registered_names_come_before_claims():
    # With SuperNode authentication the SuperLink knows each node's registered name (tied to its key): that
    # name labels the node and no claim is asked for; unregistered nodes (and invalid registered names) still
    # answer the hello.
    from types import SimpleNamespace

    from strategies.naming import NodeNames

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1

    class RegistryGrid(AnsweringGrid):
        def get_nodes(self):
            registered = {3: "edge-a", 4: "edge-a", 5: "../bad", 6: ""}
            return [SimpleNamespace(node_id=n, name=registered.get(n, "")) for n in self.nodes]

    grid = RegistryGrid({3: hello(0), 4: None, 5: hello(1), 6: hello(2)})
    names = NodeNames()
    names.learn(grid, grid.get_node_ids(), timeout=1.0)
    assert names.labels == {3: "node-edge-a", 4: "node-4", 5: "partition-1", 6: "partition-2"}
    assert grid.sent == 1  # one hello round, to the nodes without a valid registered name


@pytest.mark.parametrize("periods", ["1,2,3", "4"])
def test_a_qsparse_period_list_not_naming_every_node_stops_before_round_1(tmp_path, periods):
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    grid = AnsweringGrid({11: hello(0), 12: hello(1)})
    run_config = {
        "out-dir": str(tmp_path),
        "run-name": "q",
        "algorithm": "qsparse",
        "qsparse-async": True,
        "qsparse-periods": periods,
    }
    with pytest.raises(ConfigError, match=r"'qsparse-periods'.*2 nodes"):
        run_server(grid, run_config)
    assert grid.sent == 1  # the hello only: no training instruction went out
