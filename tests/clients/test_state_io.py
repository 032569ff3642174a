"""Every slot of the worker state survives context.state (and so the disk mirror) exactly."""

import torch
from flwr.app import RecordDict

from clients import state_io
from fl_compams.algorithm import Pending, WorkerState
from fl_compams.client_opt import LocalAdam, MomentumState
from fl_compams.downlink import Version
from fl_compams.qsparse import LocalChange

CPU = torch.device("cpu")


def test_worker_state_round_trips_through_the_node_state():
    adam = LocalAdam(lr=0.1)
    _, moments = adam.step(torch.tensor([1.0, -2.0, 0.5]), adam.init(torch.zeros(3)))
    worker = WorkerState(torch.tensor([0.5, 0.0, -1.5]), Pending(7, b"\x01\x02\xff"), moments, rounds=4)
    state = RecordDict()
    state_io.save_worker_state(state, worker)
    back = state_io.load_worker_state(state, 3, CPU)
    assert torch.equal(back.residual, worker.residual) and back.pending == worker.pending
    assert back.local_opt.step == 1 and torch.equal(back.local_opt.v, moments.v) and back.rounds == 4
    sizes = {
        "residual": 12,
        "pending": 3,
        "local_opt": 24,
        "local_change": 0,
        "replica": 0,
        "momentum": 0,
        "lazy": 0,
    }
    assert state_io.state_bytes(back) == sizes


def test_qsparse_local_change_round_trips_and_is_counted():
    change = LocalChange(round=5, steps=3, change=torch.tensor([0.25, -1.0, 2.0]))
    state = RecordDict()
    state_io.save_worker_state(state, WorkerState(torch.zeros(3), rounds=2, local_change=change))
    back = state_io.load_worker_state(state, 3, CPU)
    assert back.local_change.round == 5 and back.local_change.steps == 3
    assert torch.equal(back.local_change.change, change.change)
    assert state_io.state_bytes(back)["local_change"] == 12
    assert state_io.load_worker_state(state, 4, CPU).local_change is None  # another model size: dropped
    state_io.save_worker_state(state, back._replace(local_change=None))
    assert state_io.LOCAL_CHANGE_RECORD not in state


def test_two_way_and_momentum_slots_round_trip_and_are_counted():
    version = Version(5, "0123456789abcdef")
    worker = WorkerState(
        torch.ones(3), replica=torch.tensor([1.0, 2.0, 3.0]), replica_version=version,
        momentum=MomentumState(torch.tensor([0.5, -0.5, 0.0])), rounds=2,
    )  # fmt: skip
    state = RecordDict()
    state_io.save_worker_state(state, worker)
    back = state_io.load_worker_state(state, 3, CPU)
    assert torch.equal(back.replica, worker.replica) and back.replica_version == version
    assert torch.equal(back.momentum.m, worker.momentum.m)
    assert state_io.state_bytes(back)["replica"] == 12 and state_io.state_bytes(back)["momentum"] == 12
    assert state_io.load_worker_state(state, 4, CPU).replica is None  # another model: the server resyncs
    state_io.save_worker_state(state, WorkerState(torch.ones(3), rounds=3))
    assert state_io.REPLICA_RECORD not in state and state_io.MOMENTUM_RECORD not in state


def test_empty_slots_are_removed_and_other_model_sizes_start_fresh():
    state = RecordDict()
    state_io.save_worker_state(state, WorkerState(torch.ones(3), Pending(1, b"x"), rounds=1))
    state_io.save_worker_state(
        state, WorkerState(torch.ones(3), None, rounds=2)
    )  # the pending reply resolved
    assert state_io.PENDING_RECORD not in state
    fresh = state_io.load_worker_state(state, 4, CPU)  # a model of another size
    assert fresh.residual is None and fresh.pending is None and fresh.rounds == 2


def test_laq_slot_and_its_pending_upload_round_trip_without_a_residual():
    from fl_compams.laq import LazyWorker

    lazy = LazyWorker(torch.tensor([0.25, -1.0, 3.0]), eps_hat=0.125, clock=5, threshold=2.5, sent_eps=0.75)
    worker = WorkerState(None, Pending(9, b"\x07\x08"), rounds=3, lazy=lazy)
    state = RecordDict()
    state_io.save_worker_state(state, worker)
    back = state_io.load_worker_state(state, 3, CPU)
    assert back.pending == worker.pending and back.residual is None  # LAQ's pending upload is kept
    assert torch.equal(back.lazy.q, lazy.q) and back.lazy._replace(q=None) == lazy._replace(q=None)
    assert state_io.state_bytes(back)["lazy"] == 12 + 32
    first = WorkerState(None, None, rounds=1, lazy=LazyWorker(None, 0.0, 100))  # no upload applied yet
    state_io.save_worker_state(state, first)
    assert state_io.load_worker_state(state, 3, CPU).lazy == first.lazy
    assert state_io.load_worker_state(state, 4, CPU).lazy is not None  # Q = 0 fits any model
    state_io.save_worker_state(state, worker)
    assert state_io.load_worker_state(state, 4, CPU).lazy is None  # a Q of another model size: fresh


def test_state_bytes_names_every_protocol_slot():
    """The slots clients report (``state-bytes-<slot>``) are exactly the ones the server summarises."""
    from fl_compams import protocol

    assert tuple(state_io.state_bytes(WorkerState())) == protocol.STATE_SLOTS
