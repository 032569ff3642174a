"""The algorithm layer: acknowledged error feedback under faults, idempotent statuses, exact no-fault rounds."""

import random

import pytest
import torch

from fl_compams import AMSGrad, from_bytes, make_compressor
from fl_compams.algorithm import (
    Algorithm,
    Instruction,
    Outcome,
    ReplyBound,
    ServerReply,
    Status,
    WorkerState,
    instruction_for,
    server_step,
    worker_begin,
    worker_end,
)
from fl_compams.checkpoint import load_checkpoint, save_checkpoint
from fl_compams.downlink import DownlinkPart, receive
from fl_compams.error_feedback import ef_step
from fl_compams.qsparse import Qsparse
from fl_compams.server import init_server_state
from fl_compams.server_opt import SGD

BLOCKS = (24, 6, 20, 10)
DIM = sum(BLOCKS)


def compressor(name):
    return (
        make_compressor("topk", ratio=0.1)
        if name == "topk"
        else make_compressor("blocksign", block_sizes=BLOCKS)
    )


class Client:
    """One worker: its state, and the test's own ledger of what it sent and what became of it."""

    def __init__(self, label):
        self.label = label
        self.state = WorkerState()
        self.updates = torch.zeros(DIM, dtype=torch.float64)

    def residual(self):
        return torch.zeros(DIM) if self.state.residual is None else self.state.residual

    def unsent(self):
        """Asynchronous Qsparse: local work done but not sent yet (model units)."""
        change = self.state.local_change
        return torch.zeros(DIM) if change is None else change.change


#: The bounds the fault test runs under: a fixed norm, and an adaptive one tight enough to act on these updates.
BOUNDS = {
    "fixed": lambda action: ReplyBound("fixed", max_norm=14.0, action=action),
    "adaptive": lambda action: ReplyBound("adaptive", multiplier=1.5, window=3, action=action),
}


def run_with_faults(name, action, tmp_path, rounds=40, seed=0, bound="fixed", qsparse=None, two_way=False):
    """Partial participation, lost instructions and replies, a bound that clips or rejects, rounds below
    min-valid-replies and a server restart from a checkpoint; return clients and the server's ledger.

    With ``qsparse`` (Qsparse-local-SGD) a client's updates are its local work in model units, eta H_r u.
    ``two_way``: Block-Sign broadcasts (log of 3); each client brings its replica to the public model first.
    """
    algo = Algorithm(
        "compams" if qsparse is None else "qsparse",
        compressor(name),
        AMSGrad(lr=0.01) if qsparse is None else SGD(lr=1.0),
        bound=BOUNDS[bound](action),
        min_valid_replies=2,
        qsparse=qsparse,
        downlink=DownlinkPart(compressor("blocksign"), log_size=3) if two_way else None,
    )
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    clients = [Client(f"partition-{i}") for i in range(6)]
    applied = {c.label: torch.zeros(DIM, dtype=torch.float64) for c in clients}
    removed = {c.label: torch.zeros(DIM, dtype=torch.float64) for c in clients}
    state = init_server_state(torch.zeros(DIM), algo.server_opt, two_way=two_way)
    seen = {o: 0 for o in Outcome}
    for rnd in range(1, rounds + 1):
        if rnd == rounds // 2:  # server restart: everything it knows comes back from the checkpoint
            state, _ = load_checkpoint(save_checkpoint(tmp_path, state))
        sampled = rng.sample(clients, 4)
        replies, lost, sent = [], [], {}
        for c in sampled:
            fate = rng.random()
            if fate < 0.1:  # the instruction never arrives: the client does nothing this round
                lost.append(c.label)
                continue
            instruction = instruction_for(state, c.label, rnd)
            version = None
            if two_way:
                dense = state.downlink.public if instruction.downlink.dense else None
                replica, version = receive(
                    c.state.replica, c.state.replica_version, instruction.downlink, dense, dim=DIM
                )
                assert torch.equal(replica, state.downlink.public)
                c.state = c.state._replace(replica=replica, replica_version=version)
            c.state, _ = worker_begin(algo, c.state, instruction, dim=DIM)
            scale = 3.0 if rng.random() < 0.3 else 0.5  # some updates exceed the bound
            update = torch.randn(DIM, generator=gen) * scale
            steps = 1 if qsparse is None else qsparse.period(int(c.label.split("-")[1]))
            c.updates += update.double() * (1 if qsparse is None else qsparse.lr * steps)
            reply, c.state = worker_end(algo, c.state, update, round=rnd, acked=-1, steps=steps)
            if 0.1 <= fate < 0.25:  # reply lost in transit, timed out, or invalid: the server never sees it
                lost.append(c.label)
                continue
            payload = from_bytes(reply.payload, DIM)
            sent[c.label] = payload.decode().double()
            acked = max((s.round for s in instruction_for(state, c.label, rnd).statuses), default=-1)
            replies.append(ServerReply(c.label, rnd, payload, 10, acked, version))
        state, report = server_step(algo, state, rnd, replies, lost)
        for label, status in report.statuses.items():
            seen[status.outcome] += 1
            if label in sent and status.outcome != Outcome.LOST:
                applied[label] += status.factor * sent[label]
                removed[label] += status.removed_fraction() * sent[label]
    for c in clients:  # each client hears the fate of its last reply
        c.state, _ = worker_begin(algo, c.state, instruction_for(state, c.label, rounds + 1), dim=DIM)
    return clients, applied, removed, seen


@pytest.mark.parametrize("name", ["topk", "blocksign"])
@pytest.mark.parametrize("action", ["clip", "reject"])
@pytest.mark.parametrize("bound", sorted(BOUNDS))
def test_ef_identity_holds_under_faults(name, action, bound, tmp_path):
    clients, applied, removed, seen = run_with_faults(name, action, tmp_path, bound=bound)
    assert seen[Outcome.LOST] > 5 and seen[Outcome.APPLIED] > 20  # the faults really happened
    if action == "reject":
        assert seen[Outcome.REJECTED] > 3
    else:
        assert sum(float(r.norm()) > 0 for r in removed.values()) >= 3  # some clips
    for c in clients:
        assert c.state.pending is None
        total = applied[c.label] + removed[c.label] + c.residual().double()
        err = float((total - c.updates).norm())
        assert err <= 1e-5 * float(c.updates.norm()), (c.label, err)


@pytest.mark.parametrize("name", ["topk", "blocksign"])
@pytest.mark.parametrize("asynchronous", [False, True])
def test_ef_identity_holds_under_faults_for_qsparse(name, asynchronous, tmp_path):
    # per client: sum(applied) + sum(removed) + memory (+ unsent local work) = sum of its local work
    qsparse = Qsparse(lr=0.5, steps=2, asynchronous=asynchronous, periods="uniform" if asynchronous else "")
    clients, applied, removed, seen = run_with_faults(name, "reject", tmp_path, qsparse=qsparse)
    assert seen[Outcome.LOST] > 5 and seen[Outcome.APPLIED] > 20 and seen[Outcome.REJECTED] > 3
    if asynchronous:  # the uniform rule gave the clients different periods, and some work is still unsent
        assert len({qsparse.period(i) for i in range(6)}) == 2
        assert sum(c.state.local_change is not None for c in clients) >= 4
    for c in clients:
        assert c.state.pending is None
        total = applied[c.label] + removed[c.label] + c.residual().double() + c.unsent().double()
        err = float((total - c.updates).norm())
        assert err <= 1e-5 * float(c.updates.norm()), (c.label, err)


@pytest.mark.parametrize("name", ["topk", "blocksign"])
def test_ef_identity_holds_with_two_way_compression(name, tmp_path):
    # Replicas, the broadcast log and dense resyncs (the restart reloads the downlink slot from the checkpoint).
    clients, applied, removed, seen = run_with_faults(name, "reject", tmp_path, two_way=True)
    assert seen[Outcome.LOST] > 5 and seen[Outcome.APPLIED] > 20 and seen[Outcome.REJECTED] > 3
    for c in clients:
        assert c.state.pending is None
        total = applied[c.label] + removed[c.label] + c.residual().double()
        assert float((total - c.updates).norm()) <= 1e-5 * float(c.updates.norm()), c.label


def test_without_acknowledgement_a_lost_reply_would_be_gone():
    # The identity above is not vacuous: dropping the fold-back loses exactly the lost payload.
    algo = Algorithm("compams", compressor("topk"), AMSGrad())
    state = WorkerState()
    update = torch.arange(DIM, dtype=torch.float32)
    reply, state = worker_end(algo, state, update, round=1)
    sent = from_bytes(reply.payload, DIM).decode()
    assert torch.allclose(state.residual + sent, update)
    folded, report = worker_begin(algo, state, Instruction(2, (Status(1, Outcome.LOST, 0.0),)), dim=DIM)
    assert torch.allclose(folded.residual, update) and report.folded_norm == pytest.approx(float(sent.norm()))


def test_statuses_are_idempotent_and_tagged_by_round():
    algo = Algorithm("compams", compressor("topk"), AMSGrad())
    update = torch.linspace(-1, 1, DIM)
    _, state = worker_end(algo, WorkerState(), update, round=3)
    other_round = Instruction(4, (Status(2, Outcome.LOST, 0.0), Status(3, Outcome.APPLIED, 0.5)))
    once, report = worker_begin(algo, state, other_round, dim=DIM)
    twice, _ = worker_begin(algo, once, other_round, dim=DIM)  # the same statuses again: no effect
    assert torch.equal(once.residual, state.residual) and torch.equal(twice.residual, once.residual)
    assert report.acked == 3 and report.removed_norm > 0 and once.pending is None


def test_pending_reply_unknown_to_the_server_is_folded_back():
    # A server that restarted from an older state sends no status for the reply: it never applied it.
    algo = Algorithm("compams", compressor("blocksign"), AMSGrad())
    update = torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    _, state = worker_end(algo, WorkerState(), update, round=5)
    back, report = worker_begin(algo, state, Instruction(6, ()), dim=DIM)
    assert torch.allclose(back.residual, update, atol=1e-6) and report.folded_norm > 0


def test_server_forgets_statuses_once_acknowledged():
    algo = Algorithm("compams", compressor("topk"), AMSGrad())
    state = init_server_state(torch.zeros(DIM), algo.server_opt)
    payload = algo.compressor.encode(torch.ones(DIM))
    state, _ = server_step(algo, state, 1, [ServerReply("a", 1, payload, 1)], lost=["b"])
    assert [s.outcome for s in state.unacked["a"]] == [Outcome.APPLIED]
    assert [s.outcome for s in state.unacked["b"]] == [Outcome.LOST]
    state, _ = server_step(algo, state, 2, [ServerReply("a", 2, payload, 1, acked=1)])
    assert [s.round for s in state.unacked["a"]] == [2] and [s.round for s in state.unacked["b"]] == [1]


@pytest.mark.parametrize("name", ["topk", "blocksign"])
def test_no_fault_rounds_equal_the_plain_algorithm_2_loop(name):
    algo = Algorithm("compams", compressor(name), AMSGrad(lr=0.01))
    gen = torch.Generator().manual_seed(3)
    updates = [[torch.randn(DIM, generator=gen) for _ in range(3)] for _ in range(8)]
    # the algorithm layer
    state = init_server_state(torch.zeros(DIM), algo.server_opt)
    workers = [WorkerState() for _ in range(3)]
    for rnd, us in enumerate(updates, start=1):
        replies = []
        for i, u in enumerate(us):
            label = f"w{i}"
            workers[i], begun = worker_begin(algo, workers[i], instruction_for(state, label, rnd), dim=DIM)
            reply, workers[i] = worker_end(algo, workers[i], u, round=rnd, acked=begun.acked)
            replies.append(ServerReply(label, rnd, from_bytes(reply.payload, DIM), 1, reply.acked))
        state, _ = server_step(algo, state, rnd, replies)
    # Algorithm 2 written out: EF step per worker, mean of C(.), one AMSGrad step
    theta, opt_state, residuals = (
        torch.zeros(DIM),
        algo.server_opt.init(torch.zeros(DIM)),
        [torch.zeros(DIM)] * 3,
    )
    for us in updates:
        g_bar = torch.zeros(DIM)
        for i, u in enumerate(us):
            payload, residuals[i] = ef_step(algo.compressor, u, residuals[i])
            payload.add_to(g_bar, 1 / 3)
        delta, opt_state = algo.server_opt.update(g_bar, opt_state)
        theta = theta + delta
    assert torch.equal(state.theta, theta)
    assert all(torch.equal(w.residual, r) for w, r in zip(workers, residuals, strict=True))
