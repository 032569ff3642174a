"""Summary tables of a sweep: per-method statistics over seeds and GitHub-markdown rendering.

Pure functions of ``{key: [rows of each seed]}`` (see :func:`simulations.report.load.load_sweep`) built on
:mod:`simulations.report.stats`; no matplotlib. Means are over seeds and standard deviations are sample
standard deviations over seeds (``ddof=1``, ``None`` with fewer than 2 seeds). Any value that cannot be
computed is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from simulations.report.load import parse_key
from simulations.report.stats import (
    SMOOTH_WINDOW,
    TOTAL_BYTES_COLUMN,
    UPLOADS_COLUMN,
    at_budget,
    downlink_bytes_per_client,
    finite,
    first_reached,
    sample_mean_std,
    smoothed,
    sorted_by_round,
    theory_bytes_per_client,
    uplink_bytes_per_client,
)

__all__ = [
    "REFERENCE_LABEL",
    "Column",
    "Formatter",
    "default_columns",
    "fmt_bytes",
    "fmt_mean_std",
    "mean_std",
    "reached",
    "summarize",
    "to_markdown",
]

#: Label of the uncompressed baseline that compression ratios are relative to.
REFERENCE_LABEL = "full-precision"

Rows = Sequence[Mapping[str, Any]]


def _reference_key(key: str, keys: Sequence[str], reference: str | None) -> str | None:
    if reference is None:
        return None
    _, sep, sub = key.partition("/")
    if sep and f"{reference}/{sub}" in keys:
        return f"{reference}/{sub}"
    return reference if reference in keys else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def summarize(
    sweep: Mapping[str, Sequence[Rows]],
    *,
    target_accuracy: float | None = None,
    target_train_loss: float | None = None,
    budget_bytes: float | None = None,
    reference: str | None = REFERENCE_LABEL,
) -> list[dict[str, Any]]:
    """One summary row per key of the sweep, in the sweep's order.

    Parameters
    ----------
    sweep : mapping
        ``{key: [metrics rows of each seed]}``; round 0 is the initial model.
    target_accuracy : float, optional
        Test accuracy (a fraction, like the ``accuracy`` column) to reach.
    target_train_loss : float, optional
        Training loss to reach. A round reaches it when the **smoothed** training loss — the mean over a
        trailing window of the last ``SMOOTH_WINDOW`` (5) rounds with a training loss (fewer at the start, see
        :func:`simulations.report.stats.smoothed`)
        — is ``<= target_train_loss``. The raw per-round loss is the mean minibatch loss of that round's
        clients and too noisy to threshold.
    budget_bytes : float, optional
        Cumulative uplink budget in bytes.
    reference : str or None, default "full-precision"
        Label of the dense baseline for compression ratios. For a key ``"<label>/<axis>-<value>"`` the
        reference is ``"<reference>/<axis>-<value>"`` when present, else ``"<reference>"``.

    Returns
    -------
    list of dict
        Keys of each row (``*_mean``/``*_std`` are over seeds, ``std`` is ``None`` below 2 seeds):

        - ``method`` (the sweep key), ``label``, ``axis``, ``axis_value`` (see
          :func:`simulations.report.load.parse_key`), ``n_seeds``, ``rounds`` (last round, smallest over seeds);
        - ``final_accuracy_*`` (last round), ``best_accuracy_*`` (max over rounds >= 1);
        - ``final_val_accuracy_smooth_*`` (validation accuracy, mean of the last ``SMOOTH_WINDOW`` rounds: what
          learning rates are tuned on) and ``best_val_accuracy_*`` (of those smoothed values); ``None`` without
          a validation split;
        - ``final_wall_s_*`` (the run's wall time at its last round, seconds);
        - ``final_train_loss_*`` (last round, raw) and ``final_train_loss_smooth_*`` (smoothed as above);
        - ``uplink_bytes_per_client`` — measured uplink bytes per client per round, the mean of
          ``uplink_bytes_per_client`` over all rounds >= 1 of all seeds;
        - ``uplink_bytes_total_*`` — ``uplink_bytes_cum`` of the last round;
        - ``downlink_bytes_per_client`` (see :func:`simulations.report.stats.downlink_bytes_per_client`) and
          ``total_bytes_per_client`` (uplink + downlink per client per round);
        - ``theory_bytes_per_client`` — ``uplink_theory_bits / 8 / clients_ok`` averaged the same way
          (rounds with no successful client are left out);
        - ``reference`` (key of the baseline or ``None``), ``compression_ratio`` (baseline's
          ``uplink_bytes_per_client`` / this method's) and ``compression_ratio_theory`` (same with
          ``theory_bytes_per_client``);
        - ``target_accuracy``, ``seeds_reached_accuracy``, ``rounds_to_accuracy_*`` (first round, possibly
          0, with ``accuracy >= target``), ``bytes_to_accuracy_*`` (its ``uplink_bytes_cum``) and
          ``wall_s_to_accuracy_*`` (its ``wall_s``, seconds since the run started), means and
          stds over the seeds that reached the target (``None`` if none did); when the rows carry the columns
          of :func:`simulations.report.stats.add_cumulative_traffic`, also ``total_bytes_to_accuracy_*``
          (uplink + downlink) and ``uploads_to_accuracy_*`` (replies that carried a payload);
        - ``target_train_loss``, ``seeds_reached_train_loss``, ``rounds_to_train_loss_*``,
          ``bytes_to_train_loss_*`` (same, with the smoothed training loss);
        - ``budget_bytes``, ``accuracy_at_budget_*`` and ``round_at_budget_mean`` (the last round whose
          ``uplink_bytes_cum <= budget_bytes``; round 0 spends nothing, so it is always defined), and
          ``seeds_spent_budget`` (seeds whose final ``uplink_bytes_cum >= budget_bytes``; for the others the
          value is just their final accuracy).

        All target and budget fields are ``None`` when the corresponding argument is ``None``.
    """
    keys = list(sweep)
    per_client = {k: uplink_bytes_per_client(sweep[k]) for k in keys}
    theory = {k: theory_bytes_per_client(sweep[k]) for k in keys}
    out = []
    for key in keys:
        seeds = [sorted_by_round(rows) for rows in sweep[key] if rows]
        label, axis, value = parse_key(key)
        row: dict[str, Any] = {
            "method": key,
            "label": label,
            "axis": axis,
            "axis_value": value,
            "n_seeds": len(seeds),
            "rounds": min((rows[-1]["round"] for rows in seeds), default=None),
        }

        def put(name: str, values: Sequence[float | None], row: dict[str, Any] = row) -> None:
            row[f"{name}_mean"], row[f"{name}_std"] = sample_mean_std(values)

        def last(column: str, seeds: list = seeds) -> list[float | None]:
            return [finite(rows[-1].get(column)) for rows in seeds]

        put("final_accuracy", last("accuracy"))
        put(
            "best_accuracy",
            [
                max(
                    (v for r in rows if r["round"] > 0 and (v := finite(r.get("accuracy"))) is not None),
                    default=None,
                )
                for rows in seeds
            ],
        )
        val = [smoothed(rows, "val_accuracy") for rows in seeds]  # empty without a validation split
        put("final_val_accuracy_smooth", [v[-1][1] if v else None for v in val])
        put("best_val_accuracy", [max((a for _, a in v), default=None) for v in val])
        put("final_train_loss", last("train_loss"))
        put("final_wall_s", last("wall_s"))
        smooth = [smoothed(rows) for rows in seeds]
        put("final_train_loss_smooth", [s[-1][1] if s else None for s in smooth])
        row["uplink_bytes_per_client"] = per_client[key]
        put("uplink_bytes_total", last("uplink_bytes_cum"))
        down = downlink_bytes_per_client(sweep[key])
        row["downlink_bytes_per_client"] = down
        row["total_bytes_per_client"] = (
            None if down is None or per_client[key] is None else per_client[key] + down
        )
        row["theory_bytes_per_client"] = theory[key]
        ref = _reference_key(key, keys, reference)
        row["reference"] = ref
        row["compression_ratio"] = _ratio(per_client.get(ref), per_client[key]) if ref else None
        row["compression_ratio_theory"] = _ratio(theory.get(ref), theory[key]) if ref else None

        has_totals = any(TOTAL_BYTES_COLUMN in rows[-1] for rows in seeds)

        def to_target(
            name: str,
            target: float | None,
            hit_rows: list,
            row: dict[str, Any] = row,
            totals: bool = has_totals,
        ) -> None:
            # hit_rows: per seed, the first row at the target or None; means over the seeds that reached it
            row[f"target_{name}"] = target
            hits = [h for h in hit_rows if h is not None]
            row[f"seeds_reached_{name}"] = len(hits) if target is not None else None
            put(f"rounds_to_{name}", [float(h["round"]) for h in hits])
            put(f"bytes_to_{name}", [finite(h.get("uplink_bytes_cum")) for h in hits])
            put(f"wall_s_to_{name}", [finite(h.get("wall_s")) for h in hits])
            if totals:
                put(f"total_bytes_to_{name}", [finite(h.get(TOTAL_BYTES_COLUMN)) for h in hits])
                put(f"uploads_to_{name}", [finite(h.get(UPLOADS_COLUMN)) for h in hits])

        # Target accuracy.
        acc_hits = []
        if target_accuracy is not None:
            acc_hits = [
                first_reached(((r, finite(r.get("accuracy"))) for r in rows), target_accuracy)
                for rows in seeds
            ]
        to_target("accuracy", target_accuracy, acc_hits)

        # Target training loss (smoothed).
        loss_hits = []
        if target_train_loss is not None:
            for rows, s in zip(seeds, smooth, strict=True):
                rnd = first_reached(s, target_train_loss, below=True)
                loss_hits.append(None if rnd is None else next(r for r in rows if r["round"] == rnd))
        to_target("train_loss", target_train_loss, loss_hits)

        # Accuracy at a byte budget.
        row["budget_bytes"] = budget_bytes
        accs: list[float | None] = []
        rnds: list[float | None] = []
        spent = 0
        if budget_bytes is not None:
            for rows in seeds:
                within = at_budget(rows, budget_bytes)
                if within is not None:
                    accs.append(finite(within.get("accuracy")))
                    rnds.append(float(within["round"]))
                final = finite(rows[-1].get("uplink_bytes_cum"))
                spent += int(final is not None and final >= budget_bytes)
        put("accuracy_at_budget", accs)
        row["round_at_budget_mean"] = sample_mean_std(rnds)[0]
        row["seeds_spent_budget"] = spent if budget_bytes is not None else None
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------- formatting


def fmt_mean_std(
    mean: float | None, std: float | None, digits: int = 1, *, scale: float = 1.0, none: str = "—"
) -> str:
    """``"98.1 ± 0.3"``; just the mean when ``std`` is ``None``; ``none`` when ``mean`` is ``None``.

    Parameters
    ----------
    mean, std : float or None
        Values to format.
    digits : int, default 1
        Decimal places of both numbers.
    scale : float, default 1.0
        Multiply both first (``100`` turns accuracy fractions into percent).
    none : str, default "—"
        Text for a missing mean.

    Returns
    -------
    str
        The formatted text.
    """
    if mean is None:
        return none
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def fmt_bytes(n: float | None, *, none: str = "—") -> str:
    """Decimal SI bytes with 3 significant digits: ``"512 B"``, ``"19.5 kB"``, ``"11.7 MB"``."""
    if n is None:
        return none
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n:.3g} B"


Formatter = Callable[[Mapping[str, Any], str], str]


def mean_std(digits: int = 1, *, scale: float = 1.0, as_bytes: bool = False, none: str = "—") -> Formatter:
    """Column formatter showing ``row[key + "_mean"] ± row[key + "_std"]``.

    Parameters
    ----------
    digits : int, default 1
        Decimal places (ignored with ``as_bytes``).
    scale : float, default 1.0
        Multiply first.
    as_bytes : bool, default False
        Format both numbers with :func:`fmt_bytes`.
    none : str, default "—"
        Text when the mean is missing.

    Returns
    -------
    callable
        ``f(row, key) -> str`` for :func:`to_markdown`.
    """

    def fmt(row: Mapping[str, Any], key: str) -> str:
        mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
        if as_bytes:
            if mean is None:
                return none
            return fmt_bytes(mean) if std is None else f"{fmt_bytes(mean)} ± {fmt_bytes(std)}"
        return fmt_mean_std(mean, std, digits, scale=scale, none=none)

    return fmt


def reached(count_key: str, digits: int = 1, *, scale: float = 1.0, as_bytes: bool = False) -> Formatter:
    """Formatter for a to-target column: ``"12.0 ± 1.0 (2/3)"``, or ``"not reached (0/3)"``.

    Parameters
    ----------
    count_key : str
        Row key of the number of seeds that reached the target (``"seeds_reached_accuracy"``, ...).
    digits, scale, as_bytes
        As for :func:`mean_std`.

    Returns
    -------
    callable
        ``f(row, key) -> str`` for :func:`to_markdown`; ``"—"`` when no target was set.
    """
    inner = mean_std(digits, scale=scale, as_bytes=as_bytes)

    def fmt(row: Mapping[str, Any], key: str) -> str:
        count, n = row.get(count_key), row.get("n_seeds")
        if count is None:
            return "—"
        if count == 0:
            return f"not reached (0/{n})"
        text = inner(row, key)
        return text if count == n else f"{text} ({count}/{n})"

    return fmt


Column = tuple[str, str, "str | Formatter | None"]


def _cell(row: Mapping[str, Any], key: str, fmt: str | Formatter | None) -> str:
    if callable(fmt):
        text = fmt(row, key)
    else:
        value = row.get(key)
        if value is None:
            text = "—"
        elif fmt:
            text = format(value, fmt)
        else:
            text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Render rows as a GitHub-flavoured markdown table.

    Parameters
    ----------
    rows : sequence of mapping
        E.g. the output of :func:`summarize`.
    columns : sequence of (key, header, fmt)
        ``fmt`` is ``None`` (``str(value)``), a format spec applied to ``row[key]`` (``".3f"``, ``",.0f"``)
        or a callable ``fmt(row, key) -> str`` such as :func:`mean_std` / :func:`reached`. A missing
        value (``None`` or absent key) renders as ``"—"`` for ``None`` and spec formats.

    Returns
    -------
    str
        Header, alignment line (first column left-aligned, the others right-aligned) and one line per row,
        ending with a newline. ``|`` inside cells is escaped.
    """
    if not columns:
        raise ValueError("to_markdown needs at least one column")
    headers = [h.replace("|", "\\|") for _, h, _ in columns]
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("| " + " | ".join(":---" if i == 0 else "---:" for i in range(len(columns))) + " |")
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def default_columns(rows: Sequence[Mapping[str, Any]]) -> list[Column]:
    """The standard summary columns; target, budget and ratio columns only when they have values.

    Accuracies are shown in percent; the target and budget values come from the rows themselves.

    Parameters
    ----------
    rows : sequence of mapping
        Output of :func:`summarize`.

    Returns
    -------
    list of (key, header, fmt)
        Columns for :func:`to_markdown`.
    """
    cols: list[Column] = [
        ("method", "method", None),
        ("n_seeds", "seeds", "d"),
        ("final_accuracy", "final acc. (%)", mean_std(1, scale=100)),
        ("best_accuracy", "best acc. (%)", mean_std(1, scale=100)),
        ("final_train_loss_smooth", f"train loss (last {SMOOTH_WINDOW})", mean_std(3)),
        ("uplink_bytes_per_client", "uplink B/client/round", ",.0f"),
        ("theory_bytes_per_client", "theory B/client/round", ",.0f"),
        ("uplink_bytes_total", "uplink total", mean_std(as_bytes=True)),
    ]
    first = rows[0] if rows else {}
    if any(r.get("compression_ratio") is not None for r in rows):
        cols.append(("compression_ratio", f"ratio vs {REFERENCE_LABEL}", ".1f"))
    if first.get("target_accuracy") is not None:
        t = 100 * first["target_accuracy"]
        cols.append(("rounds_to_accuracy", f"rounds to {t:g}%", reached("seeds_reached_accuracy", 1)))
        cols.append(
            ("bytes_to_accuracy", f"uplink to {t:g}%", reached("seeds_reached_accuracy", as_bytes=True))
        )
    if first.get("target_train_loss") is not None:
        t = first["target_train_loss"]
        cols.append(
            ("rounds_to_train_loss", f"rounds to train loss {t:g}", reached("seeds_reached_train_loss", 1))
        )
    if first.get("budget_bytes") is not None:
        cols.append(
            ("accuracy_at_budget", f"acc. (%) at {fmt_bytes(first['budget_bytes'])}", mean_std(1, scale=100))
        )
    return cols
