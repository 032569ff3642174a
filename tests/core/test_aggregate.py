"""In-place aggregation of decoded payloads."""

import pytest
import torch

from fl_compams import (
    BlockSign,
    TopK,
    aggregation_weights,
    from_bytes,
    make_compressor,
    to_bytes,
    weighted_mean,
)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("topk", {"ratio": 0.1}),
        ("blocksign", {"block_sizes": (30, 70)}),
        ("identity", {}),
        ("signtopk", {"ratio": 0.1}),
        ("qsgd", {"levels": 3}),
    ],
)
def test_weighted_mean_equals_dense_average(name, kw):
    gen = torch.Generator().manual_seed(0)
    c = make_compressor(name, **kw)
    payloads = [c.encode(torch.randn(100, generator=gen), gen) for _ in range(5)]
    payloads = [from_bytes(to_bytes(p), 100) for p in payloads]  # as the server sees them
    weights = aggregation_weights("num-examples", [1, 2, 3, 4, 10])
    got = weighted_mean(payloads, weights, 100)
    expected = sum(w * c.decode(p) for w, p in zip(weights, payloads, strict=True))
    assert torch.allclose(got, expected, atol=1e-6)


def test_weights():
    assert aggregation_weights("uniform", [5, 1]) == [0.5, 0.5]
    assert aggregation_weights("num-examples", [3, 1]) == [0.75, 0.25]
    with pytest.raises(ValueError, match="unknown weighting"):
        aggregation_weights("median", [1])
    with pytest.raises(ValueError, match="zero replies"):
        aggregation_weights("uniform", [])


def test_dimension_mismatch_is_rejected():
    p = TopK(k=1).encode(torch.ones(10))
    with pytest.raises(ValueError, match="dimension 10, expected 11"):
        weighted_mean([p], [1.0], 11)


def test_blocksign_add_to_matches_decode():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    p = BlockSign(block_sizes=(1, 499, 500)).encode(x)
    out = torch.ones(1000)
    p.add_to(out, 0.5)
    assert torch.allclose(out, 1 + 0.5 * p.decode())


def test_payload_to_its_own_device_is_itself():
    p = make_compressor("topk", ratio=0.1).encode(torch.randn(100))
    assert p.to("cpu") is p
