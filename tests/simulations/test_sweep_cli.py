"""Presets expand into valid runs; the CLI plans, skips finished runs, and reports from result files."""

import json

import pytest

from simulations import cli
from simulations.report import write_report
from simulations.sweep import available_presets, is_complete, plan_runs


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_expands_into_valid_runs(tmp_path, name):
    runs = plan_runs(name, out=tmp_path)  # parse_config validates every run
    if name == "equal-budget":
        assert runs == []  # it re-reads accuracy-vs-bits
        return
    assert runs and len({r.run_dir for r in runs}) == len(runs)
    seeds = [r.seed for r in runs]
    assert seeds == sorted(seeds)  # seed-major: an interrupted sweep stays balanced
    for dataset in ("mnist", "cifar10"):
        for r in plan_runs(name, out=tmp_path, dataset=dataset, data_dir="/data"):
            assert r.overrides["dataset"] == dataset and r.overrides["data-dir"] == "/data"


def test_speedup_scales_lr_with_sqrt_n(tmp_path):
    runs = {r.key: r for r in plan_runs("speedup", out=tmp_path, seeds=[0])}
    for n in (1, 2, 4, 8):
        r = runs[f"topk-0.01-ef/n-{n}"]
        assert r.num_supernodes == n
        assert r.overrides["server-lr"] == pytest.approx(0.001 * n**0.5)


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
    assert (readme.parent / "accuracy_vs_uplink_bytes.png").stat().st_size > 1000
    summary = json.loads((readme.parent / "summary.json").read_text())
    assert set(summary["curves"]) == {"full-precision", "topk-0.01-ef"}


def test_cli_dry_run_lists_only_missing_runs(tmp_path, capsys):
    args = ["reproduce", "speedup", "--runs", str(tmp_path), "--seeds", "0", "--dry-run"]
    assert cli.main(args) == 0
    assert "4 runs, 0 already complete, 4 to run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "speedup", "--seeds", "zero"])
