"""Hand-written metrics rows and run directories for the tests of ``simulations.report``."""

import json


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
            "downlink_bytes": 10,
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
