"""The validation split: held out of the training set before partitioning, seeded, stratified, off by default."""

import numpy as np
import pytest
import torch

from fl_compams.config import parse_config
from tasks.data import DataBundle, hold_out_validation, load_dataset
from tasks.partition import partition_indices, partition_stats
from tasks.task import client_data, load_data, partitions

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def rows(x: torch.Tensor) -> list[bytes]:
    return [r.tobytes() for r in x.reshape(x.shape[0], -1).numpy()]


def test_fraction_zero_is_the_bundle_itself_with_an_empty_validation_split(digits):
    assert hold_out_validation(digits, 0.0, 3) is digits
    assert digits.num_val == 0
    assert digits.val_x.shape == (0, 1, 8, 8) and digits.val_x.dtype == torch.float32
    assert digits.val_y.shape == (0,) and digits.val_y.dtype == torch.int64


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_split_size_is_the_fraction_of_every_class(digits, fraction):
    split = hold_out_validation(digits, fraction, 0)
    counts = torch.bincount(digits.train_y, minlength=10)
    expected = [round(fraction * int(c)) for c in counts]
    assert torch.bincount(split.val_y, minlength=10).tolist() == expected
    assert split.num_val == sum(expected) and abs(split.num_val - fraction * digits.num_train) <= 5
    assert split.num_train + split.num_val == digits.num_train
    assert split.test_x is digits.test_x and split.test_y is digits.test_y


def test_split_moves_examples_from_train_to_val_without_loss_or_overlap(digits):
    split = hold_out_validation(digits, 0.2, 4)
    train, val = rows(split.train_x), rows(split.val_x)
    assert not set(train) & set(val)  # digits has no duplicate images
    assert sorted(train + val) == sorted(rows(digits.train_x))
    # labels travel with their images
    label_of = dict(zip(rows(digits.train_x), digits.train_y.tolist(), strict=True))
    assert [label_of[r] for r in val] == split.val_y.tolist()
    assert [label_of[r] for r in train] == split.train_y.tolist()


def test_split_is_deterministic_for_the_seed(digits):
    a, b, c = (hold_out_validation(digits, 0.2, s) for s in (7, 7, 8))
    assert (
        torch.equal(a.val_x, b.val_x) and torch.equal(a.val_y, b.val_y) and torch.equal(a.train_x, b.train_x)
    )
    assert not torch.equal(a.val_x, c.val_x)


def test_split_rejects_bad_arguments(digits):
    for fraction in (-0.1, 0.51, float("nan")):
        with pytest.raises(ValueError, match="validation-fraction"):
            hold_out_validation(digits, fraction, 0)
    with pytest.raises(ValueError, match="seed"):
        hold_out_validation(digits, 0.1, -1)
    with pytest.raises(ValueError, match="already has a validation split"):
        hold_out_validation(hold_out_validation(digits, 0.1, 0), 0.1, 0)


def test_databundle_checks_the_validation_tensors():
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="both val_x and val_y"):
        DataBundle("bad", x, y, x, y, num_classes=2, input_shape=(1, 2, 2), val_x=x)
    with pytest.raises(ValueError, match="val_x examples have shape"):
        DataBundle("bad", x, y, x, y, 2, (1, 2, 2), val_x=torch.zeros(2, 1, 2, 3), val_y=y[:2])
    with pytest.raises(ValueError, match="val_y must be an int64 vector"):
        DataBundle("bad", x, y, x, y, 2, (1, 2, 2), val_x=x[:2], val_y=y[:3])
    ok = DataBundle("ok", x, y, x, y, 2, (1, 2, 2), val_x=x[:1], val_y=y[:1])
    assert ok.num_val == 1


def test_clients_never_see_a_validation_example_and_share_the_rest():
    cfg = parse_config({"validation-fraction": 0.2, "seed": 5})
    bundle = load_data(cfg.data, seed=cfg.seed)
    assert bundle.num_val > 0 and bundle.num_val + bundle.num_train == load_dataset("digits").num_train
    parts = partitions(cfg.data, 6, cfg.seed)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(bundle.num_train))
    val = set(rows(bundle.val_x))
    seen = []
    for pid in range(6):
        x, _ = client_data(cfg.data, pid, 6, cfg.seed, CPU)
        assert not set(rows(x)) & val, pid
        seen += rows(x)
    assert sorted(seen) == sorted(rows(bundle.train_x))
    stats = partition_stats(bundle.train_y.numpy(), list(parts), bundle.num_classes)
    assert sum(stats["sizes"]) == bundle.num_train
    assert np.array_equal(
        np.sum(stats["label_histograms"], axis=0), np.bincount(bundle.train_y.numpy(), minlength=10)
    )


def test_server_and_clients_derive_the_same_split():
    cfg = parse_config({"validation-fraction": 0.15, "seed": 2})
    first = load_data(cfg.data, seed=2)
    assert load_data(cfg.data, seed=2) is first  # cached per process
    fresh = hold_out_validation(load_dataset("digits"), 0.15, 2)  # what another process computes
    assert torch.equal(fresh.val_x, first.val_x) and torch.equal(fresh.train_y, first.train_y)
    other_seed = load_data(cfg.data, seed=3)
    assert not torch.equal(other_seed.val_y, first.val_y)


def test_default_config_data_and_partitions_are_unchanged():
    cfg = parse_config({})
    assert cfg.data.validation_fraction == 0.0
    bundle = load_data(cfg.data, seed=cfg.seed)
    assert bundle.num_val == 0
    old = load_dataset("digits")  # the pre-validation code path: partitions of the whole training split
    assert torch.equal(bundle.train_x, old.train_x) and torch.equal(bundle.test_y, old.test_y)
    for n, seed in ((10, 0), (3, 4)):
        before = partition_indices(
            old.train_y.numpy(), n, "dirichlet", alpha=0.5, seed=seed, min_partition_size=10
        )
        after = partitions(cfg.data, n, seed)
        assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
