"""fasthist.plot: every figure is a matplotlib Figure, saves a PNG, and shows what the
histograms say; ``import fasthist`` never imports matplotlib."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fasthist

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402

from fasthist import plot  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(12, 3))
    opt = fasthist.Adam(model.named_parameters(), lr=1e-2)
    rec = fasthist.QuantileRecorder(opt, every=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        opt.zero_grad()
        model(torch.randint(0, 12, (8, 3), generator=g)).pow(2).mean().backward()  # rows 12..19 unused
        opt.step()
    rec.close()
    return opt, rec


def png(path) -> bool:
    return path.read_bytes()[:8] == PNG


def test_histograms(run, tmp_path):
    opt, _ = run
    rng = opt.eps_range()
    fig = plot.histograms(opt, eps=1e-8, eps_range=rng, path=str(tmp_path / "h.png"))
    assert isinstance(fig, Figure) and png(tmp_path / "h.png")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3 and all(ax.get_xscale() == "log" for ax in axes)
    assert "0.weight" in axes[0].get_title() and "40% zero" in axes[0].get_title()  # 8 of 20 rows unused
    # ε is drawn where it is
    assert any(np.allclose(line.get_xdata(), [1e-8, 1e-8]) for line in axes[0].get_lines())
    # also from a dict of histograms and a single one, and a subset by name
    assert len([a for a in plot.histograms(opt.histograms(), names=["2.bias"]).axes if a.get_visible()]) == 1
    assert isinstance(plot.histograms(opt.histogram(), eps=None), Figure)


def test_adaptability_curves_are_the_shares(run, tmp_path):
    opt, _ = run
    fig = plot.adaptability(opt, eps_range=opt.eps_range(), path=str(tmp_path / "a.png"))
    assert png(tmp_path / "a.png")
    ax = fig.axes[0]
    hists = opt.histograms()
    curves = {line.get_label().split(" ")[0]: line for line in ax.get_lines() if "(" in line.get_label()}
    assert set(curves) == set(hists)
    for name, line in curves.items():
        x, y = line.get_xdata(), line.get_ydata()
        assert np.all(np.diff(y) <= 0)  # non-increasing in ε
        for k in (0, len(x) // 3, len(x) // 2, len(x) - 1):  # exact at the bin edges
            assert y[k] == pytest.approx(hists[name].fraction_above(float(x[k]) * (1 - 1e-12)), abs=1e-12)


def test_quantiles(run, tmp_path):
    _, rec = run
    trace = rec.trace()
    fig = plot.quantiles(rec, eps=1e-8, path=str(tmp_path / "q.png"))
    assert png(tmp_path / "q.png")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == trace.names
    ax = axes[trace.names.index("2.weight")]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert np.array_equal(lines["2.weight"].get_xdata(), trace.steps)
    assert np.allclose(lines["2.weight"].get_ydata(), trace.values[:, trace.names.index("2.weight"), 1])
    assert ax.get_yscale() == "log"
    with pytest.raises(KeyError):
        plot.quantiles(trace, names=["nope"])


def test_sweep(tmp_path):
    result = {
        "task": "digits",
        "metric": "accuracy",
        "eps_range": {"low": 1e-6, "high": 1e-1},
        "best_eps": 1e-3,
        "best_inside": True,
        "runs": [
            {"eps": e, "metric": m, "metric_min": m - 1, "metric_max": m + 1, "adaptive_share": s}
            for e, m, s in [(1e-8, 95.0, 0.99), (1e-3, 97.5, 0.4), (1e-1, 90.0, 0.0)]
        ],
    }
    fig = plot.sweep(result, path=str(tmp_path / "s.png"))
    assert isinstance(fig, Figure) and png(tmp_path / "s.png")
    assert fig.get_suptitle() == "ε sweep on digits"  # no verdict given: no claim made
    with pytest.raises(ValueError):
        plot.sweep({**result, "runs": []})


def test_errors(run):
    opt, _ = run
    with pytest.raises(TypeError):
        plot.histograms(42)
    with pytest.raises(KeyError):
        plot.adaptability(opt, names=["missing"])
    with pytest.raises(ValueError):
        plot.histograms({})


def test_import_fasthist_needs_no_demo_dependency():
    # (tqdm is left out: torch itself imports it when it is installed)
    code = (
        "import sys, fasthist, fasthist.estimate, fasthist.recorder, fasthist.cli, fasthist.integrations.tensorboard\n"
        "bad = [m for m in ('matplotlib', 'sklearn', 'tensorboard') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- legends: every mark explained, never over the data ---------------------------------------
def legends_clear_of_data(fig) -> None:
    """Every legend of ``fig`` lies outside every visible data panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # the constrained layout places the legends
    renderer = canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    assert legends, "no legend"
    for leg in legends:
        box = leg.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.get_visible():
                assert not box.overlaps(ax.get_window_extent(renderer)), (ax.get_title(), box, ax.bbox)


def legend_texts(fig) -> list[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    return [t.get_text() for leg in legends for t in leg.get_texts()]


def many_tensors() -> dict[str, fasthist.Histogram]:
    """Twelve tensors with long names spread over ten decades (as charlm's, whose embedding
    curve and ε line the old legend covered)."""
    bins = fasthist.LogBins()
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(12):
        x = torch.exp(torch.randn(500, generator=g) * 2.0 - 2.0 * i)
        out[f"layer{i}.some_long_parameter_name.weight"] = fasthist.Histogram.from_values(x, bins)
    return out


def test_histograms_legend_explains_the_dotted_lines_and_covers_nothing(run):
    opt, _ = run
    fig = plot.histograms(opt, eps=1e-8, eps_range=opt.eps_range())
    texts = legend_texts(fig)
    assert any("2%" in t and "98%" in t for t in texts), texts
    assert any(t.startswith("ε =") for t in texts) and any(t.startswith("range") for t in texts)
    legends_clear_of_data(fig)


def test_adaptability_legend_covers_nothing():
    hists = many_tensors()
    fig = plot.adaptability(hists, eps=1e-8)
    assert len([t for t in legend_texts(fig) if "layer" in t]) == 12
    legends_clear_of_data(fig)


def test_sweep_legend_covers_nothing():
    result = {
        "task": "digits",
        "metric": "accuracy",
        "eps_range": {"low": 1e-6, "high": 1e-1},
        "best_eps": 1e-3,
        "best_inside": True,
        "runs": [
            {"eps": 10.0**e, "metric": 90 + e, "metric_min": 89 + e, "metric_max": 91 + e, "adaptive_share": 0.5}
            for e in range(-8, 0)
        ],
    }
    legends_clear_of_data(plot.sweep(result))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1e-8])
def test_eps_must_be_a_positive_finite_number(run, bad):
    opt, _ = run
    for fn in (plot.histograms, plot.adaptability):
        with pytest.raises(ValueError, match="eps"):
            fn(opt, eps=bad)
    with pytest.raises(ValueError, match="eps"):
        plot.quantiles(run[1], eps=bad)


def test_histograms_draw_numerically_dead_values_in_their_own_colour():
    # a bias right before BatchNorm: its gradient is rounding noise
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(5)]
    opt = fasthist.estimate.eps_pass(model, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), progress=False)
    rng = opt.eps_range()
    assert rng.dead == ["0.bias"]
    fig = plot.histograms(opt, eps_range=rng)
    panels = {ax.get_title().split(" ")[0]: ax for ax in fig.axes if ax.get_visible()}
    assert "100% dead" in panels["0.bias"].get_title() and "dead" not in panels["0.weight"].get_title()
    dead_patches = [p for p in panels["0.bias"].patches if p.get_label() == "numerically dead (rounding noise)"]
    assert dead_patches and not [p for p in panels["0.weight"].patches if "dead" in p.get_label()]
    assert any("numerically dead" in t for t in legend_texts(fig))


def test_sweep_figure_states_a_tie_as_the_printout_does():
    # a tie between 1e-08 (outside) and 1e-05 (inside) must not be drawn as "best ε inside"
    verdict = "best ε: a tie between 1e-08 1e-05 (accuracy 97.00%); inside the estimated range [1e-06, 1e-01]: 1e-05"
    result = {
        "task": "digits",
        "metric": "accuracy",
        "eps_range": {"low": 1e-6, "high": 1e-1},
        "best_eps": 1e-5,
        "best_inside": True,
        "best_tied": [1e-8, 1e-5],
        "verdict": verdict,
        "runs": [
            {"eps": e, "metric": m, "metric_min": m, "metric_max": m, "adaptive_share": 0.5}
            for e, m in [(1e-8, 97.0), (1e-7, 96.0), (1e-5, 97.0), (1e-3, 90.0)]
        ],
    }
    fig = plot.sweep(result)
    assert verdict in fig.get_suptitle() and "inside the range" not in fig.get_suptitle().replace(verdict, "")
    stars = [line for line in fig.axes[0].get_lines() if line.get_marker() == "*"]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == [1e-8, 1e-5]
    assert "tie" in stars[0].get_label()


def test_the_tensors_that_set_the_bounds_are_always_shown_and_the_rest_counted():
    """20 tensors, the low bound set by the last one and the high bound by the 18th: both are
    among the 16 drawn, say which bound they set, and the figures say 4 were left out."""
    bins = fasthist.LogBins()
    g = torch.Generator().manual_seed(0)
    scale = [1.0] * 20
    scale[19], scale[17] = 1e-9, 1e3
    hists = {
        f"t{i}": fasthist.Histogram.from_values(torch.rand(200, generator=g) * s + s, bins) for i, s in enumerate(scale)
    }
    names = list(hists)
    rng = fasthist.eps.eps_range_from_counts(names, torch.stack([h.counts for h in hists.values()]), bins)
    assert (rng.low_tensor, rng.high_tensor) == ("t19", "t17")
    fig = plot.histograms(hists, eps_range=rng)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert [t.split(" ")[0] for t in titles] == [*names[:14], "t17", "t19"]  # in the model's order
    assert titles[-1].endswith("sets the low bound") and titles[-2].endswith("sets the high bound")
    suptitle = " ".join(fig.get_suptitle().split())
    assert "16 of 20 tensors shown" in suptitle and "4 left out" in suptitle
    fig = plot.adaptability(hists, eps_range=rng)
    labels = [line.get_label() for line in fig.axes[0].get_lines() if "(" in line.get_label()]
    assert [lb.split(" ")[0] for lb in labels] == [*names[:14], "t17", "t19"]
    assert "sets the low bound" in labels[-1]
    assert "4 left out" in " ".join(fig.get_supxlabel().split())
    legends_clear_of_data(fig)
    # t19 left out of the range: the paper's rule, which the CLI prints beside it, still has it
    rng = fasthist.eps.eps_range_from_counts(
        names, torch.stack([h.counts for h in hists.values()]), bins, exclude="t19"
    )
    titles = [ax.get_title() for ax in plot.histograms(hists, eps_range=rng).axes if ax.get_visible()]
    assert titles[-1].startswith("t19") and titles[-1].endswith("sets the paper's low bound")
    assert titles[-2].endswith("sets the high bound")
    # nothing left out: nothing said
    assert "left out" not in plot.histograms(hists, eps_range=rng, max_tensors=20).get_suptitle()
    with pytest.raises(ValueError, match="Invalid max_tensors: True"):
        plot.histograms(hists, max_tensors=True)
