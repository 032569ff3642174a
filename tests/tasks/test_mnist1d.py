"""MNIST-1D: generated offline by the mnist1d package, cached as .npz (never pickle), keyed by every argument.

Small sample counts only (a few hundred: about 0.1 s each); the 70,000-sample set is never generated here.
"""

import random
import warnings

import mnist1d.data
import mnist1d.utils
import numpy as np
import pytest
import requests
import torch

from fl_compams.config import MNIST1D_DEFAULT_SAMPLES, parse_config
from tasks.data import DataError, load_dataset, mnist1d_cache_path
from tasks.task import TASK_SHAPES, client_data, load_data, make_model, model_for_task, task_shape

N = 500  # 50 per class: 400 train, 100 test


def load(tmp_path, n=N):
    return load_dataset("mnist1d", data_dir=str(tmp_path), mnist1d_samples=n)


@pytest.fixture(autouse=True)
def no_network_no_pickle(monkeypatch):
    """The package's download and pickle helpers must never run."""

    def forbidden(*args, **kwargs):
        raise AssertionError("mnist1d must not download or pickle anything")

    monkeypatch.setattr(requests, "get", forbidden)
    monkeypatch.setattr(mnist1d.data, "to_pickle", forbidden)
    monkeypatch.setattr(mnist1d.data, "from_pickle", forbidden)
    monkeypatch.setattr(mnist1d.utils, "to_pickle", forbidden)
    monkeypatch.setattr(mnist1d.utils, "from_pickle", forbidden)


@pytest.fixture
def count_generations(monkeypatch):
    """Count the calls of the package's make_dataset."""
    calls = []
    real = mnist1d.data.make_dataset

    def counting(args=None, template=None):
        calls.append(args.num_samples)
        return real(args, template)

    monkeypatch.setattr(mnist1d.data, "make_dataset", counting)
    return calls


def test_shapes_dtypes_and_labels(tmp_path):
    b = load(tmp_path)
    assert b.name == "mnist1d" and b.num_classes == 10 and b.input_shape == (1, 40)
    assert (b.input_shape, b.num_classes) == TASK_SHAPES["mnist1d"]
    assert b.train_x.shape == (400, 1, 40) and b.test_x.shape == (100, 1, 40)  # the package's 80/20 split
    assert b.train_x.dtype == b.test_x.dtype == torch.float32
    assert b.train_y.dtype == b.test_y.dtype == torch.int64
    assert b.train_x.is_contiguous() and torch.isfinite(b.train_x).all() and torch.isfinite(b.test_x).all()
    labels = torch.cat([b.train_y, b.test_y])
    assert int(labels.min()) >= 0 and int(labels.max()) < 10
    assert torch.bincount(labels, minlength=10).tolist() == [50] * 10  # num_samples // 10 per class
    assert b.num_val == 0 and b.val_x.shape == (0, 1, 40)
    # the package standardises the whole set (train and test together)
    x = torch.cat([b.train_x, b.test_x])
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-2


def test_same_arguments_give_the_same_data_and_the_global_rngs_are_untouched(tmp_path):
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002
    a = load(tmp_path / "a")  # make_dataset seeds the global RNGs with its data seed: restored afterwards
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before  # noqa: NPY002
    b = load(tmp_path / "b")  # generated again, in another cache directory
    for t in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, t), getattr(b, t)), t


def test_cache_is_written_once_and_reused(tmp_path, count_generations):
    path = mnist1d_cache_path(str(tmp_path), N)
    assert path.parent == tmp_path / "mnist1d" and path.name.startswith(f"mnist1d-n{N}-")
    first = load(tmp_path)
    assert count_generations == [N] and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind
    second = load(tmp_path)
    assert count_generations == [N]  # read from the cache, not generated again
    for t in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, t), getattr(second, t)), t


def test_cache_is_a_plain_npz_without_pickle(tmp_path):
    b = load(tmp_path)
    with np.load(mnist1d_cache_path(str(tmp_path), N), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["recipe", "x", "x_test", "y", "y_test"]
        assert all(npz[k].dtype != object for k in npz.files)
        assert np.array_equal(npz["x"], b.train_x[:, 0].numpy()) and np.array_equal(npz["y_test"], b.test_y)
        assert '"num_samples":500' in str(npz["recipe"])


def test_any_changed_argument_gives_another_cache_file(tmp_path, monkeypatch, count_generations):
    base = mnist1d_cache_path(str(tmp_path), N)
    assert mnist1d_cache_path(str(tmp_path), N + 10) != base
    assert mnist1d_cache_path(str(tmp_path / "other"), N).name == base.name
    load(tmp_path)
    real_args = mnist1d.data.get_dataset_args

    def sheared(as_dict=False):
        args = real_args(as_dict=True)
        args["shear_scale"] = 0.5
        return args if as_dict else mnist1d.utils.ObjectView(args)

    monkeypatch.setattr(mnist1d.data, "get_dataset_args", sheared)
    changed = mnist1d_cache_path(str(tmp_path), N)
    assert changed != base and changed.name.startswith(f"mnist1d-n{N}-")
    load(tmp_path)
    assert count_generations == [N, N] and base.is_file() and changed.is_file()


def corrupt_garbage(path):
    path.write_bytes(b"not an npz archive")


def corrupt_truncated(path):
    path.write_bytes(path.read_bytes()[:400])


def save(path, **arrays):
    with path.open("wb") as f:
        np.savez(f, **arrays)


def corrupt_pickled_object(path):
    with np.load(path) as npz:
        arrays = dict(npz)
    save(path, **{**arrays, "x": np.array([{"a": 1}], dtype=object)})  # readable only with pickle


def corrupt_missing_array(path):
    with np.load(path) as npz:
        arrays = dict(npz)
    del arrays["y_test"]
    save(path, **arrays)


def corrupt_other_recipe(path):
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["recipe"] = np.array(str(arrays["recipe"]).replace('"shear_scale":0.75', '"shear_scale":0.7'))
    save(path, **arrays)


def corrupt_wrong_shape(path):
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["x"] = arrays["x"][:10]
    save(path, **arrays)


def corrupt_bad_label(path):
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["y_test"][0] = 10
    save(path, **arrays)


def corrupt_single_npy(path):
    with path.open("wb") as f:
        np.save(f, np.zeros((400, 40), np.float32))


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (corrupt_garbage, "unreadable"),
        (corrupt_truncated, r"unreadable \(BadZipFile"),
        (corrupt_single_npy, "not an .npz archive"),
        (corrupt_pickled_object, "unreadable .*allow_pickle=False"),
        (corrupt_missing_array, r"missing arrays \['y_test'\]"),
        (corrupt_other_recipe, "from other generation arguments"),
        (corrupt_wrong_shape, r"damaged \(x: float32 \(10, 40\)"),
        (corrupt_bad_label, r"damaged \(y_test"),
    ],
)
def test_a_corrupt_cache_file_is_regenerated_with_a_warning(tmp_path, count_generations, corrupt, reason):
    good = load(tmp_path)
    path = mnist1d_cache_path(str(tmp_path), N)
    corrupt(path)
    with pytest.warns(
        RuntimeWarning, match=f"MNIST-1D cache .* is {reason}.*; generating the data set again"
    ):
        again = load(tmp_path)
    assert count_generations == [N, N]
    assert torch.equal(again.train_x, good.train_x) and torch.equal(again.test_y, good.test_y)
    with np.load(path, allow_pickle=False) as npz:  # replaced by a good file
        assert np.array_equal(npz["x"], good.train_x[:, 0].numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(tmp_path)  # and read back without a warning
    assert count_generations == [N, N]


def test_an_unwritable_cache_warns_and_still_returns_the_data(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    with pytest.warns(RuntimeWarning, match="Could not cache MNIST-1D"):
        b = load(blocker)
    assert b.train_x.shape == (400, 1, 40)


def test_default_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mnist1d_cache_path("", N).parent == tmp_path / "xdg" / "fl-compams" / "mnist1d"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mnist1d_cache_path("", N).parent == tmp_path / "home" / ".cache" / "fl-compams" / "mnist1d"
    b = load_dataset("mnist1d", mnist1d_samples=300)
    assert b.num_train == 240 and mnist1d_cache_path("", 300).is_file()


def test_defaults_are_the_packages():
    assert mnist1d.data.get_dataset_args().num_samples == MNIST1D_DEFAULT_SAMPLES == 5000
    assert parse_config({}).data.mnist1d_samples == MNIST1D_DEFAULT_SAMPLES
    assert mnist1d_cache_path("/d").name == mnist1d_cache_path("/d", 5000).name


def test_invalid_sample_count_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="mnist1d-samples"):
        load(tmp_path, n=5)


def test_generator_output_that_breaks_the_contract_is_an_error(tmp_path, monkeypatch):
    real = mnist1d.data.make_dataset

    def wrong_length(args=None, template=None):
        ds = real(args, template)
        return {**ds, "x": ds["x"][:, :30], "x_test": ds["x_test"][:, :30]}

    monkeypatch.setattr(mnist1d.data, "make_dataset", wrong_length)
    with pytest.raises(DataError, match="make_dataset returned arrays"):
        load(tmp_path)
    assert not mnist1d_cache_path(str(tmp_path), N).exists()


def test_the_task_builds_the_mnist1d_cnn_and_trains_a_step(tmp_path):
    cfg = parse_config({"dataset": "mnist1d", "data-dir": str(tmp_path), "mnist1d-samples": 300})
    bundle = load_data(cfg.data, seed=cfg.seed)
    assert bundle.num_train == 240 and bundle.num_test == 60
    assert task_shape(cfg.data) == ((1, 40), 10)
    model = make_model(cfg.data, bundle, 0)
    a, b = model.state_dict(), model_for_task(cfg.data, 0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x, y = client_data(cfg.data, 0, 3, cfg.seed, torch.device("cpu"))
    assert x.shape[1:] == (1, 40) and x.shape[0] == y.shape[0] > 0
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss) and sum(p.numel() for p in model.parameters()) == 5_210
