"""A compressor defined outside the package plugs into config, protocol, codec, error feedback and the server.

``Halve`` keeps the even coordinates times ``halve-scale`` (its own run-config key) and travels under its own
kind byte (200) with its own wire body; nothing in fl_compams is edited to add it, and the registration is
undone after each test.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from fl_compams import (
    ConfigError,
    PayloadError,
    build_compressor,
    build_server_optimizer,
    ef_step,
    from_bytes,
    parse_config,
    protocol,
    to_bytes,
)
from fl_compams.algorithm import (
    Outcome,
    ServerReply,
    WorkerState,
    instruction_for,
    server_step,
    worker_begin,
    worker_end,
)
from fl_compams.codec import HEADER_SIZE, MAGIC, Reader, Writer
from fl_compams.compressors import COMPRESSORS, Compressor, Payload, registered
from fl_compams.compressors.base import TOPK_RATIO, register
from fl_compams.config import build_algorithm, schema
from fl_compams.schema import key, num_range
from fl_compams.server import apply_round, init_server_state

KIND = 200
D = 11


@dataclass(frozen=True, eq=False)
class HalvePayload(Payload):
    """``values`` = the kept coordinates 0, 2, 4, ...; body ``stride u32 (= 2) | values f32[ceil(d/2)]``."""

    dim: int
    values: torch.Tensor
    kind: int = KIND

    def decode(self) -> torch.Tensor:
        out = torch.zeros(self.dim, dtype=self.values.dtype, device=self.values.device)
        out[::2] = self.values
        return out

    def write_body(self, w: Writer) -> None:
        w.u32(2)
        w.f32(self.values)

    @classmethod
    def read_body(cls, r: Reader, kind: int, dim: int) -> HalvePayload:
        stride = r.u32("stride")
        if stride != 2:
            raise PayloadError(f"halve: expected stride 2, got {stride}")
        return cls(dim, r.f32((dim + 1) // 2, "values"))


@dataclass(frozen=True)
class Halve(Compressor):
    """``C(x)_i = scale * x_i`` for even i, else 0."""

    scale: float = 1.0
    name: ClassVar[str] = "halve"
    kind: ClassVar[int] = KIND
    payload_type: ClassVar[type[Payload]] = HalvePayload
    config_keys = (
        key("halve-scale", 1.0, num_range(0.0, 1.0, lo_open=True), "scale of the kept coordinates"),
    )

    @classmethod
    def from_config(cls, values, block_sizes=None) -> Halve:
        return cls(scale=values["halve-scale"])

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> HalvePayload:
        return HalvePayload(x.numel(), x[::2] * self.scale)


@pytest.fixture
def halve():
    with registered(Halve):
        yield Halve
    assert "halve" not in COMPRESSORS


def test_config_accepts_validates_and_sends_the_new_key(halve):
    cfg = parse_config({"compressor": "halve", "halve-scale": 0.5})
    assert cfg.compression.params["halve-scale"] == 0.5
    flat = cfg.to_flat()
    assert list(flat) == [k.name for k in schema()] and flat["halve-scale"] == 0.5
    assert parse_config(flat) == cfg
    assert "halve-scale" in protocol.CLIENT_KEYS
    with pytest.raises(ConfigError, match=r"'halve-scale': must be a number in \(0.0, 1.0\], got 0.0"):
        parse_config({"compressor": "halve", "halve-scale": 0.0})
    assert build_compressor(cfg.compression) == Halve(scale=0.5)


def test_registration_is_undone():
    with registered(Halve):
        data = to_bytes(Halve().encode(torch.ones(D)))
    with pytest.raises(ConfigError, match=r"unknown config key.*'halve-scale'"):
        parse_config({"halve-scale": 0.5})
    with pytest.raises(ConfigError, match="'compressor': must be one of"):
        parse_config({"compressor": "halve"})
    assert "halve-scale" not in protocol.CLIENT_KEYS
    with pytest.raises(PayloadError, match=f"unknown payload kind {KIND}"):
        from_bytes(data, D)


def test_wire_round_trip_and_corrupted_bodies(halve):
    x = torch.randn(D, generator=torch.Generator().manual_seed(0))
    p = Halve(scale=0.5).encode(x)
    data = to_bytes(p)
    assert data[5] == KIND and len(data) == HEADER_SIZE + 4 + 4 * 6
    back = from_bytes(data, D, expected_kind=KIND)
    assert torch.equal(back.decode(), p.decode()) and to_bytes(back) == data
    with pytest.raises(PayloadError, match="wrong payload kind: expected TOPK, got HALVE"):
        from_bytes(data, D, expected_kind=2)
    bad = bytearray(data)
    bad[HEADER_SIZE : HEADER_SIZE + 4] = struct.pack("<I", 3)
    with pytest.raises(PayloadError, match="halve: expected stride 2, got 3"):
        from_bytes(bytes(bad), D)
    bad = bytearray(data)
    bad[-4:] = struct.pack("<f", float("nan"))
    with pytest.raises(PayloadError, match="non-finite values"):
        from_bytes(bytes(bad), D)
    with pytest.raises(PayloadError, match="truncated"):
        from_bytes(data[:-1], D)
    with pytest.raises(PayloadError, match="float32 numbers only: expected value dtype code 0, got 1"):
        from_bytes(struct.pack("<4sBBBBI", MAGIC, 1, KIND, 1, 0, D) + data[HEADER_SIZE:], D)


def test_error_feedback_telescopes(halve):
    c = build_compressor(parse_config({"compressor": "halve", "halve-scale": 0.5}).compression)
    gen = torch.Generator().manual_seed(1)
    residual = torch.zeros(D, dtype=torch.float64)
    sent = torch.zeros(D, dtype=torch.float64)
    total = torch.zeros(D, dtype=torch.float64)
    for _ in range(6):
        x = torch.randn(D, generator=gen, dtype=torch.float64)
        payload, residual = ef_step(c, x, residual)
        sent += payload.decode()
        total += x
    torch.testing.assert_close(sent + residual, total, rtol=0, atol=1e-12)
    assert residual[1::2].abs().min() > 0  # the odd coordinates wait in the residual


def test_server_round_over_the_wire(halve):
    cfg = parse_config({"compressor": "halve"})
    optimizer = build_server_optimizer(cfg.server)
    state = init_server_state(torch.zeros(D), optimizer)
    c = build_compressor(cfg.compression)
    xs = [torch.randn(D, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    payloads = [from_bytes(to_bytes(c.encode(x)), D, expected_kind=c.kind) for x in xs]
    state, g_bar = apply_round(state, payloads, [1 / 3] * 3, optimizer)
    torch.testing.assert_close(g_bar, sum(c(x) for x in xs) / 3)
    assert state.round == 1
    assert torch.all(state.theta[1::2] == 0) and torch.all(state.theta[::2] != 0)


def test_client_step_and_server_step_of_the_algorithm_layer(halve):
    # The same path the ClientApp and the strategy take: worker_begin/worker_end on each client, wire bytes,
    # server_step on the server, the statuses back to the clients.
    cfg = parse_config({"compressor": "halve", "halve-scale": 0.5})
    algorithm = build_algorithm(cfg)
    state = init_server_state(torch.zeros(D), algorithm.server_opt)
    workers = {f"w{i}": WorkerState() for i in range(3)}
    for rnd in (1, 2):
        replies = []
        for i, (label, worker) in enumerate(workers.items()):
            worker, begun = worker_begin(algorithm, worker, instruction_for(state, label, rnd), dim=D)
            update = torch.randn(D, generator=torch.Generator().manual_seed(10 * rnd + i))
            reply, workers[label] = worker_end(algorithm, worker, update, round=rnd, acked=begun.acked)
            payload = from_bytes(reply.payload, D, expected_kind=algorithm.compressor.kind)
            replies.append(ServerReply(label, rnd, payload, 1, reply.acked))
        state, report = server_step(algorithm, state, rnd, replies)
        assert report.applied and all(s.outcome == Outcome.APPLIED for s in report.statuses.values())
    assert state.round == 2 and torch.all(state.theta[1::2] == 0)
    assert all(w.residual[1::2].abs().min() > 0 for w in workers.values())  # odd coordinates wait in e


def test_registry_refuses_clashes():
    @dataclass(frozen=True)
    class Clash(Halve):
        name: ClassVar[str] = "clash"

    with pytest.raises(ValueError, match="kind byte 2 is already used by 'topk'"):
        register(type("K", (Clash,), {"kind": 2}))
    with pytest.raises(ValueError, match="must be a client key"):
        register(type("S", (Clash,), {"config_keys": (key("clash-x", 1, num_range(0, 2), "x", "server"),)}))
    other_ratio = key("topk-ratio", 0.5, num_range(0, 1), "another topk-ratio")
    with pytest.raises(ValueError, match="'topk-ratio' is declared differently"):
        register(type("R", (Clash,), {"config_keys": (other_ratio,)}))
    with registered(type("R", (Clash,), {"config_keys": (TOPK_RATIO,)})):  # reusing the shared key is fine
        assert [k.name for k in schema()].count("topk-ratio") == 1
    assert "clash" not in COMPRESSORS
