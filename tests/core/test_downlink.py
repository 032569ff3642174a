"""Two-way compression and dist-EF-SGD(M) (algorithms.md section 6.4; design.md section 7, "Two-way compression").

The server's EF identity and ``public + e_s = theta``, a zero server residual exactly when C_s is lossless, the
reductions (C = identity both ways: distributed Nesterov SGD; mu = 0: dist-EF-SGD), the worker's EF identity with
the momentum transform, replicas that catch up from the log or a dense resync, mismatches that are refused, the
one-scale sign compressor, the config, and checkpoints of the downlink slot.
"""

import random

import pytest
import torch

from fl_compams import ConfigError, PayloadError, from_bytes, make_compressor, parse_config, to_bytes
from fl_compams.algorithm import (
    Algorithm,
    ServerReply,
    WorkerState,
    instruction_for,
    server_step,
    worker_begin,
    worker_end,
)
from fl_compams.checkpoint import load_checkpoint, save_checkpoint
from fl_compams.client_opt import NesterovMomentum
from fl_compams.config import build_algorithm
from fl_compams.downlink import (
    DownInstruction,
    DownlinkPart,
    ReplicaMismatch,
    Version,
    model_digest,
    parse_version,
    receive,
)
from fl_compams.server import init_server_state
from fl_compams.server_opt import SGD, AMSGrad

BLOCKS = (24, 6, 20, 10)
DIM = sum(BLOCKS)
DOWN = {
    "blocksign": lambda: make_compressor("blocksign", block_sizes=BLOCKS),
    "sign": lambda: make_compressor("sign"),
    "topk": lambda: make_compressor("topk", ratio=0.1),
    "identity": lambda: make_compressor("identity"),
}


class Worker:
    """A client: its state and a fixed quadratic f_i(x) = ||x - c_i||^2 / 2 (gradient x - c_i, plus noise)."""

    def __init__(self, label, center):
        self.label = label
        self.center = center
        self.state = WorkerState()

    def gradient(self, x, gen):
        return x - self.center + 0.01 * torch.randn(DIM, generator=gen)


def run(algo, rounds=12, n=3, seed=0, sample=None, log=None):
    """Rounds of the algorithm layer with replicas; each sampled worker trains at the replica it holds.

    Returns (server state, workers, per-round records of theta and of the broadcasts' decoded sum).
    """
    gen = torch.Generator().manual_seed(seed)
    workers = [Worker(f"w{i}", torch.randn(DIM, generator=gen)) for i in range(n)]
    state = init_server_state(torch.zeros(DIM), algo.server_opt, two_way=algo.downlink is not None)
    rng = random.Random(seed)
    for rnd in range(1, rounds + 1):
        chosen = workers if sample is None else rng.sample(workers, sample)
        replies = []
        for w in chosen:
            instr = instruction_for(state, w.label, rnd)
            dense = state.downlink.public if instr.downlink.dense else None
            replica, version = receive(
                w.state.replica, w.state.replica_version, instr.downlink, dense, dim=DIM, block_sizes=BLOCKS
            )
            if log is not None:
                log.append((rnd, w.label, instr.downlink.dense, len(instr.downlink.steps)))
            assert torch.equal(replica, state.downlink.public)  # every client trains at the public model
            w.state = w.state._replace(replica=replica, replica_version=version)
            w.state, begun = worker_begin(algo, w.state, instr, dim=DIM)
            reply, w.state = worker_end(algo, w.state, w.gradient(replica, gen), round=rnd, acked=begun.acked)
            replies.append(ServerReply(w.label, rnd, from_bytes(reply.payload, DIM), 1, reply.acked, version))
        state, _ = server_step(algo, state, rnd, replies)
    return state, workers


def ef_sgdm(up="blocksign", down="blocksign", mu=0.9, lr=0.1):
    return Algorithm(
        "ef-sgdm",
        DOWN[up](),
        SGD(lr=lr),
        local_opt=NesterovMomentum(mu),
        bound=_no_bound(),
        downlink=DownlinkPart(DOWN[down]()),
    )


def _no_bound():
    from fl_compams.algorithm import ReplyBound

    return ReplyBound("off")


# ------------------------------------------------------------------------------------------- server EF
@pytest.mark.parametrize("down", ["blocksign", "sign", "topk"])
def test_server_ef_identity_and_public_plus_residual_is_theta(down):
    algo = Algorithm(
        "compams", DOWN["topk"](), AMSGrad(lr=0.05), bound=_no_bound(), downlink=DownlinkPart(DOWN[down]())
    )
    state = init_server_state(torch.zeros(DIM), algo.server_opt, two_way=True)
    gen = torch.Generator().manual_seed(1)
    sent = torch.zeros(DIM, dtype=torch.float64)
    moved = torch.zeros(DIM, dtype=torch.float64)
    for rnd in range(1, 21):
        before = state.theta
        payload = algo.compressor.encode(torch.randn(DIM, generator=gen))
        state, _ = server_step(algo, state, rnd, [ServerReply("a", rnd, payload, 1)])
        moved += (state.theta - before).double()
        step = state.downlink.log[-1]
        assert step.target == state.downlink.version and step.target.round == rnd
        sent += from_bytes(step.payload, DIM).decode().double()
        down_state = state.downlink
        # public + e_s = theta, and sum of broadcasts + e_s = sum of theta's changes
        assert torch.allclose(down_state.public + down_state.residual, state.theta, atol=1e-6)
        assert torch.allclose(sent + down_state.residual.double(), moved, atol=1e-6)
    assert float(state.downlink.residual.norm()) > 0  # a lossy C_s leaves a residual
    assert not torch.equal(state.downlink.public, state.theta)


def test_server_residual_is_zero_exactly_when_the_downlink_is_lossless():
    for down, lossless in (("identity", True), ("blocksign", False), ("topk", False)):
        state, _ = run(ef_sgdm(down=down), rounds=6)
        if lossless:
            assert torch.count_nonzero(state.downlink.residual) == 0
            assert torch.allclose(state.downlink.public, state.theta, atol=1e-6)
        else:
            assert float(state.downlink.residual.norm()) > 1e-4


# ------------------------------------------------------------------------------------------- reductions
def test_identity_both_ways_equals_distributed_nesterov_sgd():
    mu, lr, n, rounds = 0.9, 0.1, 3, 10
    state, _ = run(ef_sgdm(up="identity", down="identity", mu=mu, lr=lr), rounds=rounds, n=n, seed=4)
    # Written out: x <- x - lr mean_i (mu m_i + g_i), m_i <- mu m_i + g_i, gradients at x (same noise draws).
    gen = torch.Generator().manual_seed(4)
    centers = [torch.randn(DIM, generator=gen) for _ in range(n)]
    x, m = torch.zeros(DIM), [torch.zeros(DIM) for _ in range(n)]
    for _ in range(rounds):
        step = torch.zeros(DIM)
        for i in range(n):
            g = x - centers[i] + 0.01 * torch.randn(DIM, generator=gen)
            m[i] = mu * m[i] + g
            step += (mu * m[i] + g) / n
        x = x - lr * step
    assert torch.allclose(state.theta, x, atol=1e-5) and torch.allclose(state.downlink.public, x, atol=1e-5)


def test_momentum_zero_is_dist_ef_sgd():
    lr, n, rounds = 0.1, 3, 10
    state, workers = run(ef_sgdm(mu=0.0, lr=lr), rounds=rounds, n=n, seed=5)
    # dist-EF-SGD (Zheng et al., gradient units): p_i = g_i + e_i, Delta_i = C(p_i), e_i = p_i - Delta_i;
    # p~ = mean_i Delta_i + e~, Delta = C(p~), e~ = p~ - Delta; x <- x - lr Delta.
    c = DOWN["blocksign"]()
    gen = torch.Generator().manual_seed(5)
    centers = [torch.randn(DIM, generator=gen) for _ in range(n)]
    x, e, e_s = torch.zeros(DIM), [torch.zeros(DIM) for _ in range(n)], torch.zeros(DIM)
    for _ in range(rounds):
        mean = torch.zeros(DIM)
        for i in range(n):
            p = x - centers[i] + 0.01 * torch.randn(DIM, generator=gen) + e[i]
            e[i] = p - c(p)
            mean += c(p) / n
        p = mean + e_s
        e_s = p - c(p)
        x = x - lr * c(p)
    assert torch.allclose(state.downlink.public, x, atol=1e-5)
    assert torch.allclose(state.downlink.residual, -lr * e_s, atol=1e-6)  # model units = -lr x gradient units
    assert all(torch.allclose(w.state.residual, e[i], atol=1e-5) for i, w in enumerate(workers))


def test_nesterov_zero_momentum_sends_the_gradient_itself():
    g = torch.randn(DIM, generator=torch.Generator().manual_seed(2))
    p, state = NesterovMomentum(0.0).step(g, NesterovMomentum(0.0).init(g))
    assert torch.equal(p, g) and torch.equal(state.m, g)


def test_worker_ef_identity_with_the_momentum_transform():
    algo = ef_sgdm(mu=0.9)
    gen = torch.Generator().manual_seed(6)
    opt, mom = NesterovMomentum(0.9), None
    state, sent, total = (
        WorkerState(),
        torch.zeros(DIM, dtype=torch.float64),
        torch.zeros(DIM, dtype=torch.float64),
    )
    for rnd in range(1, 16):
        g = torch.randn(DIM, generator=gen)
        mom = opt.init(g) if mom is None else mom
        p, mom = opt.step(g, mom)  # u_t = mu m_t + g_t
        total += p.double()
        reply, state = worker_end(algo, state, g, round=rnd)
        state = state._replace(pending=None)  # applied
        sent += from_bytes(reply.payload, DIM).decode().double()
    assert torch.allclose(state.momentum.m, mom.m)
    assert torch.allclose(sent + state.residual.double(), total, atol=1e-5)
    assert float(state.residual.norm()) > 0


# ------------------------------------------------------------------------------------------- replicas
def test_late_and_absent_clients_catch_up_from_the_log_or_a_dense_resync():
    algo = Algorithm(
        "compams", DOWN["topk"](), AMSGrad(lr=0.05), downlink=DownlinkPart(DOWN["blocksign"](), log_size=3)
    )
    log = []
    run(algo, rounds=30, n=6, sample=2, seed=7, log=log)  # ``run`` asserts every replica equals public
    seen, last = set(), {}
    for rnd, label, dense, steps in log:
        behind = rnd - last[label] if label in last else None
        if label not in seen:
            assert dense  # first contact: the dense model
        elif behind <= 3:
            assert not dense and steps == behind  # the broadcasts since its last round, from the log
        else:
            assert dense  # further behind than the log reaches
        seen.add(label)
        last[label] = rnd
    assert any(d for _, _, d, _ in log[6:]) and any(not d for _, _, d, _ in log)


def test_a_chain_heavier_than_the_model_is_replaced_by_the_dense_model():
    # Top-k keeping every coordinate sends 8 bytes per coordinate: one broadcast already outweighs 4 d bytes.
    lossless = Algorithm(
        "compams", DOWN["topk"](), AMSGrad(lr=0.05), downlink=DownlinkPart(make_compressor("topk", ratio=1.0))
    )
    log = []
    run(lossless, rounds=4, n=2, log=log)
    assert all(dense for _, _, dense, _ in log)
    small = []
    run(
        Algorithm("compams", DOWN["topk"](), AMSGrad(lr=0.05), downlink=DownlinkPart(DOWN["topk"]())),
        4,
        2,
        log=small,
    )
    assert not any(dense for rnd, _, dense, _ in small if rnd > 1)


def test_a_replica_ahead_of_the_servers_idea_skips_what_it_has():
    # The client applied round 1's broadcast but its reply was lost: the server still thinks it holds version 0
    # and sends the chain from there; the client starts at its own version in the chain.
    state, _ = run(ef_sgdm(), rounds=2, n=2)
    at_round_1 = run(ef_sgdm(), rounds=1, n=2)[0].downlink.public  # the same run, one round shorter
    down = state.downlink
    first, _ = down.log
    assert model_digest(at_round_1) == first.target.digest
    replica, version = receive(at_round_1, first.target, DownInstruction(down.version, down.log), dim=DIM)
    assert torch.equal(replica, down.public) and version == down.version


def test_mismatched_replicas_are_refused():
    state, _ = run(ef_sgdm(), rounds=3, n=1)
    down = state.downlink
    instr = DownInstruction(down.version, down.log[-1:])
    source = down.log[-1].source
    public = down.public
    with pytest.raises(ReplicaMismatch, match="no replica"):
        receive(None, None, instr, dim=DIM)
    with pytest.raises(ReplicaMismatch, match="not among"):
        receive(public, Version(0, "0" * 16), instr, dim=DIM)
    wrong = public.clone()
    wrong[0] += 1.0  # the client's replica is not the model of its version
    with pytest.raises(ReplicaMismatch, match="digest"):
        receive(wrong, source, instr, dim=DIM)
    with pytest.raises(ReplicaMismatch, match="without a model"):
        receive(None, None, DownInstruction(down.version, dense=True), dim=DIM)
    with pytest.raises(ReplicaMismatch, match="digest"):
        receive(None, None, DownInstruction(down.version, dense=True), wrong, dim=DIM)
    bad = instr.steps[0]._replace(payload=b"junk")
    with pytest.raises(PayloadError):
        receive(public, source, DownInstruction(down.version, (bad,)), dim=DIM)


def test_versions_parse_strictly():
    v = Version(12, "0123456789abcdef")
    assert parse_version(str(v)) == v
    for bad in (
        "12",
        "12:0123",
        "x:0123456789abcdef",
        "12:0123456789ABCDEF",
        12,
        None,
        "-1:0123456789abcdef",
    ):
        with pytest.raises(ValueError, match="replica version"):
            parse_version(bad)


# ------------------------------------------------------------------------------------------- sign, config
def test_one_scale_sign_compressor():
    x = torch.randn(DIM, generator=torch.Generator().manual_seed(8))
    c = make_compressor("sign")
    payload = from_bytes(to_bytes(c.encode(x)), DIM)
    y = payload.decode()
    assert torch.allclose(y, torch.where(x >= 0, 1.0, -1.0) * x.abs().mean())
    assert float((y - x).norm() ** 2) <= (1 - 1 / DIM) * float(x.norm() ** 2)
    assert payload.norm() == pytest.approx(float(y.norm()), rel=1e-6)
    assert c.theory_bits(DIM) == DIM + 32
    assert len(to_bytes(payload)) == 12 + 4 + (DIM + 7) // 8


def test_ef_sgdm_composition_and_bad_input():
    cfg = parse_config({"algorithm": "ef-sgdm"})
    algo = build_algorithm(cfg, BLOCKS)
    assert algo.compressor == make_compressor("blocksign", block_sizes=BLOCKS)
    assert algo.downlink.compressor == algo.compressor and algo.server_opt.momentum == 0.0
    assert algo.local_opt == NesterovMomentum(0.9)
    sgd = build_algorithm(
        parse_config({"algorithm": "ef-sgdm", "client-momentum": 0.0, "compressor": "sign"})
    )
    assert sgd.local_opt.momentum == 0.0 and sgd.compressor == make_compressor("sign")
    assert build_algorithm(parse_config({})).downlink is None  # default: the dense model
    two_way = build_algorithm(parse_config({"downlink-compressor": "topk", "downlink-ratio": 0.05}), BLOCKS)
    assert two_way.downlink.compressor.ratio == 0.05 and two_way.compressor.ratio == 0.01
    for bad, key in (
        ({"algorithm": "flower-fedavg", "downlink-compressor": "topk"}, "downlink-compressor"),
        ({"algorithm": "flower-fedadam", "downlink-compressor": "blocksign"}, "downlink-compressor"),
        ({"algorithm": "ef-sgdm", "downlink-compressor": "topk"}, "downlink-compressor"),
        ({"algorithm": "ef-sgdm", "compressor": "qsgd"}, "compressor"),
        ({"client-momentum": 0.5}, "client-momentum"),
        ({"downlink-log": 3}, "downlink-log"),
        ({"downlink-log": 0, "downlink-compressor": "topk"}, "downlink-log"),
        ({"downlink-compressor": "nope"}, "downlink-compressor"),
    ):
        with pytest.raises(ConfigError, match=key):
            parse_config(bad)


def test_checkpoint_keeps_the_downlink_exactly(tmp_path):
    algo = Algorithm(
        "compams", DOWN["topk"](), AMSGrad(lr=0.05), downlink=DownlinkPart(DOWN["topk"](), log_size=2)
    )
    state, _ = run(algo, rounds=5, n=3, sample=2)
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path, state))
    a, b = state.downlink, loaded.downlink
    assert torch.equal(a.public, b.public) and torch.equal(a.residual, b.residual)
    assert a.version == b.version and a.log == b.log and dict(a.replicas) == dict(b.replicas)
    assert len(b.log) == 2 and dict(b.replicas)
    one_way, _ = load_checkpoint(
        save_checkpoint(tmp_path / "one", init_server_state(torch.zeros(DIM), AMSGrad()))
    )
    assert one_way.downlink is None
