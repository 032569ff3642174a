"""sigma_g^2 of a split at a fixed model: zero when every client has all the data, larger for skewed splits."""

import torch

from fl_compams.config import parse_config
from tasks.heterogeneity import split_sigma_g2
from tasks.task import client_data, model_for_task
from tasks.training import full_gradient


def _cfg(**overrides):
    return parse_config({"min-partition-size": 0, **overrides})


def test_identical_clients_have_zero_dissimilarity():
    cfg = _cfg(partitioner="full")
    h = split_sigma_g2(cfg.data, 4, 0, model_for_task(cfg.data, 0))
    assert h.sigma_g2 < 1e-12 * h.mean_grad_sq_norm and h.weighted_sigma_g2 < 1e-12 * h.mean_grad_sq_norm
    assert h.mean_grad_sq_norm > 0


def test_equals_the_definition_and_leaves_the_model_unchanged():
    cfg = _cfg(**{"dirichlet-alpha": 0.3})
    model = model_for_task(cfg.data, 1)
    before = [p.detach().clone() for p in model.parameters()]
    h = split_sigma_g2(cfg.data, 5, 1, model)
    grads = []
    for pid in range(5):
        x, y = client_data(cfg.data, pid, 5, 1, torch.device("cpu"))
        grads.append(full_gradient(model, x, y, batch_size=64)[0].double())
    g = torch.stack(grads)
    expected = float(((g - g.mean(0)) ** 2).sum(1).mean())
    assert abs(h.sigma_g2 - expected) <= 1e-6 * expected
    assert h.client_sizes == tuple(int(client_data(cfg.data, p, 5, 1, "cpu")[0].shape[0]) for p in range(5))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_skewed_split_is_more_dissimilar_than_an_iid_one_at_the_same_model():
    iid, skewed = _cfg(partitioner="iid"), _cfg(**{"dirichlet-alpha": 0.05})
    model = model_for_task(iid.data, 0)
    assert (
        split_sigma_g2(skewed.data, 10, 0, model).sigma_g2
        > 5 * split_sigma_g2(iid.data, 10, 0, model).sigma_g2
    )
