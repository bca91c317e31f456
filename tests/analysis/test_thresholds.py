"""The thresholds callback (paper Eq. 4, Table 4, §5.5, Fig. 10) on the hand-built embedding of conftest.py.

Every expected number is derived by hand below, or by the brute-force loops of oracle.py (never featstudy's code).

Hand derivation for ``permutations=1, seed=0``. Real D per class (conftest's table), columns = the 8 features:

    a: -1,  1,  0, -0.75, -0.75,  1,  0.25,  0
    b: .5, .5,  0,  1,     .375, -1, -0.125, 0
    c:  1, -1,  0, -0.5,   .375, .5, -0.125, 0

Randomized D (labels = default_rng(0).permutation(labels) = 2 0 1 1 1 2 0 0 1 2 2 0, D by scipy in oracle.py):

    r_a: .375, -.375, 0,  .5,  .375, -.25, -.125, 0
    r_b: -.5,   .5,   0, -.375, -.375, .25,  .25,  0
    r_c: .375, -.375, 0, -.25,  .375, .125, -.125, 0

#{f: D > x}, summed over the 3 classes: real 10 on [0, .25), 9 on [.25, .375), 7 on [.375, .5), 4 on [.5, 1), 0 at 1;
random 9 on [0, .125), 8 on [.125, .25), 6 on [.25, .375), 2 on [.375, .5), 0 from .5. d_avg+ = (real - random)/3
= 1/3, 2/3, 1, 5/3, 4/3: the maximum 5/3 first reached at x = 0.375, so t+ = 0.375, d_avg(t+) = 5/3.
#{f: D < -x}: real 8 on [0, .125), 6 on [.125, .5), 5 on [.5, .75), 3 on [.75, 1); random 9, 7, 5 (on [.25, .375)),
1 (on [.375, .5)), 0; d_avg- = -1/3, -1/3, 1/3, 5/3, 5/3, 1: first maximum at 0.375, so t- = -0.375, d_avg = 5/3.

Irrelevant at (t+, t-) = (.375, -.375), strict inequalities: conv1_1:2, fc7:1, fc7:2 (3; conv1_1 1, conv5_4 0,
fc7 2). t+ only: also conv5_4:1 (its largest D is .375, not > .375): 4. t- only: the same 3 as both.
Kept pairs (D > .375 or D < -.375): conv1_1 6 of 9, conv5_4 4 of 6, fc7 3 of 9, all 13 of 24; randomized:
conv1_1 2 of 9 (the two +-.5), conv5_4 1 of 6, fc7 0 of 9, all 3 of 24.
"""

from __future__ import annotations

import csv
import json
from fractions import Fraction

import numpy as np
import pytest

import oracle
from featstudy.analysis.thresholds import ThresholdsCallback
from featstudy.errors import ConfigError


def read_csv(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_metrics_equal_the_hand_derivation(tiny):
    result = ThresholdsCallback().run(tiny.context())
    m = result.metrics
    assert m["t_plus"] == 0.375 and m["t_minus"] == -0.375
    th = result.objects["thresholds"]
    assert (th.t_plus, th.t_minus) == (0.375, -0.375) and th.real_counts_plus.shape == (3, 1001)
    assert result.objects["kept"] == pytest.approx({"conv1_1": 2 / 3, "conv5_4": 2 / 3, "fc7": 1 / 3})
    assert result.objects["kept_random"] == pytest.approx({"conv1_1": 2 / 9, "conv5_4": 1 / 6, "fc7": 0.0})
    assert m["d_avg_t_plus"] == pytest.approx(5 / 3, abs=1e-12)
    assert m["d_avg_t_minus"] == pytest.approx(5 / 3, abs=1e-12)
    assert m["n_irrelevant_features"] == 3
    assert (m["n_irrelevant_features.conv1_1"], m["n_irrelevant_features.conv5_4"],
            m["n_irrelevant_features.fc7"]) == (1, 0, 2)
    assert m["n_irrelevant_features_t_plus_only"] == 4
    assert m["n_irrelevant_features_t_minus_only"] == 3
    assert m["kept_fraction"] == pytest.approx(13 / 24, abs=1e-12)
    assert m["kept_fraction_random"] == pytest.approx(3 / 24, abs=1e-12)
    for layer, real, rand in (("conv1_1", 6 / 9, 2 / 9), ("conv5_4", 4 / 6, 1 / 6), ("fc7", 3 / 9, 0.0)):
        assert m[f"kept_fraction.{layer}"] == pytest.approx(real, abs=1e-12), layer
        assert m[f"kept_fraction_random.{layer}"] == pytest.approx(rand, abs=1e-12), layer
    assert set(m) == {"t_plus", "t_minus", "d_avg_t_plus", "d_avg_t_minus", "n_irrelevant_features",
                      "n_irrelevant_features_t_plus_only", "n_irrelevant_features_t_minus_only", "kept_fraction",
                      "kept_fraction_random"} | {f"{k}.{layer}" for layer in tiny.layers for k in
                                                 ("n_irrelevant_features", "kept_fraction", "kept_fraction_random")}
    assert result.objects["irrelevant"].tolist() == [False, False, True, False, False, False, True, True]


def test_d_avg_curves_steps_and_values(tiny):
    result = ThresholdsCallback().run(tiny.context())
    for name, col in (("d_avg_plus", 1), ("d_avg_minus", 2)):
        steps, values = result.series[name]
        assert steps.tolist() == list(range(1001)) and steps.dtype.kind == "i"  # x = step / 1000, integer steps
        grid, *curves = oracle.d_avg(oracle.signed_d(tiny.features, tiny.labels, 3)[0],
                                     oracle.d_random(tiny.features, tiny.labels, 3, 1, 0))
        np.testing.assert_allclose(values, curves[col - 1], rtol=0, atol=1e-12)
    steps, plus = result.series["d_avg_plus"]
    # spot values of the hand derivation: x = 0, .2, .3, .375, .4, .6, 1
    assert [plus[s] for s in (0, 200, 300, 375, 400, 600, 1000)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 5 / 3, 5 / 3, 4 / 3, 0], abs=1e-12)
    _, minus = result.series["d_avg_minus"]
    assert [minus[s] for s in (0, 200, 300, 375, 600, 800)] == pytest.approx(
        [-1 / 3, -1 / 3, 1 / 3, 5 / 3, 5 / 3, 1], abs=1e-12)


def test_a_coarser_step_moves_the_grid_and_the_steps(tiny):
    """step 0.05: the grid is k/20, the steps 0, 50, ..., 1000; t+ must be on it: .4 is the first grid point of the
    [.375, .5) plateau (5/3)."""
    result = ThresholdsCallback(step=0.05).run(tiny.context())
    steps, values = result.series["d_avg_plus"]
    assert steps.tolist() == list(range(0, 1001, 50))
    assert result.metrics["t_plus"] == 0.4 and result.metrics["t_minus"] == -0.4
    assert values[8] == pytest.approx(5 / 3)


def test_tables_csv_and_json(tiny):
    result = ThresholdsCallback().run(tiny.context())
    tables = tiny.out / "tables"
    assert {p.name for p in result.files} == {"table4.csv", "table3.csv", "irrelevant_by_layer.csv", "d_avg.csv"}
    assert all(p.parent == tables for p in result.files)

    t4 = read_csv(tables / "table4.csv")
    assert t4 == [["dataset", "t_plus", "d_avg_t_plus", "t_minus", "d_avg_t_minus", "n_classes", "n_features",
                   "permutations", "bins"],
                  ["tiny", "0.375", "1.66667", "-0.375", "1.66667", "3", "8", "1", "exact"]]
    assert read_csv(tables / "table3.csv") == [["layer", "n_features", "analysed"], ["conv1_1", "3", "yes"],
                                               ["conv5_4", "2", "yes"], ["fc7", "3", "yes"], ["Total", "8", "8"]]
    assert read_csv(tables / "irrelevant_by_layer.csv") == [
        ["layer", "n_features", "n_irrelevant", "kept_fraction", "kept_fraction_random"],
        ["conv1_1", "3", "1", "0.666667", "0.222222"],
        ["conv5_4", "2", "0", "0.666667", "0.166667"],
        ["fc7", "3", "2", "0.333333", "0"]]
    d_avg = read_csv(tables / "d_avg.csv")
    assert d_avg[0] == ["x", "d_avg_plus", "d_avg_minus"] and len(d_avg) == 1002
    assert d_avg[376] == ["0.375", "1.66667", "1.66667"] and d_avg[1] == ["0", "0.333333", "-0.333333"]

    js = result.tables
    assert set(js) == {"tables/table4.json", "tables/table3.json", "tables/irrelevant_by_layer.json",
                       "tables/d_avg.json"}
    assert js["tables/table4.json"]["t_plus"] == [0.375] and js["tables/table4.json"]["t_minus"] == [-0.375]
    assert js["tables/table4.json"]["d_avg_t_plus"] == [pytest.approx(5 / 3, abs=1e-12)]
    assert js["tables/table4.json"]["bins"] == ["exact"] and js["tables/table4.json"]["n_features"] == [8]
    ibl = js["tables/irrelevant_by_layer.json"]
    assert ibl["layer"] == ["conv1_1", "conv5_4", "fc7"] and ibl["n_irrelevant"] == [1, 0, 2]
    assert ibl["kept_fraction"] == pytest.approx([2 / 3, 2 / 3, 1 / 3], abs=1e-12)
    assert ibl["kept_fraction_random"] == pytest.approx([2 / 9, 1 / 6, 0], abs=1e-12)
    assert js["tables/table3.json"]["n_features"] == [3, 2, 3, 8]
    assert len(js["tables/d_avg.json"]["x"]) == 1001 and js["tables/d_avg.json"]["d_avg_plus"][375] == \
        pytest.approx(5 / 3)
    json.dumps(js)  # the MLflow table API needs plain JSON types


def test_analysis_layers_subset(tiny):
    """analysis.layers=[conv5_4, fc7]: 5 features; Table 3 still lists every layer, marks the analysed ones."""
    ctx = tiny.context(layers=["conv5_4", "fc7"])
    result = ThresholdsCallback().run(ctx)
    real = oracle.signed_d(tiny.features[:, 3:], tiny.labels, 3)[0]
    rand = oracle.d_random(tiny.features[:, 3:], tiny.labels, 3, 1, 0)
    expect = oracle.thresholds(real, rand)
    assert result.metrics["t_plus"] == expect["t_plus"] and result.metrics["t_minus"] == expect["t_minus"]
    assert "n_irrelevant_features.conv1_1" not in result.metrics
    assert read_csv(tiny.out / "tables" / "table3.csv")[1:] == [["conv1_1", "3", "no"], ["conv5_4", "2", "yes"],
                                                               ["fc7", "3", "yes"], ["Total", "8", "5"]]
    assert read_csv(tiny.out / "tables" / "table4.csv")[1][6] == "5"


@pytest.mark.parametrize("permutations, seed", [(2, 0), (3, 5), (1, 1), (1, 3), (2, 7)])
def test_every_metric_against_the_oracle(tiny, permutations, seed):
    """Any K and seed: every metric equals an independent computation (scipy D, brute-force Eq. 4, counting).
    With (1, 3) and (2, 7) some real D lie exactly on t+ (.25 / .375) and on t- (-.5): strictly beyond is kept."""
    ctx = tiny.context(permutations=permutations, seed=seed, bins=None)
    m = ThresholdsCallback().run(ctx).metrics
    assert read_csv(tiny.out / "tables" / "table4.csv")[1][-2:] == [str(permutations), "exact"]
    real = oracle.signed_d(tiny.features, tiny.labels, 3)[0]
    rand = oracle.d_random(tiny.features, tiny.labels, 3, permutations, seed)
    expect = oracle.thresholds(real, rand)
    tp, tm = expect["t_plus"], expect["t_minus"]
    assert (m["t_plus"], m["t_minus"]) == (tp, tm)
    assert m["d_avg_t_plus"] == pytest.approx(expect["d_avg_t_plus"], abs=1e-12)
    assert m["d_avg_t_minus"] == pytest.approx(expect["d_avg_t_minus"], abs=1e-12)
    layer_of = np.array([n.split(":")[0] for n in tiny.feature_names])
    for layer in [None, *tiny.layers]:
        cols = slice(None) if layer is None else layer_of == layer
        suffix = "" if layer is None else f".{layer}"
        kept = [[Fraction(int(v > tp or v < tm)) for v in row] for row in real[cols]]
        kept_r = [int(v > tp or v < tm) for k in range(permutations) for v in rand[k][cols].ravel()]
        assert m[f"kept_fraction{suffix}"] == pytest.approx(float(sum(map(sum, kept)) / (len(kept) * 3)))
        assert m[f"kept_fraction_random{suffix}"] == pytest.approx(sum(kept_r) / len(kept_r))
        irrelevant = sum(all(not (v > tp or v < tm) for v in row) for row in real[cols])
        assert m[f"n_irrelevant_features{suffix}"] == irrelevant
    assert m["n_irrelevant_features_t_plus_only"] == sum(all(v <= tp for v in row) for row in real)
    assert m["n_irrelevant_features_t_minus_only"] == sum(all(v >= tm for v in row) for row in real)


def test_binned_d_feeds_the_thresholds(tiny):
    """analysis.bins=2: each feature's [min, max] in 2 equal-width bins; D is then the exact D of the bin index
    (README), so the oracle runs on the bin indices, computed here by hand: floor((x - min) / (max - min) * 2)
    clipped to 1."""
    x = tiny.features.astype(np.float64)
    lo, hi = x.min(0), x.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    idx = np.clip(np.floor((x - lo) / span * 2), 0, 1)
    m = ThresholdsCallback().run(tiny.context(bins=2)).metrics
    assert read_csv(tiny.out / "tables" / "table4.csv")[1][-1] == "2"
    expect = oracle.thresholds(oracle.signed_d(idx, tiny.labels, 3)[0], oracle.d_random(idx, tiny.labels, 3, 1, 0))
    assert (m["t_plus"], m["t_minus"]) == (expect["t_plus"], expect["t_minus"])
    assert m["d_avg_t_plus"] == pytest.approx(expect["d_avg_t_plus"])


@pytest.mark.parametrize("step", [0, -0.1, 0.2, 0.1000001])
def test_bad_step_is_a_config_error_naming_the_key(step):
    with pytest.raises(ConfigError, match=r"analysis\.callbacks\.thresholds\.step"):
        ThresholdsCallback(step=step)
    assert ThresholdsCallback(step=0.1).step == 0.1  # the bound itself is allowed


def test_analysis_settings_default_to_one_permutation_and_exact(tiny):
    """An analysis mapping without ``permutations``/``seed``/``bins`` (e.g. a notebook's): K = 1, seed 0, exact."""
    from featstudy.analysis import AnalysisContext
    from featstudy.store import load_embedding

    ctx = AnalysisContext(load_embedding(tiny.folder), {}, tiny.out, "tiny")
    m = ThresholdsCallback().run(ctx).metrics
    assert (m["t_plus"], m["t_minus"]) == (0.375, -0.375)  # the hand derivation above (K = 1, seed 0, exact)
    assert read_csv(tiny.out / "tables" / "table4.csv")[1][-2:] == ["1", "exact"]
