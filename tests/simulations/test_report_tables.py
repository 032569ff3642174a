"""simulations.report.tables: summary rows over seeds and their markdown rendering."""

import math

import numpy as np
import pytest
from report_rows import make_rows

from simulations.report.stats import SMOOTH_WINDOW, add_cumulative_traffic, smoothed
from simulations.report.tables import (
    default_columns,
    fmt_bytes,
    fmt_mean_std,
    mean_std,
    reached,
    summarize,
    to_markdown,
)


@pytest.fixture
def sweep():
    fp0 = make_rows([0.1, 0.5, 0.7, 0.9, 0.8], 1000, theory_bits_per_client=7600)
    fp1 = make_rows([0.1, 0.6, 0.85, 0.8, 0.95], 1000, theory_bits_per_client=7600)
    tk0 = make_rows([0.1, 0.3, 0.5, 0.7, 0.86], 50, theory_bits_per_client=800)
    # Round 2 with one client (100 B), round 4 with none (nothing sent, no per-client value).
    tk1 = make_rows(
        [0.1, 0.2, 0.3, 0.4, 0.5],
        [50, 100, 50, 50],
        clients_ok=[2, 1, 2, 0],
        theory_bits_per_client=800,
    )
    return {"full-precision": [fp0, fp1], "topk-0.01-ef": [tk0, tk1]}


def test_summarize_accuracy_and_bytes(sweep):
    fp, tk = summarize(sweep)
    assert fp["method"] == "full-precision" and fp["n_seeds"] == 2 and fp["rounds"] == 4
    assert fp["final_accuracy_mean"] == pytest.approx(0.875)
    assert fp["final_accuracy_std"] == pytest.approx(0.15 / math.sqrt(2))
    assert fp["best_accuracy_mean"] == pytest.approx(0.925)
    assert fp["best_accuracy_std"] == pytest.approx(0.05 / math.sqrt(2))
    assert fp["uplink_bytes_per_client"] == pytest.approx(1000)
    assert fp["uplink_bytes_total_mean"] == pytest.approx(8000) and fp["uplink_bytes_total_std"] == 0
    assert fp["theory_bytes_per_client"] == pytest.approx(950)
    assert fp["reference"] == "full-precision" and fp["compression_ratio"] == pytest.approx(1.0)
    # topk: per-client values 50,50,50,50 and 50,100,50 (round 4 had no client) -> 400 / 7.
    assert tk["uplink_bytes_per_client"] == pytest.approx(400 / 7)
    assert tk["compression_ratio"] == pytest.approx(17.5)
    assert tk["theory_bytes_per_client"] == pytest.approx(100)
    assert tk["compression_ratio_theory"] == pytest.approx(9.5)
    # cumulative: seed 0: 100, 200, 300, 400; seed 1: 100, 200, 300, 300.
    assert tk["uplink_bytes_total_mean"] == pytest.approx(350)
    assert tk["uplink_bytes_total_std"] == pytest.approx(100 / math.sqrt(2))
    assert tk["final_accuracy_mean"] == pytest.approx(0.68)
    for key in (
        "rounds_to_accuracy_mean",
        "seeds_reached_accuracy",
        "accuracy_at_budget_mean",
        "target_accuracy",
    ):
        assert fp[key] is None


def test_summarize_targets_and_budget(sweep):
    fp, tk = summarize(sweep, target_accuracy=0.85, budget_bytes=250)
    # full-precision reaches 0.85 at round 3 (seed 0) and round 2 (seed 1, equality counts).
    assert fp["seeds_reached_accuracy"] == 2
    assert fp["rounds_to_accuracy_mean"] == pytest.approx(2.5)
    assert fp["rounds_to_accuracy_std"] == pytest.approx(math.sqrt(0.5))
    assert fp["bytes_to_accuracy_mean"] == pytest.approx(5000)
    assert fp["bytes_to_accuracy_std"] == pytest.approx(2000 / math.sqrt(2))
    # topk: only seed 0 reaches it (round 4, 400 B).
    assert tk["seeds_reached_accuracy"] == 1
    assert tk["rounds_to_accuracy_mean"] == 4 and tk["rounds_to_accuracy_std"] is None
    assert tk["bytes_to_accuracy_mean"] == 400
    # Budget 250 B: full-precision only has round 0; topk has round 2 (0.5) and round 2 (0.3).
    assert fp["accuracy_at_budget_mean"] == pytest.approx(0.1) and fp["round_at_budget_mean"] == 0
    assert tk["accuracy_at_budget_mean"] == pytest.approx(0.4)
    assert tk["accuracy_at_budget_std"] == pytest.approx(0.2 / math.sqrt(2))
    assert tk["round_at_budget_mean"] == 2
    assert fp["seeds_spent_budget"] == 2 and tk["seeds_spent_budget"] == 2
    # A budget above what topk spent: its final accuracies, and no seed spent it.
    (tk_big,) = summarize({"topk": sweep["topk-0.01-ef"]}, budget_bytes=350)
    assert tk_big["accuracy_at_budget_mean"] == pytest.approx((0.7 + 0.5) / 2)
    assert tk_big["seeds_spent_budget"] == 1
    assert tk_big["compression_ratio"] is None  # no full-precision in this sweep
    (tk_eq,) = summarize({"topk": sweep["topk-0.01-ef"]}, budget_bytes=300)  # round with exactly 300 B counts
    assert tk_eq["accuracy_at_budget_mean"] == pytest.approx((0.7 + 0.5) / 2)
    assert tk_eq["round_at_budget_mean"] == pytest.approx(3.5)
    (none,) = summarize({"topk": sweep["topk-0.01-ef"]}, target_accuracy=0.99)
    assert none["seeds_reached_accuracy"] == 0 and none["rounds_to_accuracy_mean"] is None


def test_smoothed_train_loss_target():
    losses = [1.0, 0.1, 1.0, 0.6, 0.4, 0.3, 0.2]  # smoothed: 1.0, 0.55, 0.7, 0.675, 0.62, 0.48, 0.5
    seed0 = make_rows([0.1] * 8, 10, train_loss=losses)
    seed1 = make_rows([0.1] * 8, 10, train_loss=[1.0] * 7)
    (row,) = summarize({"m": [seed0, seed1]}, target_train_loss=0.5)
    # The raw loss is <= 0.5 at round 2 already; the 5-round trailing mean only at round 6.
    assert row["seeds_reached_train_loss"] == 1
    assert row["rounds_to_train_loss_mean"] == 6
    assert row["bytes_to_train_loss_mean"] == 6 * 20
    assert row["final_train_loss_mean"] == pytest.approx(0.6)
    assert row["final_train_loss_smooth_mean"] == pytest.approx(0.75)
    assert row["final_train_loss_smooth_mean"] == pytest.approx(
        np.mean([smoothed(seed0)[-1][1], smoothed(seed1)[-1][1]])
    )
    flat = make_rows([0.1] * 4, 10, train_loss=[0.5] * 3)
    (row,) = summarize({"m": [flat]}, target_train_loss=0.5)  # equality reaches the target
    assert row["rounds_to_train_loss_mean"] == 1


def test_compression_ratio_reference_per_axis_value():
    sw = {
        "full-precision": [make_rows([0.1, 0.2], 1000)],
        "full-precision/n-4": [make_rows([0.1, 0.2], 2000)],
        "topk/n-4": [make_rows([0.1, 0.2], 100)],
        "topk/n-8": [make_rows([0.1, 0.2], 100)],
    }
    rows = {r["method"]: r for r in summarize(sw)}
    assert rows["topk/n-4"]["reference"] == "full-precision/n-4"
    assert rows["topk/n-4"]["compression_ratio"] == pytest.approx(20)
    assert rows["topk/n-8"]["reference"] == "full-precision"
    assert rows["topk/n-8"]["compression_ratio"] == pytest.approx(10)
    assert rows["topk/n-4"]["axis"] == "n" and rows["topk/n-4"]["axis_value"] == "4"
    assert all(r["compression_ratio"] is None for r in summarize(sw, reference=None))


def test_formatting_helpers():
    assert fmt_mean_std(0.981, 0.003, 1, scale=100) == "98.1 ± 0.3"
    assert fmt_mean_std(0.981, None, 2, scale=100) == "98.10"
    assert fmt_mean_std(None, 0.1) == "—"
    assert fmt_bytes(11687340) == "11.7 MB"
    assert fmt_bytes(19478.9) == "19.5 kB"
    assert fmt_bytes(512) == "512 B"
    assert fmt_bytes(None) == "—"
    r = reached("seeds_reached_accuracy", 1)
    assert r({"n_seeds": 2, "seeds_reached_accuracy": 0}, "rounds_to_accuracy") == "not reached (0/2)"
    row = {
        "n_seeds": 2,
        "seeds_reached_accuracy": 1,
        "rounds_to_accuracy_mean": 4.0,
        "rounds_to_accuracy_std": None,
    }
    assert r(row, "rounds_to_accuracy") == "4.0 (1/2)"
    assert r({"n_seeds": 2, "seeds_reached_accuracy": None}, "rounds_to_accuracy") == "—"


def test_to_markdown_table():
    rows = [
        {"method": "full-precision", "n": 3, "acc_mean": 0.981, "acc_std": 0.003, "ratio": 1.0},
        {"method": "a|b", "n": 1, "acc_mean": 0.9, "acc_std": None, "ratio": None},
    ]
    cols = [("method", "method", None), ("n", "seeds", "d"), ("acc", "acc. (%)", mean_std(1, scale=100))]
    cols.append(("ratio", "ratio", ".1f"))
    assert to_markdown(rows, cols) == (
        "| method | seeds | acc. (%) | ratio |\n"
        "| :--- | ---: | ---: | ---: |\n"
        "| full-precision | 3 | 98.1 ± 0.3 | 1.0 |\n"
        "| a\\|b | 1 | 90.0 | — |\n"
    )
    with pytest.raises(ValueError):
        to_markdown(rows, [])


def test_default_columns_render_summary(sweep):
    rows = summarize(sweep, target_accuracy=0.85, target_train_loss=0.1, budget_bytes=250)
    md = to_markdown(rows, default_columns(rows))
    lines = md.splitlines()
    assert len(lines) == 4
    assert "rounds to 85%" in lines[0] and "ratio vs full-precision" in lines[0] and "250 B" in lines[0]
    assert lines[2].startswith("| full-precision | 2 | 87.5 ± 10.6 |")
    assert "4.0 (1/2)" in lines[3] and "| 17.5 |" in lines[3] and "not reached (0/2)" in lines[3]
    assert f"train loss (last {SMOOTH_WINDOW})" in lines[0]
    plain = default_columns(summarize({"m": sweep["topk-0.01-ef"]}))
    assert [c[0] for c in plain][-1] == "uplink_bytes_total"


def test_summarize_totals_both_ways_and_uploads_to_target():
    rows = make_rows([0.1, 0.5, 0.9], [100, 300], clients_ok=[2, 2])
    rows[1]["clients_skipped"] = 1
    sweep = {"m": [rows]}
    add_cumulative_traffic(sweep)
    (row,) = summarize(sweep, target_accuracy=0.9)
    assert row["downlink_bytes_per_client"] == 5.0
    assert row["total_bytes_per_client"] == 200.0 + 5.0
    assert row["total_bytes_to_accuracy_mean"] == 800 + 20
    assert row["uploads_to_accuracy_mean"] == 3  # 4 replies, one of them a skip
