"""Fuzzing the wire codec: random bytes and mutated valid payloads of every kind.

Whatever the input, ``from_bytes`` either returns a payload that decodes to a finite vector of the expected
dimension, or raises ``PayloadError``; nothing else escapes, and memory stays within a small multiple of the
input size and the model dimension.
"""

import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_compams import PayloadError, from_bytes, make_compressor, to_bytes
from fl_compams.codec import HEADER_SIZE, MAGIC
from fl_compams.payloads import Kind

DIM = 97  # odd, so packed sign bits have padding
KINDS = {
    "identity": {},
    "identity16": {"value_dtype": "float16"},
    "topk": {"ratio": 0.1},
    "topk-varint16": {"ratio": 0.1, "index_coding": "varint", "value_dtype": "float16"},
    "blocksign": {"block_sizes": (40, 7, 50)},
    "randk": {"ratio": 0.1},
    "mvss": {"density": 0.1, "index_coding": "varint"},
    "qsgd": {"levels": 6, "bucket_size": 16},
    "signtopk": {"ratio": 0.1},
    "signtopk-varint": {"ratio": 0.1, "index_coding": "varint"},
    "laq": {"bits": 3},
    "laq-1": {"bits": 1},
    "laq-16": {"bits": 16},
}
# Counters of how many cases ran (reported by the last test; docs/reliability.md quotes them).
CASES = {"random": 0, "mutated": 0, "mutated_accepted": 0}


def seeds():
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, kw in KINDS.items():
        c = make_compressor(name.split("-")[0].rstrip("16"), **kw)
        for _ in range(3):
            out.append(to_bytes(c.encode(torch.randn(DIM, generator=gen), gen)))
    return out


SEEDS = seeds()


def check(data: bytes) -> bool:
    """True if accepted (and then it must decode), False if rejected with PayloadError."""
    try:
        payload = from_bytes(data, DIM)
    except PayloadError:
        return False
    out = payload.decode()
    if out.shape != (DIM,) or not bool(torch.isfinite(out).all()):
        raise AssertionError(f"accepted payload decodes badly: {out.shape}")
    return True


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_payload_error(data):
    CASES["random"] += 1
    check(data)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bodies_behind_a_valid_header(body):
    CASES["random"] += 1
    for kind in Kind:
        check(struct.pack("<4sBBBBI", MAGIC, 1, int(kind), 0, 0, DIM) + body)


def mutate(rng: np.random.Generator, data: bytes) -> bytes:
    buf = bytearray(data)
    if len(buf) < 8:
        return bytes(buf) + rng.integers(0, 256, rng.integers(0, 32), dtype=np.uint8).tobytes()
    op = rng.integers(7)
    if op == 0:  # flip bits
        for _ in range(rng.integers(1, 9)):
            i = rng.integers(len(buf))
            buf[i] ^= 1 << rng.integers(8)
    elif op == 1:  # truncate
        buf = buf[: rng.integers(len(buf))]
    elif op == 2:  # extend
        buf += rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8).tobytes()
    elif op == 3:  # absurd dimension or count fields in the header and first body words
        pos = rng.choice([8, HEADER_SIZE, HEADER_SIZE + 4, HEADER_SIZE + 8])
        value = rng.choice([0, 1, DIM - 1, DIM + 1, 2**31, 2**32 - 1])
        if pos + 4 <= len(buf):
            buf[pos : pos + 4] = struct.pack("<I", int(value))
    elif op == 4:  # overwrite a random run with random bytes
        i = rng.integers(len(buf))
        n = rng.integers(1, 16)
        buf[i : i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif op == 5:  # splice with another payload
        other = SEEDS[rng.integers(len(SEEDS))]
        cut = rng.integers(len(buf))
        buf = buf[:cut] + other[rng.integers(len(other)) :]
    else:  # change kind, dtype or coding byte
        buf[rng.integers(5, 8)] = rng.integers(0, 10)
    return bytes(buf)


def test_mutation_fuzz_every_kind():
    rng = np.random.default_rng(2024)
    start = time.perf_counter()
    n = 200_000
    accepted = 0
    for i in range(n):
        data = SEEDS[i % len(SEEDS)]
        for _ in range(rng.integers(1, 4)):
            data = mutate(rng, data)
        accepted += check(data)
    CASES["mutated"] += n
    CASES["mutated_accepted"] += accepted
    assert (
        accepted > 1000
    )  # the mutations also reach the deep paths (values, scales, indices that still parse)
    assert time.perf_counter() - start < 120


def test_memory_stays_bounded():
    rng = np.random.default_rng(7)
    worst = 0.0
    for i in range(1500):
        data = mutate(rng, SEEDS[i % len(SEEDS)])
        tracemalloc.start()
        try:
            check(data)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        worst = max(worst, peak / (len(data) + 4 * DIM))
    assert worst < 64, worst


def test_huge_claims_are_cheap():
    # a 20-byte message claiming 2^32-1 coordinates, or 2^31 non-zeros, is rejected without allocating
    header = struct.pack("<4sBBBBI", MAGIC, 1, int(Kind.TOPK), 0, 1, 10**9) + struct.pack("<II", 2**31, 2**31)
    tracemalloc.start()
    with pytest.raises(PayloadError):
        from_bytes(header, 10**9)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000


def test_report_case_counts():
    # ordered last in this file: the counts of the fuzz cases that ran in this session
    print(f"codec fuzz cases: {CASES}")
    assert CASES["mutated"] >= 200_000 or CASES["random"] == 0
