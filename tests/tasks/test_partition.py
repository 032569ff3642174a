"""Tests for tasks.partition: disjoint, covering, seeded splits and their statistics."""

import json

import numpy as np
import pytest

from tasks.partition import PARTITIONERS, partition_indices, partition_stats

N_PER_CLASS = 140
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def labels():
    """1,400 labels, 140 per class, sorted by class (the worst case for an unshuffled split)."""
    return np.repeat(np.arange(NUM_CLASSES), N_PER_CLASS)


@pytest.mark.parametrize("kind", ["dirichlet", "iid"])
def test_partitions_are_disjoint_and_cover_all_samples(labels, kind):
    parts = partition_indices(labels, 10, kind, alpha=0.5, seed=3)
    assert len(parts) == 10
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    allidx = np.concatenate(parts)
    assert allidx.size == labels.size
    assert np.array_equal(np.sort(allidx), np.arange(labels.size))


@pytest.mark.parametrize("kind", PARTITIONERS)
def test_same_seed_same_partitions_other_seed_other_partitions(labels, kind):
    a = partition_indices(labels, 7, kind, alpha=0.5, seed=11)
    b = partition_indices(labels, 7, kind, alpha=0.5, seed=11)
    c = partition_indices(labels, 7, kind, alpha=0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_full_partitioner_gives_every_client_every_sample(labels):
    assert "full" in PARTITIONERS
    parts = partition_indices(labels, 4, "full", seed=0)
    for p in parts:
        assert np.array_equal(np.sort(p), np.arange(labels.size))


def test_iid_partitions_mix_classes_even_for_sorted_labels(labels):
    parts = partition_indices(labels, 10, "iid", seed=0)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for p in parts:
        # a contiguous shard of sorted labels would hold one class; a random one holds all ten
        assert np.unique(labels[p]).size == NUM_CLASSES


def test_dirichlet_respects_min_partition_size(labels):
    # seed 0 unconstrained leaves a partition below 60, so the redraw is exercised
    free = partition_indices(labels, 10, "dirichlet", alpha=0.5, seed=0, min_partition_size=0)
    assert min(p.size for p in free) < 60
    for seed in range(3):
        parts = partition_indices(labels, 10, "dirichlet", alpha=0.5, seed=seed, min_partition_size=60)
        assert min(p.size for p in parts) >= 60


def test_dirichlet_impossible_min_size_raises_clear_error(labels):
    # 10 partitions of 1,400 samples cannot all hold 141
    with pytest.raises(ValueError, match="min-partition-size") as info:
        partition_indices(labels, 10, "dirichlet", alpha=0.5, seed=0, min_partition_size=141)
    assert "dirichlet-alpha" in str(info.value)


def test_iid_impossible_min_size_raises_clear_error(labels):
    with pytest.raises(ValueError, match="min-partition-size"):
        partition_indices(labels, 10, "iid", seed=0, min_partition_size=141)
    parts = partition_indices(labels, 10, "iid", seed=0, min_partition_size=140)
    assert min(p.size for p in parts) == 140


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_partitions": 0}, "num_partitions"),
        ({"num_partitions": 1401}, "num_partitions"),
        ({"num_partitions": 2.0}, "num_partitions"),
        ({"num_partitions": 5, "alpha": 0.0}, "alpha"),
        ({"num_partitions": 5, "alpha": float("nan")}, "alpha"),
        ({"num_partitions": 5, "partitioner": "shards"}, "dirichlet"),
        ({"num_partitions": 5, "min_partition_size": -1}, "min_partition_size"),
    ],
)
def test_invalid_arguments_raise_value_error(labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition_indices(labels, **kwargs)


def test_invalid_labels_raise_value_error():
    with pytest.raises(ValueError, match="integer"):
        partition_indices(np.array([0.5, 1.5, 2.5]), 2)
    with pytest.raises(ValueError, match="1-D"):
        partition_indices(np.zeros((4, 2), dtype=np.int64), 2)


def test_single_partition_holds_everything(labels):
    (only,) = partition_indices(labels, 1, "dirichlet", seed=0)
    assert np.array_equal(np.sort(only), np.arange(labels.size))


def test_stats_are_consistent_and_json_serialisable(labels):
    parts = partition_indices(labels, 8, "dirichlet", alpha=0.5, seed=5)
    stats = partition_stats(labels, parts, NUM_CLASSES)
    assert json.loads(json.dumps(stats)) == stats
    assert stats["num_partitions"] == 8
    assert stats["sizes"] == [int(p.size) for p in parts]
    assert sum(stats["sizes"]) == labels.size
    hists = np.array(stats["label_histograms"])
    assert hists.shape == (8, NUM_CLASSES)
    assert hists.sum(axis=1).tolist() == stats["sizes"]
    assert hists.sum(axis=0).tolist() == [N_PER_CLASS] * NUM_CLASSES
    assert all(type(v) is int for row in stats["label_histograms"] for v in row)
    for p, row in zip(parts, stats["label_histograms"], strict=True):
        assert row == np.bincount(labels[p], minlength=NUM_CLASSES).tolist()


def test_stats_reject_out_of_range_input(labels):
    with pytest.raises(ValueError, match="num_classes"):
        partition_stats(labels, [np.arange(3)], 5)
    with pytest.raises(ValueError, match="outside"):
        partition_stats(labels, [np.array([0, labels.size])], NUM_CLASSES)


def _mean_total_variation(labels, parts):
    """Mean over partitions of the total-variation distance of its label mix from the global mix."""
    global_mix = np.bincount(labels, minlength=NUM_CLASSES) / labels.size
    tvs = []
    for p in parts:
        mix = np.bincount(labels[p], minlength=NUM_CLASSES) / max(p.size, 1)
        tvs.append(0.5 * np.abs(mix - global_mix).sum())
    return float(np.mean(tvs))


def test_small_alpha_is_more_skewed_than_large_alpha(labels):
    def skew(alpha):
        return np.mean(
            [
                _mean_total_variation(
                    labels,
                    partition_indices(labels, 10, "dirichlet", alpha=alpha, seed=s, min_partition_size=0),
                )
                for s in range(3)
            ]
        )

    small, large = skew(0.1), skew(100.0)
    # alpha = 0.1: most clients hold a few classes (TV ~ 0.6); alpha = 100: nearly the global mix (TV < 0.1)
    assert small > 0.4
    assert large < 0.15
    assert small > 3 * large
