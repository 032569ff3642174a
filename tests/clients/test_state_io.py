"""Every slot of the worker state survives context.state (and so the disk mirror) exactly."""

import torch
from flwr.app import RecordDict

from clients import state_io
from fl_compams.algorithm import Pending, WorkerState
from fl_compams.client_opt import LocalAdam

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
    assert state_io.state_bytes(back) == {"residual": 12, "pending": 3, "local_opt": 24, "lazy": 0}


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
