"""The figures callback (:class:`featstudy.analysis.figures.FiguresCallback`) on the hand-built tiny embedding.

Each figure is read back from the real matplotlib Figure the callback drew (``CallbackResult.objects["figures"]``)
and compared with hand derivations (the D table of ``conftest``) or with ``oracle`` (scipy D, brute-force
permutations, counts and Eq. 4 thresholds): fig1's pair, histograms and title; fig5's modes; fig6's percentages;
fig9's real / randomized count curves and t+; fig10's kept percentages; ``which``, ``formats``, ``dpi`` and the
config errors. Figures 2 and 3 (network rebuild, images) are left to their own tests.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from oracle import d_avg, d_random, permuted, signed_d, thresholds

from featstudy.analysis.figures import FiguresCallback
from featstudy.errors import ConfigError

FAST = ["fig1", "fig5", "fig6", "fig9", "fig10"]
RANDOM_SETTINGS = [(1, 1), (2, 0), (2, 1)]  # (permutations, seed); t+ != -t- in each (0.25/0.625, .75/.625, ...)


def draw(tiny, which, *, permutations=1, seed=0, layers=None, **options):
    """Run the callback on a fresh tiny context; return (result, {name: Figure})."""
    ctx = tiny.context(permutations=permutations, seed=seed, layers=layers)
    result = FiguresCallback(which=which, **options).run(ctx)
    return result, result.objects["figures"]


def oracle_d(tiny, permutations, seed):
    """Real D (F, C), randomized D (K, F, C) and the Eq. 4 thresholds, all from the oracle."""
    real = signed_d(tiny.features, tiny.labels, 3)[0]
    rand = d_random(tiny.features, tiny.labels, 3, permutations, seed)
    return real, rand, thresholds(real, rand)


def layer_of(tiny) -> np.ndarray:
    return np.array([name.split(":")[0] for name in tiny.feature_names])


# -- Figure 1 ---------------------------------------------------------------------------------------------------
def hist(ax, prefix):
    """(bar left edges, heights, label) of the histogram whose legend label starts with ``prefix``."""
    (container,) = [c for c in ax.containers if c.patches[0].get_label().startswith(prefix)]
    return (np.array([p.get_x() for p in container.patches]), np.array([p.get_height() for p in container.patches]),
            container.patches[0].get_label())


def check_fig1(fig, intra, inter, title):
    """Bars = numpy densities of the raw values on 50 equal bins over [min, max] of both samples."""
    ax = fig.axes[0]
    both = np.concatenate([intra, inter])
    edges = np.linspace(both.min(), both.max(), 51)
    for prefix, values in (("intra", intra), ("inter", inter)):
        left, heights, label = hist(ax, prefix)
        assert label == f"{prefix}-class (n={len(values)})"
        assert left == pytest.approx(edges[:-1])
        assert heights == pytest.approx(np.histogram(values, bins=edges, density=True)[0])
    assert ax.get_title() == title


def test_fig1_default_pair_is_largest_abs_d(tiny):
    # |D| = 1 first reached, in row-major (feature, class) order, at (conv1_1:0, a) with D = -1
    # (argmax of D itself would give (conv1_1:0, c), D = +1)
    _, figs = draw(tiny, ["fig1"])
    column = tiny.features[:, 0].astype(float)
    check_fig1(figs["fig1"], column[:4], column[4:], "tiny: feature conv1_1:0, class a (D = -1.000)")
    assert list(column[:4]) == [0, 1, 2, 3]


def test_fig1_default_pair_positive_on_layer_subset(tiny):
    # layers conv5_4 + fc7 (features 3..7): first |D| = 1 at (conv5_4:0, b), D = +1 (argmin of D: (fc7:0, b))
    _, figs = draw(tiny, ["fig1"], layers=["conv5_4", "fc7"])
    column = tiny.features[:, 3].astype(float)
    intra, inter = column[4:8], np.concatenate([column[:4], column[8:]])
    assert list(intra) == [5, 6, 7, 8] and list(inter) == [0, 0, 0, 0, 0, 1, 0, 1]
    check_fig1(figs["fig1"], intra, inter, "tiny: feature conv5_4:0, class b (D = +1.000)")


def test_fig1_chosen_pair(tiny):
    # conv5_4:1, class c: D = +0.375 (conftest table); class c's values 5 3 5 8, the others 3 1 4 1 5 9 2 6
    _, figs = draw(tiny, ["fig1"], fig1_feature="conv5_4:1", fig1_class="c")
    check_fig1(figs["fig1"], np.array([5.0, 3, 5, 8]), np.array([3.0, 1, 4, 1, 5, 9, 2, 6]),
               "tiny: feature conv5_4:1, class c (D = +0.375)")


def test_fig1_constant_feature(tiny):
    # fc7:2 is 7 everywhere: range [7, 8], bins of 0.02, all mass in bin 0 -> density 50 on both sides
    _, figs = draw(tiny, ["fig1"], fig1_feature="fc7:2", fig1_class="b")
    ax = figs["fig1"].axes[0]
    for prefix in ("intra", "inter"):
        left, heights, _ = hist(ax, prefix)
        assert left[0] == pytest.approx(7.0) and heights[0] == pytest.approx(50.0) and heights[1:].sum() == 0
    assert ax.get_title() == "tiny: feature fc7:2, class b (D = +0.000)"


@pytest.mark.parametrize(("options", "key"), [
    ({"fig1_feature": "conv9_9:0", "fig1_class": "a"}, "analysis.callbacks.figures.fig1_feature"),
    ({"fig1_feature": "conv1_1:0", "fig1_class": "zebra"}, "analysis.callbacks.figures.fig1_class"),
])
def test_fig1_bad_names(tiny, options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        draw(tiny, ["fig1"], **options)


# -- Figures 5 and 6 through the callback -------------------------------------------------------------------------
def test_fig5_modes_by_hand(tiny):
    # per layer (conftest D table), mode = centre of the first fullest of 50 bins, interval = quantiles at
    # F(mode) -/+ .34 (linear interpolation), bar = interval extended to the mode:
    #   conv1_1 D+ {.5,.5,1,1}: mode .51, F .5 -> [.5, 1]      D- {-1,-1}: mode -.99, F 1 -> [-1, -1] -> bar [-1, -.99]
    #   conv5_4 D+ {1,.375,.375}: mode .37, F 0 -> [.375,.375] -> bar [.37, .375]
    #           D- {-.75,-.5,-.75}: mode -.75, F 2/3 -> [-.75, -.5]
    #   fc7     D+ {1,.5,.25}: mode .25, F 1/3 -> [.25, .5 + .3467*.5]   D- {-1,-.125,-.125}: mode -.13 -> [-1, -.125]
    _, figs = draw(tiny, ["fig5"])
    ax = figs["fig5"].axes[0]
    plus, minus = ax.containers
    expected = {plus: ([0.51, 0.37, 0.25], [0.5, 0.37, 0.25], [1.0, 0.375, 0.5 + 0.5 * (2 * (1 / 3 + 0.34) - 1)]),
                minus: ([-0.99, -0.75, -0.13], [-1.0, -0.75, -1.0], [-0.99, -0.5, -0.125])}
    for container, (centre, bottom, top) in expected.items():
        line, _, (bars,) = container.lines
        assert line.get_xdata() == pytest.approx([0, 1, 2])
        assert line.get_ydata() == pytest.approx(centre)
        assert [seg[0][1] for seg in bars.get_segments()] == pytest.approx(bottom)
        assert [seg[1][1] for seg in bars.get_segments()] == pytest.approx(top)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["tiny"]
    assert [t.get_text() for t in ax.get_xticklabels()] == tiny.layers


def test_fig6_by_hand(tiny):
    # conv1_1 (9 pairs): -1 x2 (bin 0), 0 x3 (bin 50), .5 x2 (bin 75), 1 x2 (bin 99);
    # conv5_4 + fc7 (15 pairs): -1 (0), -.75 x2 (12), -.5 (25), -.125 x2 (43), 0 x3 (50), .25 (62), .375 x2 (68),
    # .5 (75), 1 x2 (99)
    _, figs = draw(tiny, ["fig6"])
    low_ax, high_ax = figs["fig6"].axes
    low = np.zeros(100)
    low[[0, 50, 75, 99]] = [2, 3, 2, 2]
    high = np.zeros(100)
    high[[0, 12, 25, 43, 50, 62, 68, 75, 99]] = [1, 2, 1, 2, 3, 1, 2, 1, 2]
    for ax, counts, n in ((low_ax, low, 9), (high_ax, high, 15)):
        (line,) = ax.get_lines()
        assert line.get_xdata() == pytest.approx(np.linspace(-0.99, 0.99, 100))
        assert line.get_ydata() == pytest.approx(100 * counts / n)
    assert high_ax.get_title() == "conv5_4+fc7" and low_ax.get_title().startswith("conv1_1")
    assert figs["fig6"]._suptitle.get_text() == "tiny"


# -- Figure 9 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("permutations", "seed"), RANDOM_SETTINGS)
def test_fig9_counts_match_oracle(tiny, permutations, seed):
    real, rand, th = oracle_d(tiny, permutations, seed)
    grid, _, _, real_plus, rand_plus, _, _ = d_avg(real, rand)
    assert sorted(map(tuple, real_plus)) != sorted(map(tuple, rand_plus))  # real and randomized curves differ
    _, figs = draw(tiny, ["fig9"], permutations=permutations, seed=seed)
    ax = figs["fig9"].axes[0]
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) == grid.size]
    black = [line for line in curves if to_rgba(line.get_color()) == to_rgba("black")]
    red = [line for line in curves if to_rgba(line.get_color()) == to_rgba("red")]
    assert len(black) == 3 and len(red) == 3 * permutations and len(curves) == len(black) + len(red)
    for line in curves:
        assert line.get_xdata() == pytest.approx(grid)

    def rows(lines):
        return sorted(tuple(int(v) for v in line.get_ydata()) for line in lines)

    assert rows(black) == sorted(tuple(r) for r in real_plus)
    assert rows(red) == sorted(tuple(r) for r in rand_plus)
    (dashed,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert dashed.get_xdata() == pytest.approx([th["t_plus"]] * 2)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "classes", "randomized labels", f"t+ = {th['t_plus']:.3f}"]
    assert ax.get_ylabel() == "# features with D > x"


def test_fig9_by_hand_step_eighth(tiny):
    # seed 1, one permutation, step 0.125 (grid 0, 1/8, ..., 1). #{f: D > x} per class, from the conftest table
    # for the real classes and from the oracle's randomized D (permuted labels 2 2 1 1 1 0 0 2 0 2 1 0):
    #   real a: D+ {1, 1, .25}          -> 3 3 2 2 2 2 2 2 0
    #   real b: D+ {.5, .5, 1, .375}    -> 4 4 4 3 1 1 1 1 0
    #   real c: D+ {1, .375, .5}        -> 3 3 3 2 1 1 1 1 0
    #   random a: {.625, .375, .5}      -> 3 3 3 2 1 0 0 0 0
    #   random b, c: {.5, .25, .25}     -> 3 3 1 1 0 0 0 0 0
    # d_avg+ = (real sum - random sum) / 3 = (1 1 4 3 3 4 4 4 0) / 3: first maximum at x = .25 = t+
    perm = permuted(tiny.labels, 1, 1)[0]
    assert list(perm) == [2, 2, 1, 1, 1, 0, 0, 2, 0, 2, 1, 0]
    _, figs = draw(tiny, ["fig9"], permutations=1, seed=1, step=0.125)
    ax = figs["fig9"].axes[0]

    def curves(colour):
        lines = [line for line in ax.get_lines() if to_rgba(line.get_color()) == to_rgba(colour)]
        assert all(line.get_xdata() == pytest.approx(np.arange(9) / 8) for line in lines if len(line.get_xdata()))
        return sorted(tuple(int(v) for v in line.get_ydata()) for line in lines if len(line.get_xdata()))

    assert curves("black") == sorted([(3, 3, 2, 2, 2, 2, 2, 2, 0), (4, 4, 4, 3, 1, 1, 1, 1, 0),
                                      (3, 3, 3, 2, 1, 1, 1, 1, 0)])
    assert curves("red") == sorted([(3, 3, 3, 2, 1, 0, 0, 0, 0), (3, 3, 1, 1, 0, 0, 0, 0, 0),
                                    (3, 3, 1, 1, 0, 0, 0, 0, 0)])
    (dashed,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert dashed.get_xdata() == pytest.approx([0.25, 0.25])
    assert ax.get_legend().get_texts()[2].get_text() == "t+ = 0.250"


# -- Figure 10 --------------------------------------------------------------------------------------------------
def kept_percent(d_stack: np.ndarray, layers_of: np.ndarray, layers, t_plus: float, t_minus: float) -> list[float]:
    """100 x share of the layer's (permutation, feature, class) pairs with D > t+ or D < t-, counted in a loop."""
    out = []
    for layer in layers:
        kept = total = 0
        for d in d_stack:
            for f in np.flatnonzero(layers_of == layer):
                for value in d[f]:
                    total += 1
                    kept += bool(value > t_plus or value < t_minus)
        out.append(100.0 * kept / total)
    return out


@pytest.mark.parametrize(("permutations", "seed"), [(1, 0)] + RANDOM_SETTINGS)
def test_fig10_kept_percent_match_oracle(tiny, permutations, seed):
    real, rand, th = oracle_d(tiny, permutations, seed)
    layers_of = layer_of(tiny)
    expected_real = kept_percent(real[None], layers_of, tiny.layers, th["t_plus"], th["t_minus"])
    expected_rand = kept_percent(rand, layers_of, tiny.layers, th["t_plus"], th["t_minus"])
    assert expected_real != expected_rand
    _, figs = draw(tiny, ["fig10"], permutations=permutations, seed=seed)
    ax = figs["fig10"].axes[0]
    real_bars, rand_bars = ax.containers
    for bars, expected, colour, offset in ((real_bars, expected_real, "tab:blue", -0.2),
                                           (rand_bars, expected_rand, "tab:green", 0.2)):
        assert [p.get_height() for p in bars.patches] == pytest.approx(expected)
        assert [p.get_x() + p.get_width() / 2 for p in bars.patches] == pytest.approx(np.arange(3) + offset)
        assert all(to_rgba(p.get_facecolor()) == to_rgba(colour) for p in bars.patches)
    assert [t.get_text() for t in ax.get_xticklabels()] == tiny.layers
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["real labels", "randomized labels"]
    assert ax.get_ylabel().startswith("% of pairs")


def test_fig10_by_hand_seed0(tiny):
    # one permutation, seed 0: t+ = .375, t- = -.375 (oracle); real D (conftest table):
    #   conv1_1 |D| > .375: -1 .5 1 1 .5 -1 -> 6 of 9;  conv5_4: -.75 1 -.5 -.75 (not .375, .375) -> 4 of 6;
    #   fc7: 1 -1 .5 -> 3 of 9
    _, figs = draw(tiny, ["fig10"], permutations=1, seed=0)
    real_bars, _ = figs["fig10"].axes[0].containers
    assert [p.get_height() for p in real_bars.patches] == pytest.approx([600 / 9, 400 / 6, 300 / 9])


# -- which, formats, dpi, config errors -------------------------------------------------------------------------
def test_which_and_formats_write_exactly_those_files(tiny):
    result, figs = draw(tiny, ["fig5", "fig9"], formats=["png", "svg"])
    folder = tiny.out / "figures"
    expected = [folder / name for name in ("fig5.png", "fig5.svg", "fig9.png", "fig9.svg")]
    assert list(result.files) == expected
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in expected)
    assert set(figs) == {"fig5", "fig9"}
    for path in expected:
        head = path.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else b"<svg" in head


def test_default_formats_png_pdf_and_all_fast_figures(tiny):
    result, figs = draw(tiny, FAST)
    assert set(figs) == set(FAST)
    assert [p.name for p in result.files] == [f"{n}.{fmt}" for n in FAST for fmt in ("png", "pdf")]
    pdf = tiny.out / "figures" / "fig6.pdf"
    assert pdf.read_bytes()[:4] == b"%PDF"


def png_width(path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def test_dpi_scales_the_png(tiny):
    draw(tiny, ["fig9"], formats=["png"], dpi=40)
    small = png_width(tiny.out / "figures" / "fig9.png")
    draw(tiny, ["fig9"], formats=["png"], dpi=80)
    large = png_width(tiny.out / "figures" / "fig9.png")
    assert large == pytest.approx(2 * small, rel=0.05)


@pytest.mark.parametrize(("options", "key"), [
    ({"formats": ["jpg"]}, "formats"),
    ({"formats": ["png", "gif"]}, "formats"),
    ({"formats": []}, "formats"),
    ({"which": ["fig4"]}, "which"),
    ({"which": ["fig1", "fig11"]}, "which"),
])
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ConfigError, match=rf"analysis\.callbacks\.figures\.{key}"):
        FiguresCallback(**options)


# -- what a reader reads besides the data ---------------------------------------------------------------------------
def test_fig9_fig10_fig1_legends_axes_and_widths_a_reader_relies_on(tiny):
    """Legend swatches have the curves' colours (black classes, red randomized), the t+ line is blue and dashed;
    fig9's x spans [0, 1] with counts from 0; fig10's y spans 0-100 %, its two bars of 0.4 do not overlap;
    fig1's inter-class bars are blue, intra-class orange, as its legend says."""
    _, figs = draw(tiny, ["fig1", "fig9", "fig10"], permutations=2, seed=0)
    ax9 = figs["fig9"].axes[0]
    handles = ax9.get_legend().legend_handles
    assert [to_rgba(h.get_color()) for h in handles] == [to_rgba("black"), to_rgba("red"), to_rgba("tab:blue")]
    assert handles[2].get_linestyle() == "--"
    assert ax9.get_xlim() == (0.0, 1.0) and ax9.get_ylim()[0] == 0.0 and ax9.get_xlabel() == "x"
    assert ax9.get_title() == "tiny: D+ per class"
    ax10 = figs["fig10"].axes[0]
    assert ax10.get_title() == "tiny: pairs kept by t+ / t-"
    assert ax10.get_ylim() == (0.0, 100.0)
    assert ax10.get_ylabel() == "% of pairs kept"  # percent, not a fraction; which pairs: the title
    assert all(p.get_width() == pytest.approx(0.4) for bars in ax10.containers for p in bars.patches)
    ax1 = figs["fig1"].axes[0]
    inter, intra = ax1.containers
    assert all(to_rgba(p.get_facecolor())[:3] == to_rgba("tab:blue")[:3] for p in inter.patches)
    assert all(to_rgba(p.get_facecolor())[:3] == to_rgba("tab:orange")[:3] for p in intra.patches)
    assert [t.get_text().split(" (")[0] for t in ax1.get_legend().get_texts()] == ["inter-class", "intra-class"]


def test_default_which_is_every_figure_and_fig1_needs_both_names(tiny):
    assert FiguresCallback().which == ["fig1", "fig2", "fig3", "fig5", "fig6", "fig9", "fig10"]
    # only one of the pair given: an error naming the missing one, never the default pair in silence
    with pytest.raises(ConfigError, match=r"analysis\.callbacks\.figures\.fig1_class=None"):
        draw(tiny, ["fig1"], fig1_feature="conv1_1:0")


def test_fig2_fig3_files_add_to_the_others_and_unreadable_images_are_grey_cells(tiny):
    """The tiny embedding's images cannot be opened (no dataset root): fig2/fig3 still draw their rows, every image
    cell light grey (225), gaps white; their files come after fig1's, none lost."""
    result, figs = draw(tiny, ["fig1", "fig2", "fig3"], formats=["png"], top_k=2, n_images=2, n_class_images=1)
    assert [p.name for p in result.files] == ["fig1.png", "fig2.png", "fig3.png"]
    strip = np.asarray(figs["fig3"].axes[0].images[0].get_array())
    size = 32  # no image: the default cell size
    cells = [strip[:, j * (size + 4): j * (size + 4) + size] for j in range(4)]  # 2 activating, gap, 1 class sample
    assert all((cells[j] == 225).all() for j in (0, 1, 3)) and (cells[2] == 255).all()


def test_top_features_tiles_grey_for_missing_and_grey_level_images_in_three_channels():
    from featstudy.analysis import plots

    grey_level = np.full((8, 8), 77, np.uint8)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200
    fig = plots.fig_top_features([{"label": "f", "images": [grey_level, None, rgb]}], "t")
    strip = np.asarray(fig.axes[0].images[0].get_array())
    assert strip.shape == (8, 3 * 12, 3)
    assert (strip[:, 0:8] == 77).all() and (strip[:, 12:20] == 225).all() and (strip[:, 24:32] == rgb).all()
    assert (strip[:, 8:12] == 255).all()  # the gap between cells stays white
