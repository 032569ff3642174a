"""Server optimizers: Algorithm 2's AMSGrad exactly, and the named torch-style variants."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_compams import (
    SGD,
    AMSGrad,
    Identity,
    TorchAdam,
    TorchAMSGrad,
    ef_step,
    make_server_optimizer,
    weighted_mean,
)
from fl_compams.aggregate import aggregation_weights


def reference_amsgrad(theta, grads, lr, b1, b2, eps):
    """Algorithm 2 written out with Python floats, one coordinate at a time."""
    theta = list(theta)
    m = [0.0] * len(theta)
    v = [0.0] * len(theta)
    vh = [0.0] * len(theta)
    for g in grads:
        for j, gj in enumerate(g):
            m[j] = b1 * m[j] + (1 - b1) * gj
            v[j] = b2 * v[j] + (1 - b2) * gj * gj
            vh[j] = max(vh[j], v[j])
            theta[j] -= lr * m[j] / (vh[j] + eps) ** 0.5
    return theta


@settings(max_examples=100, deadline=None)
@given(
    # |g| >= 1e-100 (or 0): (1 - b1) g must stay a normal float for the closed form to hold to 1e-12
    g=st.lists(st.floats(-100, 100).filter(lambda v: v == 0 or abs(v) >= 1e-100), min_size=1, max_size=8),
    lr=st.floats(1e-4, 1.0),
    eps=st.floats(1e-12, 1e-2),
)
def test_step_one_closed_form(g, lr, eps):
    # theta_2 - theta_1 = -lr (1 - b1) g / sqrt((1 - b2) g^2 + eps): no bias correction, eps inside the sqrt
    opt = AMSGrad(lr=lr, beta1=0.9, beta2=0.999, eps=eps)
    gt = torch.tensor(g, dtype=torch.float64)
    delta, state = opt.update(gt, opt.init(gt))
    expected = -lr * 0.1 * gt / torch.sqrt(0.001 * gt**2 + eps)
    assert torch.allclose(delta, expected, rtol=1e-12, atol=0)
    assert state.step == 1


def test_v_hat_is_monotone_and_state_is_not_mutated():
    opt = AMSGrad()
    gen = torch.Generator().manual_seed(0)
    state = opt.init(torch.zeros(50, dtype=torch.float64))
    for t in range(100):
        g = torch.randn(50, generator=gen, dtype=torch.float64) * (10.0 if t == 3 else 0.1)
        before = state.v_hat.clone()
        _, new = opt.update(g, state)
        assert torch.equal(state.v_hat, before)  # pure: the old state is untouched
        assert torch.all(new.v_hat >= state.v_hat) and torch.all(new.v_hat >= new.v)
        state = new
    assert state.step == 100


def test_matches_reference_loop():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(30)]
    opt = AMSGrad(lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6)
    theta = torch.randn(6, generator=gen, dtype=torch.float64)
    ref = reference_amsgrad(theta.tolist(), [g.tolist() for g in grads], 0.05, 0.8, 0.99, 1e-6)
    state = opt.init(theta)
    for g in grads:
        delta, state = opt.update(g, state)
        theta = theta + delta
    assert torch.allclose(theta, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-12)


def _run_torch(opt_factory, theta0, grads):
    p = torch.nn.Parameter(theta0.clone())
    opt = opt_factory([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (TorchAMSGrad(lr=0.01, eps=1e-8), lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-8, amsgrad=True)),
        (TorchAdam(lr=0.01, eps=1e-8), lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-8)),
        (SGD(lr=0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
        (
            SGD(lr=0.1, momentum=0.9, nesterov=True),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        ),
        (SGD(lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    ],
    ids=["amsgrad-torch", "adam", "sgd-momentum", "sgd-nesterov", "sgd"],
)
def test_named_variants_match_torch_optim(ours, theirs):
    gen = torch.Generator().manual_seed(2)
    theta0 = torch.randn(20, generator=gen, dtype=torch.float64)
    grads = [torch.randn(20, generator=gen, dtype=torch.float64) for _ in range(25)]
    theta, state = theta0.clone(), ours.init(theta0)
    for g in grads:
        delta, state = ours.update(g, state)
        theta = theta + delta
    assert torch.allclose(theta, _run_torch(theirs, theta0, grads), rtol=1e-10, atol=1e-12)


def test_paper_amsgrad_differs_from_torch_amsgrad():
    g = torch.full((3,), 1e-3, dtype=torch.float64)
    a, _ = AMSGrad(lr=1.0).update(g, AMSGrad().init(g))
    b, _ = TorchAMSGrad(lr=1.0).update(g, TorchAMSGrad().init(g))
    assert not torch.allclose(a, b)  # the eps placement and bias correction matter


def test_identity_one_client_pipeline_equals_centralized_amsgrad():
    # client: ef_step(identity) -> payload; server: weighted_mean -> AMSGrad, for T rounds
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(40, generator=gen) for _ in range(20)]
    opt = AMSGrad(lr=0.01)
    theta = torch.zeros(40)
    state, e = opt.init(theta), torch.zeros(40)
    for g in grads:
        payload, e = ef_step(Identity(), g, e)
        g_bar = weighted_mean([payload], aggregation_weights("uniform", [1]), 40)
        delta, state = opt.update(g_bar, state)
        theta = theta + delta
    ref = reference_amsgrad([0.0] * 40, [g.tolist() for g in grads], 0.01, 0.9, 0.999, 1e-8)
    assert torch.allclose(theta, torch.tensor(ref, dtype=torch.float32), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ({"beta2": -0.1}, r"beta2 must be in \[0, 1\)"),
        ({"eps": 0.0}, "eps must be > 0"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AMSGrad(**kwargs)


def test_registry():
    assert isinstance(make_server_optimizer("amsgrad"), AMSGrad)
    with pytest.raises(ValueError, match="unknown server optimizer 'adamw'"):
        make_server_optimizer("adamw")
