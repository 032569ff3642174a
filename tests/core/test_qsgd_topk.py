"""QSGD o Top-k / (1 + beta) (Qsparse-local-SGD): contraction, level grid, bits, wire round trip and corruption."""

import math
import struct

import numpy as np
import pytest
import torch

from fl_compams import PayloadError, from_bytes, make_compressor, to_bytes
from fl_compams.codec import HEADER_SIZE, MAGIC
from fl_compams.compressors import QSGDTopK
from fl_compams.compressors.qsgd_topk import qsgd_beta
from fl_compams.config import build_compressor, parse_config
from fl_compams.payloads import Kind

DIM = 97  # odd, so packed bits have padding


def encoded(k=10, levels=5, d=DIM, seed=0, coding="int32"):
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    c = QSGDTopK(k=k, levels=levels, index_coding=coding)
    return x, c, c.encode(x, torch.Generator().manual_seed(seed + 1))


def exact_error(x, k, s):
    """E||x - C(x)||^2 in closed form: the dropped tail, plus the scaled QSGD error on the kept values."""
    idx = torch.topk(x.abs(), k).indices
    y = x[idx]
    norm = y.norm()
    r = y.abs() * s / norm
    frac = r - r.floor()
    var = ((norm / s) ** 2 * frac * (1 - frac)).sum()  # E||Q(y) - y||^2
    c = 1 / (1 + qsgd_beta(k, s))
    # E||y - c Q(y)||^2 = (1 - c)^2 ||y||^2 + c^2 Var
    return (x.square().sum() - y.square().sum()) + (1 - c) ** 2 * y.square().sum() + c**2 * var


@pytest.mark.parametrize("d,k,s", [(50, 5, 1), (50, 5, 4), (200, 20, 2), (64, 64, 8), (30, 1, 3)])
def test_contraction_by_monte_carlo(d, k, s):
    # E||x - C(x)||^2 <= (1 - gamma)||x||^2 with gamma = k / (d (1 + beta_{k,s})) (algorithms.md 5.1)
    x = torch.randn(d, generator=torch.Generator().manual_seed(d + k + s), dtype=torch.float64)
    c = QSGDTopK(k=k, levels=s)
    gen = torch.Generator().manual_seed(1)
    errors = torch.tensor([float((x - c(x, gen)).square().sum()) for _ in range(3000)], dtype=torch.float64)
    mean, se = float(errors.mean()), float(errors.std() / math.sqrt(errors.numel()))
    exact = float(exact_error(x, k, s))
    bound = (1 - c.gamma(d)) * float(x.square().sum())
    assert abs(mean - exact) <= 5 * se + 1e-12  # the Monte Carlo mean is the closed form
    assert exact <= bound * (1 + 1e-12) and mean <= bound + 5 * se
    assert c.gamma(d) == pytest.approx(k / (d * (1 + min(k / s**2, math.sqrt(k) / s))))


def test_scaled_back_it_is_unbiased_on_the_top_k():
    x = torch.randn(40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = QSGDTopK(k=8, levels=2)
    gen = torch.Generator().manual_seed(4)
    n = 4000
    mean = sum(c(x, gen) for _ in range(n)) / n * (1 + qsgd_beta(8, 2))
    top = torch.zeros_like(x)
    idx = torch.topk(x.abs(), 8).indices
    top[idx] = x[idx]
    step = float(x[idx].norm()) / 2  # one level; per-coordinate sd <= step / 2
    assert torch.all((mean - top).abs() <= 5 * (step / 2) / math.sqrt(n))


def test_values_lie_on_the_scaled_level_grid_of_the_top_k():
    x, c, p = encoded(k=12, levels=3)
    out = c.decode(p)
    kept = torch.topk(x.abs(), 12).indices.sort().values
    assert torch.equal(p.indices, kept) and int(torch.count_nonzero(out)) <= 12
    unit = float(x[kept].norm()) / (1 + qsgd_beta(12, 3)) / 3
    grid = out[kept].abs() / unit
    assert torch.allclose(grid, grid.round(), atol=1e-5) and grid.max() <= 3
    nonzero = out[kept] != 0
    assert torch.equal(torch.sign(out[kept][nonzero]), torch.sign(x[kept][nonzero]))


def test_needs_a_generator_and_is_reproducible():
    x = torch.randn(100)
    with pytest.raises(ValueError, match=r"seeded torch\.Generator"):
        QSGDTopK(ratio=0.1)(x)
    a = QSGDTopK(ratio=0.1)(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, QSGDTopK(ratio=0.1)(x, torch.Generator().manual_seed(7)))


def test_theory_bits_and_measured_bytes():
    d, k, s = 10_000, 100, 4
    c = QSGDTopK(k=k, levels=s)
    assert c.theory_bits(d) == k * (1 + 3) + 32 + k * 14
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    data = to_bytes(c.encode(x, torch.Generator().manual_seed(1)))
    # header | nnz | k u32 indices | levels | scale | k sign bits | k magnitudes of bit_length(4) = 3 bits
    assert len(data) == HEADER_SIZE + 4 + 4 * k + 4 + 4 + (k + 7) // 8 + (3 * k + 7) // 8


def test_config_builds_it_and_rejects_bad_levels():
    cfg = parse_config({"compressor": "qsgd-topk", "topk-k": 7, "qsgd-levels": 6, "index-coding": "varint"})
    assert build_compressor(cfg.compression) == QSGDTopK(k=7, levels=6, index_coding="varint")
    with pytest.raises(ValueError, match="qsgd-levels"):
        parse_config({"compressor": "qsgd-topk", "qsgd-levels": 0})
    with pytest.raises(ValueError, match="levels"):
        QSGDTopK(ratio=0.1, levels=0)


@pytest.mark.parametrize("coding", ["int32", "varint"])
@pytest.mark.parametrize("k,levels", [(1, 1), (10, 5), (DIM, 255), (30, 32768)])
def test_round_trip_is_exact_and_canonical(coding, k, levels):
    _, c, p = encoded(k=k, levels=levels, coding=coding)
    data = to_bytes(p)
    back = from_bytes(data, DIM)
    assert back.kind == Kind.QSGD_TOPK
    assert torch.equal(c.decode(back), c.decode(p))
    assert to_bytes(back) == data
    out = torch.zeros(DIM)
    back.add_to(out, 0.5)
    assert torch.allclose(out, 0.5 * c.decode(p))


def _body_offsets(data, k):
    """Offsets of levels, scale, signs and magnitudes in an int32-coded payload with k indices."""
    levels = HEADER_SIZE + 4 + 4 * k
    return levels, levels + 4, levels + 8, levels + 8 + (k + 7) // 8


def test_rejects_every_corruption_with_payload_error():
    k = 10
    _, _, p = encoded(k=k, levels=5)
    data = to_bytes(p)
    lv, sc, sg, mg = _body_offsets(data, k)
    bad = {
        "levels 0": data[:lv] + struct.pack("<I", 0) + data[lv + 4 :],
        "levels too many": data[:lv] + struct.pack("<I", 2**15 + 1) + data[lv + 4 :],
        "negative scale": data[:sc] + struct.pack("<f", -1.0) + data[sc + 4 :],
        "nan scale": data[:sc] + struct.pack("<f", float("nan")) + data[sc + 4 :],
        "sign padding": data[:sg] + bytes([data[sg], data[sg + 1] | 1]) + data[sg + 2 :],
        "magnitude above levels": data[:mg] + b"\xff" + data[mg + 1 :],  # 3-bit levels 7 > 5
        "nnz above dim": data[:HEADER_SIZE] + struct.pack("<I", DIM + 1) + data[HEADER_SIZE + 4 :],
        "trailing byte": data + b"\x00",
    }
    for what, body in bad.items():
        with pytest.raises(PayloadError):
            from_bytes(body, DIM)
            pytest.fail(what)
    for cut in range(len(data)):  # every truncation
        with pytest.raises(PayloadError):
            from_bytes(data[:cut], DIM)
    with pytest.raises(PayloadError, match="dimension"):
        from_bytes(data, DIM + 1)


def test_fuzz_random_and_mutated_bodies_only_raise_payload_error():
    rng = np.random.default_rng(2026)
    seeds = [
        to_bytes(encoded(k=k, levels=s, seed=i)[2]) for i, (k, s) in enumerate([(5, 1), (20, 6), (97, 3)])
    ]
    header = struct.pack("<4sBBBBI", MAGIC, 1, int(Kind.QSGD_TOPK), 0, 0, DIM)
    accepted = 0
    for i in range(20_000):
        if i % 4 == 0:
            data = header + rng.integers(0, 256, rng.integers(0, 120), dtype=np.uint8).tobytes()
        else:
            buf = bytearray(seeds[i % len(seeds)])
            for _ in range(rng.integers(1, 4)):
                j = rng.integers(max(1, len(buf)))
                if rng.random() < 0.5 and buf:
                    buf[j] ^= 1 << rng.integers(8)
                else:
                    buf = (
                        buf[:j]
                        if rng.random() < 0.5
                        else buf + rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
                    )
            data = bytes(buf)
        try:
            out = from_bytes(data, DIM).decode()
        except PayloadError:
            continue
        accepted += 1
        assert out.shape == (DIM,) and bool(torch.isfinite(out).all())
    assert accepted > 100  # the mutations reach the deep paths (values that still parse)


def test_registered_under_its_name():
    assert isinstance(make_compressor("qsgd-topk", ratio=0.01), QSGDTopK)
