"""The per-process node cache: cached set-ups give the replies fresh ones give, and entries never mix.

The equivalence tests drive the ClientApp's own handlers with the instructions a server built from the algorithm
layer sends (``instruction_for`` / ``server_step``, as :class:`strategies.CompAMS` does), for two nodes served
alternately by one thread, with evaluation and probe messages in between (they leave the shared model in eval
mode with gradients), once with the cache and once without, and compare every reply and every node state byte
for byte.
"""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import node_cache
from clients.client_app import evaluate_local, probe, train
from fl_compams import ParamSpec, flatten, parse_config, protocol, unflatten
from fl_compams.algorithm import FLOWER_BASELINES, ServerReply, instruction_for, server_step
from fl_compams.config import build_algorithm
from fl_compams.server import init_server_state
from strategies import validate
from tasks.task import model_for_task

LABELS = ("partition-1", "partition-2")


@pytest.fixture(autouse=True)
def _fresh_cache():
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray worker; 2-thread ops crawl on a busy 2-core machine
    node_cache.clear()
    yield
    node_cache.enabled = True
    node_cache.clear()
    torch.set_num_threads(threads)


def _settings(cfg) -> dict:
    flat = cfg.to_flat()
    return {k: flat[k] for k in protocol.CLIENT_KEYS if k not in protocol.OPTIONAL_CLIENT_KEYS}


def _context(i: int, run_id: int = 1, **extra) -> Context:
    node = {"partition-id": i + 1, "num-partitions": 10, **extra}
    return Context(run_id=run_id, node_id=100 + i, node_config=node, state=RecordDict(), run_config={})


def _dump(content: RecordDict) -> dict:
    """Every record of a message (or a node state), tensors as raw bytes: equal dumps = bit-identical content."""
    out = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {k: (a.dtype, tuple(a.shape), a.numpy().tobytes()) for k, a in record.items()}
        else:
            out[name] = dict(record)
    return out


def _message(settings, rnd, arrays=None, extra=None, message_type=MessageType.TRAIN) -> Message:
    content = RecordDict({protocol.CONFIG: ConfigRecord({**settings, "server-round": rnd})})
    if arrays is not None:
        content[protocol.ARRAYS] = arrays
    for name, record in (extra or {}).items():
        content[name] = record
    return Message(content=content, message_type=message_type, dst_node_id=7)


def _run(overrides: dict, rounds: int, cached: bool) -> list:
    """Every reply and node state of ``rounds`` rounds of two nodes, with evaluate and probe messages between."""
    node_cache.enabled = cached
    node_cache.clear()
    cfg = parse_config(overrides)
    settings = _settings(cfg)
    model = model_for_task(cfg.data, cfg.seed)
    spec = ParamSpec.from_module(model)
    baseline = cfg.algorithm in FLOWER_BASELINES
    algorithm = None if baseline else build_algorithm(cfg, spec.block_sizes)
    theta = flatten(model.state_dict(), spec)
    state = None
    if not baseline:
        state = init_server_state(theta, algorithm.server_opt, two_way=algorithm.downlink is not None)
    contexts = [_context(i) for i in range(len(LABELS))]
    seen = []
    for rnd in range(1, rounds + 1):
        public = theta if baseline else state.theta if state.downlink is None else state.downlink.public
        arrays = ArrayRecord({k: v.contiguous() for k, v in unflatten(public, spec).items()})
        replies, trained = [], []
        for label, ctx in zip(LABELS, contexts, strict=True):
            extra, send = {}, arrays
            if not baseline:
                instruction = instruction_for(state, label, rnd, algorithm)
                if instruction.statuses:
                    extra[protocol.STATUSES] = ConfigRecord(protocol.statuses_to_fields(instruction.statuses))
                if instruction.downlink is not None:
                    extra[protocol.DOWNLINK] = ConfigRecord(protocol.downlink_to_fields(instruction.downlink))
                    send = arrays if instruction.downlink.dense else None
            reply = train(_message(settings, rnd, send, extra), ctx)
            seen += [_dump(reply.content), _dump(ctx.state)]
            # the other node is evaluated or probed in between: eval mode, gradients left on the shared model
            other = contexts[1 - LABELS.index(label)]
            if rnd % 2:
                seen.append(
                    _dump(
                        evaluate_local(
                            _message(settings, rnd, arrays, None, MessageType.EVALUATE), other
                        ).content
                    )
                )
            else:
                seen.append(
                    _dump(
                        probe(
                            _message(settings, rnd, arrays, None, protocol.PROBE_MESSAGE_TYPE), other
                        ).content
                    )
                )
            if baseline:
                trained.append(flatten(reply.content[protocol.ARRAYS].to_torch_state_dict(), spec))
                continue
            checked = validate.training_reply(
                reply.content, rnd, dim=spec.dim, kind=algorithm.compressor.kind, block_sizes=spec.block_sizes
            )
            echo = validate.replica_echo(reply.content) if state.downlink is not None else None
            n = int(checked.metrics.values[protocol.NUM_EXAMPLES])
            replies.append(ServerReply(label, rnd, checked.payload, n, checked.acked, echo))
        if baseline:
            theta = torch.stack(trained).mean(0)
        else:
            state, _ = server_step(algorithm, state, rnd, replies)
    return seen


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the default run: Top-k 1 % with EF, AMSGrad
        {"local-steps": 3, "batch-size": 16},  # local SGD moves the shared model's weights in place
        {"downlink-compressor": "blocksign"},  # two-way: no model in most instructions, the replica is loaded
        {"algorithm": "qadam"},
        {"algorithm": "flower-fedavg"},
    ],
    ids=["default", "local-sgd", "two-way", "qadam", "flower-fedavg"],
)
def test_cached_setup_gives_bit_identical_replies_over_rounds_and_nodes(overrides):
    fresh = _run(overrides, rounds=3, cached=False)
    assert node_cache.stats()["runs"] == 0  # the cache was off
    cached = _run(overrides, rounds=3, cached=True)
    stats = node_cache.stats()
    assert stats["runs"] == 1 and stats["nodes"] == 2 and stats["node_hits"] > 0
    assert len(cached) == len(fresh)
    for i, (a, b) in enumerate(zip(fresh, cached, strict=True)):
        assert a == b, f"content {i} differs"


def _used(model: torch.nn.Module) -> None:
    """Leave a model as a handler might: eval mode, gradients, changed weights."""
    model.eval()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
        with torch.no_grad():
            p.add_(1.0)


def _record(cfg) -> ConfigRecord:
    return ConfigRecord({**_settings(cfg), "server-round": 1})


def test_handed_out_model_is_what_a_fresh_one_would_be():
    cfg = parse_config({"seed": 5})
    fresh = model_for_task(cfg.data, cfg.seed)
    weights = {k: v + 0.5 for k, v in fresh.state_dict().items()}
    first = node_cache.setup(_record(cfg), _context(0), weights)
    _used(first.model)
    again = node_cache.setup(_record(cfg), _context(1), weights)  # another node, the same thread
    assert again.model is first.model  # one skeleton per run and thread, not one per node
    assert again.model.training and all(p.grad is None for p in again.model.parameters())
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, weights[k])
    _used(again.model)
    initial = node_cache.setup(_record(cfg), _context(1), None)  # no model in the message: the seeded init
    for k, v in initial.model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])


def test_runs_nodes_and_configs_never_share_data():
    """Each (run, node, config) gets the examples a fresh set-up loads, whatever was served before it."""
    cases = [
        (1, 0, {"seed": 0}),
        (1, 1, {"seed": 0}),
        (1, 0, {"seed": 1}),  # the partition depends on the seed
        (2, 0, {"seed": 0}),
        (1, 0, {"seed": 0, "dirichlet-alpha": 100.0}),
    ]
    for _ in range(2):  # the second pass is served from the cache
        for run_id, node, overrides in cases:
            cfg = parse_config(overrides)
            got = node_cache.setup(_record(cfg), _context(node, run_id), None)
            node_cache.enabled = False
            want = node_cache.setup(_record(cfg), _context(node, run_id), None)
            node_cache.enabled = True
            assert got.cfg == want.cfg
            assert torch.equal(got.data.x, want.data.x) and torch.equal(got.data.y, want.data.y)
            assert got.data.seed_id == want.data.seed_id
    stats = node_cache.stats()
    assert stats["nodes"] == len(cases) and stats["node_hits"] == len(cases)


def test_a_replaced_data_file_is_read_again(tmp_path):
    cfg = parse_config({})
    path = tmp_path / "train.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(6, 1, 8, 8)).astype(np.float32), y=np.arange(6) % 10)
    ctx = Context(
        run_id=1, node_id=3, node_config={"data-file": str(path)}, state=RecordDict(), run_config={}
    )
    first = node_cache.setup(_record(cfg), ctx, None).data
    np.savez(path, x=rng.normal(size=(9, 1, 8, 8)).astype(np.float32), y=np.arange(9) % 10)
    second = node_cache.setup(_record(cfg), ctx, None).data
    assert first.x.shape[0] == 6 and second.x.shape[0] == 9


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(node_cache, "_nodes", node_cache.LRU(3))
    monkeypatch.setattr(node_cache, "_runs", node_cache.LRU(2))
    for seed in range(3):
        cfg = parse_config({"seed": seed})
        for node in range(3):
            node_cache.setup(_record(cfg), dataclasses.replace(_context(0), node_id=node), None)
    stats = node_cache.stats()
    assert stats["runs"] == 2 and stats["nodes"] == 3


def test_lru_evicts_the_least_recently_used_within_both_bounds():
    lru = node_cache.LRU(3, max_bytes=10)
    for key in "abc":
        lru.put(key, key.upper(), 3)
    assert lru.get("a") == "A"  # now the most recent: b is the oldest
    lru.put("d", "D", 3)  # 4 entries, 12 bytes: b goes
    assert lru.get("b") is None and len(lru) == 3 and lru.nbytes == 9
    lru.put("e", "E", 7)  # 16 bytes: the two oldest (c, a) go
    assert lru.get("c") is None and lru.get("a") is None and lru.get("d") == "D" and lru.nbytes == 10
    lru.put("big", "X", 11)  # larger than the whole budget: not kept, nothing else lost
    assert lru.get("big") is None and len(lru) == 2
    with pytest.raises(ValueError, match="max_entries"):
        node_cache.LRU(0)


class _WithScratch(torch.nn.Module):
    """A model with a non-persistent buffer: a state-dict load would not overwrite it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("scratch", torch.zeros(1), persistent=False)

    def forward(self, x):
        return self.inner(x)


def test_a_model_with_state_outside_its_state_dict_is_never_cached(monkeypatch):
    real = node_cache.model_for_task
    monkeypatch.setattr(node_cache, "model_for_task", lambda data, seed: _WithScratch(real(data, seed)))
    cfg = parse_config({})
    first = node_cache.setup(_record(cfg), _context(0), None).model
    second = node_cache.setup(_record(cfg), _context(0), None).model
    assert first is not second
