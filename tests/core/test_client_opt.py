"""QAdam's local Adam step and its EF pipeline."""

import pytest
import torch

from fl_compams import SGD, BlockSign, Identity, ef_step, weighted_mean
from fl_compams.client_opt import LocalAdam


def test_identity_one_worker_equals_adam_without_bias_correction():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(10, generator=gen, dtype=torch.float64) for _ in range(20)]
    adam, server = LocalAdam(lr=0.01), SGD(lr=1.0)
    x = torch.zeros(10, dtype=torch.float64)
    state, sstate, e = adam.init(x), server.init(x), torch.zeros_like(x)
    for g in grads:
        delta, state = adam.step(g, state)
        payload, e = ef_step(Identity(), delta, e)
        step, sstate = server.update(weighted_mean([payload], [1.0], 10, dtype=torch.float64), sstate)
        x = x + step
    # reference: Adam with no bias correction, eps outside the sqrt
    ref, m, v = torch.zeros(10, dtype=torch.float64), 0, 0
    for g in grads:
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref = ref - 0.01 * m / (v.sqrt() + 1e-8)
    assert torch.allclose(x, ref, atol=1e-12)


def test_options_change_the_step_as_documented():
    g = torch.tensor([0.5, -2.0], dtype=torch.float64)
    base = LocalAdam(lr=1.0, eps=1e-2)
    d0, _ = base.step(g, base.init(g))
    assert torch.allclose(d0, 0.1 * g / ((0.001 * g * g).sqrt() + 1e-2))
    inside = LocalAdam(lr=1.0, eps=1e-2, eps_inside_sqrt=True)
    d1, _ = inside.step(g, inside.init(g))
    assert torch.allclose(d1, 0.1 * g / (0.001 * g * g + 1e-2).sqrt())
    corrected = LocalAdam(lr=1.0, eps=1e-2, bias_correction=True)
    d2, _ = corrected.step(g, corrected.init(g))
    assert torch.allclose(d2, g / ((g * g).sqrt() + 1e-2))


def test_ef_telescoping_on_adam_steps_with_one_bit_quantizer():
    gen = torch.Generator().manual_seed(1)
    adam, c = LocalAdam(lr=0.1), BlockSign(block_sizes=(20, 30))
    state, e = adam.init(torch.zeros(50, dtype=torch.float64)), torch.zeros(50, dtype=torch.float64)
    sent, true = torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    for _ in range(30):
        delta, state = adam.step(torch.randn(50, generator=gen, dtype=torch.float64), state)
        payload, e = ef_step(c, delta, e)
        sent += c.decode(payload)
        true += delta
    assert torch.allclose(sent + e, true, atol=1e-10)


def test_moments_are_local():
    adam = LocalAdam()
    s1 = adam.step(torch.ones(3), adam.init(torch.zeros(3)))[1]
    s2 = adam.step(-2 * torch.ones(3), adam.init(torch.zeros(3)))[1]
    assert not torch.equal(s1.m, s2.m) and not torch.equal(s1.v, s2.v)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="beta2"):
        LocalAdam(beta2=1.0)
