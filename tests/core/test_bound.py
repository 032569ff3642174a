"""The default reply bound (``update-norm-bound = "adaptive"``): one enormous but finite reply cannot freeze or
derail a run, an honest run clips nothing, and a resumed run bounds exactly as the uninterrupted one."""

import math

import pytest
import torch

from fl_compams import ConfigError, from_bytes, make_compressor, parse_config, to_bytes
from fl_compams.algorithm import (
    Outcome,
    ReplyBound,
    ServerReply,
    WorkerState,
    instruction_for,
    server_step,
    worker_begin,
    worker_end,
)
from fl_compams.checkpoint import load_checkpoint, save_checkpoint
from fl_compams.config import build_algorithm, default_config
from fl_compams.server import init_server_state

DIM = 1000  # Top-k 1 % (the default) keeps 10 coordinates
CLIENTS = 10


def attack_payload(value):
    """A valid Top-k payload over every coordinate, each equal to ``value`` (finite float32: the codec accepts it)."""
    payload = make_compressor("topk", ratio=1.0).encode(torch.full((DIM,), value))
    return from_bytes(to_bytes(payload), DIM, expected_kind=payload.kind)


def quadratic_run(
    algo, rounds, attack=None, attack_round=0, alone=False, state=None, workers=None, start=1, seed=0
):
    """Clients minimise 0.5 ||theta - c_i||^2 (heterogeneous c_i around one optimum) with noisy gradients;
    in ``attack_round`` client 0's reply is replaced by :func:`attack_payload` (``attack``), and with ``alone``
    client 0 is the only one sampled in that round.

    Returns the server state, the workers, the model after every round and every round's step report."""
    gen = torch.Generator().manual_seed(seed)
    optimum = torch.randn(DIM, generator=gen)
    centers = [optimum + 0.1 * torch.randn(DIM, generator=gen) for _ in range(CLIENTS)]
    if state is None:
        state = init_server_state(torch.zeros(DIM), algo.server_opt)
    workers = workers or {f"partition-{i}": WorkerState() for i in range(CLIENTS)}
    thetas, reports = [state.theta], []
    for rnd in range(start, start + rounds):
        noise = torch.Generator().manual_seed(1000 * seed + rnd)
        replies = []
        for i, (label, w) in enumerate(workers.items()):
            if alone and rnd == attack_round and i > 0:
                continue
            w, begun = worker_begin(algo, w, instruction_for(state, label, rnd), dim=DIM)
            grad = state.theta - centers[i] + 0.05 * torch.randn(DIM, generator=noise)
            reply, workers[label] = worker_end(algo, w, grad, round=rnd, acked=begun.acked)
            payload = from_bytes(reply.payload, DIM)
            if rnd == attack_round and i == 0:
                payload = attack_payload(attack)
            replies.append(ServerReply(label, rnd, payload, 1, reply.acked))
        state, report = server_step(algo, state, rnd, replies)
        thetas.append(state.theta)
        reports.append(report)
    return state, workers, thetas, reports, torch.stack(centers).mean(0)


def finite(state):
    tensors = [state.theta, *(t for t in state.opt_state if isinstance(t, torch.Tensor))]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def default_algorithm(**overrides):
    return build_algorithm(parse_config(overrides))


def progress(thetas, minimum, start, end):
    """How much closer to the minimum the model got from round ``start`` to round ``end``."""
    return float((thetas[start] - minimum).norm() - (thetas[end] - minimum).norm())


def test_one_reply_of_3e38_neither_breaks_the_state_nor_stops_learning():
    # With the bound off (the old default) v_hat becomes inf and the model never moves again.
    algo = default_algorithm()
    _, _, honest, _, minimum = quadratic_run(algo, 61)
    state, _, thetas, reports, _ = quadratic_run(algo, 61, attack=3e38, attack_round=11)
    assert finite(state)
    assert float((thetas[61] - thetas[11]).norm()) > 0.5 * float((honest[61] - honest[11]).norm())
    assert progress(thetas, minimum, 11, 61) > 0.5 * progress(honest, minimum, 11, 61) > 0  # still converging
    attacked = reports[10].statuses["partition-0"]
    assert (
        attacked.outcome == Outcome.REJECTED and attacked.factor == 0.0
    )  # dropped by the bound, and reported


def test_one_reply_of_1e18_costs_a_few_honest_rounds_at_most():
    # With the bound off, v_hat of every coordinate jumps to ~1e31 and the model drifts away from the minimum.
    algo = default_algorithm()
    _, _, honest, _, minimum = quadratic_run(algo, 61)
    _, _, thetas, _, _ = quadratic_run(algo, 61, attack=1e18, attack_round=11)
    per_round = progress(honest, minimum, 11, 61) / 50  # an honest round's progress
    excess = float((thetas[61] - minimum).norm() - (honest[61] - minimum).norm())
    assert per_round > 0 and excess < 5 * per_round, (excess, per_round)


def test_an_honest_run_clips_nothing():
    _, _, _, reports, _ = quadratic_run(default_algorithm(), 60)
    assert all(math.isfinite(r.bound) for r in reports)  # the bound was in force in every round
    assert all(s == (s.round, Outcome.APPLIED, 1.0) for r in reports for s in r.statuses.values())
    assert max(max(r.norms.values()) / r.bound for r in reports) < 0.5  # with room to spare


def test_a_resumed_run_bounds_exactly_as_the_uninterrupted_one(tmp_path):
    # Round 13: the attacker is the only client sampled, so only the history of norms can bound its reply.
    algo = default_algorithm()
    attack = {"attack": 1e6, "attack_round": 13, "alone": True}
    straight, _, _, reports, _ = quadratic_run(algo, 30, **attack)
    assert reports[12].statuses["partition-0"].factor < 1e-3  # the bound acted
    before, workers, _, _, _ = quadratic_run(algo, 12)
    # a server restart; the clients keep their state
    state, _ = load_checkpoint(save_checkpoint(tmp_path, before))
    assert state.recent_norms == before.recent_norms and len(state.recent_norms) == algo.bound.window
    resumed, _, _, tail, _ = quadratic_run(algo, 18, **attack, state=state, workers=dict(workers), start=13)
    assert torch.equal(resumed.theta, straight.theta) and resumed.recent_norms == straight.recent_norms
    assert [r.bound for r in tail] == [r.bound for r in reports[12:]]
    # not vacuous: a restart that forgot the history lets the lone reply through unbounded
    amnesic = state._replace(recent_norms=())
    forgot, _, _, _, _ = quadratic_run(algo, 18, **attack, state=amnesic, workers=dict(workers), start=13)
    assert not torch.equal(forgot.theta, straight.theta)


def test_checkpoints_before_version_3_resume_with_an_empty_history(tmp_path):
    import hashlib
    import json
    import struct

    state, *_ = quadratic_run(default_algorithm(), 3)
    path = save_checkpoint(tmp_path, state)
    body = path.read_bytes()[:-32]
    magic, version, head_len = struct.unpack_from("<8sHI", body)
    assert version == 5  # the layout of versions 3 to 5 without LAQ state or buffers is the same
    header = json.loads(body[14 : 14 + head_len])
    del header["recent_norms"]  # the layout of version 2
    head = json.dumps(header).encode()
    old = struct.pack("<8sHI", magic, 2, len(head)) + head + body[14 + head_len :]
    path.write_bytes(old + hashlib.sha256(old).digest())
    back, _ = load_checkpoint(path)
    assert back.recent_norms == () and torch.equal(back.theta, state.theta) and back.unacked == state.unacked


def test_first_rounds_bound_one_outlier_among_two_but_not_a_lone_reply():
    bound = ReplyBound()  # adaptive: 10 x a 0.75-quantile that is a value of the sample
    assert bound.factor(3e38, bound.limit((), (3e38,))) == 1.0  # nothing to compare a lone first reply with
    assert bound.limit((), (2.0, 3e38)) == 20.0  # the 0.75-quantile of two values is the smaller one
    for n in range(2, 13):  # one outlier among n replies, with no history: bounded
        honest = tuple(1.0 + 0.1 * i for i in range(n - 1))
        assert bound.factor(3e38, bound.limit((), (*honest, 3e38))) < 1e-30
    assert bound.limit(((0.0, 0.0, 2.0),), (0.0,)) == 20.0  # zero norms are ignored (no zero bound)
    assert bound.limit(((2.0,),), (3e38,)) == 20.0  # later, history bounds a lone reply
    # an outlier enters the history capped at the bound; a rise of every norm raises the bound at once
    assert bound.observe((), (1.0, 2.0, 3e38), 20.0) == ((1.0, 2.0, 20.0),)
    assert bound.limit(((1.0,),) * 10, (5.0, 6.0, 7.0)) == 60.0
    assert len(bound.observe(((1.0,),) * 10, (2.0,), 20.0)) == 10  # the window


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"update-norm-bound": "median"}, r"'update-norm-bound'.*\['adaptive', 'fixed', 'off'\]"),
        ({"update-norm-bound": "fixed"}, "needs max-update-norm > 0"),
        ({"max-update-norm": 5.0}, "set update-norm-bound = 'fixed'"),
        ({"update-norm-multiplier": 0.5}, "'update-norm-multiplier': must be a finite number >= 1"),
        ({"update-norm-window": 0}, "'update-norm-window': must be an integer >= 1"),
    ],
)
def test_bound_keys_are_validated(overrides, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(overrides)


def test_the_default_is_adaptive_and_the_paper_is_one_setting_away():
    assert default_algorithm().bound == ReplyBound("adaptive", multiplier=10.0, window=10, action="reject")
    assert default_config().server.update_norm_bound == "adaptive"
    off = default_algorithm(**{"update-norm-bound": "off"}).bound
    assert off.limit(((1.0,),), (1.0, 3e38)) == math.inf
    fixed = default_algorithm(
        **{"update-norm-bound": "fixed", "max-update-norm": 2.0, "update-norm-action": "clip"}
    ).bound
    assert fixed.limit((), (1.0, 3e38)) == 2.0 and fixed.factor(8.0, 2.0) == 0.25
