"""The selectivity callback on the hand-built embedding (conftest): AUROC from scikit-learn, the selectivity index
and per-layer medians written out by hand, the npz and the figure's data.

Hand values of the class selectivity index (μ per class a, b, c; μ_rest = mean of the other two class means):

=========  =====================  ========  =======  ===============================
feature    class means            μ_max     μ_rest   index
=========  =====================  ========  =======  ===============================
conv1_1:0  1.5, 5.5, 9.5          9.5 (c)   3.5      6/13
conv1_1:1  9.5, 5.5, 1.5          9.5 (a)   3.5      6/13
conv1_1:2  0, 0, 0                0         0        0 (defined: a feature that never fires)
conv5_4:0  0, 6.5, 0.5            6.5 (b)   0.25     6.25/6.75 = 25/27
conv5_4:1  2.25, 5.5, 5.25        5.5 (b)   3.75     1.75/9.25 = 7/37
fc7:0      2, 0, 1                2 (a)     0.5      1.5/2.5 = 3/5
fc7:1      0.25, 0, 0             0.25 (a)  0        1
fc7:2      7, 7, 7                7 (a)     7        0
=========  =====================  ========  =======  ===============================
"""

from __future__ import annotations

import numpy as np
import pytest

from featstudy.analysis.selectivity import SelectivityCallback
from featstudy.errors import ConfigError

INDEX = {"conv1_1:0": 6 / 13, "conv1_1:1": 6 / 13, "conv1_1:2": 0.0, "conv5_4:0": 25 / 27, "conv5_4:1": 7 / 37,
         "fc7:0": 3 / 5, "fc7:1": 1.0, "fc7:2": 0.0}
PREFERRED = {"conv1_1:0": "c", "conv1_1:1": "a", "conv1_1:2": "a", "conv5_4:0": "b", "conv5_4:1": "b",
             "fc7:0": "a", "fc7:1": "a", "fc7:2": "a"}
#: |D| of every pair per layer, from the conftest table (exact KS)
ABS_D = {"conv1_1": [1, 0.5, 1, 1, 0.5, 1, 0, 0, 0], "conv5_4": [0.75, 1, 0.5, 0.75, 0.375, 0.375],
         "fc7": [1, 1, 0.5, 0.25, 0.125, 0.125, 0, 0, 0]}


def _sklearn_auroc(tiny) -> np.ndarray:
    from sklearn.metrics import roc_auc_score

    return np.array([[roc_auc_score(tiny.labels == c, tiny.features[:, f]) for c in range(3)]
                     for f in range(tiny.features.shape[1])])


def test_auroc_and_index_against_sklearn_and_the_hand_table(tiny):
    result = SelectivityCallback(formats=[]).run(tiny.context())
    np.testing.assert_allclose(result.objects["auroc"], _sklearn_auroc(tiny), rtol=0, atol=1e-15)
    np.testing.assert_allclose(result.objects["selectivity"].index, [INDEX[n] for n in tiny.feature_names],
                               rtol=1e-12, atol=0)


def test_per_layer_medians(tiny):
    m = SelectivityCallback(formats=[]).run(tiny.context()).metrics
    shift = np.abs(_sklearn_auroc(tiny) - 0.5)
    layer = np.array([n.split(":")[0] for n in tiny.feature_names])
    for name in tiny.layers:
        assert m[f"auroc_abs_median.{name}"] == pytest.approx(float(np.median(shift[layer == name])), abs=1e-15)
    # selectivity medians by hand: conv1_1 {6/13, 6/13, 0} -> 6/13; conv5_4 {25/27, 7/37} -> their mean; fc7 {.6, 1, 0}
    assert m["selectivity_median.conv1_1"] == pytest.approx(6 / 13)
    assert m["selectivity_median.conv5_4"] == pytest.approx((25 / 27 + 7 / 37) / 2)
    assert m["selectivity_median.fc7"] == pytest.approx(0.6)
    assert set(m) == {f"{k}.{layer}" for k in ("auroc_abs_median", "selectivity_median") for layer in tiny.layers}


def test_the_npz_holds_every_array_with_class_names(tiny):
    SelectivityCallback(formats=[]).run(tiny.context())
    z = np.load(tiny.out / "arrays" / "selectivity.npz")
    assert z["auroc"].shape == (8, 3) and z["selectivity"].shape == (8,)
    assert z["preferred"].tolist() == [PREFERRED[n] for n in tiny.feature_names]
    assert z["classes"].tolist() == ["a", "b", "c"] and z["feature_names"].tolist() == tiny.feature_names
    np.testing.assert_allclose(z["class_means"][4], [2.25, 5.5, 5.25])


def test_layers_subset_and_figure_data(tiny):
    result = SelectivityCallback(formats=["png"]).run(tiny.context(layers=["conv5_4", "fc7"]))
    data = result.objects["figure_data"]
    assert list(data) == ["conv5_4", "fc7"]
    np.testing.assert_allclose(data["conv5_4"]["selectivity"], [25 / 27, 7 / 37])
    for name in data:
        assert sorted(data[name]["abs_d"].tolist()) == sorted(ABS_D[name])
    assert (tiny.out / "figures" / "selectivity.png").stat().st_size > 0
    assert "selectivity_median.conv1_1" not in result.metrics


@pytest.mark.parametrize("kwargs", [{"formats": ["gif"]}, {"dpi": 0}, {"dpi": "high"}])
def test_bad_settings_are_one_line_naming_the_key(kwargs):
    with pytest.raises(ConfigError, match=r"^analysis\.callbacks\.selectivity\.(formats|dpi)"):
        SelectivityCallback(**kwargs)
