"""Compact client state (config keys state-dtype, state-store): rounded residuals, state on node-local disk."""

import warnings

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import persist, state_io
from clients.client_app import end, train
from fl_compams import ef_step, make_compressor, parse_config, precision, protocol
from fl_compams.algorithm import Outcome, Status, WorkerState
from tasks.task import model_for_task

CPU = torch.device("cpu")
NODE = {"partition-id": 1, "num-partitions": 4}
RUN_CONFIG = {"out-dir": "/srv/fl/runs", "run-name": "compact"}


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """The run-scoped temporary directory of state-store = "disk" under tmp_path."""
    monkeypatch.setattr(state_io, "temporary_root", lambda: tmp_path / "tmp")
    return tmp_path / "tmp"


def residual_vector(d=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g) * 10.0 ** (torch.rand(d, generator=g) * 6 - 5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_residual_reads_back_as_the_rounded_values_and_counts_its_stored_bytes(dtype):
    x = residual_vector()
    state = RecordDict()
    state_io.save_worker_state(state, WorkerState(x, rounds=1), dtype)
    back = state_io.load_worker_state(state, x.numel(), CPU)
    assert back.residual.dtype == torch.float32 and torch.equal(back.residual, precision.round_to(x, dtype))
    assert not torch.equal(back.residual, x)
    stored = sum(a.numpy().nbytes for a in state[state_io.RESIDUAL_RECORD].values())
    assert (
        state_io.state_bytes(back, dtype)["residual"]
        == stored
        == 2 * x.numel() + (8 if dtype == "float16" else 0)
    )
    assert state_io.load_worker_state(state, x.numel() + 1, CPU).residual is None  # another model: fresh


def test_float32_residual_record_is_unchanged():
    x = residual_vector()
    state = RecordDict()
    state_io.save_worker_state(state, WorkerState(x, rounds=1))
    record = state[state_io.RESIDUAL_RECORD]
    assert list(record.keys()) == [state_io.RESIDUAL_KEY] and record[state_io.RESIDUAL_KEY].dtype == "float32"
    assert np.array_equal(record[state_io.RESIDUAL_KEY].numpy(), x.numpy())
    assert state_io.state_bytes(WorkerState(x), "float32")["residual"] == 4 * x.numel()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_ef_identity_holds_up_to_the_accumulated_rounding_error(dtype):
    """sum(sent) + e_T = sum(updates) + sum_t (rounding of e_t), each rounding within the dtype's element bound."""
    d, rounds = 400, 30
    topk = make_compressor("topk", k=8)
    g = torch.Generator().manual_seed(5)
    updates = torch.randn(rounds, d, generator=g, dtype=torch.float64).float() * 0.01
    state, sent, bound = (
        RecordDict(),
        torch.zeros(d, dtype=torch.float64),
        torch.zeros(d, dtype=torch.float64),
    )
    for t in range(rounds):
        e = state_io.load_worker_state(state, d, CPU).residual if t else torch.zeros(d)
        payload, e_exact = ef_step(topk, updates[t], e)
        sent += payload.decode().double()
        bound += precision.element_bound(e_exact, dtype).double()
        state_io.save_worker_state(state, WorkerState(e_exact, rounds=t + 1), dtype)
    e_stored = state_io.load_worker_state(state, d, CPU).residual.double()
    gap = (sent + e_stored - updates.double().sum(0)).abs()
    float32_arithmetic = 4 * rounds * 2.0**-24 * updates.double().abs().sum(0)  # the float32 EF step itself
    assert bool((gap <= bound + float32_arithmetic).all())
    if dtype != "float32":  # the stored residual really was the rounded one
        assert float(gap.max()) > float(float32_arithmetic.max())


def instruction(rnd, settings, statuses=()):
    cfg = parse_config(settings)
    flat = cfg.to_flat()
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(model_for_task(cfg.data, cfg.seed).state_dict()),
            protocol.CONFIG: ConfigRecord(
                {**{k: flat[k] for k in protocol.CLIENT_KEYS}, "server-round": rnd}
            ),
        }
    )
    if statuses:
        content[protocol.STATUSES] = ConfigRecord(protocol.statuses_to_fields(statuses))
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)


def node_context(node_config=None):
    return Context(
        run_id=5, node_id=7, node_config={**NODE, **(node_config or {})}, state=RecordDict(),
        run_config=dict(RUN_CONFIG),
    )  # fmt: skip


def three_rounds(ctx, settings):
    """Metrics of three training rounds, each acknowledging the one before."""
    out = []
    for rnd in (1, 2, 3):
        statuses = (Status(rnd - 1, Outcome.APPLIED, 1.0),) if rnd > 1 else ()
        out.append(dict(train(instruction(rnd, settings, statuses), ctx).content[protocol.METRICS]))
    return out


def test_disk_store_keeps_only_the_counters_in_memory_and_changes_no_result(tmp_root):
    base = {"seed": 3, "batch-size": 8}
    in_memory = three_rounds(node_context(), base)
    ctx = node_context()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no StateFileWarning
        on_disk = three_rounds(ctx, {**base, "state-store": "disk"})
    assert on_disk == in_memory  # lossless: the same residuals, bit for bit, and the same state bytes
    assert not ctx.state.array_records and set(ctx.state.config_records) == {
        state_io.COUNTERS_RECORD,
        state_io.STORE_RECORD,
    }
    path = ctx.state[state_io.STORE_RECORD][state_io.STORE_PATH_KEY]
    assert str(path).startswith(str(tmp_root)) and not list(
        tmp_root.rglob("*.prev")
    )  # run-scoped, no history
    saved = persist.read_state(path, run_key=state_io.run_key(ctx), node_key="partition-1", dim=None)
    assert (
        saved.rounds == 3
        and saved.arrays[state_io.RESIDUAL_RECORD][state_io.RESIDUAL_KEY].dtype == np.float32
    )
    end(Message(RecordDict(), message_type="query.end", dst_node_id=7), ctx)
    assert not list(tmp_root.rglob("*.state"))  # the run's end removes it


def test_disk_store_in_float16_writes_the_rounded_residual(tmp_root):
    ctx = node_context()
    metrics = three_rounds(ctx, {"seed": 3, "batch-size": 8, "state-store": "disk", "state-dtype": "float16"})
    path = ctx.state[state_io.STORE_RECORD][state_io.STORE_PATH_KEY]
    saved = persist.read_state(path, run_key=state_io.run_key(ctx), node_key="partition-1", dim=None)
    values = saved.arrays[state_io.RESIDUAL_RECORD][state_io.RESIDUAL_KEY]
    assert values.dtype == np.float16
    assert metrics[-1][protocol.STATE_BYTES["residual"]] == values.nbytes + 8  # values and the scale exponent


def test_disk_store_uses_the_state_dir_when_the_node_has_one(tmp_path, tmp_root):
    ctx = node_context({"state-dir": str(tmp_path / "node")})
    three_rounds(ctx, {"seed": 3, "batch-size": 8, "state-store": "disk"})
    path = ctx.state[state_io.STORE_RECORD][state_io.STORE_PATH_KEY]
    assert path == str(state_io.state_file(ctx)) and not tmp_root.exists()


def test_a_lost_store_file_gives_a_warning_and_a_fresh_state(tmp_root):
    settings = {"seed": 3, "batch-size": 8, "state-store": "disk"}
    ctx = node_context()
    train(instruction(1, settings), ctx)
    persist.Path(ctx.state[state_io.STORE_RECORD][state_io.STORE_PATH_KEY]).write_bytes(b"garbage")
    with pytest.warns(persist.StateFileWarning, match="gone or unusable"):
        got = dict(train(instruction(2, settings), ctx).content[protocol.METRICS])
    assert got[protocol.RESIDUAL_NORM_IN] == 0.0 and got[protocol.STATE_ROUNDS] == 1


def test_default_instruction_does_not_carry_the_state_keys_but_a_compact_one_does():
    from fl_compams import ParamSpec
    from fl_compams.config import build_algorithm
    from fl_compams.server import init_server_state
    from strategies.comp_ams import CompAMS

    spec = ParamSpec(("w",), ((6,),), ("float32",), (True,))

    def sent(**overrides):
        cfg = parse_config(overrides)
        algorithm = build_algorithm(cfg, spec.block_sizes)
        strategy = CompAMS(cfg, spec, algorithm, init_server_state(torch.zeros(6), algorithm.server_opt))
        return dict(strategy.client_config())

    assert not {"state-dtype", "state-store"} & set(sent())  # the default instruction's bytes are unchanged
    assert sent(**{"state-dtype": "bfloat16", "state-store": "disk"}).items() >= {
        ("state-dtype", "bfloat16"),
        ("state-store", "disk"),
    }
    with pytest.raises(ValueError, match="state-dtype"):
        parse_config({"state-dtype": "float8"})


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_two_way_replica_is_stored_in_two_bytes_exactly_and_follows_the_broadcasts(dtype):
    """The public model stays representable in state-dtype, so the compact replica still matches every digest."""
    from fl_compams import ParamSpec, flatten, unflatten
    from fl_compams.algorithm import instruction_for
    from fl_compams.config import build_algorithm
    from fl_compams.downlink import broadcast, observe
    from fl_compams.server import init_server_state
    from strategies import validate

    settings = {"seed": 3, "batch-size": 8, "downlink-compressor": "blocksign", "state-dtype": dtype}
    cfg = parse_config(settings)
    model = model_for_task(cfg.data, cfg.seed)
    spec = ParamSpec.from_module(model)
    algorithm = build_algorithm(cfg, spec.block_sizes)
    theta = flatten(model.state_dict(), spec)
    state = init_server_state(theta, algorithm.server_opt, two_way=True, public_dtype=dtype)
    flat = cfg.to_flat()

    def message(state, rnd):
        instruction = instruction_for(state, "partition-1", rnd)
        content = RecordDict(
            {
                protocol.CONFIG: ConfigRecord(
                    {**{k: flat[k] for k in protocol.CLIENT_KEYS}, "server-round": rnd}
                )
            }
        )
        content[protocol.DOWNLINK] = ConfigRecord(protocol.downlink_to_fields(instruction.downlink))
        if instruction.downlink.dense:
            content[protocol.ARRAYS] = ArrayRecord(unflatten(state.downlink.public, spec))
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)

    ctx = Context(run_id=1, node_id=7, node_config=dict(NODE), state=RecordDict(), run_config={})
    first = train(message(state, 1), ctx).content
    down = observe(state.downlink, [("partition-1", validate.replica_echo(first))])
    for rnd in (1, 2, 3):  # the node sits out three broadcasts, then follows them
        new = theta + 0.01 * torch.randn(spec.dim, generator=torch.Generator().manual_seed(rnd))
        down = broadcast(algorithm.downlink, down, theta, new, rnd)
        theta = new
        assert torch.equal(precision.round_to(down.public, dtype), down.public)  # representable
        assert torch.allclose(down.public + down.residual, theta, atol=1e-6)  # public + e_s = theta
    content = train(message(state._replace(theta=theta, downlink=down), 4), ctx).content
    assert content[protocol.PAYLOAD][protocol.REPLICA] == str(down.version)  # no resync: the digest matched
    record = ctx.state[state_io.REPLICA_RECORD]
    assert sum(a.numpy().nbytes for k, a in record.items() if k.startswith("model")) == 2 * spec.dim + (
        8 if dtype == "float16" else 0
    )
    held = state_io.load_worker_state(ctx.state, spec.dim, CPU)
    assert torch.equal(held.replica, down.public) and held.replica_version == down.version
    metrics = content[protocol.METRICS]
    assert metrics[protocol.STATE_BYTES["replica"]] == state_io.state_bytes(held, dtype)["replica"]
