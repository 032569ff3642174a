"""Qsparse-local-SGD (algorithms.md section 5): memory identity, reductions, async = sync delayed, bad input."""

import pytest
import torch
import torch.nn.functional as F

from fl_compams import from_bytes, make_compressor
from fl_compams.algorithm import (
    Algorithm,
    ServerReply,
    WorkerState,
    instruction_for,
    server_step,
    worker_begin,
    worker_end,
)
from fl_compams.config import build_algorithm, parse_config
from fl_compams.error_feedback import ef_step
from fl_compams.errors import ConfigError
from fl_compams.qsparse import Qsparse, parse_periods
from fl_compams.server import init_server_state
from fl_compams.server_opt import SGD
from tasks.training import local_update

DIM = 40
QCOMPS = {
    "signtopk": {"ratio": 0.1},
    "topk": {"ratio": 0.1},
    "qsgd-topk": {"ratio": 0.2, "levels": 3},
}


def qcomp(name):
    return make_compressor(name, **QCOMPS[name])


def qsparse_algorithm(name, **kw):
    """algorithm = "qsparse" as the registry composes it: server sgd, lr 1, no momentum, EF on."""
    return Algorithm("qsparse", qcomp(name), SGD(lr=1.0), qsparse=Qsparse(**kw))


# ------------------------------------------------------------------------------------------ memory identity
def local_sgd(theta, a, b, lr, steps, gen):
    """H SGD steps on 0.5 ||A_i theta - b_i||^2 over random rows; (theta_H, the list of eta * gradient)."""
    steps_taken = []
    for _ in range(steps):
        i = torch.randint(a.shape[0], (4,), generator=gen)
        g = a[i].T @ (a[i] @ theta - b[i])
        steps_taken.append(lr * g)
        theta = theta - lr * g
    return theta, steps_taken


@pytest.mark.parametrize("name", sorted(QCOMPS))
@pytest.mark.parametrize("asynchronous", [False, True])
def test_memory_identity_in_model_units(name, asynchronous):
    # sum over syncs of g + m_final (+ the unsent local change, asynchronous) = sum of every eta * gradient
    lr, steps = 0.01, 5
    part = Qsparse(lr=lr, steps=steps, asynchronous=asynchronous)
    c = qcomp(name)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, DIM, generator=gen, dtype=torch.float64), torch.randn(30, generator=gen).double()
    theta, memory, kept = torch.zeros(DIM, dtype=torch.float64), torch.zeros(DIM, dtype=torch.float64), None
    sent, work = torch.zeros_like(theta), torch.zeros_like(theta)
    for rnd in range(1, 13):
        theta_h, etas = local_sgd(theta, a, b, lr, steps, gen)
        work += sum(etas)
        u = (theta - theta_h) / (lr * steps)  # what tasks.training.local_update returns
        w = part.work(kept, u, round=rnd, steps=steps)
        payload, memory = ef_step(c, w.send, memory, gen)
        g = c.decode(payload)
        sent += g
        kept = w.keep
        theta = theta - g  # one client: the server applies its g
    unsent = kept.change if kept is not None else 0.0
    assert float((sent + memory + unsent - work).norm()) <= 1e-10 * float(work.norm())
    assert float(memory.norm()) > 0  # the compressor really dropped something


# ------------------------------------------------------------------------------------------ reductions
def run_layer(algo, updates, *, steps=None, seed=5):
    """The algorithm layer without faults; updates[t][i] = client i's mean gradient in round t + 1."""
    state = init_server_state(torch.zeros(DIM), algo.server_opt)
    workers = [WorkerState() for _ in updates[0]]
    payloads = []
    for rnd, us in enumerate(updates, start=1):
        replies, row = [], []
        for i, u in enumerate(us):
            label = f"w{i}"
            workers[i], begun = worker_begin(algo, workers[i], instruction_for(state, label, rnd), dim=DIM)
            rng = torch.Generator().manual_seed(seed + 100 * i + rnd)
            reply, workers[i] = worker_end(
                algo, workers[i], u, round=rnd, rng=rng, acked=begun.acked, steps=steps
            )
            p = from_bytes(reply.payload, DIM)
            row.append(p.decode())
            replies.append(ServerReply(label, rnd, p, 1, reply.acked))
        state, _ = server_step(algo, state, rnd, replies)
        payloads.append(row)
    return state, workers, payloads


def gradients(rounds=8, clients=3, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(DIM, generator=gen) for _ in range(clients)] for _ in range(rounds)]


@pytest.mark.parametrize("k_of_d", [1.0, 0.1])
def test_h1_is_ef_sgd_with_the_compressor_on_eta_g_plus_memory(k_of_d):
    # H = 1, QComp = Sign-Top-k with k = d (the scaled sign): EF-signSGD; k < d: EF-Sign-Top-k-SGD.
    lr = 0.05
    algo = Algorithm(
        "qsparse",
        make_compressor("signtopk", ratio=k_of_d),
        SGD(lr=1.0),
        qsparse=Qsparse(lr=lr, steps=1),
    )
    grads = gradients()
    state, workers, _ = run_layer(algo, grads)
    x, e = torch.zeros(DIM), [torch.zeros(DIM) for _ in range(3)]
    k = max(1, round(k_of_d * DIM))
    for gs in grads:
        g_bar = torch.zeros(DIM)
        for i, g in enumerate(gs):
            p = lr * g + e[i]  # EF-signSGD (Karimireddy et al.): C applied to eta g + e
            top = torch.zeros(DIM)
            idx = torch.topk(p.abs(), k).indices
            top[idx] = torch.where(p[idx] >= 0, 1.0, -1.0) * p[idx].abs().sum() / k
            e[i] = p - top
            g_bar += top / 3
        x = x - g_bar
    assert torch.allclose(state.theta, x, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(w.residual, r, atol=1e-6) for w, r in zip(workers, e, strict=True))


def test_identity_qcomp_is_local_sgd_fedavg():
    # QComp = identity: x_{t+1} = mean_r x_hat_r (FedAvg of H local SGD steps), against a plain torch loop
    lr, steps, rounds, clients = 0.1, 4, 3, 3
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(20, 6, generator=gen), torch.randint(0, 3, (20,), generator=gen)) for _ in range(clients)
    ]
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    algo = Algorithm("qsparse", make_compressor("identity"), SGD(lr=1.0), qsparse=Qsparse(lr=lr, steps=steps))
    dim = theta0.numel()
    state = init_server_state(theta0, algo.server_opt)
    workers = [WorkerState() for _ in range(clients)]
    reference = theta0.clone()
    for rnd in range(1, rounds + 1):
        replies, trained = [], []
        for i, (x, y) in enumerate(data):
            # the layer: tasks.training.local_update at the global model, then worker_end
            torch.nn.utils.vector_to_parameters(state.theta.clone(), model.parameters())  # not a view
            u, _ = local_update(
                model,
                x,
                y,
                steps=steps,
                lr=lr,
                batch_size=5,
                generator=torch.Generator().manual_seed(rnd * 10 + i),
            )
            label = f"w{i}"
            workers[i], begun = worker_begin(algo, workers[i], instruction_for(state, label, rnd), dim=dim)
            reply, workers[i] = worker_end(algo, workers[i], u, round=rnd, acked=begun.acked)
            replies.append(ServerReply(label, rnd, from_bytes(reply.payload, dim), 1, reply.acked))
            # the plain loop: torch.optim.SGD from the reference model on the same minibatches
            torch.nn.utils.vector_to_parameters(reference.clone(), model.parameters())
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            g = torch.Generator().manual_seed(rnd * 10 + i)
            for _ in range(steps):
                idx = torch.randperm(20, generator=g)[:5]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            trained.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
        state, _ = server_step(algo, state, rnd, replies)
        reference = torch.stack(trained).mean(0)
        assert torch.allclose(state.theta, reference, rtol=1e-5, atol=1e-6), rnd
    assert all(float(w.residual.abs().max()) < 1e-6 for w in workers)  # identity drops nothing
    assert float((reference - theta0).norm()) > 0.01  # the model moved


@pytest.mark.parametrize("name", sorted(QCOMPS))
def test_async_with_equal_periods_is_sync_delayed_by_one_contact(name):
    # Derivation: asynchronously a client sends at contact t + 1 the work it did at contact t. When that work
    # does not depend on the model it started from (here: given updates; "staleness removed"), the asynchronous
    # run is the synchronous one one round later, bit for bit; its first contact sends QComp(0) = 0.
    grads = gradients(rounds=7)
    sync_state, sync_workers, sync_sent = run_layer(qsparse_algorithm(name, lr=0.1, steps=4), grads[:-1])
    # the async client uses at contact t + 1 the generator the sync client used at contact t
    async_algo = qsparse_algorithm(name, lr=0.1, steps=4, asynchronous=True)
    async_state, async_workers, async_sent = run_layer(async_algo, grads, seed=4)
    assert all(float(p.abs().max()) == 0 for p in async_sent[0])
    for t in range(len(grads) - 1):
        for a, s in zip(async_sent[t + 1], sync_sent[t], strict=True):
            assert torch.equal(a, s)
    assert torch.equal(async_state.theta, sync_state.theta)
    for a, s in zip(async_workers, sync_workers, strict=True):
        assert torch.equal(a.residual, s.residual)
        assert a.local_change is not None and a.local_change.round == len(grads)
    # not vacuous: with staleness the model the work started from matters, so the runs differ in general
    assert float(async_state.theta.norm()) > 0


# ------------------------------------------------------------------------------------------ periods
def test_periods_rules():
    assert Qsparse(lr=0.1, steps=3).period(7) == 3
    uniform = Qsparse(lr=0.1, steps=8, asynchronous=True, periods="uniform", seed=1)
    drawn = [uniform.period(r) for r in range(40)]
    assert all(1 <= h <= 8 for h in drawn) and len(set(drawn)) > 3
    assert drawn == [
        Qsparse(lr=0.1, steps=8, asynchronous=True, periods="uniform", seed=1).period(r) for r in range(40)
    ]
    assert drawn != [
        Qsparse(lr=0.1, steps=8, asynchronous=True, periods="uniform", seed=2).period(r) for r in range(40)
    ]
    listed = Qsparse(lr=0.1, asynchronous=True, periods=parse_periods("1, 2,4"))
    assert [listed.period(r) for r in range(3)] == [1, 2, 4]
    with pytest.raises(ConfigError, match=r"qsparse-periods.*partition id is 3"):
        listed.period(3)
    listed.check_clients(["partition-2", "partition-0", "partition-1"])
    for wrong in (["partition-0", "partition-1"], ["partition-0", "partition-1", "node-x"]):
        with pytest.raises(ConfigError, match="qsparse-periods"):
            listed.check_clients(wrong)


def test_async_contacts_report_the_age_of_their_work():
    part = Qsparse(lr=0.5, steps=2, asynchronous=True)
    u = torch.ones(DIM)
    first = part.work(None, u, round=3, steps=2)
    assert (first.steps, first.staleness) == (0, 0) and float(first.send.abs().max()) == 0
    assert first.keep.round == 3 and torch.equal(first.keep.change, u)  # eta H u = 0.5 * 2 * u
    later = part.work(first.keep, 2 * u, round=7, steps=2)
    assert (later.steps, later.staleness) == (2, 4) and torch.equal(later.send, u)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "given,key",
    [
        ({"local-steps": 0}, "local-steps"),
        ({"compressor": "qsgd-topk", "qsgd-levels": 0}, "qsgd-levels"),
        ({"compressor": "qsgd"}, "compressor"),
        ({"compressor": "mvss"}, "compressor"),
        ({"compressor": "randk", "randk-scaled": True}, "compressor"),
        ({"qsparse-async": True, "qsparse-periods": "2,0,1"}, "qsparse-periods"),
        ({"qsparse-async": True, "qsparse-periods": "2,x"}, "qsparse-periods"),
        ({"qsparse-periods": "2,2"}, "qsparse-periods"),  # periods without the asynchronous variant
        ({"error-feedback": False}, "error-feedback"),
        ({"server-opt": "adam"}, "server-opt"),
    ],
)
def test_bad_settings_stop_before_round_1_naming_the_key(given, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_config({"algorithm": "qsparse", **given})


def test_qsparse_keys_belong_to_qsparse():
    for given in ({"qsparse-async": True}, {"qsparse-periods": "uniform"}):
        with pytest.raises(ConfigError, match="applies to algorithm = 'qsparse' only"):
            parse_config(given)


def test_composition_fixes_the_server_and_reads_h_eta_and_the_variant():
    cfg = parse_config(
        {
            "algorithm": "qsparse",
            "compressor": "signtopk",
            "local-steps": 4,
            "local-lr": 0.2,
            "qsparse-async": True,
        }
    )
    algo = build_algorithm(cfg)
    assert algo.server_opt == SGD(lr=1.0, momentum=0.0) and algo.error_feedback and algo.local_opt is None
    assert algo.qsparse == Qsparse(lr=0.2, steps=4, asynchronous=True, periods="", seed=0)
    assert build_algorithm(parse_config({})).qsparse is None  # compams is untouched
