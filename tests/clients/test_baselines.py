"""Client-side baseline pieces: QAdam's moments in context.state, Flower-style dense replies."""

import torch
from flwr.app import RecordDict

from clients.baselines import ADAM_RECORD, local_adam_step
from fl_compams.client_opt import LocalAdam


def test_qadam_moments_persist_in_the_node_state():
    state = RecordDict()
    adam = LocalAdam(lr=0.1)
    g1, g2 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 0.5, -1.0])
    d1 = local_adam_step(state, g1, adam)
    assert ADAM_RECORD in state and int(state[ADAM_RECORD]["step"].numpy()[0]) == 1
    d2 = local_adam_step(state, g2, adam)
    # the same two steps with the moments carried explicitly
    s = adam.init(g1)
    e1, s = adam.step(g1, s)
    e2, s = adam.step(g2, s)
    assert torch.allclose(d1, e1) and torch.allclose(d2, e2)
    assert torch.allclose(torch.from_numpy(state[ADAM_RECORD]["v"].numpy()), s.v)


def test_qadam_state_of_another_model_size_starts_fresh():
    state = RecordDict()
    adam = LocalAdam(lr=0.1)
    local_adam_step(state, torch.ones(4), adam)
    d = local_adam_step(state, torch.ones(3), adam)
    fresh, _ = adam.step(torch.ones(3), adam.init(torch.ones(3)))
    assert torch.allclose(d, fresh)
