"""Mathematical properties of every compressor (Li et al. Defs. 1-2, Remark 1; baselines' papers)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fl_compams import COMPRESSORS, MVSS, QSGD, BlockSign, Identity, RandK, SignTopK, TopK, make_compressor
from fl_compams.kernels import blocksign_decode, blocksign_encode, topk_indices

finite64 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=64)


def vectors(min_size=1, max_size=300):
    """float64 vectors, with many ties and zeros mixed in."""
    tied = st.sampled_from([0.0, 1.0, -1.0, 2.5, -2.5])
    return arrays(np.float64, st.integers(min_size, max_size), elements=st.one_of(finite64, tied)).map(
        torch.from_numpy
    )


# ------------------------------------------------------------------------------------------------ Top-k
@settings(max_examples=200, deadline=None)
@given(x=vectors(), frac=st.floats(0.0, 1.0))
def test_topk_error_is_sum_of_smallest_squares_and_contracts(x, frac):
    d = x.numel()
    k = max(1, min(d, int(frac * d)))
    c = TopK(k=k)
    cx = c(x)
    err = (cx - x).square().sum().item()
    smallest = torch.sort(x.square()).values[: d - k].sum().item()
    assert err == pytest.approx(smallest, rel=1e-12, abs=1e-12)
    assert err <= (1 - k / d) * x.square().sum().item() * (1 + 1e-12) + 1e-12
    assert c.encode(x).values.numel() == k  # exactly k values sent
    assert torch.equal(c(cx), cx)  # idempotent


@settings(max_examples=200, deadline=None)
@given(x=vectors(), frac=st.floats(0.0, 1.0))
def test_topk_matches_reference_with_lowest_index_ties(x, frac):
    d = x.numel()
    k = max(1, min(d, int(frac * d)))
    a = x.abs().numpy()
    # reference: sort by (-|x|, index) and take the first k
    ref = np.sort(np.lexsort((np.arange(d), -a))[:k])
    got = topk_indices(x, k).numpy()
    assert np.array_equal(got, ref)
    assert np.array_equal(topk_indices(x, k, device_path=True).numpy(), ref)


@pytest.mark.parametrize("d,k", [(10_000, 100), (100_000, 1000), (50_000, 1), (4096, 4096)])
def test_topk_large_vectors_exact_on_both_paths(d, k, gen):
    x = torch.randn(d, generator=gen)
    x[::7] = 0.5  # heavy ties
    x[::11] = 0.0
    ref = np.sort(np.lexsort((np.arange(d), -x.abs().numpy()))[:k])
    assert np.array_equal(topk_indices(x, k).numpy(), ref)
    assert np.array_equal(topk_indices(x, k, device_path=True).numpy(), ref)


def test_topk_adversarial_layout_falls_back_but_stays_exact():
    # the strided sample sees only small values: the threshold estimate must be corrected
    d, k = 200_000, 2000
    x = torch.zeros(d)
    stride = max(1, d // 65536)
    x[1::stride] = torch.linspace(1.0, 2.0, len(range(1, d, stride)))
    ref = np.sort(np.lexsort((np.arange(d), -x.abs().numpy()))[:k])
    assert np.array_equal(topk_indices(x, k).numpy(), ref)


def test_topk_ratio_resolution():
    assert TopK(ratio=0.01).k_for(1000) == 10
    assert TopK(ratio=0.001).k_for(100) == 1  # never zero
    assert TopK(k=50).k_for(10) == 10
    with pytest.raises(ValueError, match="exactly one of k or ratio"):
        TopK(k=3, ratio=0.1)
    with pytest.raises(ValueError, match="ratio must be in"):
        TopK(ratio=1.5)


# --------------------------------------------------------------------------------------------- Block-Sign
def block_split(draw_sizes, d):
    sizes, left = [], d
    for s in draw_sizes:
        if left <= 0:
            break
        s = min(s, left)
        sizes.append(s)
        left -= s
    if left > 0:
        sizes.append(left)
    return tuple(sizes)


@settings(max_examples=200, deadline=None)
@given(x=vectors(), raw_sizes=st.lists(st.integers(1, 50), max_size=12))
def test_blocksign_exact_error_identity(x, raw_sizes):
    sizes = block_split(raw_sizes, x.numel())
    c = BlockSign(block_sizes=sizes)
    cx = c(x)
    err = (cx - x).square().sum().item()
    expected = sum((b.square().sum() - b.abs().sum() ** 2 / b.numel()).item() for b in torch.split(x, sizes))
    norm2 = x.square().sum().item()
    assert err == pytest.approx(expected, rel=1e-9, abs=1e-9 * max(1.0, norm2))
    assert err <= (1 - 1 / max(sizes)) * norm2 * (1 + 1e-9) + 1e-9
    for b, cb in zip(torch.split(x, sizes), torch.split(cx, sizes), strict=True):
        scale = b.abs().sum() / b.numel()
        assert torch.allclose(cb.abs(), scale.expand_as(cb), rtol=1e-12)  # constant magnitude per block
        assert torch.all((cb >= 0) == (b >= 0))  # sign(0) = +1
        assert cb.abs().sum().item() == pytest.approx(b.abs().sum().item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(c(cx), cx, rtol=1e-12, atol=0)  # idempotent


def test_blocksign_zero_maps_to_plus_and_one_element_blocks_are_exact():
    x = torch.tensor([0.0, -3.0, 0.0, 2.0, -1.0], dtype=torch.float64)
    c = BlockSign(block_sizes=(1, 1, 3))
    out = c(x)
    assert out[0] == 0.0 and out[1] == -3.0  # 1-element blocks reproduce x exactly
    assert torch.equal(out[2:], torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))  # sign(0)=+1, scale 1


def test_blocksign_rejects_wrong_blocks():
    with pytest.raises(ValueError, match="sum to 5 but the vector has 6"):
        BlockSign(block_sizes=(2, 3)).encode(torch.zeros(6))
    with pytest.raises(ValueError, match="positive"):
        BlockSign(block_sizes=(2, 0))


@pytest.mark.parametrize("d", [1, 7, 8, 9, 1000, 123_457])
def test_blocksign_kernels_agree_between_cpu_and_device_paths(d, gen):
    x = torch.randn(d, generator=gen)
    sizes = block_split([3, 100, 5000], d)
    s1, sc1 = blocksign_encode(x, sizes)
    s2, sc2 = blocksign_encode(x, sizes, device_path=True)
    assert torch.equal(s1, s2) and torch.equal(sc1, sc2)
    assert torch.equal(
        blocksign_decode(s1, sc1, sizes, d), blocksign_decode(s1, sc1, sizes, d, device_path=True)
    )


@pytest.mark.parametrize("d", [131_072, 1_000_003])
def test_blocksign_scale_is_exact_to_float32_rounding_on_large_blocks(d, gen):
    """The L1 scale is accumulated in float64: within one float32 rounding of the exact mean |x| on both paths.

    (A float32 accumulation was off by 1.7e-4 relative on a 131k block and 8.9e-4 on 1e6 on an H200.)
    """
    x = torch.randn(d, generator=gen) * 3 + 1  # a non-zero mean makes naive float32 sums drift
    sizes = (d // 3, d - d // 3)
    exact = torch.stack([b.double().abs().sum() / b.numel() for b in torch.split(x, sizes)])
    for path in (False, True):
        _, scales = blocksign_encode(x, sizes, device_path=path)
        assert scales.dtype == torch.float32
        assert ((scales.double() - exact).abs() / exact).max() <= 2.0**-24  # half an ulp: correctly rounded


# ------------------------------------------------------------------------------------------ Sign-Top-k
@settings(max_examples=100, deadline=None)
@given(x=vectors(), frac=st.floats(0.0, 1.0))
def test_signtopk_exact_error_identity(x, frac):
    d = x.numel()
    k = max(1, min(d, int(frac * d)))
    cx = SignTopK(k=k)(x)
    top = TopK(k=k)(x)
    expected = x.square().sum() - top.abs().sum() ** 2 / k
    err = (cx - x).square().sum()
    assert err.item() == pytest.approx(
        expected.item(), rel=1e-9, abs=1e-9 * max(1.0, x.square().sum().item())
    )
    assert int(torch.count_nonzero(cx)) <= k


# ------------------------------------------------------------------------------------- unbiased operators
def _mc_mean_var(c, x, n, seed):
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(x)
    total_sq = torch.zeros_like(x)
    nnz = 0
    for _ in range(n):
        p = c.encode(x, g)
        y = c.decode(p).to(torch.float64)
        total += y
        total_sq += (y - x) ** 2
        nnz += int(torch.count_nonzero(y))
    return total / n, total_sq / n, nnz / n


def test_mvss_probabilities_hit_the_density_exactly_and_scale_with_magnitude(gen):
    x = torch.randn(2000, generator=gen, dtype=torch.float64) ** 3
    x[:50] = 0.0
    c = MVSS(density=0.05)
    p = c.probabilities(x)
    assert p.sum().item() == pytest.approx(0.05 * 2000, rel=1e-9)
    assert torch.all((p == 0) == (x == 0)) and torch.all((p >= 0) & (p <= 1))
    unsat = (p < 1) & (x != 0)
    ratio = p[unsat] / x[unsat].abs()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-9)  # p_i = lambda |x_i| off saturation
    assert torch.all(x[p == 1].abs() >= x[unsat].abs().max())  # saturated are the largest


def test_mvss_is_unbiased_with_the_predicted_variance():
    # 5-sigma Monte Carlo bounds with a fixed seed: fails only if the mean or variance is wrong.
    x = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = MVSS(density=0.1)
    n = 4000
    mean, msq, nnz = _mc_mean_var(c, x, n, seed=1)
    p = c.probabilities(x)
    var = x**2 * (1 / p - 1)
    assert torch.all((mean - x).abs() <= 5 * torch.sqrt(var / n) + 1e-12)
    assert msq.sum().item() == pytest.approx(var.sum().item(), rel=0.1)
    assert nnz == pytest.approx(0.1 * 200, rel=0.05)


def test_mvss_full_density_is_identity(gen):
    x = torch.randn(100, generator=gen, dtype=torch.float64)
    assert torch.equal(MVSS(density=1.0)(x, gen), x)


@pytest.mark.parametrize("levels,bucket", [(1, 0), (4, 0), (2, 16)])
def test_qsgd_is_unbiased_within_its_variance_bound(levels, bucket):
    x = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = QSGD(levels=levels, bucket_size=bucket)
    n = 4000
    mean, msq, _ = _mc_mean_var(c, x, n, seed=2)
    b = bucket or 64
    bound = min(b / levels**2, math.sqrt(b) / levels) * x.square().sum().item()
    assert msq.sum().item() <= bound * 1.1
    # per-coordinate variance <= (norm/s)^2 / 4; 5-sigma mean check
    norm = x.square().sum().sqrt().item() if bucket == 0 else x.view(-1, b).norm(dim=1).max().item()
    assert torch.all((mean - x).abs() <= 5 * (norm / levels / 2) / math.sqrt(n))


def test_qsgd_values_lie_on_the_level_grid(gen):
    x = torch.randn(100, generator=gen, dtype=torch.float64)
    y = QSGD(levels=3)(x, gen)
    grid = y.abs() / x.norm() * 3
    assert torch.allclose(grid, grid.round(), atol=1e-9) and grid.max() <= 3


def test_randk_counts_and_unbiased_scaled_form():
    x = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    p = RandK(k=5).encode(x, g)
    assert p.indices.numel() == 5 and torch.equal(p.values, x[p.indices])
    mean, _, _ = _mc_mean_var(RandK(k=5, scaled=True), x, 4000, seed=4)
    sd = torch.sqrt(x**2 * (50 / 5 - 1) / 4000)
    assert torch.all((mean - x).abs() <= 5 * sd)


def test_random_compressors_require_an_explicit_generator():
    for c in (MVSS(), QSGD(), RandK(ratio=0.1)):
        with pytest.raises(ValueError, match=r"seeded torch\.Generator"):
            c.encode(torch.ones(10))


def test_random_compressors_are_reproducible_for_a_seed():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for c in (MVSS(), QSGD(levels=2), RandK(ratio=0.05)):
        a = c(x, torch.Generator().manual_seed(7))
        b = c(x, torch.Generator().manual_seed(7))
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_builds_every_compressor_and_rejects_unknown():
    assert set(COMPRESSORS) == {
        "identity",
        "topk",
        "blocksign",
        "randk",
        "mvss",
        "qsgd",
        "signtopk",
        "qsgd-topk",
        "sign",
        "laq",
    }
    assert isinstance(make_compressor("topk", ratio=0.1), TopK)
    with pytest.raises(ValueError, match="unknown compressor 'top-k'"):
        make_compressor("top-k")


def test_theory_bits_follow_the_formulas():
    d = 10_000
    assert Identity().theory_bits(d) == 32 * d
    assert TopK(ratio=0.01).theory_bits(d) == 100 * (32 + 14)
    assert TopK(ratio=0.01, value_dtype="float16").theory_bits(d) == 100 * (16 + 14)
    assert BlockSign(block_sizes=(5000, 5000)).theory_bits(d) == d + 64
    assert SignTopK(k=100).theory_bits(d) == 100 + 32 + 100 * 14
    assert QSGD(levels=4).theory_bits(d) == 32 + d * (1 + 3)
    assert MVSS(density=0.01).theory_bits(d) == pytest.approx(100 * 46)


def test_float16_values_saturate_instead_of_overflowing():
    x = torch.tensor([1e6, -2.0, 0.5])
    p = TopK(k=1, value_dtype="float16").encode(x)
    assert p.values.dtype == torch.float16 and torch.isfinite(p.values).all()
    assert p.values.item() == 65504.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "name,kw", [("topk", {"ratio": 0.01}), ("blocksign", {}), ("signtopk", {"ratio": 0.01})]
)
def test_cuda_encode_matches_cpu(name, kw):
    """CPU and CUDA select the same coordinates and signs; scales agree to one float32 rounding.

    Scales are float64 sums on both devices, summed in different orders, so the final float32 rounding may
    differ by one unit in the last place (relative 2**-23); nothing else may differ.
    """
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    c = make_compressor(name, **kw)
    cpu, cuda = c(x), c(x.cuda()).cpu()
    assert torch.equal(cpu != 0, cuda != 0) and torch.equal(cpu > 0, cuda > 0)
    torch.testing.assert_close(cuda, cpu, rtol=2.0**-23, atol=0.0)
