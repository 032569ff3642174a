"""simulations.report.plots: small PNGs, distinct colour-blind-safe styles."""

import numpy as np
import pytest
from report_rows import make_rows

from simulations.report.plots import plot_curves, plot_xy, style

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_small_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) < 200_000


def test_plot_curves_writes_small_png(tmp_path):
    rng = np.random.default_rng(0)
    sw = {}
    for m in range(8):  # > 6 methods: legend outside the axes
        seeds = []
        for _ in range(2):
            acc = np.clip(np.linspace(0.1, 0.9, 41) + rng.normal(0, 0.02, 41), 0, 1).tolist()
            seeds.append(make_rows(acc, [100 * (m + 1) + int(rng.integers(0, 5)) for _ in range(40)]))
        sw[f"method-{m}"] = seeds
    sw["single"] = [make_rows([0.1, 0.5, 0.7], 10)]
    out = plot_curves(sw, x="round", y="accuracy", out_path=tmp_path / "sub" / "acc.png", title="t")
    assert out == tmp_path / "sub" / "acc.png"
    _assert_small_png(out)
    out = plot_curves(
        sw, x="uplink_bytes_cum", y="train_loss", out_path=tmp_path / "b.png", methods=["single"]
    )
    _assert_small_png(out)
    with pytest.raises(KeyError):
        plot_curves(sw, x="round", y="accuracy", out_path=tmp_path / "c.png", methods=["nope"])
    assert not (tmp_path / "c.png").exists()


def test_plot_xy_writes_png(tmp_path):
    pts = {
        "topk": ([0.5, 0.1, 1.0], [0.02, 0.01, 0.05]),
        "sign": ([0.1, None, 1.0], [0.03, 0.1, 0.08], [0.01, 0.0, None]),
    }
    out = plot_xy(pts, xlabel=r"$\sigma_g^2$", ylabel="gap", out_path=tmp_path / "xy.png", logx=True)
    _assert_small_png(out)
    with pytest.raises(ValueError):
        plot_xy({"x": ([1, 2], [1])}, xlabel="x", ylabel="y", out_path=tmp_path / "bad.png")


def test_styles_are_distinct():
    first = [style(i) for i in range(7)]
    for key in ("color", "marker", "linestyle"):
        assert len({repr(s[key]) for s in first}) == 7
    combos = {(s["color"], s["marker"], repr(s["linestyle"])) for s in (style(i) for i in range(56))}
    assert len(combos) == 56
    # colour and marker alone already tell 64 series apart (9+ methods no longer share both with another)
    assert len({(s["color"], s["marker"]) for s in (style(i) for i in range(64))}) == 64


def test_large_png_is_reencoded_with_a_palette(tmp_path, monkeypatch):
    import simulations.report.plots as plots

    sw = {"m": [make_rows([0.1, 0.5, 0.7], 10), make_rows([0.2, 0.4, 0.8], 10)]}
    rgba = plot_curves(sw, x="round", y="accuracy", out_path=tmp_path / "rgba.png")
    monkeypatch.setattr(plots, "_PALETTE_ABOVE", 0)
    pal = plot_curves(sw, x="round", y="accuracy", out_path=tmp_path / "pal.png")
    _assert_small_png(pal)
    assert rgba.read_bytes()[25] != 3 and pal.read_bytes()[25] == 3  # PNG colour type 3 = palette
    assert len(pal.read_bytes()) < len(rgba.read_bytes())


def test_accuracy_axis_zooms_on_where_the_lines_end(tmp_path, monkeypatch):
    import simulations.report.plots as plots

    limits = []
    finish = plots._finish
    monkeypatch.setattr(
        plots, "_finish", lambda fig, ax, *a: (limits.append(ax.get_ylim()), finish(fig, ax, *a))[1]
    )
    acc = lambda top: [0.1] + [top - 0.5 / r for r in range(1, 41)]  # noqa: E731
    sw = {"a": [make_rows(acc(0.97), 10)], "b": [make_rows(acc(0.99), 10)]}
    plot_curves(sw, x="round", y="accuracy", out_path=tmp_path / "a.png")
    low, high = limits[-1]
    # second halves (rounds 20-40): a from 0.97 - 0.5/20 = 0.945, b up to 0.99 - 0.5/40 ~ 0.978
    assert low == pytest.approx(0.97 - 0.5 / 20 - 0.02) and high == pytest.approx(0.99 - 0.5 / 40 + 0.01)
    plot_curves(sw, x="round", y="accuracy", out_path=tmp_path / "b.png", zoom_accuracy=False)
    assert limits[-1][0] < 0.1  # unzoomed: the whole curve


def test_a_target_is_drawn_and_kept_in_view(tmp_path, monkeypatch):
    import simulations.report.plots as plots

    seen = []
    finish = plots._finish
    monkeypatch.setattr(plots, "_finish", lambda fig, ax, *a: (seen.append(ax), finish(fig, ax, *a))[1])
    sw = {"a": [make_rows([0.1] + [0.97] * 20, 10)]}
    plot_curves(sw, x="round", y="accuracy", out_path=tmp_path / "a.png", target=0.9)
    ax = seen[-1]
    assert any(list(line.get_ydata()) == [0.9, 0.9] for line in ax.get_lines())
    assert ax.get_ylim()[0] <= 0.9 - 0.02
