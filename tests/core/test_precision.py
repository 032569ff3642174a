"""Compact storage of state vectors (fl_compams.precision): the rounding error stays within the dtype's bound."""

import pytest
import torch

from fl_compams import precision

COMPACT = ("float16", "bfloat16")


def wide_vector(n=20_000, seed=0):
    """Signed values spread over 14 decades (1e-8 .. 1e6), as residuals of very different coordinates are."""
    g = torch.Generator().manual_seed(seed)
    mags = 10.0 ** (torch.rand(n, generator=g) * 14 - 8)
    return torch.where(torch.rand(n, generator=g) < 0.5, -mags, mags).float()


@pytest.mark.parametrize("dtype", COMPACT)
def test_rounding_error_is_within_unit_roundoff_per_element(dtype):
    x = wide_vector()
    r = precision.round_to(x, dtype)
    err = (r - x).abs()
    assert bool((err <= precision.element_bound(x, dtype)).all())
    # not vacuous: the values really were rounded to the dtype's significand, and close to its unit roundoff
    rel = (err / x.abs())[x.abs() > 1e-2 * x.abs().max()]
    u = precision.UNIT_ROUNDOFF[dtype]
    assert u / 4 < float(rel.max()) <= u


@pytest.mark.parametrize("dtype", COMPACT)
def test_stored_values_are_two_bytes_and_read_back_exactly(dtype):
    x = wide_vector(1000, seed=1)
    values, k = precision.encode(x, dtype)
    assert values.element_size() == precision.itemsize(dtype) == 2
    assert torch.equal(precision.decode(values, k), precision.round_to(x, dtype))
    assert torch.equal(precision.round_to(precision.round_to(x, dtype), dtype), precision.round_to(x, dtype))


@pytest.mark.parametrize("dtype", COMPACT)
def test_rounding_is_idempotent_even_where_the_largest_element_rounds_to_a_power_of_two(dtype):
    near = [2.0**15 - 1, 2.0**14 + 1, 2.0**15 - 2**-3, 2.0**14 + 2**-4, 1.0, 2.0**14]  # tie / boundary cases
    cases = [wide_vector(3000, seed=s) for s in range(3)]
    cases += [torch.tensor([top, 0.3, -1e-3, 2.0**-20, 5e-9]) * 2.0**j for top in near for j in (-30, 0, 7)]
    # the largest rounds up to 2**15; the smallest is a normal float16 whose last bit a coarser scale would drop
    cases.append(torch.tensor([2.0**15 - 1, 2.0**-14 + 2.0**-24]))
    for x in cases:
        once = precision.round_to(x, dtype)
        assert torch.equal(precision.round_to(once, dtype), once)


def test_float16_is_scaled_so_large_and_small_vectors_neither_overflow_nor_flush():
    big = torch.tensor([1e6, -7e4, 3.0, 0.1])  # within 2**-28 of the largest: normal once scaled
    small = torch.tensor([3e-7, -1e-9, 2e-10])
    assert not torch.isfinite(big.half().float()).all() and small.half().float()[1:].eq(0).all()  # plain fp16
    for x in (big, small):
        r = precision.round_to(x, "float16")
        assert bool(((r - x).abs() <= precision.UNIT_ROUNDOFF["float16"] * x.abs()).all())


def test_float32_stores_the_vector_itself():
    x = wide_vector(100)
    values, k = precision.encode(x, "float32")
    assert values is x and k == 0 and precision.itemsize("float32") == 4


def test_zero_and_empty_vectors_and_bad_input():
    for dtype in COMPACT:
        assert torch.equal(precision.round_to(torch.zeros(5), dtype), torch.zeros(5))
        assert precision.round_to(torch.zeros(0), dtype).numel() == 0
        with pytest.raises(ValueError, match="NaN or infinite"):
            precision.encode(torch.tensor([1.0, float("nan")]), dtype)
    with pytest.raises(ValueError, match="state dtype must be one of"):
        precision.encode(torch.ones(2), "float8")
