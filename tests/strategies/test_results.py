"""The results directory: run-name is a plain name inside out-dir, and an earlier run's results are never lost."""

import pytest

from fl_compams import ConfigError, parse_config
from strategies import results
from strategies.results import ResultsDir, check_fresh, resolve_run_dir

BAD_NAMES = [
    "../../x",
    "../x",
    "/tmp/x",
    "a/b",
    ".",
    "..",
    ".hidden",
    "-rf",
    "a\\b",
    "x" * 129,
    "a b",
    "nul\x00",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_run_name_must_be_a_plain_name(tmp_path, name):
    with pytest.raises(ConfigError, match="config key 'run-name'"):
        parse_config({"run-name": name})
    with pytest.raises(ConfigError, match="must be a plain name"):
        resolve_run_dir(str(tmp_path / "out"), name)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_run_dir_stays_inside_out_dir_even_through_a_symbolic_link(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside out-dir"):
        resolve_run_dir(str(tmp_path / "out"), "link")
    assert (
        resolve_run_dir(str(tmp_path / "out"), "seed-0.v2_a") == (tmp_path / "out" / "seed-0.v2_a").resolve()
    )
    assert resolve_run_dir("", "x", base=tmp_path) == (tmp_path / "runs" / "x").resolve()


def test_an_empty_run_name_never_reuses_a_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(results.time, "strftime", lambda fmt: "20250101-120000")
    first = resolve_run_dir(str(tmp_path), "")
    assert first.name == "20250101-120000"
    first.mkdir()
    second = resolve_run_dir(str(tmp_path), "")
    assert second.name == "20250101-120000-2"
    second.mkdir()
    assert resolve_run_dir(str(tmp_path), "").name == "20250101-120000-3"


def test_a_fresh_results_dir_refuses_earlier_results(tmp_path):
    ResultsDir(tmp_path / "new")  # a new directory
    (tmp_path / "empty").mkdir()
    ResultsDir(tmp_path / "empty")  # an empty one
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"round": 0}\n')
    for path in (old, tmp_path / "new"):  # "new" now holds an (empty) metrics.jsonl
        with pytest.raises(ConfigError, match=r"already exists and holds.*metrics\.jsonl.*never overwritten"):
            ResultsDir(path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="holds a file"):
        check_fresh(tmp_path / "file")
    assert (old / "metrics.jsonl").read_text() == '{"round": 0}\n'
    resumed = ResultsDir(old, keep_rounds_upto=0)  # resuming keeps what it continues
    assert results.read_metrics(resumed.path) == [{"round": 0}]
