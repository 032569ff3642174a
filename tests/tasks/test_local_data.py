"""A node's own data file: the documented .npz format, and a clear error for everything else."""

import numpy as np
import pytest
import torch

from fl_compams import nodes
from fl_compams.config import parse_config
from tasks.data import available_datasets
from tasks.local_data import LocalDataError, load_npz, node_data
from tasks.task import TASK_SHAPES, client_data, load_data, make_model, model_for_task, task_shape

SHAPE, CLASSES = (1, 8, 8), 10
CPU = torch.device("cpu")


def write(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def good(np_rng, n=5, shape=SHAPE):
    return {
        "x": np_rng.standard_normal((n, *shape)).astype(np.float32),
        "y": np.arange(n, dtype=np.int64) % 10,
    }


def test_valid_file_loads_exactly(tmp_path, np_rng):
    arrays = good(np_rng)
    x, y = load_npz(write(tmp_path, **arrays), SHAPE, CLASSES)
    assert x.dtype == np.float32 and np.array_equal(x, arrays["x"])
    assert y.dtype == np.int64 and np.array_equal(y, arrays["y"])


def test_channel_axis_is_added_and_other_dtypes_are_converted(tmp_path, np_rng):
    x3 = np_rng.standard_normal((4, 8, 8))  # float64, N x H x W
    x, y = load_npz(write(tmp_path, x=x3, y=np.array([0, 1, 2, 9], np.uint8)), SHAPE, CLASSES)
    assert x.shape == (4, 1, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.allclose(x[:, 0], x3.astype(np.float32))


BAD = {
    "x uint8": (lambda a: {**a, "x": (a["x"] > 0).astype(np.uint8)}, "'x' has dtype uint8, expected float32"),
    "x wrong image size": (
        lambda a: {**a, "x": np.zeros((5, 1, 28, 28), np.float32)},
        r"shape \(5, 1, 28, 28\)",
    ),
    "x channels last": (lambda a: {**a, "x": np.zeros((5, 8, 8, 1), np.float32)}, "transpose"),
    "x flat": (
        lambda a: {**a, "x": np.zeros((5, 64), np.float32)},
        r"expected N x 1 x 8 x 8 \(or N x 8 x 8\)",
    ),
    "x empty": (
        lambda a: {"x": np.zeros((0, 1, 8, 8), np.float32), "y": np.zeros(0, np.int64)},
        "no examples",
    ),
    "x nan": (lambda a: {**a, "x": np.full((5, 1, 8, 8), np.nan, np.float32)}, "NaN or infinite"),
    "y float": (lambda a: {**a, "y": a["y"].astype(np.float32)}, "'y' has dtype float32, expected integer"),
    "y too short": (lambda a: {**a, "y": a["y"][:3]}, r"'y' has shape \(3,\), expected \(5,\)"),
    "y 2-d": (lambda a: {**a, "y": a["y"][:, None]}, r"'y' has shape \(5, 1\)"),
    "y out of range": (
        lambda a: {**a, "y": np.array([0, 1, 2, 3, 10])},
        r"labels in \[0, 10\], outside \[0, 10\)",
    ),
    "y negative": (lambda a: {**a, "y": np.array([0, -1, 2, 3, 4])}, r"labels in \[-1, 4\]"),
    "no y": (
        lambda a: {"x": a["x"], "labels": a["y"]},
        r"missing array\(s\) \['y'\]; found \['labels', 'x'\]",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_arrays_raise_an_error_naming_the_file(tmp_path, np_rng, name):
    change, match = BAD[name]
    path = write(tmp_path, **change(good(np_rng)))
    with pytest.raises(LocalDataError, match=match) as err:
        load_npz(path, SHAPE, CLASSES)
    assert str(path) in str(err.value)


def test_unreadable_files_raise_an_error_naming_the_file(tmp_path, np_rng):
    with pytest.raises(LocalDataError, match="no such file"):
        load_npz(tmp_path / "missing.npz", SHAPE, CLASSES)
    with pytest.raises(LocalDataError, match="not a regular file"):
        load_npz(tmp_path, SHAPE, CLASSES)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(LocalDataError, match=r"cannot be read as an \.npz archive"):
        load_npz(garbage, SHAPE, CLASSES)
    objects = write(tmp_path, "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(LocalDataError, match="without pickle"):
        load_npz(objects, SHAPE, CLASSES)
    single = tmp_path / "x.npy"
    np.save(single, np.zeros((2, 8, 8), np.float32))
    with pytest.raises(LocalDataError, match=r"single \.npy array"):
        load_npz(single, SHAPE, CLASSES)
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes(write(tmp_path, "full.npz", **good(np_rng)).read_bytes()[:300])
    with pytest.raises(LocalDataError, match="cannot be read"):
        load_npz(truncated, SHAPE, CLASSES)


def test_node_data_prefers_the_data_file_and_seeds_stably(tmp_path, np_rng):
    cfg = parse_config({})
    path = write(tmp_path, **good(np_rng, n=7))
    data = node_data(cfg.data, {"data-file": str(path), "node-name": "edge-a"}, 0, CPU, SHAPE, CLASSES)
    assert data.x.shape == (7, 1, 8, 8) and data.source == f"file {path}"
    assert (
        data.seed_id == nodes.seed_id({"node-name": "edge-a"}) == 2000364439
    )  # CRC-32, same in every process
    with_pid = node_data(cfg.data, {"data-file": str(path), "partition-id": 4}, 0, CPU, SHAPE, CLASSES)
    assert with_pid.seed_id == 4


def test_node_data_partition_mode_is_the_central_partition():
    cfg = parse_config({})
    data = node_data(cfg.data, {"partition-id": 1, "num-partitions": 3}, 0, CPU, SHAPE, CLASSES)
    x, y = client_data(cfg.data, 1, 3, 0, CPU)
    assert torch.equal(data.x, x) and torch.equal(data.y, y) and data.seed_id == 1


def test_node_without_data_source_gets_a_clear_error():
    with pytest.raises(LocalDataError, match="this SuperNode has no data"):
        node_data(parse_config({}).data, {"num-partitions": 2}, 0, CPU, SHAPE, CLASSES)


def test_task_shapes_match_the_loaded_data_and_the_model():
    cfg = parse_config({})
    bundle = load_data(cfg.data, cfg.seed)
    assert task_shape(cfg.data) == TASK_SHAPES["digits"] == (bundle.input_shape, bundle.num_classes)
    a, b = model_for_task(cfg.data, 3).state_dict(), make_model(cfg.data, bundle, 3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(TASK_SHAPES) <= set(available_datasets())


def test_one_dimensional_signals_load_with_or_without_the_channel_axis(tmp_path, np_rng):
    shape = TASK_SHAPES["mnist1d"][0]
    assert shape == (1, 40)
    x2 = np_rng.standard_normal((3, 40))
    x, _ = load_npz(write(tmp_path, x=x2, y=np.array([0, 1, 9])), shape, CLASSES)
    assert x.shape == (3, 1, 40) and np.allclose(x[:, 0], x2.astype(np.float32))
    x3, _ = load_npz(
        write(tmp_path, "c.npz", x=x2[:, None].astype(np.float32), y=np.zeros(3, int)), shape, 10
    )
    assert np.array_equal(x3, x)
    with pytest.raises(LocalDataError, match=r"expected N x 1 x 40 \(or N x 40\)"):
        load_npz(
            write(tmp_path, "w.npz", x=np.zeros((3, 1, 8, 8), np.float32), y=np.zeros(3, int)), shape, 10
        )
    with pytest.raises(LocalDataError, match=r"N x L x C: transpose it with x.transpose\(0, 2, 1\)"):
        load_npz(
            write(tmp_path, "t.npz", x=np.zeros((3, 40, 2), np.float32), y=np.zeros(3, int)), (2, 40), 10
        )
