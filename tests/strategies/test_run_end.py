"""strategies.run_end: the end-of-run query to every node; what each did, and a run that never fails on it."""

import logging

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app import Error as FlowerError
from flwr.supercore.task_identity import TaskIdentity

from fl_compams import protocol
from strategies.run_end import end_run


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1


class AnsweringGrid:
    """Node id -> its answer: a RecordDict, an error reason (str), or None (no answer)."""

    def __init__(self, answers):
        self.answers, self.sent = answers, []

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, messages, timeout=None):
        self.sent += list(messages)
        replies = []
        for m in messages:
            answer = self.answers[m.metadata.dst_node_id]
            if isinstance(answer, str):
                replies.append(Message(FlowerError(code=1, reason=answer), reply_to=m))
            elif answer is not None:
                replies.append(Message(answer, reply_to=m))
        return replies


def info(removed, kept):
    return RecordDict({protocol.END_INFO: ConfigRecord({protocol.REMOVED: removed, protocol.KEPT: kept})})


def test_every_node_is_told_and_each_outcome_is_reported(caplog):
    grid = AnsweringGrid(
        {
            1: info(2, 0),
            2: info(0, 2),
            3: None,
            4: "no handler",
            5: RecordDict(),
            6: info(-1, 0),
        }
    )
    labels = {1: "node-edge-0", 2: "node-edge-1"}
    with caplog.at_level(logging.INFO, logger="flwr"):
        out = end_run(grid, labels, timeout=5.0)
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [1, 2, 3, 4, 5, 6]
    assert {m.metadata.message_type for m in grid.sent} == {protocol.END_MESSAGE_TYPE}
    assert out["node-edge-0"] == "removed 2, kept 0 state file(s)"
    assert out["node-edge-1"] == "removed 0, kept 2 state file(s)"
    assert out["node-3"].startswith("no answer") and "no handler" in out["node-4"]
    assert out["node-5"] == out["node-6"] == "malformed answer"
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run ended:")]
    assert "node-edge-0: removed 2" in line and "node-3: no answer" in line


def test_a_failing_grid_does_not_fail_the_finished_run(caplog):
    class Broken(AnsweringGrid):
        def send_and_receive(self, messages, timeout=None):
            raise RuntimeError("SuperLink gone")

    with caplog.at_level(logging.WARNING, logger="flwr"):
        out = end_run(Broken({1: None}), {}, timeout=1.0)
    assert out == {"node-1": "no answer (keeps its state files)"}
    assert any("SuperLink gone" in r.getMessage() for r in caplog.records)
    assert end_run(AnsweringGrid({}), {}, timeout=1.0) == {}
