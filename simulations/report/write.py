"""The report of one preset's sweep: tables, plots and a compact summary (pure functions of the run files).

``write_report(preset, ...)`` reads ``<runs>/<dataset>/<preset>/`` (or the ``source`` preset's runs), writes
``<out>/<dataset>/<preset>/README.md`` with the tables and the command that regenerates them, PNG plots, and
``summary.json`` (the table rows and, per method and seed, the per-round accuracy, training loss, cumulative
uplink bytes and sigma_g^2), small enough to commit. Training-loss curves are smoothed with
:data:`simulations.report.stats.SMOOTH_WINDOW`, the same window as the tables.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from simulations.report.load import Sweep, load_sweep
from simulations.report.plots import plot_curves, plot_xy
from simulations.report.stats import (
    SMOOTH_WINDOW,
    add_cumulative_traffic,
    add_smoothed,
    column_mean,
    sample_mean_std,
    smoothed,
)
from simulations.report.tables import default_columns, fmt_bytes, mean_std, reached, summarize, to_markdown
from simulations.sweep import load_preset, preset_meta

log = logging.getLogger(__name__)


def _sig(v: Any, digits: int = 5) -> Any:
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.{digits}g}")
    return v


def _load_sources(root: Path, source: str | list[str]) -> Sweep:
    """The sweep of one preset, or of several merged (``source = ["accuracy-vs-bits", "seed-systems"]``).

    The first source must exist; a later one that has no runs is left out with a warning. A key that an earlier
    source already has is kept as ``<source>:<key>`` (two presets may each have a ``full-precision``).
    """
    names = [source] if isinstance(source, str) else list(source)
    merged = load_sweep(root / names[0])
    for name in names[1:]:
        if not (root / name).is_dir():
            log.warning("report: no runs of %s under %s; left out", name, root)
            continue
        extra = load_sweep(root / name)
        for key, seeds in extra.items():
            new_key = f"{name}:{key}" if key in merged else key
            merged[new_key] = seeds
            merged.seeds[new_key] = extra.seeds[key]
            merged.run_dirs[new_key] = extra.run_dirs[key]
        merged.skipped += extra.skipped
    return merged


def _compact(sweep) -> dict:
    out: dict[str, Any] = {}
    for key, seeds in sweep.items():
        out[key] = {
            str(seed): {
                col: [_sig(r.get(col)) for r in rows]
                for col in ("round", "accuracy", "train_loss", "uplink_bytes_cum", "sigma_g2")
            }
            for seed, rows in zip(sweep.seeds[key], seeds, strict=True)
        }
    return out


def _command(preset: str, dataset: str) -> str:
    extra = "" if dataset == "digits" else f" --dataset {dataset}"
    if dataset not in ("digits", "mnist1d"):  # the others are downloaded
        extra += " --data-dir DATA_DIR"
    return f"fl-compams reproduce {preset}{extra}"


def write_report(preset: str, *, runs_root: Path, out_root: Path, dataset: str = "digits") -> Path:
    """Write the report of one preset and return the path of its README.md."""
    meta = preset_meta(load_preset(preset), dataset)
    sweep = _load_sources(Path(runs_root) / dataset, meta.get("source", preset))
    loss_smooth = add_smoothed(sweep, "train_loss")
    total_bytes, uploads = add_cumulative_traffic(sweep)
    out = Path(out_root) / dataset / preset
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(
        sweep,
        target_accuracy=meta.get("target-accuracy"),
        target_train_loss=meta.get("target-train-loss"),
        budget_bytes=meta.get("budget-bytes"),
    )
    lines = [
        f"# {preset} ({dataset})",
        "",
        meta.get("description", ""),
        "",
        f"Regenerate: `{_command(preset, dataset)}` (runs that already exist are skipped; "
        f"`fl-compams report {preset}` redraws from the files).",
        "",
        f"Seeds per method: {_seed_counts(sweep)}; mean ± std over seeds.",
        "",
    ]
    plots: list[tuple[str, Path]] = []
    extra: dict[str, Any] = {}  # preset-specific measurements for summary.json

    def curve(heading: str, file: str, y: str, title: str, x: str = "round", **kwargs) -> None:
        plots.append((heading, plot_curves(sweep, x=x, y=y, out_path=out / file, title=title, **kwargs)))

    loss_title = f"train loss (mean of last {SMOOTH_WINDOW} rounds)"
    loss_style = {"ylabel": "training loss", "logy": True}
    if preset == "speedup":
        lines += _speedup(rows, meta, sweep)
        curve(
            "Training loss per round",
            "train_loss.png",
            loss_smooth,
            f"Top-k 0.01 + EF: {loss_title}",
            target=meta.get("target-train-loss"),
            **loss_style,
        )
    elif preset == "heterogeneity":
        lines += _heterogeneity(sweep, rows, out, plots, extra)
    elif preset == "tune":
        lines += _tune(rows)
        curve(
            "Validation accuracy per round",
            "val_accuracy_vs_round.png",
            "val_accuracy",
            f"{preset}: validation accuracy",
        )
    elif preset in ("seed-systems", "laq-uploads"):
        lines += _seed_systems(rows)
        curve("Test accuracy per round", "accuracy_vs_round.png", "accuracy", f"{preset}: test accuracy")
        curve(
            "Test accuracy against cumulative bytes, both directions",
            "accuracy_vs_total_bytes.png",
            "accuracy",
            f"{preset}: accuracy vs bytes sent up and down",
            x=total_bytes,
        )
        curve(
            "Test accuracy against cumulative uploads",
            "accuracy_vs_uploads.png",
            "accuracy",
            f"{preset}: accuracy vs uploads",
            x=uploads,
        )
    elif preset == "equal-budget":
        lines += _equal_bytes(rows, meta)
        for x, what in (("uplink_bytes_cum", "uplink"), (total_bytes, "uplink + downlink")):
            curve(
                f"Test accuracy against cumulative bytes, {what}",
                f"accuracy_vs_{'uplink' if x == 'uplink_bytes_cum' else 'total'}_bytes.png",
                "accuracy",
                f"accuracy vs bytes sent ({what}, all clients)",
                x=x,
                target=meta.get("target-accuracy"),
            )
    else:
        lines.append(to_markdown(rows, default_columns(rows)))
        if meta.get("pairs"):
            lines += _pairs(sweep, meta["pairs"])
        curve("Test accuracy per round", "accuracy_vs_round.png", "accuracy", f"{preset}: test accuracy")
        curve(
            "Training loss per round",
            "train_loss_vs_round.png",
            loss_smooth,
            f"{preset}: {loss_title}",
            **loss_style,
        )
        if preset != "ef-ablation":
            curve(
                "Test accuracy against cumulative uplink bytes",
                "accuracy_vs_uplink_bytes.png",
                "accuracy",
                f"{preset}: accuracy vs bytes sent",
                x="uplink_bytes_cum",
            )
    lines.append("")
    for title, path in plots:
        lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    if sweep.skipped:
        lines += ["Skipped (incomplete) runs:", ""] + [f"- `{d}`: {why}" for d, why in sweep.skipped] + [""]
    (out / "summary.json").write_text(
        json.dumps({"table": rows, "curves": _compact(sweep), **extra}, default=_sig) + "\n"
    )
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    return readme


def _last_window_mean(rows, column: str) -> float | None:
    """The last :func:`smoothed` value of ``column``: its mean over the last :data:`SMOOTH_WINDOW` rounds (one seed)."""
    series = smoothed(rows, column)
    return series[-1][1] if series else None


def paired_differences(sweep, first: str, second: str, column: str) -> list[float]:
    """Per seed run by both keys: ``first`` minus ``second``, each the mean of its last rounds' ``column``."""
    if first not in sweep or second not in sweep:
        return []
    ends = {
        key: {
            s: _last_window_mean(rows, column) for s, rows in zip(sweep.seeds[key], sweep[key], strict=True)
        }
        for key in (first, second)
    }
    return [a - b for s, a in ends[first].items() if a is not None and (b := ends[second].get(s)) is not None]


def _pairs(sweep, pairs: list[list[str]]) -> list[str]:
    """Table of paired-by-seed differences for ``pairs = [[a, b], ...]`` in ``[preset]`` (a minus b)."""
    table = []
    for first, second in pairs:
        acc = paired_differences(sweep, first, second, "accuracy")
        loss = paired_differences(sweep, first, second, "train_loss")
        acc_mean, acc_std = sample_mean_std(acc)
        loss_mean, loss_std = sample_mean_std(loss)
        table.append(
            {
                "pair": f"{first} − {second}",
                "acc_mean": acc_mean,
                "acc_std": acc_std,
                "acc_wins": f"{sum(d > 0 for d in acc)} of {len(acc)}",
                "loss_mean": loss_mean,
                "loss_std": loss_std,
                "loss_wins": f"{sum(d < 0 for d in loss)} of {len(loss)}",
            }
        )
    return [
        "",
        "### Paired by seed",
        "",
        f"Each difference is taken within one seed (same split, same initial model), each side the mean of its "
        f'last {SMOOTH_WINDOW} rounds; mean ± std over the seeds both ran. "wins": seeds where the first is '
        "better (higher accuracy, lower training loss).",
        "",
        to_markdown(
            table,
            [
                ("pair", "first − second", None),
                ("acc", "test accuracy (points)", mean_std(1, scale=100)),
                ("acc_wins", "wins (accuracy)", None),
                ("loss", "training loss", mean_std(3)),
                ("loss_wins", "wins (loss)", None),
            ],
        ),
    ]


def _seed_counts(sweep) -> str:
    """``3`` when every method has 3 seeds, ``2 to 3`` when they differ, ``—`` for none."""
    counts = sorted({len(s) for s in sweep.values()})
    if not counts:
        return "—"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"


def _seed_systems(rows: list[dict]) -> list[str]:
    """The seed systems side by side: bytes both ways, uploads, and what reaching the target cost."""
    t = rows[0].get("target_accuracy") if rows else None
    cols = [
        ("method", "method", None),
        ("n_seeds", "seeds", "d"),
        ("final_accuracy", "final acc. (%)", mean_std(1, scale=100)),
        ("uplink_bytes_per_client", "uplink B/client/round", ",.0f"),
        ("theory_bytes_per_client", "uplink theory B/client/round", ",.0f"),
        ("downlink_bytes_per_client", "downlink B/client/round", ",.0f"),
        ("total_bytes_per_client", "total B/client/round", ",.0f"),
    ]
    if t is not None:
        cols += [
            ("rounds_to_accuracy", f"rounds to {100 * t:g}%", reached("seeds_reached_accuracy", 1)),
            ("uploads_to_accuracy", f"uploads to {100 * t:g}%", reached("seeds_reached_accuracy", 0)),
            (
                "total_bytes_to_accuracy",
                f"bytes up + down to {100 * t:g}%",
                reached("seeds_reached_accuracy", as_bytes=True),
            ),
        ]
    return [
        "Bytes are measured (the serialised messages Flower sends), per contacted client per round; the uplink "
        "theory column is the payload's size by the bit formulas of algorithms.md section 8. An upload is a "
        "reply that carried a payload (LAQ's skips are replies too, of a few bytes, but not uploads).",
        "",
        to_markdown(rows, cols),
    ]


def _equal_bytes(rows: list[dict], meta: dict) -> list[str]:
    """Bytes (both directions) and wall time to the target accuracy, and accuracy at one byte budget."""
    t = meta.get("target-accuracy")
    budget = meta["budget-bytes"]
    cols = [
        ("method", "method", None),
        ("n_seeds", "seeds", "d"),
        ("uplink_bytes_per_client", "uplink B/client/round", ",.0f"),
        ("total_bytes_per_client", "up + down B/client/round", ",.0f"),
    ]
    if t is not None:
        reached_by = "seeds_reached_accuracy"
        cols += [
            ("bytes_to_accuracy", f"uplink to {100 * t:g}%", reached(reached_by, as_bytes=True)),
            ("total_bytes_to_accuracy", f"up + down to {100 * t:g}%", reached(reached_by, as_bytes=True)),
            ("rounds_to_accuracy", f"rounds to {100 * t:g}%", reached(reached_by, 1)),
            ("wall_s_to_accuracy", f"wall s to {100 * t:g}%", reached(reached_by, 1)),
        ]
    cols += [
        ("accuracy_at_budget", f"acc. (%) at {fmt_bytes(budget)} uplink", mean_std(1, scale=100)),
        ("final_accuracy", "final acc. (%)", mean_std(1, scale=100)),
    ]
    return [
        "Bytes are what was sent (serialised messages), summed over all clients, mean ± std over the seeds that "
        "reached the target (their count beside it); wall time is the run's own clock on the machine that ran "
        f"the sweep, beside the bytes, not a benchmark. The budget column stops each method at {fmt_bytes(budget)} "
        "of cumulative uplink; a budget favours whichever method's per-round size fits it, so the bytes-to-target "
        "columns are the comparison to read.",
        "",
        to_markdown(rows, cols),
    ]


def tuned_choice(rows: list[dict]) -> dict[str, dict]:
    """Per method label, the row (one learning rate) with the highest smoothed final validation accuracy.

    Ties go to the first row in the preset's order. Rows without a validation accuracy are never chosen.
    """
    best: dict[str, dict] = {}
    for r in rows:
        v = r.get("final_val_accuracy_smooth_mean")
        if v is not None and (
            r["label"] not in best or v > best[r["label"]]["final_val_accuracy_smooth_mean"]
        ):
            best[r["label"]] = r
    return best


def _tune(rows: list[dict]) -> list[str]:
    """The learning-rate grid on the validation split, and the value each method keeps."""
    chosen = {r["method"] for r in tuned_choice(rows).values()}
    table = [
        {**r, "lr": r.get("axis_value"), "chosen": "**chosen**" if r["method"] in chosen else ""}
        for r in rows
    ]
    return [
        "Learning rates are chosen on the **validation split** (held out of every client's data, never the test "
        f"set): the highest validation accuracy averaged over the last {SMOOTH_WINDOW} rounds. The tuning seed "
        "is not one of the seeds the studies report.",
        "",
        to_markdown(
            table,
            [
                ("label", "method", None),
                ("lr", "learning rate", None),
                ("final_val_accuracy_smooth", "final val. acc. (%)", mean_std(1, scale=100)),
                ("best_val_accuracy", "best val. acc. (%)", mean_std(1, scale=100)),
                ("chosen", "", None),
            ],
        ),
    ]


def _samples_per_round(sweep, key: str) -> float | None:
    """Training examples one round consumes: clients x local steps x batch size (from the run's config.json)."""
    dirs = sweep.run_dirs.get(key, [])
    try:
        info = json.loads((dirs[0] / "config.json").read_text())
        cfg = info["config"]
        return float(info["num_nodes"]) * float(cfg["local-steps"]) * float(cfg["batch-size"])
    except (IndexError, OSError, KeyError, TypeError, ValueError):
        return None


def _speedup(rows: list[dict], meta: dict, sweep=None) -> list[str]:
    paper = meta.get("paper-rounds", {})
    base = next(
        (r for r in rows if r.get("axis_value") and r["axis"] == "n" and r["axis_value"] == "1"), None
    )
    table = []
    for r in rows:
        label = f"n-{r['axis_value']}"
        rounds = r.get("rounds_to_train_loss_mean")
        speed = (
            base["rounds_to_train_loss_mean"] / rounds
            if base and rounds and base.get("rounds_to_train_loss_mean")
            else None
        )
        per_round = _samples_per_round(sweep, r["method"]) if sweep is not None else None
        samples = {}
        if per_round is not None:
            for stat in ("mean", "std"):
                v = r.get(f"rounds_to_train_loss_{stat}")
                samples[f"samples_to_train_loss_{stat}"] = None if v is None else v * per_round
        table.append({**r, **samples, "n": label, "speedup": speed, "paper": paper.get(label)})
    target = meta.get("target-train-loss")
    return [
        f"Rounds until the smoothed training loss reaches {target} (lr = 0.001 x sqrt(n), batch fixed), with the "
        "paper's MNIST iteration counts beside them. Samples to target = rounds x clients x local steps x batch "
        "size: a linear speedup keeps it constant.",
        "",
        to_markdown(
            table,
            [
                ("n", "clients", None),
                ("rounds_to_train_loss", "rounds to target", reached("seeds_reached_train_loss", 1)),
                ("speedup", "speedup vs n = 1", ".2f"),
                ("samples_to_train_loss", "samples to target", reached("seeds_reached_train_loss", 0)),
                ("paper", "paper (MNIST) iterations", None),
                ("final_accuracy", "final accuracy (%)", mean_std(1, scale=100)),
            ],
        ),
        *_speedup_at(sweep, meta.get("other-train-loss-targets", []), [r["method"] for r in rows]),
    ]


def _speedup_at(sweep, targets: list[float], keys: list[str]) -> list[str]:
    """Speedup vs the first key at further training-loss targets (the preset names them beside its target)."""
    if not targets or sweep is None:
        return []
    table = []
    for t in targets:
        rows = {r["method"]: r for r in summarize(sweep, target_train_loss=t)}
        base = rows[keys[0]].get("rounds_to_train_loss_mean")
        row: dict[str, Any] = {"target": f"{t:g}"}
        for k in keys:
            r, label = rows[k], k.rsplit("/", 1)[-1]
            m, n_hit, n = r.get("rounds_to_train_loss_mean"), r.get("seeds_reached_train_loss"), r["n_seeds"]
            row[label] = (
                "not reached" if m is None else f"{m:.0f}" + ("" if n_hit == n else f" ({n_hit}/{n})")
            )
            if m and base:
                row[label] += f" (x{base / m:.2f})"
        table.append(row)
    labels = [k.rsplit("/", 1)[-1] for k in keys]
    return [
        "",
        "Rounds to further training-loss targets (mean over seeds; speedup against the first setting in brackets):",
        "",
        to_markdown(table, [("target", "target loss", None)] + [(label, label, None) for label in labels]),
    ]


def _heterogeneity(sweep, rows: list[dict], out: Path, plots: list, extra: dict) -> list[str]:
    """Gap to full precision (paired by seed) against each split's sigma_g^2 at common reference models."""
    from simulations.report.split import REFERENCES, paired_gaps, reference_run, split_sigma_g2_at_references

    trained_from = reference_run(sweep)
    try:
        at_ref = split_sigma_g2_at_references(sweep, trained_from)
    except (OSError, KeyError, ValueError, TypeError) as e:  # runs without a usable config.json
        log.warning("sigma_g^2 at the reference models not measured: %s", e)
        at_ref = {}
    extra["split_sigma_g2"] = {
        "reference_checkpoint": str(trained_from) if trained_from else None,
        "values": {k: {str(s): v for s, v in seeds.items()} for k, seeds in at_ref.items()},
    }
    table, points = [], {}
    for r in rows:
        label = r["label"]
        setting = r["method"].split("/", 1)[1] if "/" in r["method"] else ""
        ref_key = f"full-precision/{setting}" if setting else "full-precision"
        gaps = paired_gaps(sweep, sweep.seeds, r["method"], ref_key) if label != "full-precision" else []
        gap, gap_std = sample_mean_std(gaps)
        per_seed = at_ref.get(setting, {})
        row = {**r, "setting": setting, "gap_mean": gap, "gap_std": gap_std, "gap_n": len(gaps)}
        for which in REFERENCES:
            row[f"sigma_g2_{which}_mean"], row[f"sigma_g2_{which}_std"] = sample_mean_std(
                [v[which] for v in per_seed.values() if which in v]
            )
        row["sigma_g2_probe"] = column_mean(sweep[r["method"]], "sigma_g2")
        table.append(row)
        x = (
            row["sigma_g2_trained_mean"]
            if row["sigma_g2_trained_mean"] is not None
            else row["sigma_g2_initial_mean"]
        )
        if label != "full-precision" and x is not None and gap is not None:
            xs, ys, errs = points.setdefault(label, ([], [], []))
            xs.append(x)
            ys.append(100 * gap)
            errs.append(None if gap_std is None else 100 * gap_std)
    extra["table"] = table  # summary.json keeps the rows with the split's sigma_g^2 and the paired gaps
    which = "trained checkpoint" if trained_from else "initial model"
    plots.append(
        (
            f"Accuracy gap to full precision against the split's sigma_g^2 (at the {which})",
            plot_xy(
                points,
                xlabel=f"sigma_g^2 of the split at the {which}",
                ylabel="gap to full precision (points, mean ± std over seeds)",
                out_path=out / "gap_vs_sigma_g2.png",
                logx=True,
            ),
        )
    )

    def sigma(row: dict, key: str) -> str:  # 3 significant digits: values span decades
        m, sd = row.get(f"{key}_mean"), row.get(f"{key}_std")
        return "—" if m is None else f"{m:.3g}" + ("" if sd is None else f" ± {sd:.2g}")

    return [
        "sigma_g^2 = (1/n) sum_i ||grad f_i - grad f||^2 of each **split**, measured at common reference models: "
        "the initial model of the split's seed, and one fixed trained checkpoint"
        + (f" (`{trained_from.relative_to(trained_from.parents[3])}`)" if trained_from else " (none found)")
        + ", mean ± std over seeds. The probe column is the older measurement, at each run's own current model "
        "during training (mean over probes and seeds), which mixes the split with training progress. Gap = "
        "full-precision final accuracy minus the method's on the same split and seed, mean ± std over the "
        "seeds both have.",
        "",
        to_markdown(
            table,
            [
                ("label", "method", None),
                ("setting", "split", None),
                ("sigma_g2_initial", "sigma_g^2 at init", sigma),
                ("sigma_g2_trained", "sigma_g^2 at trained ref.", sigma),
                ("sigma_g2_probe", "probe (in training)", ".3g"),
                ("final_accuracy", "final accuracy (%)", mean_std(1, scale=100)),
                ("gap", "gap (points)", mean_std(1, scale=100)),
                ("gap_n", "seeds", "d"),
            ],
        ),
    ]
