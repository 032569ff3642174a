"""simulations.report.stats: curves on a common grid over seeds, the one smoothing."""

import numpy as np
import pytest
from report_rows import make_rows

from simulations.report.stats import (
    SMOOTH_WINDOW,
    add_cumulative_traffic,
    add_smoothed,
    at_budget,
    downlink_bytes_per_client,
    first_reached,
    sample_mean_std,
    series_on_grid,
    smoothed,
)


def test_series_on_grid_steps_on_common_bytes_grid():
    s0 = [
        {"round": i, "b": x, "y": y}
        for i, (x, y) in enumerate(zip([0, 10, 20, 30], [0, 1, 2, 3], strict=True))
    ]
    s1 = [
        {"round": i, "b": x, "y": y}
        for i, (x, y) in enumerate(zip([0, 15, 25, 35], [0, 10, 20, 30], strict=True))
    ]
    grid, mean, std = series_on_grid([s0, s1], x="b", y="y")
    np.testing.assert_allclose(grid, [0, 10, 15, 20, 25, 30])
    np.testing.assert_allclose(mean, [0, 0.5, 5.5, 6, 11, 11.5])
    np.testing.assert_allclose(std, np.std([[0, 1, 1, 2, 2, 3], [0, 0, 10, 10, 20, 20]], axis=0, ddof=1))
    grid, _, _ = series_on_grid([s0, s1], x="b", y="y", positive_x=True)
    assert grid[0] == 15  # seed 1 has no value below 15 B
    bad = [{"round": 0, "b": 5, "y": 0}, {"round": 1, "b": 3, "y": 1}]
    with pytest.raises(ValueError, match="non-decreasing"):
        series_on_grid([bad], x="b", y="y")


def test_series_on_grid_rounds_skip_missing_values():
    a = make_rows([0.1, 0.2, 0.3], 10)
    b = make_rows([0.3, 0.4, 0.5], 10)
    a[2]["sigma_g2"], b[2]["sigma_g2"], a[1]["sigma_g2"] = 2.0, 4.0, 1.0
    grid, mean, std = series_on_grid([a, b], x="round", y="sigma_g2")
    np.testing.assert_allclose(grid, [2])  # round 1 was probed in one seed only
    np.testing.assert_allclose(mean, [3.0])
    grid, mean, std = series_on_grid([a], x="round", y="train_loss")
    np.testing.assert_allclose(grid, [1, 2])  # no train loss at round 0
    assert np.isnan(std).all()


def test_sample_mean_std_skips_missing_values():
    assert sample_mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(np.sqrt(2)))
    assert sample_mean_std([4.0]) == (4.0, None)
    assert sample_mean_std([None]) == (None, None)


def test_smoothed_is_a_trailing_mean_over_smooth_window():
    # 5 rounds: the window of the numbers committed in docs/results (see the module docstring).
    assert SMOOTH_WINDOW == 5
    losses = [1.0, 0.1, 1.0, 0.6, 0.4, 0.3, 0.2]
    seed0 = make_rows([0.1] * 8, 10, train_loss=losses)
    sm = smoothed(seed0)
    assert [r for r, _ in sm] == list(range(1, 8))
    assert [v for _, v in sm] == pytest.approx([1.0, 0.55, 0.7, 0.675, 0.62, 0.48, 0.5])
    assert [v for _, v in smoothed(seed0, window=2)] == pytest.approx([1.0, 0.55, 0.55, 0.8, 0.5, 0.35, 0.25])
    # A round without a training loss (no client replied) is skipped: it neither counts nor gets a value.
    gap = make_rows([0.1] * 4, 10, train_loss=[1.0, 9.0, 0.5], clients_ok=[2, 0, 2])
    assert smoothed(gap) == [(1, 1.0), (3, pytest.approx(0.75))]


def test_add_smoothed_stores_the_same_series_in_the_rows():
    gap = make_rows([0.1] * 5, 10, train_loss=[1.0, 9.0, 0.5, 0.3], clients_ok=[2, 0, 2, 2])
    sweep = {"m": [gap]}
    assert add_smoothed(sweep) == "train_loss_smooth"
    assert [r["train_loss_smooth"] for r in gap] == [None, 1.0, None, pytest.approx(0.75), pytest.approx(0.6)]
    assert [
        (r["round"], r["train_loss_smooth"]) for r in gap if r["train_loss_smooth"] is not None
    ] == smoothed(gap)


def test_first_reached_and_at_budget():
    assert first_reached([(1, 0.9), (2, None), (3, 0.5), (4, 0.4)], 0.5, below=True) == 3
    assert first_reached([(1, 0.2), (2, 0.6)], 0.6) == 2
    assert first_reached([(1, 0.2)], 0.6) is None
    rows = make_rows([0.1, 0.2, 0.3], 10)  # 20 B per round
    assert at_budget(rows, 25)["round"] == 1
    assert at_budget(rows, 0)["round"] == 0
    assert at_budget(rows[1:], 5) is None


def test_cumulative_traffic_counts_both_directions_and_uploads_without_skips():
    rows = make_rows([0.1, 0.5, 0.9], [100, 300], clients_ok=[2, 1])
    rows[1]["clients_skipped"] = 1  # one of round 1's two replies was a skip (LAQ)
    sweep = {"m": [rows]}
    total, uploads = add_cumulative_traffic(sweep)
    assert [r[total] for r in rows] == [0, 200 + 10, 200 + 300 + 20]
    assert [r[uploads] for r in rows] == [0, 1, 2]
    # every instruction sent counts in the downlink per client: 10 bytes to the 2 clients of each round
    assert downlink_bytes_per_client([rows]) == 5.0
