"""The client state file: round trip, every corruption class gives a warning and a fresh state, atomic writes."""

import hashlib
import os
import struct
import warnings

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from clients import persist, state_io
from clients.persist import (
    PersistedState,
    StateFileWarning,
    decode_state,
    encode_state,
    read_state,
    write_state,
)

RUN, NODE, KEY, DIM = 2**63 + 12345, 2**64 - 7, "partition-1", 1000


def make_state(np_rng, *, residual=True, rounds=3, run=RUN, key=KEY, dim=DIM):
    res = np_rng.standard_normal(dim).astype(np.float32) if residual else None
    return PersistedState(run, NODE, key, rounds, res)


def rehash(body: bytes) -> bytes:
    """Bytes with a fresh checksum, to reach the checks behind the SHA-256."""
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("residual", [True, False])
def test_round_trip_is_exact(tmp_path, np_rng, residual):
    state = make_state(np_rng, residual=residual)
    path = persist.state_path(tmp_path, RUN, KEY)
    write_state(path, state)
    assert path == tmp_path / f"run-{RUN}" / "partition-1.state"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = read_state(path, run_id=RUN, node_key=KEY, dim=DIM)
    assert (got.run_id, got.node_id, got.node_key, got.rounds) == (RUN, NODE, KEY, 3)
    if residual:
        assert got.residual.dtype == np.float32 and np.array_equal(got.residual, state.residual)
    else:
        assert got.residual is None
    assert path.stat().st_size == 46 + len(KEY) + (4 * DIM if residual else 0) + 32


def test_layout_is_the_documented_one(np_rng):
    state = make_state(np_rng, dim=3)
    data = encode_state(state)
    magic, version, flags, run, node, rounds, dim, klen = struct.unpack_from("<8sHHQQQQH", data)
    assert (magic, version, flags, run, node, rounds, dim, klen) == (
        b"CAMSEFST",
        1,
        1,
        RUN,
        NODE,
        3,
        3,
        len(KEY),
    )
    assert data[46 : 46 + klen] == KEY.encode()
    assert np.array_equal(np.frombuffer(data, "<f4", 3, 46 + klen), state.residual)
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()


def test_missing_file_is_a_silent_fresh_start(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_state(tmp_path / "nope.state", run_id=RUN, node_key=KEY, dim=DIM) is None


def _header(data: bytes, **fields) -> bytes:
    names = ("magic", "version", "flags", "run", "node", "rounds", "dim", "klen")
    values = dict(zip(names, struct.unpack_from("<8sHHQQQQH", data), strict=True))
    values.update(fields)
    return struct.pack("<8sHHQQQQH", *values.values()) + data[46:-32]


CORRUPTIONS = {
    "empty": (lambda d: b"", "truncated"),
    "truncated header": (lambda d: d[:40], "truncated"),
    "truncated body": (lambda d: d[: len(d) // 2], "checksum mismatch"),
    "missing checksum": (lambda d: d[:-32], "checksum mismatch"),
    "flipped body byte": (lambda d: d[:100] + bytes([d[100] ^ 0x01]) + d[101:], "checksum mismatch"),
    "flipped checksum byte": (lambda d: d[:-1] + bytes([d[-1] ^ 0x80]), "checksum mismatch"),
    "trailing garbage": (lambda d: d + b"\x00" * 8, "checksum mismatch"),
    "foreign file": (lambda d: b"PK\x03\x04" + d[4:], "not a COMP-AMS client state file"),
    "future version": (lambda d: rehash(_header(d, version=2)), "format version 2 is not supported"),
    "unknown flag": (lambda d: rehash(_header(d, flags=3)), "unknown flags"),
    "length mismatch": (lambda d: rehash(_header(d, dim=DIM + 1)), "length mismatch"),
    "key not utf-8": (
        lambda d: rehash(_header(d[:46] + b"\xff" * len(KEY) + d[46 + len(KEY) :])),
        "not UTF-8",
    ),
    "nan residual": (
        lambda d: rehash(d[: 46 + len(KEY)] + np.float32("nan").tobytes() + d[50 + len(KEY) : -32]),
        "NaN or infinite",
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_every_corruption_gives_a_warning_and_a_fresh_state(tmp_path, np_rng, name):
    corrupt, reason = CORRUPTIONS[name]
    path = tmp_path / "node.state"
    path.write_bytes(corrupt(encode_state(make_state(np_rng))))
    with pytest.warns(StateFileWarning, match=reason) as record:
        assert read_state(path, run_id=RUN, node_key=KEY, dim=DIM) is None
    assert str(path) in str(record[0].message) and "zero residual" in str(record[0].message)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"run_id": RUN + 1}, "belongs to run"),
        ({"node_key": "partition-2"}, "belongs to node 'partition-1'"),
        ({"dim": DIM - 1}, f"dimension {DIM}, the model has {DIM - 1}"),
    ],
)
def test_file_of_another_run_node_or_model_is_not_used(tmp_path, np_rng, kwargs, reason):
    path = tmp_path / "node.state"
    write_state(path, make_state(np_rng))
    args = {"run_id": RUN, "node_key": KEY, "dim": DIM, **kwargs}
    with pytest.warns(StateFileWarning, match=reason):
        assert read_state(path, **args) is None


def test_unreadable_path_warns(tmp_path):
    (tmp_path / "dir.state").mkdir()  # a directory where the file should be
    with pytest.warns(StateFileWarning, match="cannot be read"):
        assert read_state(tmp_path / "dir.state", run_id=RUN, node_key=KEY, dim=DIM) is None


def test_atomic_write_leaves_no_temp_file_and_replaces(tmp_path, np_rng):
    path = tmp_path / "deep" / "er" / "node.state"
    write_state(path, make_state(np_rng, rounds=1))
    write_state(path, make_state(np_rng, rounds=2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["node.state"]
    assert read_state(path, run_id=RUN, node_key=KEY, dim=DIM).rounds == 2


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
    path = persist.state_path(tmp_path, 5, "node-../../etc/x y")
    assert path.parent == tmp_path / "run-5" and "/" not in path.name and " " not in path.name


def test_encode_rejects_bad_input(np_rng):
    with pytest.raises(ValueError, match="vector"):
        encode_state(PersistedState(RUN, NODE, KEY, 1, np.zeros((2, 2), np.float32)))
    with pytest.raises(ValueError, match="rounds"):
        encode_state(PersistedState(RUN, NODE, KEY, -1, None))
    with pytest.raises(ValueError, match="truncated"):
        decode_state(b"CAMSEFST")


# ------------------------------------------------------------------ context.state <-> disk (clients.state_io)


def context(tmp_path, node_id=11, **node_config):
    cfg = {"state-dir": str(tmp_path), **node_config}
    return Context(run_id=RUN, node_id=node_id, node_config=cfg, state=RecordDict(), run_config={})


def train_round(ctx, residual):
    """What the ClientApp does with the state in one round."""
    state_io.restore_from_disk(ctx, residual.numel())
    before = state_io.load_residual(ctx.state, residual.numel(), torch.device("cpu"))
    state_io.save_residual(ctx.state, residual)
    state_io.bump_rounds(ctx.state)
    state_io.save_to_disk(ctx)
    return before


@pytest.mark.parametrize("node_config", [{"partition-id": 1}, {"node-name": "edge-a", "data-file": "/d.npz"}])
def test_restarted_node_restores_residual_and_rounds(tmp_path, node_config):
    first = context(tmp_path, node_id=11, **node_config)
    r1, r2 = torch.randn(50), torch.randn(50)
    train_round(first, r1)
    train_round(first, r2)
    restarted = context(tmp_path, node_id=99, **node_config)  # Flower gives a restarted SuperNode a new id
    restored = train_round(restarted, torch.randn(50))
    assert torch.equal(restored, r2)
    assert int(restarted.state[state_io.COUNTERS_RECORD][state_io.ROUNDS_KEY]) == 3


def test_state_in_memory_wins_over_the_file(tmp_path):
    ctx = context(tmp_path, **{"partition-id": 0})
    train_round(ctx, torch.ones(4))
    persist.write_state(
        state_io.state_file(ctx), PersistedState(RUN, 1, "partition-0", 7, np.zeros(4, np.float32))
    )
    assert not state_io.restore_from_disk(ctx, 4)
    assert torch.equal(state_io.load_residual(ctx.state, 4, torch.device("cpu")), torch.ones(4))


def test_without_state_dir_nothing_is_written(tmp_path):
    ctx = Context(run_id=1, node_id=2, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    train_round(ctx, torch.ones(3))
    assert state_io.state_file(ctx) is None and not any(tmp_path.iterdir())


def test_corrupt_file_after_restart_gives_zero_residual_and_warning(tmp_path):
    ctx = context(tmp_path, **{"partition-id": 2})
    train_round(ctx, torch.ones(8))
    path = state_io.state_file(ctx)
    path.write_bytes(path.read_bytes()[:-5])
    restarted = context(tmp_path, node_id=12, **{"partition-id": 2})
    with pytest.warns(StateFileWarning, match="checksum mismatch"):
        restored = train_round(restarted, torch.ones(8))
    assert torch.equal(restored, torch.zeros(8))
    assert int(restarted.state[state_io.COUNTERS_RECORD][state_io.ROUNDS_KEY]) == 1


def test_unwritable_state_dir_warns_and_keeps_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ctx = context(blocker, **{"partition-id": 0})
    with pytest.warns(StateFileWarning) as record:
        train_round(ctx, torch.ones(2))
    messages = [str(w.message) for w in record]
    assert any("cannot be read" in m for m in messages)  # the restore attempt
    assert any("could not write the client state file" in m for m in messages)
    assert int(ctx.state[state_io.COUNTERS_RECORD][state_io.ROUNDS_KEY]) == 1


def test_node_key_precedence():
    assert state_io.node_key({"partition-id": 3, "node-name": "a"}, 9) == "partition-3"
    assert state_io.node_key({"node-name": "a"}, 9) == "node-a"
    assert state_io.node_key({}, 9) == "node-9"
