"""Server checkpoints: exact round trip, corruption detection, fallback to the previous checkpoint."""

import pytest
import torch

from fl_compams import SGD, AMSGrad
from fl_compams.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from fl_compams.server import init_server_state


def trained_state(opt, rounds=3):
    gen = torch.Generator().manual_seed(0)
    state = init_server_state(torch.randn(50, generator=gen), opt)
    for r in range(rounds):
        delta, opt_state = opt.update(torch.randn(50, generator=gen), state.opt_state)
        state = state._replace(round=r + 1, theta=state.theta + delta, opt_state=opt_state)
    return state


@pytest.mark.parametrize("opt", [AMSGrad(), SGD(lr=0.1, momentum=0.9)], ids=["amsgrad", "sgd"])
def test_round_trip_is_exact(tmp_path, opt):
    state = trained_state(opt)
    path = save_checkpoint(tmp_path, state, {"totals": {"up": 5}})
    back, extra = load_checkpoint(path)
    assert back.round == 3 and extra == {"totals": {"up": 5}}
    assert torch.equal(back.theta, state.theta)
    assert type(back.opt_state) is type(state.opt_state)
    for a, b in zip(back.opt_state, state.opt_state, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_corruption_is_detected(tmp_path):
    path = save_checkpoint(tmp_path, trained_state(AMSGrad()))
    raw = path.read_bytes()
    for bad, match in [
        (raw[:-10], "checksum mismatch"),
        (raw[:20], "truncated|checksum"),
        (raw[:100] + bytes([raw[100] ^ 1]) + raw[101:], "checksum mismatch"),
        (b"", "truncated"),
    ]:
        path.write_bytes(bad)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path)


def test_latest_skips_a_corrupt_newest_checkpoint(tmp_path):
    s3 = trained_state(AMSGrad(), 3)
    save_checkpoint(tmp_path, s3)
    newest = save_checkpoint(tmp_path, trained_state(AMSGrad(), 6))
    newest.write_bytes(newest.read_bytes()[:-1])  # a crash mid-copy, say
    with pytest.warns(UserWarning, match="skipping unusable checkpoint.*round-000006"):
        state, _, path = latest_checkpoint(tmp_path)
    assert state.round == 3 and path.name == "round-000003.ckpt" and torch.equal(state.theta, s3.theta)
    assert latest_checkpoint(tmp_path / "missing") is None


def test_unacknowledged_statuses_round_trip(tmp_path):
    from fl_compams.algorithm import Outcome, Status

    unacked = {"partition-3": (Status(4, Outcome.LOST, 0.0), Status(5, Outcome.APPLIED, 0.25))}
    state = trained_state(AMSGrad())._replace(unacked=unacked)
    back, _ = load_checkpoint(save_checkpoint(tmp_path, state))
    assert back.unacked == unacked


def test_version_1_checkpoint_is_migrated_with_no_outstanding_statuses(tmp_path):
    import hashlib
    import json
    import struct

    path = save_checkpoint(tmp_path, trained_state(AMSGrad()))
    body = path.read_bytes()[:-32]
    magic, _, head_len = struct.unpack_from("<8sHI", body)
    header = json.loads(body[14 : 14 + head_len])
    del header["unacked"]  # the layout before acknowledged client state
    head = json.dumps(header).encode()
    old = struct.pack("<8sHI", magic, 1, len(head)) + head + body[14 + head_len :]
    path.write_bytes(old + hashlib.sha256(old).digest())
    back, _ = load_checkpoint(path)
    assert back.round == 3 and dict(back.unacked) == {}


def test_unknown_future_version_is_refused_with_a_clear_message(tmp_path):
    import hashlib
    import struct

    path = save_checkpoint(tmp_path, trained_state(AMSGrad()))
    body = bytearray(path.read_bytes()[:-32])
    struct.pack_into("<H", body, 8, 99)
    path.write_bytes(bytes(body) + hashlib.sha256(body).digest())
    with pytest.raises(
        CheckpointError, match=r"format version 99, this code reads versions \[1, 2, 3, 4, 5\]"
    ):
        load_checkpoint(path)


def reseal(path, edit):
    """Rewrite a checkpoint's header with ``edit(header)`` (or raw header bytes) and a valid checksum again."""
    import hashlib
    import json
    import struct

    body = path.read_bytes()[:-32]
    magic, version, head_len = struct.unpack_from("<8sHI", body)
    header = json.loads(body[14 : 14 + head_len])
    head = edit(header)
    head = head if isinstance(head, bytes) else json.dumps(header).encode()
    new = struct.pack("<8sHI", magic, version, len(head)) + head + body[14 + head_len :]
    path.write_bytes(new + hashlib.sha256(new).digest())


def _tensor(header, name):
    return next(t for t in header["tensors"] if t["name"] == name)


CRAFTED = {  # each keeps a valid checksum; before issue 10 some raised RuntimeError or KeyError, some loaded
    "theta not a vector": (lambda h: _tensor(h, "theta").update(shape=[5, 10]), "theta must be a vector"),
    "shape vs bytes": (lambda h: _tensor(h, "theta").update(shape=[49]), "200 bytes for a float32 tensor"),
    "moment shape": (
        lambda h: _tensor(h, "opt.m").update(shape=[25], nbytes=100),
        r"optimizer tensor 'm' has shape \(25,\), theta's is \(50,\)",
    ),
    "past the end": (lambda h: _tensor(h, "opt.v").update(offset=10**6), "runs past the end"),
    "unknown dtype": (lambda h: _tensor(h, "theta").update(dtype="object"), "malformed header"),
    "no extra": (lambda h: h.pop("extra"), "malformed header"),
    "extra not a dict": (lambda h: h.update(extra=[1]), "extra must be a JSON object"),
    "no round": (lambda h: h.pop("round"), "malformed header"),
    "round a string": (lambda h: h.update(round="3"), "round must be an integer >= 0"),
    "negative round": (lambda h: h.update(round=-1), "round must be an integer >= 0"),
    "step a string": (lambda h: h["opt_scalars"].update(step="x"), "optimizer counter 'step'"),
    "no step": (lambda h: h["opt_scalars"].pop("step"), r"AdamState needs \['m', 'step', 'v', 'v_hat'\]"),
    "no moment": (lambda h: h["tensors"].pop(), r"AdamState needs"),
    "no theta": (lambda h: h.update(tensors=h["tensors"][1:]), "malformed header"),
    "unknown optimizer": (lambda h: h.update(opt_state_type="Evil"), "malformed header"),
    "status factor": (lambda h: h.update(unacked={"p": [[1, 1, 5.0]]}), "status factor of 'p' must be in"),
    "status shape": (lambda h: h.update(unacked={"p": [[1, 1]]}), r"is not \[round, outcome, factor\]"),
    "status outcome": (lambda h: h.update(unacked={"p": [[1, 9, 0.0]]}), "malformed header"),
    "statuses not a list": (lambda h: h.update(unacked={"p": 3}), "statuses of 'p' are not a list"),
    "header a list": (lambda h: b"[]", "the header is not a JSON object"),
    "deeply nested": (lambda h: b"[" * 100_000 + b"]" * 100_000, "malformed header"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_checkpoints_with_a_valid_checksum_are_refused(tmp_path, case):
    edit, match = CRAFTED[case]
    path = save_checkpoint(tmp_path, trained_state(AMSGrad()), {"totals": {"up": 1}})
    reseal(path, edit)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_latest_skips_crafted_or_mismatched_checkpoints(tmp_path):
    s3 = trained_state(AMSGrad(), 3)
    save_checkpoint(tmp_path, s3, {"totals": {"up": 1}})
    crafted = save_checkpoint(tmp_path, trained_state(AMSGrad(), 6), {"totals": {"up": 2}})
    reseal(crafted, CRAFTED["moment shape"][0])
    with pytest.warns(UserWarning, match="skipping unusable checkpoint.*round-000006.*optimizer tensor 'm'"):
        state, _, path = latest_checkpoint(tmp_path)
    assert state.round == 3 and path.name == "round-000003.ckpt" and torch.equal(state.theta, s3.theta)
    with pytest.warns(UserWarning, match="round-000003.ckpt: theta has 50 parameters, the model has 49"):
        assert latest_checkpoint(tmp_path, dim=49) is None

    def check(state, extra):
        if extra["totals"]["up"] < 5:
            raise CheckpointError(f"totals too small: {extra['totals']}")

    with pytest.warns(UserWarning, match="round-000003.ckpt: totals too small"):
        assert latest_checkpoint(tmp_path, check=check) is None
    assert latest_checkpoint(tmp_path, dim=50, check=lambda s, e: None)[0].round == 3
