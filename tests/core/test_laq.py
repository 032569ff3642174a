"""LAQ (Sun et al., NeurIPS 2019): the quantizer's bounds, the skip rule, the server's innovation sum, and the
acknowledged worker state under faults (algorithms.md section 4.7)."""

import itertools
import random

import pytest
import torch

from fl_compams import SGD, PayloadError, from_bytes, to_bytes
from fl_compams.algorithm import (
    Algorithm,
    Instruction,
    Outcome,
    ServerReply,
    Status,
    WorkerState,
    instruction_for,
    server_step,
    worker_begin,
    worker_end,
)
from fl_compams.checkpoint import load_checkpoint, save_checkpoint
from fl_compams.compressors.laq import LAQQuantizer
from fl_compams.config import parse_config
from fl_compams.errors import ConfigError
from fl_compams.laq import LazyConfig, LazyWorker, fresh_worker, quantize_innovation, should_upload
from fl_compams.server import init_server_state

DIM = 50


def vec(seed, scale=1.0, dim=DIM):
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * scale


# ----------------------------------------------------------------------------------------------- quantizer
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
def test_codes_on_the_grid_and_error_within_tau_r(bits):
    quantizer = LAQQuantizer(bits)
    for seed in range(5):
        g, prev = vec(seed), vec(100 + seed, 0.5)
        payload, dq, q = quantize_innovation(quantizer, g, prev)
        assert int(payload.codes.min()) >= 0 and int(payload.codes.max()) <= 2**bits - 1
        radius = float((g - prev).abs().max())
        tau = 1 / (2**bits - 1)
        assert float((q - g).abs().max()) <= tau * radius * (1 + 1e-5) + 1e-6
        back = from_bytes(to_bytes(payload), DIM)  # the wire carries exactly the innovation
        assert torch.equal(back.decode(), dq) and back.codes.dtype == torch.int32


def test_innovation_is_zero_when_the_gradient_equals_the_last_upload():
    g = vec(1)
    payload, dq, q = quantize_innovation(LAQQuantizer(3), g, g.clone())
    assert float(payload.radius) == 0 and torch.equal(dq, torch.zeros(DIM)) and torch.equal(q, g)


def test_error_shrinks_as_bits_grow():
    g, prev = vec(2), vec(3)
    errors = [float((quantize_innovation(LAQQuantizer(b), g, prev)[2] - g).norm()) for b in range(1, 17)]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 1e-4 * float((g - prev).norm())


def test_authors_formula_exactly():
    # quantd(vec, v2, b) = v2 - r + 2 delta floor((vec - v2 + r + delta) / (2 delta)), delta = r / (2^b - 1)
    g, prev, b = vec(4).double(), vec(5).double(), 4
    r = float((g - prev).abs().max())
    delta = r / (2**b - 1)
    expected = prev - r + 2 * delta * torch.floor((g - prev + r + delta) / (2 * delta))
    _, _, q = quantize_innovation(LAQQuantizer(b), g.float(), prev.float())
    assert torch.allclose(q.double(), expected, atol=1e-5)


def test_wire_size_and_rejection():
    payload = LAQQuantizer(3).encode(vec(6))
    data = to_bytes(payload)
    assert len(data) == 12 + 4 + 4 + (3 * DIM + 7) // 8 and LAQQuantizer(3).theory_bits(DIM) == 32 + 3 * DIM
    with pytest.raises(PayloadError, match="bits"):
        from_bytes(data[:16] + (17).to_bytes(4, "little") + data[20:], DIM)
    with pytest.raises(PayloadError, match="radius"):
        from_bytes(data[:12] + (-1.0).hex().encode()[:0] + b"\x00\x00\x80\xbf" + data[16:], DIM)
    with pytest.raises(PayloadError, match="truncated"):
        from_bytes(data[:-1], DIM)


# ----------------------------------------------------------------------------------------------- rounds
def algo(lazy=None, bits=4, lr=0.05, min_valid=1):
    return Algorithm(
        "laq",
        LAQQuantizer(bits),
        SGD(lr=lr),
        error_feedback=False,
        lazy=lazy or LazyConfig(),
        min_valid_replies=min_valid,
    )


class Problem:
    """f_m(theta) = 0.5 ||A_m theta - b_m||^2: deterministic gradients, different per worker."""

    def __init__(self, workers=4, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.a = [torch.randn(DIM, DIM, generator=gen) / DIM**0.5 for _ in range(workers)]
        self.b = [torch.randn(DIM, generator=gen) for _ in range(workers)]

    def grad(self, m, theta):
        return self.a[m].T @ (self.a[m] @ theta - self.b[m])


def run(algorithm, problem, rounds, *, faults=None, restart_at=None, tmp_path=None, seed=0):
    """The algorithm layer over the workers of ``problem``; ``faults(rnd, label) -> 'instr' | 'reply' | None``."""
    labels = [f"partition-{m}" for m in range(len(problem.a))]
    workers = {label: WorkerState() for label in labels}
    state = init_server_state(torch.zeros(DIM), algorithm.server_opt)
    uploads = {label: [] for label in labels}
    thetas = [state.theta]
    for rnd in range(1, rounds + 1):
        if rnd == restart_at:
            state, _ = load_checkpoint(save_checkpoint(tmp_path, state))
        replies, lost = [], []
        for m, label in enumerate(labels):
            fate = faults(rnd, label) if faults else None
            if fate == "instr":
                lost.append(label)
                continue
            instruction = instruction_for(state, label, rnd, algorithm)
            workers[label], begun = worker_begin(algorithm, workers[label], instruction, dim=DIM)
            reply, workers[label] = worker_end(
                algorithm, workers[label], problem.grad(m, state.theta), round=rnd, acked=begun.acked
            )
            if not reply.skip:
                uploads[label].append(rnd)
            if fate == "reply":
                lost.append(label)
                continue
            payload = None if reply.skip else from_bytes(reply.payload, DIM)
            replies.append(ServerReply(label, rnd, payload, 1, reply.acked))
        state, _ = server_step(algorithm, state, rnd, replies, lost)
        thetas.append(state.theta)
    return state, workers, uploads, thetas


def test_zero_thresholds_give_plain_quantized_gd_exactly():
    lazy = LazyConfig(xi=0.0, error_weight=0.0, constant=0.0)
    algorithm, problem = algo(lazy), Problem()
    _, _, uploads, thetas = run(algorithm, problem, 30)
    assert all(len(u) == 30 for u in uploads.values())  # RHS = 0: every worker uploads every round
    theta, qs = torch.zeros(DIM), [None] * len(problem.a)  # theta^{k+1} = theta^k - alpha sum_m Q_m(theta^k)
    for k in range(30):
        for m in range(len(problem.a)):
            qs[m] = quantize_innovation(algorithm.compressor, problem.grad(m, theta), qs[m])[2]
        total = torch.zeros(DIM)
        for q in qs:
            total = total + q
        theta = theta + total * -algorithm.server_opt.lr
        assert torch.equal(thetas[k + 1], theta), k


def test_max_skip_zero_never_skips_and_equals_zero_thresholds():
    """t-bar = 0 forces an upload every round: the configurable form of quantized GD (the LAQ baseline)."""
    zero = LazyConfig(xi=0.0, error_weight=0.0, constant=0.0)
    _, _, uploads, thetas = run(algo(LazyConfig(max_skip=0)), Problem(), 20)
    _, _, _, reference = run(algo(zero), Problem(), 20)
    assert all(len(u) == 20 for u in uploads.values())
    assert all(torch.equal(a, b) for a, b in zip(thetas, reference, strict=True))
    assert parse_config({"algorithm": "laq", "laq-max-skip": 0}).laq.laq_max_skip == 0


def test_default_rule_skips_and_still_converges():
    algorithm, problem = algo(), Problem()
    state, _, uploads, _ = run(algorithm, problem, 150)
    count = sum(len(u) for u in uploads.values())
    assert count < 0.7 * 150 * 4  # lazy: many skips
    grad = sum(problem.grad(m, state.theta) for m in range(4))
    assert float(grad.norm()) < 0.05 * float(sum(problem.grad(m, torch.zeros(DIM)) for m in range(4)).norm())


def test_forced_upload_every_t_bar_plus_one_rounds():
    lazy = LazyConfig(xi=1e12, max_skip=4)
    _, _, uploads, _ = run(algo(lazy), Problem(), 23)
    for rounds in uploads.values():
        assert rounds == [1, 6, 11, 16, 21]


def test_skip_rule_parts():
    cfg = LazyConfig(xi=0.0, max_skip=3)
    lazy = LazyWorker(None, eps_hat=1.0, clock=0, threshold=2.0)
    assert not should_upload(cfg, lazy, dq_sq=4.9, err_sq=0.0)  # 4.9 < 2 + 3 (0 + 1)
    assert should_upload(cfg, lazy, dq_sq=5.0, err_sq=0.0)
    assert should_upload(cfg, lazy._replace(clock=3), dq_sq=0.0, err_sq=0.0)  # (7b)
    slaq = LazyConfig(stochastic=True)
    assert (slaq.error_weight, slaq.constant) == (1.5, 0.2)
    assert fresh_worker(cfg).clock == 3  # the first round uploads


def _aggregate_invariant(state):
    total = torch.zeros(DIM)
    for label in sorted(state.lazy.q, key=lambda s: int(s.split("-")[1])):
        total = total + state.lazy.q[label]
    assert torch.equal(state.lazy.nabla, total)


def test_acknowledged_state_under_faults_and_a_restart(tmp_path):
    rng = random.Random(0)
    fates = {}

    def faults(rnd, label):
        return fates.setdefault((rnd, label), rng.choices(["instr", "reply", None], [0.08, 0.15, 0.77])[0])

    lazy = LazyConfig(xi=0.8, history=5, max_skip=10, expire_rounds=50)
    algorithm, problem = algo(lazy), Problem(workers=5, seed=1)
    state, workers, _, _ = run(algorithm, problem, 60, faults=faults, restart_at=30, tmp_path=tmp_path)
    lost = sum(f == "reply" for f in fates.values())
    assert lost > 10
    # every worker hears the fate of its last reply, then its committed Q is the server's stored Q
    for label in workers:
        workers[label], _ = worker_begin(
            algorithm, workers[label], instruction_for(state, label, 61, algorithm), dim=DIM
        )
        assert torch.equal(workers[label].lazy.q, state.lazy.q[label]), label
    _aggregate_invariant(state)


def test_without_acknowledgement_copies_would_diverge():
    # The check above is not vacuous: a worker that committed its upload when sending, while the reply was lost,
    # holds a Q the server never had.
    algorithm = algo()
    _, state = worker_end(algorithm, WorkerState(), vec(7), round=1)
    payload = from_bytes(state.pending.payload, DIM)
    lost, report = worker_begin(algorithm, state, Instruction(2, (Status(1, Outcome.LOST, 0.0),)), dim=DIM)
    assert lost.lazy.q is None and lost.lazy.clock == fresh_worker(algorithm.lazy).clock + 1
    assert report.folded_norm == pytest.approx(payload.norm())
    applied, _ = worker_begin(algorithm, state, Instruction(2, (Status(1, Outcome.APPLIED, 1.0),)), dim=DIM)
    assert torch.equal(applied.lazy.q, payload.decode()) and applied.lazy.clock == 0


def test_silent_worker_expires_and_resets():
    lazy = LazyConfig(expire_rounds=3, xi=0.0)
    algorithm, problem = algo(lazy), Problem(workers=3)

    def faults(rnd, label):
        return "instr" if label == "partition-2" and 3 <= rnd <= 7 else None

    state, workers, _, _ = run(algorithm, problem, 6, faults=faults)
    assert "partition-2" not in state.lazy.q and set(state.lazy.q) == {"partition-0", "partition-1"}
    _aggregate_invariant(state)
    instruction = instruction_for(state, "partition-2", 7, algorithm)
    assert instruction.lazy.reset and not instruction_for(state, "partition-0", 7, algorithm).lazy.reset
    w, _ = worker_begin(algorithm, workers["partition-2"], instruction, dim=DIM)
    reply, w = worker_end(algorithm, w, problem.grad(2, state.theta), round=7)
    assert not reply.skip and w.lazy.q is None  # forced upload from Q = 0


def test_skip_from_an_algorithm_that_cannot_skip_changes_nothing():
    from fl_compams import AMSGrad, make_compressor

    compams = Algorithm("compams", make_compressor("topk", ratio=0.1), AMSGrad())
    state = init_server_state(torch.zeros(DIM), compams.server_opt)
    after, report = server_step(compams, state, 1, [ServerReply("a", 1, None, 1)])
    assert torch.equal(after.theta, state.theta) and report.statuses["a"].outcome == Outcome.LOST


def test_checkpoint_keeps_the_lazy_state(tmp_path):
    state, _, _, _ = run(algo(), Problem(), 5)
    back, _ = load_checkpoint(save_checkpoint(tmp_path, state))
    assert torch.equal(back.lazy.nabla, state.lazy.nabla) and back.lazy.contact == state.lazy.contact
    assert back.lazy.changes == state.lazy.changes
    assert all(torch.equal(back.lazy.q[k], v) for k, v in state.lazy.q.items())


@pytest.mark.parametrize(
    "bad",
    [
        {"laq-bits": 0},
        {"laq-bits": 17},
        {"laq-xi": -0.1},
        {"laq-history": 0},
        {"laq-max-skip": -1},
        {"laq-expire-rounds": 0},
        {"fraction-train": 0.5},
        {"local-steps": 2},
        {"compressor": "blocksign"},
    ],
)
def test_bad_settings_name_the_key(bad):
    with pytest.raises(ConfigError, match=repr(next(iter(bad)))):
        parse_config({"algorithm": "laq", **bad})


def test_a_hostile_upload_is_rejected_and_its_worker_keeps_its_q():
    """One finite but enormous innovation (a node lying about its radius) is bounded, never applied.

    The bound is on ||Q_m + dQ_m|| against every stored gradient; the hostile worker's upload counts as a skip
    on both sides, so the model equals the run in which that worker skipped that round.
    """
    algorithm, problem = algo(), Problem()
    assert algorithm.bound.mode == "adaptive"

    def play(hostile):
        labels = [f"partition-{m}" for m in range(len(problem.a))]
        workers = {label: WorkerState() for label in labels}
        state = init_server_state(torch.zeros(DIM), algorithm.server_opt)
        outcomes = []
        for rnd in range(1, 13):
            replies = []
            for m, label in enumerate(labels):
                instruction = instruction_for(state, label, rnd, algorithm)
                workers[label], begun = worker_begin(algorithm, workers[label], instruction, dim=DIM)
                reply, workers[label] = worker_end(
                    algorithm, workers[label], problem.grad(m, state.theta), round=rnd, acked=begun.acked
                )
                if rnd == 8 and m == 0:
                    if hostile:  # the same node, lying: a radius of 1e30 (codes unchanged)
                        big = LAQQuantizer(4).encode(torch.full((DIM,), 1e30))
                        replies.append(ServerReply(label, rnd, big, 1, reply.acked))
                        continue
                    replies.append(ServerReply(label, rnd, None, 1, reply.acked))  # honest twin: a skip
                    continue
                payload = None if reply.skip else from_bytes(reply.payload, DIM)
                replies.append(ServerReply(label, rnd, payload, 1, reply.acked))
            state, report = server_step(algorithm, state, rnd, replies, [])
            outcomes.append(report.statuses.get("partition-0"))
        for label in labels:  # the last statuses reach the workers
            instruction = instruction_for(state, label, 13, algorithm)
            workers[label], _ = worker_begin(algorithm, workers[label], instruction, dim=DIM)
        return state, workers, outcomes

    hostile, workers, outcomes = play(True)
    honest, _, _ = play(False)
    assert outcomes[7].outcome == Outcome.REJECTED
    assert torch.isfinite(hostile.theta).all()
    assert torch.equal(hostile.theta, honest.theta)
    assert torch.equal(hostile.lazy.q["partition-0"], workers["partition-0"].lazy.q)  # both copies agree


def test_the_default_bound_rejects_nothing_honest():
    """150 honest rounds: the adaptive bound on stored gradients equals no bound, bit for bit."""
    from dataclasses import replace

    from fl_compams.algorithm import ReplyBound

    bounded = algo()
    unbounded = replace(bounded, bound=ReplyBound(mode="off"))
    _, _, up_a, thetas_a = run(bounded, Problem(), 150)
    _, _, up_b, thetas_b = run(unbounded, Problem(), 150)
    assert up_a == up_b and all(torch.equal(a, b) for a, b in zip(thetas_a, thetas_b, strict=True))
