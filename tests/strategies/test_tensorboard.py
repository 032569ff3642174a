"""tensorboard = true: every metrics.jsonl row also lands in a TensorBoard events file, read back here by
TensorBoard's own EventAccumulator with the same values."""

from __future__ import annotations

import sys

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from fl_compams import ConfigError
from simulations.runner import run_experiment
from strategies.results import ResultsDir, read_metrics, scalar_values


def scalars(path) -> dict[str, dict[int, float]]:
    """tag -> step -> value, as TensorBoard loads the directory."""
    acc = EventAccumulator(str(path), size_guidance={"tensors": 0})  # the loader TensorBoard serves from
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        out[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events}
        assert len(out[tag]) == len(events), f"{tag}: a step twice"
    return out


def expected(rows) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for tag, value in scalar_values(row).items():
            out.setdefault(tag, {})[row["round"]] = value
    return out


ROWS = [
    {
        "round": 0,
        "accuracy": 0.1,
        "loss": 2.3,
        "uplink_bytes_cum": 0,
        "train_loss": None,
        "update_applied": False,
    },
    {
        "round": 1,
        "accuracy": 0.25,
        "loss": 2.1,
        "uplink_bytes_cum": 2**40 + 3,  # exact beyond float32's 2^24
        "train_loss": float("nan"),
        "update_applied": True,
        "state_bytes": {"residual": {"mean": 605224.0, "max": 605224}},
        "clients": {"partition-0": {"uplink_bytes": 12}},
        "failures": {"partition-1": "client error"},
    },
]


def test_scalar_values_keep_every_finite_number_but_per_client_entries():
    values = scalar_values(ROWS[1])
    assert values == {
        "accuracy": 0.25,
        "loss": 2.1,
        "uplink_bytes_cum": float(2**40 + 3),
        "update_applied": 1.0,
        "state_bytes/residual/mean": 605224.0,
        "state_bytes/residual/max": 605224.0,
    }


def test_rows_are_read_back_by_tensorboard_with_the_same_values(tmp_path):
    results = ResultsDir(tmp_path / "run", tensorboard=True)
    for row in ROWS:
        results.append_metrics(row)
    got = scalars(results.path)
    assert got == expected(ROWS)
    assert got["uplink_bytes_cum"][1] == 2**40 + 3
    assert ResultsDir(tmp_path / "plain").scalars is None  # off by default: no events file
    assert not list((tmp_path / "plain").glob("events.out.tfevents.*"))


def test_a_resumed_run_replaces_the_rounds_after_its_checkpoint(tmp_path):
    first = ResultsDir(tmp_path, tensorboard=True)
    for rnd in range(4):
        first.append_metrics({"round": rnd, "accuracy": rnd / 10})
    resumed = ResultsDir(tmp_path, keep_rounds_upto=1, tensorboard=True)
    for rnd in (2, 3):
        resumed.append_metrics({"round": rnd, "accuracy": rnd / 100})
    files = sorted(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 2
    starts = [e.step for e in EventFileLoader(str(files[1])).Load() if e.HasField("session_log")]
    assert starts == [2]  # TensorBoard's purge marker: the first file's rounds >= 2 are dropped
    assert scalars(tmp_path)["accuracy"] == {0: 0.0, 1: 0.1, 2: 0.02, 3: 0.03}
    assert scalars(tmp_path) == expected(read_metrics(tmp_path))


def test_a_missing_tensorboard_package_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard.compat.proto.event_pb2", None)  # import fails
    with pytest.raises(ConfigError, match="pip install 'tensorboard"):
        ResultsDir(tmp_path, tensorboard=True)


def test_a_run_with_tensorboard_writes_every_row(tmp_path):
    path = run_experiment(
        {"out-dir": str(tmp_path), "run-name": "tb", "num-server-rounds": 2, "tensorboard": True},
        num_supernodes=2,
        engine="inprocess",
        workers=0,
    )
    rows = read_metrics(path)
    got = scalars(path)
    assert got == expected(rows)
    assert {"accuracy", "loss", "uplink_bytes_cum", "downlink_bytes_cum", "wall_s"} <= set(got)
    assert sorted(got["accuracy"]) == [0, 1, 2]
