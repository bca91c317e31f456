"""The figure builders of :mod:`featstudy.analysis.plots`, read back from the real matplotlib Figures they return.

Covered: ``mode_interval`` (hand-computed samples), ``split_low_high``, Figure 1 (histogram densities), Figure 5
(modes and 68% intervals of D+ / D- per layer and dataset) and Figure 6 (percent of a group's pairs per D bin).
Every expectation is derived by hand in a comment or computed here by an independent implementation (explicit
bin counting, a hand-written linear-interpolation quantile) on D values from ``oracle.signed_d`` (scipy).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from oracle import d_random, signed_d

from featstudy.analysis import plots

VGG19_LAYERS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv3_4", "conv4_1",
                "conv4_2", "conv4_3", "conv4_4", "conv5_1", "conv5_2", "conv5_3", "conv5_4", "fc7"]


# -- independent references -----------------------------------------------------------------------------------
def bin_index(value: float, lo: float, hi: float, bins: int) -> int:
    """Equal-width bin of ``value`` over [lo, hi], the right edge in the last bin (exact for dyadic values)."""
    return min(int(math.floor((value - lo) / (hi - lo) * bins)), bins - 1)


def quantile_linear(values, q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (position (n - 1) q)."""
    s = sorted(values)
    h = (len(s) - 1) * q
    i = int(math.floor(h))
    return s[i] if i + 1 >= len(s) else s[i] + (h - i) * (s[i + 1] - s[i])


def ref_mode_interval(values, lo: float, hi: float, bins: int = 50, mass: float = 0.34):
    """Mode = centre of the first fullest of ``bins`` bins; interval = quantiles at F(mode) -/+ mass, clipped."""
    values = list(values)
    if not values:
        return (math.nan, math.nan, math.nan)
    counts = [0] * bins
    for v in values:
        counts[bin_index(v, lo, hi, bins)] += 1
    best = counts.index(max(counts))
    mode = lo + (best + 0.5) * (hi - lo) / bins
    at_mode = sum(v <= mode for v in values) / len(values)
    return (mode, quantile_linear(values, max(at_mode - mass, 0.0)), quantile_linear(values, min(at_mode + mass, 1.0)))


def layer_of(feature_names) -> np.ndarray:
    return np.array([name.split(":")[0] for name in feature_names])


def errorbar_points(container):
    """(x, centre, bottom, top) arrays of one ErrorbarContainer."""
    data_line, _caps, (bars,) = container.lines
    segments = bars.get_segments()
    return (np.asarray(data_line.get_xdata(), float), np.asarray(data_line.get_ydata(), float),
            np.array([seg[0][1] for seg in segments]), np.array([seg[1][1] for seg in segments]))


@pytest.fixture()
def tiny_d(tiny):
    """Real D (F, C) of the tiny embedding (scipy oracle) and its layer of each feature."""
    return signed_d(tiny.features, tiny.labels, 3)[0], layer_of(tiny.feature_names)


# -- mode_interval ----------------------------------------------------------------------------------------------
def test_mode_interval_hand_computed_samples():
    # [.125, .25, .25, .5, .75, 1] on [0, 1], bins of 0.02: .25 twice in bin 12 -> mode = its centre 0.25;
    # F(0.25) = 3/6 = .5 -> quantiles at .16 and .84: positions 5*.16 = .8 -> .125 + .8*.125 = .225 and
    # 5*.84 = 4.2 -> .75 + .2*.25 = .8
    assert plots.mode_interval(np.array([0.125, 0.25, 0.25, 0.5, 0.75, 1.0]), 0.0, 1.0) == pytest.approx(
        (0.25, 0.225, 0.8))
    # tie between bin 25 (0.5, 0.5) and bin 49 (1.0 on the right edge, 1.0): the first wins -> mode .51;
    # F(.51) = .5 -> positions 3*.16 = .48 (-> .5) and 3*.84 = 2.52 (-> 1.0)
    assert plots.mode_interval(np.array([0.5, 1.0, 0.5, 1.0]), 0.0, 1.0) == pytest.approx((0.51, 0.5, 1.0))
    # D- side over [-1, 0]: -1 twice in bin 0 -> mode -0.99; F = 2/3 -> quantiles 2/3 - .34 (position .6533 -> -1)
    # and 1 (clipped -> the maximum -0.5)
    assert plots.mode_interval(np.array([-1.0, -0.5, -1.0]), -1.0, 0.0) == pytest.approx((-0.99, -1.0, -0.5))
    # mass is a parameter: F = .5 -/+ .5 -> the whole range [.125, 1]
    assert plots.mode_interval(np.array([0.125, 0.25, 0.25, 0.5, 0.75, 1.0]), 0.0, 1.0, mass=0.5) == pytest.approx(
        (0.25, 0.125, 1.0))
    # bins is a parameter: 4 bins of .25 -> .25 and .375 both in bin 1, whose centre is .375 (50 bins: .25)
    assert plots.mode_interval(np.array([0.25, 0.25, 0.375]), 0.0, 1.0, bins=4)[0] == pytest.approx(0.375)


def test_mode_interval_empty_sample_is_nan():
    assert all(math.isnan(v) for v in plots.mode_interval(np.array([]), 0.0, 1.0))


# -- split_low_high ---------------------------------------------------------------------------------------------
def test_split_low_high_paper_groups_and_fallback():
    low, high = plots.split_low_high(VGG19_LAYERS)
    assert low == VGG19_LAYERS[:15] and low[-1] == "conv5_3"
    assert high == ["conv5_4", "fc7"]
    assert plots.split_low_high(["conv1_1", "conv5_4", "fc7"]) == (["conv1_1"], ["conv5_4", "fc7"])
    # no paper names: the last two layers are "high"
    assert plots.split_low_high(["layer1", "layer2", "layer3", "fc"]) == (["layer1", "layer2"], ["layer3", "fc"])


# -- Figure 1 ---------------------------------------------------------------------------------------------------
def hist_by_label(ax, prefix: str):
    """(x of each bar, width, height) of the histogram whose legend label starts with ``prefix``."""
    (container,) = [c for c in ax.containers if c.patches[0].get_label().startswith(prefix)]
    return (np.array([p.get_x() for p in container.patches]), np.array([p.get_width() for p in container.patches]),
            np.array([p.get_height() for p in container.patches]), container.patches[0].get_label())


def test_fig1_histograms_densities_by_hand():
    fig = plots.fig1_histograms(np.array([0.0, 0.0, 1.0]), np.array([1.0, 2.0]), "my title")
    ax = fig.axes[0]
    # range [0, 2] over 50 bins of 0.04; intra: 2 values in bin 0 and 1 in bin 25 -> 2/(3*.04), 1/(3*.04);
    # inter: 1.0 in bin 25 and 2.0 (right edge) in bin 49 -> 1/(2*.04) = 12.5 each
    x, width, intra, label = hist_by_label(ax, "intra")
    assert label == "intra-class (n=3)"
    assert x == pytest.approx(np.arange(50) * 0.04) and width == pytest.approx(np.full(50, 0.04))
    expected = np.zeros(50)
    expected[0], expected[25] = 2 / 0.12, 1 / 0.12
    assert intra == pytest.approx(expected)
    _, _, inter, label = hist_by_label(ax, "inter")
    assert label == "inter-class (n=2)"
    expected = np.zeros(50)
    expected[25] = expected[49] = 12.5
    assert inter == pytest.approx(expected)
    assert ax.get_title() == "my title"
    assert ax.get_xlabel() == "feature activation" and ax.get_ylabel() == "density"


def test_fig1_histograms_constant_feature():
    # min = max = 7: the range becomes [7, 8], bins of 0.02; all mass in bin 0 -> density 1/0.02 = 50
    fig = plots.fig1_histograms(np.full(4, 7.0), np.full(8, 7.0), "t")
    for prefix in ("intra", "inter"):
        x, _, heights, _ = hist_by_label(fig.axes[0], prefix)
        assert x[0] == pytest.approx(7.0) and heights[0] == pytest.approx(50.0) and heights[1:].sum() == 0


# -- Figure 5 ---------------------------------------------------------------------------------------------------
def expected_fig5(d: np.ndarray, layers_of: np.ndarray, layers, sign: int):
    """Reference (mode, low, high) per layer from the D values of that sign only."""
    out = []
    for layer in layers:
        vals = [float(v) for v in d[layers_of == layer].ravel() if (v > 0 if sign > 0 else v < 0)]
        out.append(ref_mode_interval(vals, 0.0, 1.0) if sign > 0 else ref_mode_interval(vals, -1.0, 0.0))
    return np.array(out)


def check_errorbars(container, x_expected, ref):
    x, centre, bottom, top = errorbar_points(container)
    assert x == pytest.approx(x_expected)
    assert centre == pytest.approx(ref[:, 0])
    # the bar spans the 68% interval, extended to the mode when the mode (a bin centre) lies outside it
    assert bottom == pytest.approx(np.minimum(ref[:, 1], ref[:, 0]))
    assert top == pytest.approx(np.maximum(ref[:, 2], ref[:, 0]))


def test_fig5_modes_two_datasets(tiny, tiny_d):
    d, layers_of = tiny_d
    d_other = d_random(tiny.features, tiny.labels, 3, 1, 1)[0]  # a second "dataset": randomized D, seed 1
    fig = plots.fig5_modes({"tiny": (d, layers_of), "other": (d_other, layers_of)}, tiny.layers)
    ax = fig.axes[0]
    containers = ax.containers
    assert len(containers) == 4  # per dataset: D+ then D-
    x = np.arange(3.0)
    for k, (name, dd) in enumerate((("tiny", d), ("other", d_other))):
        offset = (-0.2, 0.2)[k]  # two datasets share 0.8 of a slot: width 0.4, centred on the tick
        check_errorbars(containers[2 * k], x + offset, expected_fig5(dd, layers_of, tiny.layers, +1))
        check_errorbars(containers[2 * k + 1], x + offset, expected_fig5(dd, layers_of, tiny.layers, -1))
    colours = [to_rgba(c.lines[0].get_color()) for c in containers]
    assert colours[0] == colours[1] and colours[2] == colours[3] and colours[0] != colours[2]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["tiny", "other"]
    assert [t.get_text() for t in ax.get_xticklabels()] == tiny.layers
    assert ax.get_xticks() == pytest.approx(x)
    assert ax.get_ylabel() == "D (mode, 68% interval)"


def test_fig5_ignores_zeros_and_other_sign():
    # one layer, D = [0, 0, 0, 0.5, -0.25, -0.25, 1]: D+ = {.5, 1} (tie of bins 25 and 49 -> mode .51),
    # D- = {-.25, -.25} -> bin 37 (0.75*50 = 37.5), mode -1 + 37.5/50 = -0.25, F = 1 -> interval [-.25, -.25]
    d = np.array([[0.0], [0.0], [0.0], [0.5], [-0.25], [-0.25], [1.0]])
    fig = plots.fig5_modes({"one": (d, np.array(["L"] * 7))}, ["L"])
    plus, minus = fig.axes[0].containers
    # D+: F(.51) = 1/2 -> quantiles .16, .84 of [.5, 1]: .58 and .92; the bar runs from the mode .51 (below .58)
    assert np.concatenate(errorbar_points(plus)) == pytest.approx([0.0, 0.51, 0.51, 0.92])  # x 0: no offset
    assert np.concatenate(errorbar_points(minus)) == pytest.approx([0.0, -0.25, -0.25, -0.25])


# -- Figure 6 ---------------------------------------------------------------------------------------------------
def expected_percent(values, bins: int = 100) -> np.ndarray:
    counts = np.zeros(bins)
    for v in values:
        counts[bin_index(float(v), -1.0, 1.0, bins)] += 1
    return 100.0 * counts / len(values)


def test_fig6_percent_per_group(tiny, tiny_d):
    d, layers_of = tiny_d
    d_other = d_random(tiny.features, tiny.labels, 3, 2, 0)[1]
    fig = plots.fig6_distributions({"tiny": (d, layers_of), "other": (d_other, layers_of)}, tiny.layers,
                                   title="supertitle")
    low_ax, high_ax = fig.axes
    centres = -1 + 0.01 + 0.02 * np.arange(100)  # 100 bins of 0.02 over [-1, 1]
    for ax, group in ((low_ax, ["conv1_1"]), (high_ax, ["conv5_4", "fc7"])):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["tiny", "other"]
        for line, dd in zip(lines, (d, d_other)):
            values = dd[np.isin(layers_of, group)].ravel()
            assert values.size == 3 * sum(layers_of[f] in group for f in range(8))
            assert line.get_xdata() == pytest.approx(centres)
            assert line.get_ydata() == pytest.approx(expected_percent(values))
            assert float(np.sum(line.get_ydata())) == pytest.approx(100.0)
        assert ax.get_xlabel() == "D"
    assert low_ax.get_ylabel().startswith("% of")
    (legend,) = fig.legends  # one legend for both panels, outside them
    assert [t.get_text() for t in legend.get_texts()] == ["tiny", "other"]
    # by hand, conv1_1 of tiny: D = -1, -1 (bin 0), 0, 0, 0 (bin 50), .5, .5 (bin 75), 1, 1 (bin 99) of 9 pairs
    tiny_low = low_ax.get_lines()[0].get_ydata()
    assert tiny_low[[0, 50, 75, 99]] == pytest.approx([200 / 9, 300 / 9, 200 / 9, 200 / 9])
    assert high_ax.get_title() == "conv5_4+fc7" and low_ax.get_title().startswith("conv1_1")
    assert fig._suptitle.get_text() == "supertitle"
    # per-dataset colours: one colour per dataset, the same in both groups
    colours = [[to_rgba(line.get_color()) for line in ax.get_lines()] for ax in (low_ax, high_ax)]
    assert colours[0] == colours[1] and colours[0][0] != colours[0][1]


def test_fig6_paper_layers_and_explicit_colours():
    # 17 layers, one feature each, one class: D of layer i is -1 + (2i + 1)/34 (distinct, at least 1/17 of a bin
    # from any edge except -0.5, exactly on one); low = the first 15, high = conv5_4 and fc7
    d = (-1 + (2 * np.arange(17) + 1) / 34.0)[:, None]
    fig = plots.fig6_distributions({"ds": (d, np.array(VGG19_LAYERS))}, VGG19_LAYERS, colors={"ds": "tab:red"})
    low_ax, high_ax = fig.axes
    assert low_ax.get_title() == "conv1_1-conv5_3" and high_ax.get_title() == "conv5_4+fc7"
    assert low_ax.get_lines()[0].get_ydata() == pytest.approx(expected_percent(d[:15, 0]))
    assert high_ax.get_lines()[0].get_ydata() == pytest.approx(expected_percent(d[15:, 0]))
    assert to_rgba(low_ax.get_lines()[0].get_color()) == to_rgba("tab:red")


def test_fig6_only_high_layers_gives_one_panel():
    # layers conv5_4 and fc7 only: the low group is empty and gets no panel
    d = np.array([[0.5], [-0.5]])
    fig = plots.fig6_distributions({"ds": (d, np.array(["conv5_4", "fc7"]))}, ["conv5_4", "fc7"])
    (ax,) = fig.axes
    assert ax.get_title() == "conv5_4+fc7"
    assert ax.get_lines()[0].get_ydata()[[25, 75]] == pytest.approx([50.0, 50.0])  # -.5 -> bin 25, .5 -> bin 75


# -- what a reader reads besides the data: axis ranges, the zero line, default colours, empty groups -------------
def test_fig5_axes_span_all_of_d_and_draw_the_zero_line(tiny, tiny_d):
    d, layers_of = tiny_d
    ax = plots.fig5_modes({"tiny": (d, layers_of)}, tiny.layers).axes[0]
    lo, hi = ax.get_ylim()  # all of D, and a little more: a value at exactly +-1 is not drawn on the frame
    assert -1.1 <= lo < -1.0 and 1.0 < hi <= 1.1
    zero = [line for line in ax.get_lines() if list(line.get_ydata()) == [0, 0]]
    assert len(zero) == 1 and list(zero[0].get_xdata()) == [0, 1]  # axhline(0): y = 0 across the axes
    assert ax.get_title() == "D+ and D- per layer"


def test_fig6_default_colours_xlim_and_a_dataset_without_the_group(tiny, tiny_d):
    """Default colours are the module's dataset palette in order (green, orange: never blue, which fig8 keeps
    for ImageNet); a dataset with no feature in a group draws no line there (no NaN curve)."""
    d, layers_of = tiny_d
    low_only = (d[:3], layers_of[:3])  # conv1_1 only, and first: the datasets after it are still drawn
    fig = plots.fig6_distributions({"low": low_only, "tiny": (d, layers_of)}, tiny.layers)
    low_ax, high_ax = fig.axes
    assert [to_rgba(line.get_color()) for line in low_ax.get_lines()] == [to_rgba("tab:green"), to_rgba("tab:orange")]
    assert [line.get_label() for line in high_ax.get_lines()] == ["tiny"]
    assert to_rgba(high_ax.get_lines()[0].get_color()) == to_rgba("tab:orange")  # its colour in both panels
    assert fig._suptitle is None  # no title given, none drawn
    assert low_ax.get_xlim() == high_ax.get_xlim()
    lo, hi = low_ax.get_xlim()  # D at exactly +-1 inside the axes, not on the frame
    assert -1.1 <= lo < -1.0 and 1.0 < hi <= 1.1
    assert len(fig.axes) == 2 and low_ax.get_subplotspec().get_geometry()[:2] == (1, 2)


def test_split_low_high_by_name_not_by_position():
    # the paper's high layers are found by name wherever they are; without them the last two are high
    assert plots.split_low_high(["fc7", "conv1_1", "conv5_4", "conv2_1"]) == (["conv1_1", "conv2_1"],
                                                                               ["fc7", "conv5_4"])
    assert plots.split_low_high(["a", "b", "c"]) == (["a"], ["b", "c"])
