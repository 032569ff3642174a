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
