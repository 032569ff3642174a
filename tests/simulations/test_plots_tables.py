"""Sweep loading, summary tables and plots on tiny hand-written sweeps."""

import json
import math

import numpy as np
import pytest

from simulations.plots import load_sweep, parse_key, plot_curves, plot_xy, series_on_grid, style
from simulations.tables import (
    default_columns,
    fmt_bytes,
    fmt_mean_std,
    mean_std,
    reached,
    smoothed,
    summarize,
    to_markdown,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_rows(acc, per_client, *, train_loss=None, clients_ok=None, theory_bits_per_client=None):
    """Rows for rounds 0..T; ``acc`` has T + 1 entries, the per-round lists T entries (rounds 1..T)."""
    t = len(acc) - 1
    per_client = per_client if isinstance(per_client, list) else [per_client] * t
    clients_ok = clients_ok or [2] * t
    train_loss = train_loss or [1.0] * t
    theory = (
        theory_bits_per_client if isinstance(theory_bits_per_client, list) else [theory_bits_per_client] * t
    )
    rows = [
        {
            "round": 0,
            "accuracy": acc[0],
            "loss": 2.3,
            "train_loss": None,
            "uplink_bytes": 0,
            "uplink_bytes_cum": 0,
            "downlink_bytes_cum": 0,
            "uplink_theory_bits": 0.0,
            "clients_ok": 0,
            "clients_failed": 0,
            "wall_s": 0.0,
        }
    ]
    cum = 0
    for r in range(1, t + 1):
        ok = clients_ok[r - 1]
        up = per_client[r - 1] * ok
        cum += up
        row = {
            "round": r,
            "accuracy": acc[r],
            "loss": 1.0,
            "train_loss": train_loss[r - 1] if ok else None,
            "uplink_bytes": up,
            "uplink_bytes_cum": cum,
            "downlink_bytes_cum": 10 * r,
            "uplink_theory_bits": float((theory[r - 1] or 0) * ok),
            "clients_ok": ok,
            "clients_failed": 2 - ok,
            "wall_s": float(r),
        }
        if ok:
            row["uplink_bytes_per_client"] = per_client[r - 1]
        rows.append(row)
    return rows


def write_run(run_dir, rows, *, num_rounds=None, config=True, extra=""):
    run_dir.mkdir(parents=True)
    if config:
        cfg = {"num-server-rounds": num_rounds if num_rounds is not None else rows[-1]["round"], "seed": 0}
        (run_dir / "config.json").write_text(json.dumps({"config": cfg, "num_nodes": 2, "dim": 10}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)


def simple(acc0, t=3):
    return make_rows([acc0] + [0.5] * t, 10)


# ------------------------------------------------------------------------------------------------ load_sweep


def test_load_sweep_layout_and_seed_order(tmp_path):
    write_run(tmp_path / "full-precision" / "seed-10", simple(0.10))
    write_run(tmp_path / "full-precision" / "seed-2", simple(0.02))
    for n in (16, 4, 8):
        write_run(tmp_path / "topk-0.01-ef" / f"n-{n}" / "seed-0", simple(n / 100))
    (tmp_path / "notes.txt").write_text("not a method")
    sweep = load_sweep(tmp_path)
    assert list(sweep) == ["full-precision", "topk-0.01-ef/n-4", "topk-0.01-ef/n-8", "topk-0.01-ef/n-16"]
    assert sweep.seeds["full-precision"] == [2, 10]
    assert [seed[0]["accuracy"] for seed in sweep["full-precision"]] == [0.02, 0.10]
    assert sweep["topk-0.01-ef/n-8"][0][0]["accuracy"] == 0.08
    assert sweep.skipped == []
    assert parse_key("topk-0.01-ef/n-4") == ("topk-0.01-ef", "n", "4")
    assert parse_key("full-precision") == ("full-precision", None, None)


def test_load_sweep_skips_broken_seeds(tmp_path):
    good = make_rows([0.1, 0.2, 0.3, 0.4], 10)
    write_run(tmp_path / "a" / "seed-0", good)
    (tmp_path / "a" / "seed-1").mkdir(parents=True)  # no metrics.jsonl
    write_run(tmp_path / "a" / "seed-2", good[:1])  # only the initial model
    write_run(tmp_path / "a" / "seed-3", good[:3], num_rounds=3)  # short vs its config
    write_run(tmp_path / "a" / "seed-4", good[:3], config=False)  # short vs its siblings
    write_run(tmp_path / "a" / "seed-5", good, extra='{"round": 4, "accur')  # torn last line: fine
    write_run(tmp_path / "b" / "seed-0", good[:2], num_rounds=3)  # every seed bad: key absent
    sweep = load_sweep(tmp_path)
    assert list(sweep) == ["a"]
    assert sweep.seeds["a"] == [0, 5]
    assert len(sweep["a"][1]) == 4
    reasons = {p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1]: why for p, why in sweep.skipped}
    assert set(reasons) == {"a/seed-1", "a/seed-2", "a/seed-3", "a/seed-4", "b/seed-0"}
    assert reasons["a/seed-1"] == "no metrics.jsonl"
    assert "no training rounds" in reasons["a/seed-2"]
    assert reasons["a/seed-3"] == "incomplete: 2 of 3 rounds"
    assert reasons["a/seed-4"] == "incomplete: 2 of 3 rounds"
    assert reasons["b/seed-0"] == "incomplete: 1 of 3 rounds"

    lenient = load_sweep(tmp_path, allow_incomplete=True)
    assert lenient.seeds["a"] == [0, 3, 4, 5]
    assert lenient.seeds["b"] == [0]


def test_load_sweep_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sweep(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------- summarize


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
    losses = [1.0, 0.1, 1.0, 0.6, 0.4, 0.3, 0.2]
    seed0 = make_rows([0.1] * 8, 10, train_loss=losses)
    seed1 = make_rows([0.1] * 8, 10, train_loss=[1.0] * 7)
    sm = smoothed(seed0)
    assert [r for r, _ in sm] == list(range(1, 8))
    assert [v for _, v in sm] == pytest.approx([1.0, 0.55, 0.7, 0.675, 0.62, 0.48, 0.5])
    (row,) = summarize({"m": [seed0, seed1]}, target_train_loss=0.5)
    # The raw loss is <= 0.5 at round 2 already; the 5-round trailing mean only at round 6.
    assert row["seeds_reached_train_loss"] == 1
    assert row["rounds_to_train_loss_mean"] == 6
    assert row["bytes_to_train_loss_mean"] == 6 * 20
    assert row["final_train_loss_mean"] == pytest.approx(0.6)
    assert row["final_train_loss_smooth_mean"] == pytest.approx(0.75)
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


# -------------------------------------------------------------------------------------------------- markdown


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
    plain = default_columns(summarize({"m": sweep["topk-0.01-ef"]}))
    assert [c[0] for c in plain][-1] == "uplink_bytes_total"


# ----------------------------------------------------------------------------------------------------- plots


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


def _assert_small_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) < 200_000


def test_plot_curves_writes_small_png(tmp_path):
    rng = np.random.default_rng(0)
    sw = {}
    for m in range(8):  # > 6 methods: legend outside the axes
        seeds = []
        for _ in range(2):
            acc = np.clip(np.linspace(0.1, 0.9, 41) + rng.normal(0, 0.02, 41), 0, 1).tolist()
            seeds.append(make_rows(acc, [100 * (m + 1) + int(rng.integers(0, 5)) for _ in range(40)]))
        sw[f"method-{m}"] = seeds
    sw["single"] = [make_rows([0.1, 0.5, 0.7], 10)]
    out = plot_curves(sw, x="round", y="accuracy", out_path=tmp_path / "sub" / "acc.png", title="t")
    assert out == tmp_path / "sub" / "acc.png"
    _assert_small_png(out)
    out = plot_curves(
        sw, x="uplink_bytes_cum", y="train_loss", out_path=tmp_path / "b.png", methods=["single"]
    )
    _assert_small_png(out)
    with pytest.raises(KeyError):
        plot_curves(sw, x="round", y="accuracy", out_path=tmp_path / "c.png", methods=["nope"])
    assert not (tmp_path / "c.png").exists()


def test_plot_xy_writes_png(tmp_path):
    pts = {
        "topk": ([0.5, 0.1, 1.0], [0.02, 0.01, 0.05]),
        "sign": ([0.1, None, 1.0], [0.03, 0.1, 0.08], [0.01, 0.0, None]),
    }
    out = plot_xy(pts, xlabel=r"$\sigma_g^2$", ylabel="gap", out_path=tmp_path / "xy.png", logx=True)
    _assert_small_png(out)
    with pytest.raises(ValueError):
        plot_xy({"x": ([1, 2], [1])}, xlabel="x", ylabel="y", out_path=tmp_path / "bad.png")


def test_styles_are_distinct():
    first = [style(i) for i in range(7)]
    for key in ("color", "marker", "linestyle"):
        assert len({repr(s[key]) for s in first}) == 7
    combos = {(s["color"], s["marker"], repr(s["linestyle"])) for s in (style(i) for i in range(56))}
    assert len(combos) == 56


def test_large_png_is_reencoded_with_a_palette(tmp_path, monkeypatch):
    import simulations.plots as plots

    sw = {"m": [make_rows([0.1, 0.5, 0.7], 10), make_rows([0.2, 0.4, 0.8], 10)]}
    rgba = plot_curves(sw, x="round", y="accuracy", out_path=tmp_path / "rgba.png")
    monkeypatch.setattr(plots, "_PALETTE_ABOVE", 0)
    pal = plot_curves(sw, x="round", y="accuracy", out_path=tmp_path / "pal.png")
    _assert_small_png(pal)
    assert rgba.read_bytes()[25] != 3 and pal.read_bytes()[25] == 3  # PNG colour type 3 = palette
    assert len(pal.read_bytes()) < len(rgba.read_bytes())
