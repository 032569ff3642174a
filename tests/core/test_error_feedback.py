"""Error feedback: telescoping identity, Lemma 2's residual bound, float16 rounding kept in the residual."""

import math

import pytest
import torch

from fl_compams import BlockSign, Identity, SignTopK, TopK, ef_step, make_compressor


@pytest.mark.parametrize(
    "c",
    [TopK(ratio=0.05), TopK(k=1), BlockSign(block_sizes=(30, 70, 100)), SignTopK(ratio=0.1)],
    ids=["topk", "top1", "blocksign", "signtopk"],
)
def test_telescoping_sum_of_sent_plus_residual_equals_sum_of_updates(c):
    g = torch.Generator().manual_seed(0)
    e = torch.zeros(200, dtype=torch.float64)
    sent = torch.zeros_like(e)
    true = torch.zeros_like(e)
    for _ in range(50):
        x = torch.randn(200, generator=g, dtype=torch.float64)
        payload, e = ef_step(c, x, e)
        sent += c.decode(payload)
        true += x
    assert torch.allclose(sent + e, true, atol=1e-10, rtol=0)


def test_identity_leaves_zero_residual_and_no_ef_keeps_none():
    x = torch.randn(10, dtype=torch.float64)
    _, e = ef_step(Identity(), x, torch.zeros_like(x))
    assert torch.count_nonzero(e) == 0
    payload, e = ef_step(TopK(k=2), x, None)
    assert e is None and torch.equal(TopK(k=2).decode(payload), TopK(k=2)(x))


def test_float16_rounding_lands_in_the_residual():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    c = TopK(ratio=0.1, value_dtype="float16")
    payload, e = ef_step(c, x, torch.zeros_like(x))
    kept = payload.indices
    # on the kept coordinates the residual is exactly the rounding error of the float16 values
    assert torch.equal(e[kept], x[kept] - payload.values.float())
    assert torch.count_nonzero(e[kept]) > 0
    assert torch.allclose(c.decode(payload) + e, x, atol=1e-6)


@pytest.mark.parametrize("name,kw,q2", [("topk", {"ratio": 0.1}, 1 - 0.1), ("blocksign", {}, None)])
def test_residual_obeys_lemma_2_bound(name, kw, q2):
    # Lemma 2: ||g_t|| <= G for all t  =>  ||e_t|| <= 2 q G / (1 - q^2)
    d, G = 100, 3.0
    c = make_compressor(name, **kw)
    q2 = q2 if q2 is not None else 1 - 1 / d  # Block-Sign with one block: q^2 = 1 - 1/d
    bound = 2 * math.sqrt(q2) * G / (1 - q2)
    gen = torch.Generator().manual_seed(2)
    e = torch.zeros(d, dtype=torch.float64)
    worst = 0.0
    for t in range(500):
        x = torch.randn(d, generator=gen, dtype=torch.float64)
        if t % 3 == 0:  # adversarial-ish: a fixed direction the compressor keeps dropping
            x = torch.ones(d, dtype=torch.float64) * (1 + 1e-3 * torch.arange(d))
        x = x * (G / x.norm())
        _, e = ef_step(c, x, e)
        worst = max(worst, e.norm().item())
    assert worst <= bound
    assert worst > 0


def test_rejects_residual_of_the_wrong_shape():
    with pytest.raises(ValueError, match="residual must match the update"):
        ef_step(TopK(k=1), torch.zeros(5), torch.zeros(4))
