"""Failing clients, determinism and checkpoint/resume, end to end through Flower's simulation engine."""

import numpy as np
import pytest

from simulations.runner import run_experiment
from strategies.results import load_model, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _strip(rows, client_keys=()):
    """Metrics without wall time (and, optionally, per-client keys that legitimately differ)."""
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k != "wall_s"}
        if "clients" in r:
            r["clients"] = {
                n: {k: v for k, v in c.items() if k not in client_keys} for n, c in r["clients"].items()
            }
        out.append(r)
    return out


def test_crashing_garbage_and_slow_clients_do_not_stop_the_run(tmp_path):
    import faulty_clients  # tests/simulations is on sys.path (pytest rootdir-less import mode)

    path = run_experiment(
        {"out-dir": str(tmp_path), "run-name": "faulty", "num-server-rounds": 3, "round-timeout": 8.0},
        num_supernodes=5,
        client_app=faulty_clients.app,
    )
    rows = read_metrics(path)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    first, last = rows[1], rows[3]
    assert (
        "client error" in first["failures"]["partition-0"]
        and "simulated client crash" in first["failures"]["partition-0"]
    )
    assert "bad magic" in first["failures"]["partition-1"]
    assert "no reply within round-timeout" in first["failures"]["partition-2"]
    assert first["clients_ok"] == 2 and first["clients_failed"] == 3 and first["update_applied"]
    assert last["clients_ok"] == 3 and last["clients_failed"] == 2  # the slow client is back
    assert set(last["failures"]) == {"partition-0", "partition-1"}


def test_same_seed_same_metrics(tmp_path):
    overrides = {"out-dir": str(tmp_path), "num-server-rounds": 3, "fraction-train": 0.6, "probe-every": 3}
    a = read_metrics(run_experiment({**overrides, "run-name": "a"}, num_supernodes=5))
    b = read_metrics(run_experiment({**overrides, "run-name": "b"}, num_supernodes=5))
    assert _strip(a) == _strip(b)
    assert a[1]["clients_ok"] == 3


#: Error feedback on (the default), 4 clients, 2 sampled per round: the server's checkpoint alone is not the whole
#: state of the run, the clients' residuals are part of it.
RESUME = {"fraction-train": 0.6}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return run_experiment(
        {**RESUME, "out-dir": str(out), "run-name": "straight", "num-server-rounds": 6}, num_supernodes=4
    )


def assert_same_run(straight, resumed):
    """Same metrics (everything but wall time, the clients' round counters included) and the same model."""
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["round"] for r in b] == list(range(7))  # appended, no duplicate rounds
    assert _strip(a) == _strip(b)
    ma, mb = load_model(straight), load_model(resumed)
    for name in ma:
        assert np.allclose(ma[name].numpy(), mb[name].numpy(), atol=1e-6, rtol=0)


def test_resume_continues_exactly(tmp_path, straight_run):
    # The runner persists client state under the run directory of a checkpointing run, keyed by run name:
    # the resumed simulation's new client contexts restore the residuals, so 3 + 3 rounds equal 6 straight ones.
    base = {**RESUME, "out-dir": str(tmp_path), "run-name": "resumed", "checkpoint-every": 3}
    run_experiment({**base, "num-server-rounds": 3}, num_supernodes=4)
    assert (tmp_path / "resumed" / "checkpoints" / "round-000003.ckpt").exists()
    resumed = run_experiment({**base, "num-server-rounds": 6, "resume": True}, num_supernodes=4)
    assert_same_run(straight_run, resumed)


def test_resume_after_a_server_crash_mid_round_continues_exactly(tmp_path, straight_run):
    # A server that dies during round 3 leaves checkpoint 2, while the clients sampled in round 3 have already
    # trained and saved their state of round 3. With checkpoint-every = 1 they go back to the state they had
    # before round 3 (kept on disk), so the rerun round 3 and everything after it equal the straight run.
    base = {**RESUME, "out-dir": str(tmp_path), "run-name": "crashed", "checkpoint-every": 1}
    run_experiment({**base, "num-server-rounds": 3}, num_supernodes=4)
    (tmp_path / "crashed" / "checkpoints" / "round-000003.ckpt").unlink()
    resumed = run_experiment({**base, "num-server-rounds": 6, "resume": True}, num_supernodes=4)
    assert_same_run(straight_run, resumed)


def test_resume_with_changed_algorithm_is_refused(tmp_path):
    from fl_compams import ConfigError

    base = {"out-dir": str(tmp_path), "run-name": "r", "checkpoint-every": 1, "num-server-rounds": 1}
    run_experiment(base, num_supernodes=2)
    with pytest.raises(ConfigError, match=r"different settings for \['compressor'\]"):
        run_experiment(
            {**base, "num-server-rounds": 2, "resume": True, "compressor": "blocksign"}, num_supernodes=2
        )
