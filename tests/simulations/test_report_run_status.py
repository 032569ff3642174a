"""simulations.report.run_status: one run's summary, and a failed run's non-zero exit."""

import json

from report_rows import make_rows, write_run

from simulations.report import run_status


def test_summary_of_a_run(tmp_path, capsys):
    rows = make_rows([0.1, 0.5, 0.9, 0.8], 10)
    rows[2]["clients_failed"] = 1
    write_run(tmp_path / "run", rows)
    assert run_status.main([str(tmp_path / "run"), "--wall-s", "7"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rounds"] == 3 and info["final_accuracy"] == 0.8 and info["best_accuracy"] == 0.9
    assert info["uplink_bytes_total"] == 60 and info["uplink_bytes_per_client_per_round"] == 10
    assert info["clients_failed_total"] == 1 and info["command_wall_s"] == 7


def test_failed_runs_exit_non_zero(tmp_path, capsys):
    assert run_status.main([str(tmp_path / "missing")]) == 1
    assert "no results" in capsys.readouterr().err
    write_run(tmp_path / "run", make_rows([0.1, 0.5], 10))
    status = {
        "runs": [
            {"pending-at": "1", "status": "finished:completed"},
            {"pending-at": "2", "status": "finished:failed"},
        ]
    }
    assert run_status.main([str(tmp_path / "run"), "--status-json", json.dumps(status)]) == 1
    assert "flwr run failed" in capsys.readouterr().err
