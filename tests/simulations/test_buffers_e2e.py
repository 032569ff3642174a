"""ResNet-18 on a small written CIFAR-10 fixture through Flower's simulation: BatchNorm buffers averaged, or local.

The fixture is the CIFAR-10 binary layout ``tasks.data`` reads (``cifar-10-batches-bin/data_batch_{1..5}.bin``,
``test_batch.bin``; a record is one label byte and 3x32x32 pixel bytes): 300 random training images and 100 test
images, seeded.
"""

import numpy as np
import pytest
import torch

from fl_compams import ParamSpec, buffers
from fl_compams.checkpoint import load_checkpoint
from fl_compams.compressors.sparse import TopK
from simulations.runner import run_experiment
from strategies.results import load_model, read_metrics
from tasks.models import build_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROUNDS = 2
SPEC = ParamSpec.from_module(build_model("resnet18", 10, (3, 32, 32), seed=0))


def write_cifar_fixture(root, per_file=60, test=100, seed=0):
    """Random CIFAR-10 binary files: ``per_file`` records in each of the 5 training files, ``test`` in the test file."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)

    def records(n):
        labels = rng.integers(0, 10, size=(n, 1), dtype=np.uint8)
        return np.concatenate(
            [labels, rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)], axis=1
        ).tobytes()

    for i in range(1, 6):
        (d / f"data_batch_{i}.bin").write_bytes(records(per_file))
    (d / "test_batch.bin").write_bytes(records(test))
    return root


def run(tmp_path, name, **overrides):
    config = {
        "dataset": "cifar10",
        "model": "resnet18",
        "data-dir": str(write_cifar_fixture(tmp_path / f"data-{name}")),
        "out-dir": str(tmp_path),
        "run-name": name,
        "num-server-rounds": ROUNDS,
        "batch-size": 16,
        "compressor": "topk",
        "topk-ratio": 0.001,
        "weighting": "num-examples",
        "checkpoint-every": 1,
        **overrides,
    }
    return run_experiment(config, num_supernodes=2)


def test_resnet18_averages_batchnorm_buffers_end_to_end(tmp_path):
    path = run(tmp_path, "average")
    rows = read_metrics(path)
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    topk_bits = TopK(ratio=0.001).theory_bits(SPEC.dim)
    for r in rows[1:]:
        assert r["clients_ok"] == 2 and r["clients_failed"] == 0 and np.isfinite(r["loss"])
        # theory: Top-k's formula plus 32 bits per buffer float and 64 per counter, per client
        assert r["uplink_theory_bits"] == pytest.approx(2 * (topk_bits + buffers.theory_bits(SPEC)))
        # measured: every reply holds the dense buffers (9,600 float32 + 20 int64) beside the payload
        for c in r["clients"].values():
            assert c["uplink_bytes"] - c["payload_bytes"] > 4 * 9_600 + 8 * 20
    model = load_model(path)
    assert set(model) == set(SPEC.names)  # weights and buffers
    counters = [n for n in SPEC.buffer_names if n.endswith("num_batches_tracked")]
    assert len(counters) == 20 and all(
        int(model[n]) == ROUNDS for n in counters
    )  # one batch a round, averaged
    assert float(model["bn1.running_mean"].abs().sum()) > 0  # moved from the initial zeros
    assert bool((model["bn1.running_var"] >= 0).all())
    state, _ = load_checkpoint(path / "checkpoints" / f"round-{ROUNDS:06d}.ckpt", dim=SPEC.dim)
    assert state.opt_state.m.shape == (SPEC.dim,)  # AMSGrad on the trainable parameters only
    saved = torch.cat([model[n].reshape(-1).float() for n in SPEC.buffer_names])
    assert torch.equal(state.buffers, saved)  # the checkpoint holds the broadcast buffers


def test_resnet18_with_local_buffers_sends_none_and_keeps_them_in_client_state(tmp_path):
    path = run(tmp_path, "local", buffers="local")
    rows = read_metrics(path)
    topk_bits = TopK(ratio=0.001).theory_bits(SPEC.dim)
    for r in rows[1:]:
        assert r["clients_ok"] == 2 and r["clients_failed"] == 0
        assert r["uplink_theory_bits"] == pytest.approx(2 * topk_bits)  # no buffers on the wire
        for c in r["clients"].values():  # payload and metrics only
            assert c["uplink_bytes"] - c["payload_bytes"] < 4_000
        assert r["state_bytes"]["buffers"]["max"] == 4 * 9_600 + 8 * 20
    model = load_model(path)
    # the server never learns the clients' statistics: it keeps (and evaluates with) the initial ones
    assert float(model["bn1.running_mean"].abs().sum()) == 0.0
    assert torch.equal(model["bn1.running_var"], torch.ones(64))
    assert int(model["bn1.num_batches_tracked"]) == 0


@pytest.mark.parametrize("mode", ["average", "local"])
def test_resume_with_buffers_continues_exactly(tmp_path, mode):
    """The checkpoint holds the averaged buffers (and clients' local buffers are in their mirrored state)."""
    common = {
        "model": "digits-bn-cnn",
        "buffers": mode,
        "out-dir": str(tmp_path),
        "weighting": "num-examples",
    }
    straight = run_experiment({**common, "run-name": "straight", "num-server-rounds": 4}, num_supernodes=3)
    base = {**common, "run-name": "resumed", "checkpoint-every": 2}
    run_experiment({**base, "num-server-rounds": 2}, num_supernodes=3)
    resumed = run_experiment({**base, "num-server-rounds": 4, "resume": True}, num_supernodes=3)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(straight)) == strip(read_metrics(resumed))
    a, b = load_model(straight), load_model(resumed)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    moved = int(a["1.num_batches_tracked"]) == 4
    assert moved == (mode == "average")  # local: the server keeps the initial buffers
