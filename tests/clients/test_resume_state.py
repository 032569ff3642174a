"""Client state across a server restart: keyed by the run (out-dir, run-name), not by Flower's run id.

Deployment-style: the ClientApp's own ``train`` handler, a node config with ``state-dir``, and for each round a
fresh ``Context`` (a resumed run gets a new Flower run id and new, empty contexts), as a SuperNode builds them.
"""

import logging
import warnings

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import persist, state_io
from clients.client_app import end, train
from fl_compams import parse_config, protocol
from fl_compams.algorithm import Outcome, Status
from tasks.task import model_for_task

SETTINGS = {"seed": 3, "batch-size": 8}  # default COMP-AMS: Top-k with error feedback
NODE = {"partition-id": 1, "num-partitions": 4}
RUN_CONFIG = {"out-dir": "/srv/fl/runs", "run-name": "topk-edge"}


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower refuses to build messages outside a run until these are set (flower-guide.md section 1).
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1


def instruction(rnd, statuses=()):
    """What the server sends a node in round ``rnd``: the model, the client settings, the earlier statuses."""
    cfg = parse_config(SETTINGS)
    flat = cfg.to_flat()
    model = model_for_task(cfg.data, cfg.seed)
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(model.state_dict()),
            protocol.CONFIG: ConfigRecord(
                {**{k: flat[k] for k in protocol.CLIENT_KEYS}, "server-round": rnd}
            ),
        }
    )
    if statuses:
        content[protocol.STATUSES] = ConfigRecord(protocol.statuses_to_fields(statuses))
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)


def node_context(state_dir, run_id, run_config=RUN_CONFIG):
    """A SuperNode's context for a run: Flower's run id, the run config and this node's config."""
    node_config = {**NODE, "state-dir": str(state_dir)}
    return Context(
        run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config=dict(run_config)
    )


def train_metrics(msg, context):
    return dict(train(msg, context).content[protocol.METRICS])


def first_run(state_dir):
    """Rounds 1 and 2 of Flower run 101 (the second one acknowledges the first); the metrics of round 2."""
    ctx = node_context(state_dir, run_id=101)
    train_metrics(instruction(1), ctx)
    return train_metrics(instruction(2, (Status(1, Outcome.APPLIED, 1.0),)), ctx)


def test_state_survives_a_new_flower_run_id_with_the_same_run_name(tmp_path):
    last = first_run(tmp_path)
    assert last[protocol.RESIDUAL_NORM] > 0 and last[protocol.STATE_ROUNDS] == 2
    # The server restarted and resumed the run: Flower run 202, same out-dir and run-name, round 3.
    resumed = node_context(tmp_path, run_id=202)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean restore: no StateFileWarning
        got = train_metrics(instruction(3, (Status(2, Outcome.APPLIED, 1.0),)), resumed)
    assert got[protocol.RESIDUAL_NORM_IN] == last[protocol.RESIDUAL_NORM]  # the residual it had, bit for bit
    assert got[protocol.STATE_ROUNDS] == 3


@pytest.mark.parametrize(
    "run_config",
    [
        {**RUN_CONFIG, "run-name": "topk-edge-2"},  # another run
        {**RUN_CONFIG, "out-dir": "/srv/other"},  # a run of the same name under another results root
        {**RUN_CONFIG, "run-name": ""},  # a timestamped run: keyed by Flower's run id
    ],
)
def test_state_of_another_run_is_not_restored(tmp_path, run_config):
    first_run(tmp_path)
    other = node_context(tmp_path, run_id=202, run_config=run_config)
    got = train_metrics(instruction(3), other)
    assert got[protocol.RESIDUAL_NORM_IN] == 0.0 and got[protocol.STATE_ROUNDS] == 1


def test_state_files_are_filed_under_the_run_key(tmp_path):
    first_run(tmp_path)
    key = state_io.run_key_for("/srv/fl/runs", "topk-edge", 101)
    assert key == state_io.run_key_for("/srv/fl/runs", "topk-edge", 202)  # the run id does not matter
    assert key.startswith("topk-edge-") and len(key) == len("topk-edge-") + 16
    saved = persist.read_state(
        persist.state_path(tmp_path, key, "partition-1"), run_key=key, node_key="partition-1", dim=None
    )
    assert saved.round == 2 and saved.rounds == 2 and saved.run_id == 101
    before = persist.read_state(
        persist.previous_path(persist.state_path(tmp_path, key, "partition-1")),
        run_key=key,
        node_key="partition-1",
        dim=None,
    )
    assert before.round == 1 and before.rounds == 1
    assert not torch.equal(
        torch.from_numpy(saved.arrays["ef"]["residual"]), torch.from_numpy(before.arrays["ef"]["residual"])
    )


# ------------------------------------------------------- a server that resumes behind its nodes (it died mid-round)
APPLIED = {r: (Status(r, Outcome.APPLIED, 1.0),) for r in range(1, 4)}


def three_rounds(state_dir):
    """Rounds 1-3 of Flower run 101; the reply of round 3 (payload record and metrics)."""
    ctx = node_context(state_dir, run_id=101)
    train(instruction(1), ctx)
    train(instruction(2, APPLIED[1]), ctx)
    return train(instruction(3, APPLIED[2]), ctx).content


def test_rerun_round_after_a_mid_round_crash_repeats_the_reply_exactly(tmp_path):
    # The server died during round 3 after this node had replied; it resumes from its checkpoint of round 2,
    # whose statuses still include round 2 (the reply that acknowledged it was never aggregated).
    original = three_rounds(tmp_path)
    resumed = node_context(tmp_path, run_id=202)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = train(instruction(3, APPLIED[2]), resumed).content
    assert (
        again[protocol.PAYLOAD][protocol.PAYLOAD_BYTES] == original[protocol.PAYLOAD][protocol.PAYLOAD_BYTES]
    )
    assert dict(again[protocol.METRICS]) == dict(original[protocol.METRICS])  # residuals, rounds: all equal
    # The file of the abandoned round 3 was replaced, the state before round 3 kept.
    path = state_io.state_file(resumed)
    key = state_io.run_key(resumed)
    previous = persist.read_state(persist.previous_path(path), run_key=key, node_key="partition-1", dim=None)
    assert previous.round == 2 and previous.rounds == 2


def test_node_whose_first_round_the_server_forgot_starts_fresh_silently(tmp_path):
    ctx = node_context(tmp_path, run_id=101)
    original = train(instruction(1), ctx).content
    resumed = node_context(tmp_path, run_id=202)  # the server died in round 1 and starts again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = train(instruction(1), resumed).content
    assert dict(again[protocol.METRICS]) == dict(original[protocol.METRICS])


def test_server_two_rounds_behind_gives_a_warning_and_a_fresh_state(tmp_path):
    three_rounds(tmp_path)  # state of round 3, previous of round 2: both newer than a server at round 2
    resumed = node_context(tmp_path, run_id=202)
    with pytest.warns(
        persist.StateFileWarning, match="is of round 3, but the server is at round 2"
    ) as record:
        got = train_metrics(instruction(2, APPLIED[1]), resumed)
    assert "checkpoint-every = 1" in str(record[0].message)
    assert got[protocol.RESIDUAL_NORM_IN] == 0.0 and got[protocol.STATE_ROUNDS] == 1


def test_crash_between_the_two_renames_restores_the_previous_file(tmp_path):
    # write_state moves the old file to <file>.prev, then the new one into place; a crash in between leaves
    # only the previous file, the latest complete state (its round's reply was never sent).
    ctx = node_context(tmp_path, run_id=101)
    train(instruction(1), ctx)
    last = train_metrics(instruction(2, APPLIED[1]), ctx)
    path = state_io.state_file(ctx)
    path.replace(persist.previous_path(path))
    restarted = node_context(tmp_path, run_id=101)
    got = train_metrics(instruction(3, APPLIED[2]), restarted)
    assert got[protocol.RESIDUAL_NORM_IN] == last[protocol.RESIDUAL_NORM] and got[protocol.STATE_ROUNDS] == 3


def test_run_key_names_the_run_safely():
    assert state_io.run_key_for("/r", "a/../b c", 1).startswith("a_.._b_c-")
    assert len(state_io.run_key_for("/r", "x" * 500, 1)) == 64 + 1 + 16
    assert state_io.run_key_for("/r", "", 5) == "flower-run-5" != state_io.run_key_for("/r", "", 6)
    assert state_io.run_key_for("/r", "a", 1) != state_io.run_key_for("/r2", "a", 1)
    assert state_io.run_key_for("runs", "a", 1) != state_io.run_key_for("/abs/runs", "a", 1)  # as written


def restore_lines(records) -> list[str]:
    return [
        r.getMessage() for r in records if r.name == "flwr.clients.state_io" and r.levelno == logging.INFO
    ]


def test_one_log_line_for_a_restored_state_and_one_for_a_fresh_start(tmp_path, caplog):
    """The SuperNode's log says which round a restored state came from and its size, or that the node starts fresh."""
    caplog.set_level(logging.INFO, logger="flwr")
    ctx = node_context(tmp_path, run_id=101)
    train_metrics(instruction(1), ctx)
    (fresh,) = restore_lines(caplog.records)  # round 1: nothing on disk yet
    path = state_io.state_file(ctx)
    assert "partition-1" in fresh and "no state file" in fresh and "fresh" in fresh and "round 1" in fresh
    assert str(path) in fresh
    caplog.clear()
    train_metrics(instruction(2, (Status(1, Outcome.APPLIED, 1.0),)), ctx)
    assert restore_lines(caplog.records) == []  # the state was in memory: nothing restored, nothing logged
    size = path.stat().st_size
    caplog.clear()
    resumed = node_context(tmp_path, run_id=202)  # a restarted SuperNode (or server) with empty contexts
    train_metrics(instruction(3, (Status(2, Outcome.APPLIED, 1.0),)), resumed)
    (restored,) = restore_lines(caplog.records)
    assert "restored the client state of round 2" in restored and f"({size} bytes," in restored
    assert str(path) in restored and "for round 3" in restored


def end_message():
    return Message(content=RecordDict(), message_type=protocol.END_MESSAGE_TYPE, dst_node_id=7)


def test_the_end_of_the_run_removes_the_nodes_state_files(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    ctx = node_context(tmp_path, run_id=101)
    first_run(tmp_path)  # rounds 1 and 2 in another context of the same run: both files on disk
    path = state_io.state_file(ctx)
    assert path.exists() and persist.previous_path(path).exists()
    reply = end(end_message(), ctx)
    info = reply.content[protocol.END_INFO]
    assert (info[protocol.REMOVED], info[protocol.KEPT]) == (2, 0)
    assert not path.parent.exists()  # the run's directory went with its last file; the state-dir stays
    assert tmp_path.exists() and len(ctx.state) == 0
    assert any("run ended: removed 2 client state file(s)" in r.getMessage() for r in caplog.records)
    # A run that starts again under that name finds nothing: a fresh start, as for a new run.
    again = node_context(tmp_path, run_id=303)
    assert train_metrics(instruction(1), again)[protocol.RESIDUAL_NORM_IN] == 0.0


@pytest.mark.parametrize("flag", [True, "true", "True", "ture"])
def test_keep_state_keeps_the_files_at_the_end_of_the_run(tmp_path, caplog, flag):
    first_run(tmp_path)
    ctx = node_context(tmp_path, run_id=101)
    ctx.node_config[state_io.KEEP_STATE_KEY] = flag
    path = state_io.state_file(ctx)
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        info = end(end_message(), ctx).content[protocol.END_INFO]
    assert (info[protocol.REMOVED], info[protocol.KEPT]) == (0, 2)
    assert path.read_bytes() == before and persist.previous_path(path).exists()
    assert any("not true or false" in r.getMessage() for r in caplog.records) == (
        flag == "ture"
    )  # a typo keeps
    # ... and a resumed run (new Flower run id, same run-name) continues from them.
    resumed = node_context(tmp_path, run_id=202)
    got = train_metrics(instruction(3, (Status(2, Outcome.APPLIED, 1.0),)), resumed)
    assert got[protocol.STATE_ROUNDS] == 3 and got[protocol.RESIDUAL_NORM_IN] > 0


@pytest.mark.parametrize("flag", [False, "false", ""])
def test_keep_state_false_removes(tmp_path, flag):
    first_run(tmp_path)
    ctx = node_context(tmp_path, run_id=101)
    ctx.node_config[state_io.KEEP_STATE_KEY] = flag
    info = end(end_message(), ctx).content[protocol.END_INFO]
    assert (info[protocol.REMOVED], info[protocol.KEPT]) == (2, 0)


def test_the_end_without_a_state_dir_removes_nothing(tmp_path):
    ctx = Context(
        run_id=1, node_id=7, node_config=dict(NODE), state=RecordDict(), run_config=dict(RUN_CONFIG)
    )
    info = end(end_message(), ctx).content[protocol.END_INFO]
    assert (info[protocol.REMOVED], info[protocol.KEPT]) == (0, 0) and not any(tmp_path.iterdir())
