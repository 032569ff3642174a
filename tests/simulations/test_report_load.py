"""simulations.report.load: the layout of a sweep, skipped seeds, sweep keys."""

import pytest
from report_rows import make_rows, simple, write_run

from simulations.report.load import load_sweep, parse_key


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
