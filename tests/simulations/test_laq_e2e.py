"""LAQ through the Flower apps: workers skip, skips are counted (not failures) with their bytes, the run learns."""

import math

import pytest

from simulations.runner import run_experiment
from strategies.results import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LOGREG_DIM = 8 * 8 * 10 + 10  # the LAQ paper's model (multinomial logistic regression) on digits


def test_laq_run_skips_counts_skips_and_learns(tmp_path):
    rounds, bits = 15, 4
    path = run_experiment(
        {
            "out-dir": str(tmp_path),
            "run-name": "laq",
            "algorithm": "laq",
            "model": "logreg",
            "server-lr": 0.05,
            "num-server-rounds": rounds,
            "laq-bits": bits,
            "laq-max-skip": 4,
        },
        num_supernodes=3,
    )
    rows = read_metrics(path)
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    body = 4 + 4 + math.ceil(bits * LOGREG_DIM / 8)
    skips = 0
    for r in rows[1:]:
        assert r["clients_failed"] == 0 and r["clients_ok"] == 3 and r["update_applied"]
        clients = r["clients"].values()
        skipped = [c for c in clients if c.get("skipped")]
        assert r["clients_skipped"] == len(skipped)
        skips += len(skipped)
        assert all(c["payload_bytes"] == 0 and 0 < c["uplink_bytes"] < 1000 for c in skipped)  # a few bytes
        assert all(c["payload_bytes"] == 12 + body for c in clients if not c.get("skipped"))
        uploads = 3 - len(skipped)
        assert r["uplink_theory_bits"] == uploads * (32 + bits * LOGREG_DIM) + len(skipped)
    assert all(not c.get("skipped") for c in rows[1]["clients"].values())  # the first round uploads
    assert 0 < skips < 3 * rounds  # lazy, and still uploading
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
