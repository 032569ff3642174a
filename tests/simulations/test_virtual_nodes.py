"""Virtual clients get the context deployed ones have: the run config, and state-dir in a resumable run."""

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fl_compams import parse_config
from simulations.runner import virtual_node_config
from simulations.virtual_nodes import WithContext


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1


def test_wrapped_app_sees_the_run_config_and_node_config_and_flower_keys_win():
    inner = ClientApp()
    seen = {}

    @inner.train()
    def train(msg, context):
        seen.update(run=dict(context.run_config), node=dict(context.node_config))
        context.state["seen"] = ConfigRecord({"x": 1})
        return Message(RecordDict(), reply_to=msg)

    app = WithContext(inner, {"run-name": "r", "seed": 3}, {"state-dir": "/s", "partition-id": 99})
    context = Context(
        run_id=1, node_id=2, node_config={"partition-id": 0}, state=RecordDict(), run_config={"seed": 5}
    )
    app(Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=2), context)
    assert seen == {"run": {"run-name": "r", "seed": 5}, "node": {"partition-id": 0, "state-dir": "/s"}}
    # Flower refuses a context whose run config changed; the state is the one the app wrote to
    assert context.run_config == {"seed": 5} and context.node_config == {"partition-id": 0}
    assert dict(context.state.config_records) == {"seen": {"x": 1}}


@pytest.mark.parametrize(
    "overrides,persisted",
    [
        ({}, False),  # the default run: writes nothing besides its results
        ({"run-name": "x"}, False),  # no checkpoints: it cannot be resumed
        ({"checkpoint-every": 2}, False),  # a timestamped run: it cannot be resumed either
        ({"run-name": "x", "checkpoint-every": 2}, True),
        ({"run-name": "x", "resume": True}, True),
    ],
)
def test_client_state_is_persisted_in_runs_that_can_be_resumed(tmp_path, overrides, persisted):
    cfg = parse_config({"out-dir": str(tmp_path), **overrides})
    got = virtual_node_config(cfg)
    state_dir = str(tmp_path.resolve() / "x" / "client-state")
    assert got == (
        {"state-dir": state_dir, "keep-state": "true"} if persisted else {}
    )  # kept for a later resume
    assert Path(got.get("state-dir", "/")).is_absolute()
