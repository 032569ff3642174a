"""The client state file: round trip, every corruption class gives a warning and a fresh state, atomic writes."""

import hashlib
import os
import struct
import warnings

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, RecordDict

from clients import persist, state_io
from clients.persist import (
    PersistedState,
    StateFileWarning,
    decode_state,
    encode_state,
    read_state,
    write_state,
)
from fl_compams.nodes import label_of_config

RUN, NODE, KEY, DIM = "exp-0123456789abcdef", 2**64 - 7, "partition-1", 1000
RUN_ID = 2**63 + 12345  # Flower's run id: recorded, never compared
HEADER = struct.Struct("<8sHHQQQQQHHH")


def make_state(np_rng, *, rounds=3, run=RUN, key=KEY, dim=DIM, extra=True, round=5):
    arrays = {"ef": {"residual": np_rng.standard_normal(dim).astype(np.float32)}}
    if extra:  # what QAdam keeps besides the residual, and every other supported dtype
        arrays["qadam"] = {
            "m": np_rng.standard_normal(dim).astype(np.float32),
            "step": np.array([7], dtype=np.int64),
        }
        arrays["misc"] = {
            "half": np.arange(6, dtype=np.float16).reshape(2, 3),
            "double": np.array(2.5),  # 0-d
            "flags": np.array([True, False]),
            "bytes": np.arange(5, dtype=np.uint8),
            "empty": np.zeros((0, 4), np.int32),
        }
    return PersistedState(run, key, round, rounds, dim, arrays, RUN_ID, NODE)


def rehash(body: bytes) -> bytes:
    """Bytes with a fresh checksum, to reach the checks behind the SHA-256."""
    return body + hashlib.sha256(body).digest()


def assert_same(a: PersistedState, b: PersistedState) -> None:
    fields = ("run_key", "node_key", "round", "rounds", "dim", "run_id", "node_id")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    assert a.arrays.keys() == b.arrays.keys()
    for rec in a.arrays:
        assert a.arrays[rec].keys() == b.arrays[rec].keys()
        for name, x in a.arrays[rec].items():
            y = b.arrays[rec][name]
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), (rec, name)


def test_round_trip_is_exact(tmp_path, np_rng):
    state = make_state(np_rng)
    path = persist.state_path(tmp_path, RUN, KEY)
    write_state(path, state)
    assert path == tmp_path / f"run-{RUN}" / "partition-1.state"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = read_state(path, run_key=RUN, node_key=KEY, dim=DIM)
    assert_same(got, state)


def test_file_size_of_the_digits_cnn_residual_is_the_documented_one(tmp_path):
    d = 151_306
    state = PersistedState(RUN, "partition-0", 1, 1, d, {"ef": {"residual": np.zeros(d, np.float32)}})
    assert len(encode_state(state)) == 605_369 == 58 + 20 + 11 + 24 + 4 * d + 32


def test_layout_is_the_documented_one(np_rng):
    state = make_state(np_rng, dim=3, extra=False)
    data = encode_state(state)
    assert HEADER.unpack_from(data) == (b"CAMSEFST", 2, 0, RUN_ID, NODE, 5, 3, 3, len(RUN), len(KEY), 1)
    pos = HEADER.size
    assert data[pos : pos + len(RUN) + len(KEY)] == (RUN + KEY).encode()
    pos += len(RUN) + len(KEY)
    assert data[pos : pos + 4] == struct.pack("<H", 2) + b"ef"
    assert data[pos + 4 : pos + 14] == struct.pack("<H", 8) + b"residual"
    assert struct.unpack_from("<BBQ", data, pos + 14) == (2, 1, 3)  # float32, 1-d, shape (3,)
    assert np.array_equal(np.frombuffer(data, "<f4", 3, pos + 24), state.arrays["ef"]["residual"])
    assert len(data) == pos + 24 + 12 + 32 and data[-32:] == hashlib.sha256(data[:-32]).digest()


def test_missing_file_is_a_silent_fresh_start(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_state(tmp_path / "nope.state", run_key=RUN, node_key=KEY, dim=DIM) is None


def _header(data: bytes, **fields) -> bytes:
    """The file's body (without checksum) with header fields replaced."""
    names = ("magic", "version", "flags", "run", "node", "round", "rounds", "dim", "rlen", "klen", "count")
    values = dict(zip(names, HEADER.unpack_from(data), strict=True))
    values.update(fields)
    return HEADER.pack(*values.values()) + data[HEADER.size : -32]


ARRAY0 = HEADER.size + len(RUN) + len(KEY)  # offset of the first array entry (ef/residual)
VALUES0 = ARRAY0 + 24  # offset of its values


CORRUPTIONS = {
    "empty": (lambda d: b"", "truncated"),
    "truncated header": (lambda d: d[:40], "truncated"),
    "truncated body": (lambda d: d[: len(d) // 2], "checksum mismatch"),
    "missing checksum": (lambda d: d[:-32], "checksum mismatch"),
    "flipped body byte": (lambda d: d[:100] + bytes([d[100] ^ 0x01]) + d[101:], "checksum mismatch"),
    "flipped checksum byte": (lambda d: d[:-1] + bytes([d[-1] ^ 0x80]), "checksum mismatch"),
    "trailing garbage": (lambda d: d + b"\x00" * 8, "checksum mismatch"),
    "foreign file": (lambda d: b"PK\x03\x04" + d[4:], "not a COMP-AMS client state file"),
    "future version": (lambda d: rehash(_header(d, version=3)), "format version 3 is not supported"),
    "version 1": (
        lambda d: rehash(_header(d, version=1)),
        "version 1 is not supported any more: it was keyed",
    ),
    "unknown flag": (lambda d: rehash(_header(d, flags=1)), "unknown flags"),
    "array count too high": (lambda d: rehash(_header(d, count=4)), "length mismatch"),
    "array count too low": (lambda d: rehash(_header(d, count=2)), "unexpected bytes after the last array"),
    "key too long": (lambda d: rehash(_header(d, klen=2**16 - 1)), "length mismatch"),
    "run key too long": (lambda d: rehash(_header(d, rlen=2**16 - 1)), "length mismatch"),
    "key not utf-8": (
        lambda d: rehash(_header(d[: HEADER.size + len(RUN)] + b"\xff" * len(KEY) + d[ARRAY0:])),
        "node key is not UTF-8",
    ),
    "run key not utf-8": (
        lambda d: rehash(_header(d[: HEADER.size] + b"\xff" * len(RUN) + d[HEADER.size + len(RUN) :])),
        "run key is not UTF-8",
    ),
    "unknown dtype": (
        lambda d: rehash(d[: ARRAY0 + 14] + bytes([99]) + d[ARRAY0 + 15 : -32]),
        "unknown dtype code 99",
    ),
    "shape too large": (
        lambda d: rehash(d[: ARRAY0 + 16] + struct.pack("<Q", 2**40) + d[ARRAY0 + 24 : -32]),
        "length mismatch",
    ),
    "nan residual": (
        lambda d: rehash(d[:VALUES0] + np.float32("nan").tobytes() + d[VALUES0 + 4 : -32]),
        "ef/residual contains NaN",
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_every_corruption_gives_a_warning_and_a_fresh_state(tmp_path, np_rng, name):
    corrupt, reason = CORRUPTIONS[name]
    path = tmp_path / "node.state"
    path.write_bytes(corrupt(encode_state(make_state(np_rng))))
    with pytest.warns(StateFileWarning, match=reason) as record:
        assert read_state(path, run_key=RUN, node_key=KEY, dim=DIM) is None
    assert str(path) in str(record[0].message) and "fresh (zero) state" in str(record[0].message)


def test_every_truncation_gives_a_warning(tmp_path, np_rng):
    data = encode_state(make_state(np_rng, dim=4))
    path = tmp_path / "node.state"
    for n in range(len(data)):
        path.write_bytes(data[:n])
        with pytest.warns(StateFileWarning):
            assert read_state(path, run_key=RUN, node_key=KEY, dim=4) is None


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"run_key": "exp-fedcba9876543210"}, f"belongs to run '{RUN}', not to run 'exp-fedcba9876543210'"),
        ({"node_key": "partition-2"}, "belongs to node 'partition-1'"),
        ({"dim": DIM - 1}, f"model of dimension {DIM}, this model has {DIM - 1}"),
    ],
)
def test_file_of_another_run_node_or_model_is_not_used(tmp_path, np_rng, kwargs, reason):
    path = tmp_path / "node.state"
    write_state(path, make_state(np_rng))
    args = {"run_key": RUN, "node_key": KEY, "dim": DIM, **kwargs}
    with pytest.warns(StateFileWarning, match=reason):
        assert read_state(path, **args) is None


def test_unreadable_path_warns(tmp_path):
    (tmp_path / "dir.state").mkdir()  # a directory where the file should be
    with pytest.warns(StateFileWarning, match="cannot be read"):
        assert read_state(tmp_path / "dir.state", run_key=RUN, node_key=KEY, dim=DIM) is None


def test_atomic_write_leaves_no_temp_file_and_replaces(tmp_path, np_rng):
    path = tmp_path / "deep" / "er" / "node.state"
    write_state(path, make_state(np_rng, rounds=1, round=1))
    write_state(path, make_state(np_rng, rounds=2, round=1))  # the same round again: no previous file
    assert sorted(p.name for p in path.parent.iterdir()) == ["node.state"]
    assert read_state(path, run_key=RUN, node_key=KEY, dim=DIM).rounds == 2


def test_state_of_an_earlier_round_is_kept_as_the_previous_file(tmp_path, np_rng):
    path = tmp_path / "node.state"
    prev = persist.previous_path(path)
    assert prev.name == "node.state.prev"
    write_state(path, make_state(np_rng, rounds=1, round=1))
    assert not prev.exists()
    write_state(path, make_state(np_rng, rounds=2, round=4))
    assert read_state(prev, run_key=RUN, node_key=KEY, dim=DIM).round == 1
    # a state of the same round (a rerun round) replaces the file and keeps the state before that round
    write_state(path, make_state(np_rng, rounds=2, round=4))
    assert read_state(prev, run_key=RUN, node_key=KEY, dim=DIM).round == 1
    # the file of another run or node is never taken as this node's previous state
    for other in ({"run": "exp-fedcba9876543210"}, {"key": "partition-2"}):
        write_state(path, make_state(np_rng, rounds=1, round=1, **other))
        write_state(path, make_state(np_rng, rounds=3, round=9))
        assert read_state(prev, run_key=RUN, node_key=KEY, dim=DIM).round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.state", "node.state.prev"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path, np_rng, monkeypatch):
    path = tmp_path / "node.state"
    write_state(path, make_state(np_rng, rounds=1))
    old = path.read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_state(path, make_state(np_rng, rounds=2))
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["node.state"]


def test_node_key_is_sanitised_into_the_file_name(tmp_path):
    path = persist.state_path(tmp_path, "../x y", "node-../../etc/x y")
    assert path.parent == tmp_path / "run-.._x_y" and "/" not in path.name and " " not in path.name


def test_encode_rejects_what_the_format_cannot_hold():
    with pytest.raises(ValueError, match="dtype complex64"):
        encode_state(PersistedState(RUN, KEY, 1, 1, 2, {"ef": {"r": np.zeros(2, np.complex64)}}))
    with pytest.raises(ValueError, match="round, rounds and dim"):
        encode_state(PersistedState(RUN, KEY, 1, -1, 2))
    with pytest.raises(ValueError, match="run key is 70000 bytes long"):
        encode_state(PersistedState("x" * 70_000, KEY, 1, 1, 2))
    with pytest.raises(ValueError, match="truncated"):
        decode_state(b"CAMSEFST")


def test_big_endian_arrays_are_stored_little_endian():
    arr = np.arange(3, dtype=">f4")
    got = decode_state(encode_state(PersistedState(RUN, KEY, 1, 1, 3, {"ef": {"r": arr}})))
    assert got.arrays["ef"]["r"].dtype == np.float32 and np.array_equal(got.arrays["ef"]["r"], arr)


# ------------------------------------------------------------------ context.state <-> disk (clients.state_io)
RUN_CONFIG = {"run-name": "exp", "out-dir": "/results"}


def context(tmp_path, node_id=11, run_id=RUN_ID, run_config=RUN_CONFIG, **node_config):
    cfg = {"state-dir": str(tmp_path), **node_config}
    return Context(run_id=run_id, node_id=node_id, node_config=cfg, state=RecordDict(), run_config=run_config)


def load_residual(ctx, dim):
    worker = state_io.load_worker_state(ctx.state, dim, torch.device("cpu"))
    return worker.residual if worker.residual is not None else torch.zeros(dim)


def train_round(ctx, residual, rnd):
    """What the ClientApp does with the state in round ``rnd``; the residual it started from."""
    state_io.restore_from_disk(ctx, residual.numel(), server_round=rnd)
    worker = state_io.load_worker_state(ctx.state, residual.numel(), torch.device("cpu"))
    before = load_residual(ctx, residual.numel())
    state_io.save_worker_state(ctx.state, worker._replace(residual=residual, rounds=worker.rounds + 1))
    state_io.save_to_disk(ctx, residual.numel(), server_round=rnd)
    return before


def rounds_of(ctx):
    return int(ctx.state[state_io.COUNTERS_RECORD][state_io.ROUNDS_KEY])


@pytest.mark.parametrize("node_config", [{"partition-id": 1}, {"node-name": "edge-a", "data-file": "/d.npz"}])
def test_restarted_node_restores_residual_and_rounds(tmp_path, node_config):
    first = context(tmp_path, node_id=11, **node_config)
    r1, r2 = torch.randn(50), torch.randn(50)
    train_round(first, r1, 1)
    train_round(first, r2, 2)
    restarted = context(tmp_path, node_id=99, **node_config)  # Flower gives a restarted SuperNode a new id
    restored = train_round(restarted, torch.randn(50), 3)
    assert torch.equal(restored, r2)
    assert rounds_of(restarted) == 3


def test_other_client_state_is_restored_too(tmp_path):
    ctx = context(tmp_path, **{"partition-id": 0})
    ctx.state[state_io.ADAM_RECORD] = ArrayRecord(
        {
            "m": Array(np.ones(5, np.float32)),
            "v": Array(np.full(5, 2, np.float32)),
            "step": Array(np.array([4])),
        }
    )
    train_round(ctx, torch.ones(5), 1)
    restarted = context(tmp_path, node_id=12, **{"partition-id": 0})
    assert state_io.restore_from_disk(restarted, 5, server_round=2)
    rec = restarted.state[state_io.ADAM_RECORD]
    assert np.array_equal(rec["v"].numpy(), np.full(5, 2, np.float32)) and int(rec["step"].numpy()[0]) == 4


def test_state_in_memory_wins_over_the_file(tmp_path):
    ctx = context(tmp_path, **{"partition-id": 0})
    train_round(ctx, torch.ones(4), 1)
    key = state_io.run_key(ctx)
    other = PersistedState(key, "partition-0", 1, 7, 4, {"ef": {"residual": np.zeros(4, np.float32)}})
    persist.write_state(state_io.state_file(ctx), other)
    assert not state_io.restore_from_disk(ctx, 4, server_round=2)
    assert torch.equal(load_residual(ctx, 4), torch.ones(4))


def test_without_state_dir_nothing_is_written(tmp_path):
    ctx = Context(run_id=1, node_id=2, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    train_round(ctx, torch.ones(3), 1)
    assert state_io.state_file(ctx) is None and not any(tmp_path.iterdir())


def test_corrupt_file_after_restart_gives_zero_residual_and_warning(tmp_path):
    ctx = context(tmp_path, **{"partition-id": 2})
    train_round(ctx, torch.ones(8), 1)
    train_round(ctx, torch.ones(8), 2)  # so that a previous file exists, which must not be used instead
    path = state_io.state_file(ctx)
    path.write_bytes(path.read_bytes()[:-5])
    restarted = context(tmp_path, node_id=12, **{"partition-id": 2})
    with pytest.warns(StateFileWarning, match="checksum mismatch"):
        restored = train_round(restarted, torch.ones(8), 3)
    assert torch.equal(restored, torch.zeros(8))
    assert rounds_of(restarted) == 1


def test_unwritable_state_dir_warns_and_keeps_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ctx = context(blocker, **{"partition-id": 0})
    with pytest.warns(StateFileWarning) as record:
        train_round(ctx, torch.ones(2), 1)
    messages = [str(w.message) for w in record]
    assert any("cannot be read" in m for m in messages)  # the restore attempt
    assert any("could not write the client state file" in m for m in messages)
    assert rounds_of(ctx) == 1


def test_node_key_precedence():
    assert label_of_config({"partition-id": 3, "node-name": "a"}, 9) == "partition-3"
    assert label_of_config({"node-name": "a"}, 9) == "node-a"
    assert label_of_config({}, 9) == "node-9"
