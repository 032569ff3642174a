"""Presets expand into valid runs; the CLI plans and skips finished runs (reports: test_report_write.py)."""

import pytest

from simulations import cli
from simulations.sweep import available_presets, load_preset, plan_runs, set_aside


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_expands_into_valid_runs(tmp_path, name):
    only = load_preset(name)["preset"].get("datasets")
    if only:  # a preset for some data sets refuses the others, saying which
        with pytest.raises(ValueError, match=f"runs on {only[0]}"):
            plan_runs(name, out=tmp_path, dataset="digits" if "digits" not in only else "mnist")
        runs = plan_runs(name, out=tmp_path, dataset=only[0])
        assert runs and all(r.overrides["dataset"] == only[0] for r in runs)
        return
    runs = plan_runs(name, out=tmp_path)  # parse_config validates every run
    if name == "equal-budget":
        assert runs == []  # it re-reads accuracy-vs-bits
        return
    assert runs and len({r.run_dir for r in runs}) == len(runs)
    seeds = [r.seed for r in runs]
    assert seeds == sorted(seeds)  # seed-major: an interrupted sweep stays balanced
    for dataset in ("mnist", "cifar10", "mnist1d"):
        for r in plan_runs(name, out=tmp_path, dataset=dataset, data_dir="/data"):
            assert r.overrides["dataset"] == dataset and r.overrides["data-dir"] == "/data"


def test_a_data_sets_table_overrides_the_default_model(tmp_path, monkeypatch):
    (tmp_path / "p.toml").write_text(
        "[preset]\nseeds = [0]\n[base]\nserver-lr = 0.01\n"
        '[datasets.mnist1d]\nmodel = "mnist1d-mlp"\nserver-lr = 0.002\n[methods.a]\n'
        "[methods.b]\nserver-lr = 0.03\n[datasets.mnist1d.methods.b]\nserver-lr = 0.004\n"
        '[[axis]]\nlabel = "n-2"\nnum-supernodes = 2\nnum-server-rounds = 5\n'
        '[datasets.mnist1d.axis."n-2"]\nnum-server-rounds = 50\n'
        "[datasets.mnist1d.preset]\nseeds = [7]\n"
    )
    monkeypatch.setattr("simulations.sweep.PRESET_DIR", tmp_path)
    a, b = plan_runs("p", out=tmp_path / "runs", dataset="mnist1d")
    assert a.overrides["model"] == "mnist1d-mlp" and a.overrides["server-lr"] == 0.002
    assert b.overrides["server-lr"] == 0.004  # the method's table on that data set wins over its own
    assert a.overrides["num-server-rounds"] == 50 and a.num_supernodes == 2 and a.seed == 7
    a, b = plan_runs("p", out=tmp_path / "runs", dataset="mnist", data_dir="/data")
    assert a.overrides["model"] == "auto" and a.overrides["server-lr"] == 0.01
    assert b.overrides["server-lr"] == 0.03 and a.overrides["num-server-rounds"] == 5 and a.seed == 0


def test_a_data_set_may_run_part_of_the_grid(tmp_path, monkeypatch):
    grid = "[preset]\nseeds = [0]\n[methods.a]\n[methods.b]\n[methods.c]\n"
    grid += "".join(f'[[axis]]\nlabel = "{x}"\n' for x in ("x", "y", "z"))
    (tmp_path / "p.toml").write_text(grid + '[datasets.mnist1d.preset]\nmethods = ["c", "a"]\naxes = ["y"]\n')
    monkeypatch.setattr("simulations.sweep.PRESET_DIR", tmp_path)
    assert [r.key for r in plan_runs("p", out=tmp_path, dataset="mnist1d")] == ["a/y", "c/y"]  # preset order
    assert len(plan_runs("p", out=tmp_path)) == 9  # other data sets run the whole grid
    (tmp_path / "p.toml").write_text(grid + '[datasets.mnist1d.preset]\nmethods = ["a", "typo"]\n')
    with pytest.raises(ValueError, match=r"unknown labels \['typo'\]; the preset defines \['a', 'b', 'c'\]"):
        plan_runs("p", out=tmp_path, dataset="mnist1d")


def test_speedup_scales_lr_with_sqrt_n(tmp_path):
    runs = {r.key: r for r in plan_runs("speedup", out=tmp_path, seeds=[0])}
    for n in (1, 2, 4, 8):
        r = runs[f"topk-0.01-ef/n-{n}"]
        assert r.num_supernodes == n
        assert r.overrides["server-lr"] == pytest.approx(0.001 * n**0.5)


def test_cli_dry_run_lists_only_missing_runs(tmp_path, capsys):
    args = ["reproduce", "speedup", "--runs", str(tmp_path), "--seeds", "0", "--dry-run"]
    assert cli.main(args) == 0
    assert "4 runs, 0 already complete, 4 to run" in capsys.readouterr().out
    assert cli.main(["reproduce", "speedup", "--runs", str(tmp_path), "--seeds", "0", "--dry-run"]) == 0
    assert "4 already complete" not in capsys.readouterr().out  # nothing ran: still 0 complete


def test_an_incomplete_run_is_set_aside_never_deleted(tmp_path):
    run_dir = tmp_path / "topk" / "seed-0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    moved = set_aside(run_dir)
    assert moved.name == ".seed-0.incomplete-1" and not run_dir.exists()
    assert (moved / "metrics.jsonl").read_text() == '{"round": 0}\n'
    run_dir.mkdir()
    assert set_aside(run_dir).name == ".seed-0.incomplete-2"
    assert set_aside(run_dir) is None  # nothing there
