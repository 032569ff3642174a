"""The in-process engine: InProcessGrid behaves as Flower's simulation does, and reproduces the Ray path's runs.

Fast tests drive the grid with toy ClientApps (contexts, copies, ids, error replies) and run one short in-process
experiment; the slow test runs the same configurations on Ray and in-process and compares every metrics row.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from simulations import cli
from simulations.inprocess_grid import InProcessGrid
from simulations.runner import run_experiment
from strategies.results import read_metrics
from strategies.wire import wire_bytes

pytestmark = pytest.mark.timeout(600)

counting = ClientApp()


@counting.train()
def _count(msg: Message, context: Context) -> Message:
    """Counts its calls in the node's state; mutates what it received; fails when told to."""
    if "seen" not in context.state:
        context.state["seen"] = ConfigRecord({"calls": 0})
    record = context.state["seen"]
    record["calls"] = int(record["calls"]) + 1
    msg.content["arrays"]["w"] = Array(np.zeros(3, dtype=np.float32))  # must not reach the server's message
    if msg.content["config"].get("fail", False):
        raise RuntimeError("told to fail")
    if msg.content["config"].get("die", False):
        os._exit(3)  # a worker process killed mid-round
    reply = RecordDict(
        {
            "info": ConfigRecord(
                {
                    "calls": int(record["calls"]),
                    "partition": int(context.node_config["partition-id"]),
                    "partitions": int(context.node_config["num-partitions"]),
                }
            )
        }
    )
    return Message(reply, reply_to=msg)


def _round(grid: InProcessGrid, fail: bool = False, die: bool = False) -> tuple[list[Message], list[Message]]:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))}),
            "config": ConfigRecord({"fail": fail, "die": die}),
        }
    )
    with grid.identity():
        sent = [Message(content, n, "train") for n in grid.get_node_ids()]
    return sent, list(grid.send_and_receive(sent))


def test_contexts_persist_per_node_and_node_ids_repeat_per_seed():
    grid = InProcessGrid(counting, 3, seed=7)
    ids = list(grid.get_node_ids())
    assert len(set(ids)) == 3 and not {0, SUPERLINK_NODE_ID} & set(ids)
    assert all(0 < n < 2**64 for n in ids) and max(ids) > 2**32  # random-like 64-bit ids, as Flower draws
    assert ids == list(InProcessGrid(counting, 3, seed=7).get_node_ids())
    assert ids != list(InProcessGrid(counting, 3, seed=8).get_node_ids())
    for rnd in (1, 2, 3):
        _, replies = _round(grid)
        info = {r.metadata.src_node_id: dict(r.content["info"]) for r in replies}
        assert sorted(i["partition"] for i in info.values()) == [0, 1, 2]
        assert all(i["calls"] == rnd and i["partitions"] == 3 for i in info.values())


def test_replies_carry_flowers_metadata_and_cross_as_copies():
    grid = InProcessGrid(counting, 2, seed=0)
    sent, replies = _round(grid)
    by_id = {m.metadata.message_id: m for m in sent}
    assert len(replies) == 2 and all(m.metadata.message_id for m in sent)
    for reply in replies:
        meta = reply.metadata
        instruction = by_id[meta.reply_to_message_id]
        assert meta.src_node_id == instruction.metadata.dst_node_id and meta.dst_node_id == SUPERLINK_NODE_ID
        assert meta.run_id == instruction.metadata.run_id == grid.run.run_id
        assert meta.message_type == "train" and meta.delivered_at
        assert meta.message_id and meta.message_id not in by_id
        # the client zeroed its copy of the model: the server's message is untouched, bytes as sent
        np.testing.assert_array_equal(instruction.content["arrays"]["w"].numpy(), np.arange(3))
    assert len({r.metadata.message_id for r in replies}) == 2
    assert wire_bytes(sent[0]) == wire_bytes(sent[1])


def test_a_raising_client_app_becomes_flowers_error_reply_and_its_state_is_not_kept():
    grid = InProcessGrid(counting, 2, seed=0)
    _round(grid)
    _, replies = _round(grid, fail=True)
    assert len(replies) == 2
    for reply in replies:
        assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert reply.error.reason.startswith("<class 'flwr.clientapp.client_app.ClientAppException'>:<'")
        assert "told to fail" in reply.error.reason
    _, replies = _round(grid)  # the failed call's count was dropped with its context, as Ray drops it
    assert all(r.content["info"]["calls"] == 2 for r in replies)


def test_worker_processes_hold_their_nodes_contexts_and_answer_as_flower_does():
    with InProcessGrid(counting, 5, seed=3, workers=2) as grid:
        assert list(grid.get_node_ids()) == list(InProcessGrid(counting, 5, seed=3).get_node_ids())
        for rnd in (1, 2):
            sent, replies = _round(grid)
            assert len(replies) == 5
            info = {r.metadata.src_node_id: dict(r.content["info"]) for r in replies}
            assert sorted(i["partition"] for i in info.values()) == list(range(5))
            assert all(i["calls"] == rnd for i in info.values())  # each node's context stays in its worker
            assert {r.metadata.reply_to_message_id for r in replies} == {m.metadata.message_id for m in sent}
            np.testing.assert_array_equal(sent[0].content["arrays"]["w"].numpy(), np.arange(3))
        _, replies = _round(grid, fail=True)
        assert all(r.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION for r in replies)
        assert all(r.content["info"]["calls"] == 3 for r in _round(grid)[1])  # the failed call was not kept
        with pytest.raises(RuntimeError, match=r"worker process \d ended unexpectedly"):
            _round(grid, die=True)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_nodes"):
        InProcessGrid(counting, 0)
    with pytest.raises(ValueError, match="client_threads"):
        InProcessGrid(counting, 2, client_threads=0)
    with pytest.raises(ValueError, match="workers"):
        InProcessGrid(counting, 2, workers=-1)
    with pytest.raises(ValueError, match="workers applies to engine 'inprocess'"):
        run_experiment({}, workers=2)
    with pytest.raises(ValueError, match="engine must be one of"):
        run_experiment({}, engine="warp")
    with pytest.raises(ValueError, match="no num_gpus"):
        run_experiment({}, engine="inprocess", num_gpus=1.0)


def test_failing_clients_are_counted_as_failures_in_process(tmp_path, monkeypatch):
    import faulty_clients  # tests/simulations is on sys.path (pytest rootdir-less import mode)

    # partition 0 raises, partition 1 sends garbage; the strategy counts both, the others count
    monkeypatch.setattr(faulty_clients, "SLOW_SECONDS", 0.0)  # no round timeout to miss in process
    path = run_experiment(
        {"out-dir": str(tmp_path), "run-name": "faulty", "num-server-rounds": 2, "min-valid-replies": 1},
        num_supernodes=4,
        client_app=faulty_clients.app,
        engine="inprocess",
        workers=0,  # the clients in this process (worker processes: the slow test)
    )
    rows = [r for r in read_metrics(path) if r["round"] > 0]
    assert len(rows) == 2
    for row in rows:
        assert row["clients_failed"] == 2 and row["clients_ok"] == 2 and row["update_applied"]
        assert "ClientAppException" in row["failures"]["partition-0"]
        assert "simulated client crash" in row["failures"]["partition-0"]
        assert "partition-1" in row["failures"]


def test_cli_passes_the_engine_on(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(overrides, **kwargs):
        calls.append(kwargs["engine"] + (f"/{kwargs['workers']}" if "workers" in kwargs else ""))

    monkeypatch.setattr("simulations.runner.run_experiment", fake_run)
    monkeypatch.setattr(cli, "_write", lambda *a: 0)
    args = ["reproduce", "speedup", "--runs", str(tmp_path), "--seeds", "0", "--rounds", "1"]
    assert cli.main([*args, "--engine", "inprocess"]) == 0
    assert calls == ["inprocess"] * 4
    assert cli.main(args) == 0
    assert calls[4:] == ["ray"] * 4
    assert cli.main([*args, "--engine", "inprocess", "--workers", "0"]) == 0
    assert calls[8:] == ["inprocess/0"] * 4
    assert cli.main([*args, "--workers", "2"]) == 2  # Ray sizes its own pool: a usage error
    assert cli.main([*args, "--engine", "warp"]) == 2
    assert "unknown engine 'warp'; available: ray, inprocess" in capsys.readouterr().err
    assert calls[12:] == []


# ---------------------------------------------------------------------------------------------- Ray vs in-process
CONFIGS = {
    "comp-ams-topk": {"num-server-rounds": 4},
    "block-sign-sampled": {"num-server-rounds": 5, "compressor": "blocksign", "fraction-train": 0.67},
    "two-way-topk": {
        "num-server-rounds": 5,
        "downlink-compressor": "topk",
        "fraction-train": 0.67,
        "downlink-log": 2,
    },
}


def _rows(path) -> list[dict]:
    """metrics.jsonl without the wall-time column (the one thing an engine may change)."""
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(path)]


class ForgetfulGrid(InProcessGrid):
    """A grid that loses every node's state after each call (as if contexts were not persisted)."""

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for context in self.nodes.contexts.values():
            context.state = RecordDict()
        return ids


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_inprocess_engine_reproduces_the_ray_path_round_for_round(tmp_path, monkeypatch, name):
    overrides = {"out-dir": str(tmp_path), **CONFIGS[name]}
    ray = run_experiment({**overrides, "run-name": "ray"}, num_supernodes=3, engine="ray")
    expected = _rows(ray)
    assert len(expected) == CONFIGS[name]["num-server-rounds"] + 1
    assert expected[-1]["clients"] and expected[-1]["uplink_bytes_cum"] > 0
    a = np.load(ray / "model.npz")
    for workers in (0, 2):  # clients in this process; in two worker processes
        inprocess = run_experiment(
            {**overrides, "run-name": f"inprocess-{workers}"},
            num_supernodes=3,
            engine="inprocess",
            workers=workers,
        )
        for want, row in zip(expected, _rows(inprocess), strict=True):
            assert row == want  # accuracy, loss, bytes both ways, per-client rows: all of it
        b = np.load(inprocess / "model.npz")
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    # the comparison is sharp: without persisted contexts (residuals lost) the rows differ from round 2 on
    monkeypatch.setattr("simulations.inprocess_grid.InProcessGrid", ForgetfulGrid)
    forgetful = _rows(
        run_experiment(
            {**overrides, "run-name": "forgetful"}, num_supernodes=3, engine="inprocess", workers=0
        )
    )
    assert forgetful[1] == expected[1]
    assert forgetful[2:] != expected[2:]
