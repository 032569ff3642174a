"""simulations.report.write: a preset's report from result files; tables and plots smooth alike."""

import json

import numpy as np
import pytest

import simulations.report.plots as plots
import simulations.report.write as write
from simulations.report.stats import SMOOTH_WINDOW, smoothed
from simulations.report.write import write_report
from simulations.sweep import is_complete, plan_runs


def _fake_run(run_dir, rounds, acc_per_round, bytes_per_round):
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": {"num-server-rounds": rounds}}))
    rows = []
    for t in range(rounds + 1):
        rows.append(
            {
                "round": t,
                "accuracy": min(1.0, 0.1 + acc_per_round * t),
                "loss": 2.0 / (t + 1),
                "train_loss": None if t == 0 else 2.0 / t,
                "uplink_bytes": 0 if t == 0 else bytes_per_round,
                "uplink_bytes_cum": bytes_per_round * t,
                "uplink_bytes_per_client": bytes_per_round / 2,
                "uplink_theory_bits": 8 * bytes_per_round,
                "clients_ok": 0 if t == 0 else 2,
            }
        )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "model.npz").write_bytes(b"")


def test_report_from_fake_result_files(tmp_path):
    runs = plan_runs("accuracy-vs-bits", out=tmp_path / "runs", seeds=[0, 1], rounds=4)
    for r in runs:
        if r.key in ("full-precision", "topk-0.01-ef"):
            dense = r.key == "full-precision"
            _fake_run(r.run_dir, 4, 0.25 if dense else 0.2, 1000 if dense else 20)
    done = [r for r in runs if is_complete(r)]
    assert {r.key for r in done} == {"full-precision", "topk-0.01-ef"} and len(done) == 4
    readme = write_report("accuracy-vs-bits", runs_root=tmp_path / "runs", out_root=tmp_path / "out")
    text = readme.read_text()
    assert "| topk-0.01-ef | 2 |" in text and "50.0" in text  # 1000 / 20 bytes: the ratio vs full precision
    assert "Seeds per method: 2;" in text
    assert (readme.parent / "accuracy_vs_uplink_bytes.png").stat().st_size > 1000
    summary = json.loads((readme.parent / "summary.json").read_text())
    assert set(summary["curves"]) == {"full-precision", "topk-0.01-ef"}


def test_plot_and_table_use_the_same_smoothed_train_loss(tmp_path, monkeypatch):
    # The train-loss curve a report draws is, round by round, the mean over seeds of the smoothed series the
    # table reports; its last point is the table's final smoothed loss and the title names the same window.
    runs = plan_runs("speedup", out=tmp_path / "runs", seeds=[0, 1], rounds=12)
    for r in runs:
        if r.key == "topk-0.01-ef/n-2":
            _fake_run(r.run_dir, 12, 0.05, 20)
            rows = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
            for row in rows[1:]:  # a noisy loss, different per seed, so the window matters
                row["train_loss"] = 2.0 / row["round"] + 0.3 * ((row["round"] * (r.seed + 3)) % 4)
            (r.run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    drawn, titles = [], []
    real_grid, real_plot = plots.series_on_grid, write.plot_curves

    def spy_grid(seeds, *, x, y, positive_x=False):
        out = real_grid(seeds, x=x, y=y, positive_x=positive_x)
        drawn.append((y, seeds, out))
        return out

    def spy_plot(*args, **kwargs):
        titles.append(kwargs["title"])
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(plots, "series_on_grid", spy_grid)
    monkeypatch.setattr(write, "plot_curves", spy_plot)
    readme = write_report("speedup", runs_root=tmp_path / "runs", out_root=tmp_path / "out")
    (table_row,) = json.loads((readme.parent / "summary.json").read_text())["table"]
    ((y, seeds, (grid, mean, _)),) = drawn
    assert y == "train_loss_smooth"
    per_seed = [dict(smoothed(rows)) for rows in seeds]
    assert grid.tolist() == list(range(1, 13))
    np.testing.assert_allclose(mean, [np.mean([s[int(rd)] for s in per_seed]) for rd in grid])
    assert mean[-1] == pytest.approx(table_row["final_train_loss_smooth_mean"])
    raw_mean = np.mean([[r["train_loss"] for r in rows[1:]] for rows in seeds], axis=0)
    assert not np.allclose(mean, raw_mean)  # it is smoothed
    (title,) = titles
    assert f"mean of last {SMOOTH_WINDOW} rounds" in title


def test_seed_systems_report_shows_bytes_both_ways_and_uploads(tmp_path):
    runs = plan_runs("seed-systems", out=tmp_path / "runs", seeds=[0], rounds=4)
    for r in runs:
        if r.key in ("full-precision", "laq-8bit"):
            _fake_run(r.run_dir, 4, 0.25, 1000 if r.key == "full-precision" else 100)
    readme = write_report("seed-systems", runs_root=tmp_path / "runs", out_root=tmp_path / "out")
    text = readme.read_text()
    assert "downlink B/client/round" in text and "uploads to 95%" in text and "bytes up + down to 95%" in text
    assert (readme.parent / "accuracy_vs_total_bytes.png").exists()
    assert (readme.parent / "accuracy_vs_uploads.png").exists()


def _write_planned(run, acc_per_round: float, *, with_model: bool = False):
    """A finished run of a planned config: its real config.json (for the split) and fake metrics."""
    from fl_compams.config import parse_config
    from tasks.task import model_for_task

    cfg = parse_config(run.overrides)
    _fake_run(run.run_dir, cfg.server.num_server_rounds, acc_per_round, 100)
    info = {"config": cfg.to_flat(), "num_nodes": run.num_supernodes, "dim": 0}
    (run.run_dir / "config.json").write_text(json.dumps(info))
    if with_model:  # a stand-in trained checkpoint: the initial model of another seed
        model = model_for_task(cfg.data, 99)
        np.savez(run.run_dir / "model.npz", **{k: v.numpy() for k, v in model.state_dict().items()})


def test_heterogeneity_report_measures_every_split_at_common_reference_models(tmp_path):
    runs = plan_runs("heterogeneity", out=tmp_path / "runs", seeds=[0, 1], rounds=2)
    kept = [r for r in runs if r.key.split("/")[0] in ("full-precision", "topk-0.01-ef")]
    kept = [r for r in kept if r.key.endswith(("/alpha-0.05", "/iid"))]
    for r in kept:
        ef = r.key.startswith("topk")
        _write_planned(r, 0.2 + 0.05 * r.seed if ef else 0.3, with_model=r.key == "full-precision/iid")
    readme = write_report("heterogeneity", runs_root=tmp_path / "runs", out_root=tmp_path / "out")
    summary = json.loads((readme.parent / "summary.json").read_text())
    values = summary["split_sigma_g2"]["values"]
    assert set(values) == {"alpha-0.05", "iid"} and set(values["iid"]) == {"0", "1"}
    for setting in values.values():
        for v in setting.values():
            assert v["initial"] > 0 and v["trained"] > 0
    # a skewed split is more dissimilar than an iid one at the same reference model, for every seed
    assert all(values["alpha-0.05"][s]["trained"] > values["iid"][s]["trained"] for s in ("0", "1"))
    assert summary["split_sigma_g2"]["reference_checkpoint"].endswith("full-precision/iid/seed-0")
    rows = {r["method"]: r for r in summary["table"]}
    # final accuracies (round 2): full precision 0.7 on both seeds, Top-k 0.5 (seed 0) and 0.6 (seed 1)
    row = rows["topk-0.01-ef/iid"]
    assert row["gap_mean"] == pytest.approx(0.15) and row["gap_std"] == pytest.approx(0.1 / 2**0.5)
    assert row["gap_n"] == 2 and rows["full-precision/iid"]["gap_mean"] is None
    text = readme.read_text()
    assert "sigma_g^2 at trained ref." in text and (readme.parent / "gap_vs_sigma_g2.png").exists()


def test_tune_report_chooses_on_validation_accuracy_not_test_accuracy(tmp_path):
    runs = plan_runs("tune", out=tmp_path / "runs", rounds=6)
    picked = {"full-precision/lr-0.001": (0.9, 0.5), "full-precision/lr-0.003": (0.6, 0.8)}  # (test, val)
    for r in runs:
        if r.key in picked:
            _fake_run(r.run_dir, 6, 0.1, 100)
            test_acc, val_acc = picked[r.key]
            rows = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
            for row in rows:
                row["accuracy"], row["val_accuracy"] = test_acc, val_acc - 0.01 * (6 - row["round"])
            (r.run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    readme = write_report("tune", runs_root=tmp_path / "runs", out_root=tmp_path / "out")
    chosen = [line for line in readme.read_text().splitlines() if "**chosen**" in line]
    assert len(chosen) == 1 and "| 0.003 |" in chosen[0]
    rows = {r["method"]: r for r in json.loads((readme.parent / "summary.json").read_text())["table"]}
    # the mean of the last 5 rounds' validation accuracy: 0.8 - 0.01 * mean(0..4)
    assert rows["full-precision/lr-0.003"]["final_val_accuracy_smooth_mean"] == pytest.approx(0.78)


def test_equal_bytes_report_counts_both_directions_and_wall_time_to_the_target(tmp_path):
    from report_rows import make_rows, write_run

    runs = plan_runs("accuracy-vs-bits", out=tmp_path / "runs", seeds=[0, 1], rounds=4)
    for r in runs:
        if r.key in ("full-precision", "topk-0.01-ef"):
            acc = [0.1, 0.5, 0.96, 0.97, 0.97] if r.seed == 0 or r.key == "topk-0.01-ef" else [0.1] * 5
            write_run(r.run_dir, make_rows(acc, 1000 if r.key == "full-precision" else 100))
            (r.run_dir / "model.npz").write_bytes(b"")
    for r in plan_runs("seed-systems", out=tmp_path / "runs", seeds=[0], rounds=4):
        if r.key in ("full-precision", "laq-8bit"):  # a second source; its full-precision collides
            write_run(r.run_dir, make_rows([0.1, 0.2, 0.3, 0.4, 0.5], 10))
    readme = write_report("equal-budget", runs_root=tmp_path / "runs", out_root=tmp_path / "out")
    rows = {r["method"]: r for r in json.loads((readme.parent / "summary.json").read_text())["table"]}
    assert {"laq-8bit", "seed-systems:full-precision"} <= set(rows)
    assert rows["seed-systems:full-precision"]["final_accuracy_mean"] == 0.5
    topk, dense = rows["topk-0.01-ef"], rows["full-precision"]
    # round 2 reaches 95 %: uplink 2 rounds x 2 clients x 100 B; downlink 10 B per round; wall_s = round
    assert topk["bytes_to_accuracy_mean"] == 400 and topk["total_bytes_to_accuracy_mean"] == 420
    assert topk["wall_s_to_accuracy_mean"] == 2.0 and topk["seeds_reached_accuracy"] == 2
    assert dense["seeds_reached_accuracy"] == 1 and dense["bytes_to_accuracy_mean"] == 4000
    text = readme.read_text()
    assert "up + down to 95%" in text and "wall s to 95%" in text and "(1/2)" in text
    assert (readme.parent / "accuracy_vs_total_bytes.png").exists()
    assert (readme.parent / "accuracy_vs_uplink_bytes.png").exists()


def test_speedup_report_shows_samples_to_target(tmp_path):
    runs = plan_runs("speedup", out=tmp_path / "runs", seeds=[0], rounds=30)
    for r in runs:
        r.overrides["num-server-rounds"] = 30
        _write_planned(
            r, 0.01
        )  # train loss 2 / t: the smoothed loss reaches 0.5 at the same round for every n
    readme = write_report("speedup", runs_root=tmp_path / "runs", out_root=tmp_path / "out")
    line = next(line for line in readme.read_text().splitlines() if line.startswith("| n-4 |"))
    rounds = json.loads((readme.parent / "summary.json").read_text())["table"][2]["rounds_to_train_loss_mean"]
    assert f"{rounds * 4 * 32:,.0f}" in line  # 4 clients x 1 local step x batch 32
    from simulations.report.load import load_sweep

    sweep = load_sweep(tmp_path / "runs" / "digits" / "speedup")
    lines = write._speedup_at(sweep, [0.5, 0.01], list(sweep))
    table = "\n".join(lines)
    assert "| 0.5 |" in table and "(x1.00)" in table
    assert "| 0.01 | not reached | not reached" in table  # 2 / t never falls that low in 30 rounds


def test_ef_horizon_report_pairs_each_method_with_its_partner_by_seed(tmp_path):
    # EF beats no EF on seeds 0 and 1 and loses on seed 2: the table shows the paired mean, its std and 2 of 3;
    # a seed only one side ran (seed 3 of the EF variant) is left out of the pair.
    runs = plan_runs("ef-horizon", out=tmp_path / "runs", seeds=[0, 1, 2, 3], rounds=8)
    acc = {
        ("topk-0.01-ef", 0): 0.7,
        ("topk-0.01-ef", 1): 0.6,
        ("topk-0.01-ef", 2): 0.5,
        ("topk-0.01-ef", 3): 0.9,
    }
    acc |= {("topk-0.01-no-ef", 0): 0.5, ("topk-0.01-no-ef", 1): 0.5, ("topk-0.01-no-ef", 2): 0.6}
    for r in runs:
        if (r.key, r.seed) in acc:
            _fake_run(r.run_dir, 8, 0.0, 100)
            rows = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
            for row in rows:  # the last 5 rounds average to the chosen value; earlier rounds do not count
                row["accuracy"] = acc[r.key, r.seed] + (0.0 if row["round"] > 3 else -0.3)
                row["train_loss"] = None if row["round"] == 0 else 1.0 - acc[r.key, r.seed]
            (r.run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = write_report("ef-horizon", runs_root=tmp_path / "runs", out_root=tmp_path / "out").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| topk-0.01-ef − topk-0.01-no-ef"))
    # differences 0.2, 0.1, -0.1 -> mean 6.7 points, sample std 15.3; loss differences the negatives
    assert "| 6.7 ± 15.3 | 2 of 3 | -0.067 ± 0.153 | 2 of 3 |" in line
    blocksign = next(x for x in text.splitlines() if x.startswith("| blocksign-ef − blocksign-no-ef"))
    assert "| — | 0 of 0 |" in blocksign  # no runs: nothing claimed
