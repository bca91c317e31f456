"""The analysis context (layer subsets, statistics computed once) and the callback instantiation from config."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import oracle
from featstudy.analysis import CallbackResult, instantiate_callbacks
from featstudy.analysis.base import write_table
from featstudy.analysis.ks import KSCallback
from featstudy.analysis.null import NullCallback
from featstudy.analysis.thresholds import ThresholdsCallback
from featstudy.errors import ConfigError


def test_layer_subset_selects_the_columns_in_order(tiny):
    ctx = tiny.context(layers=["fc7", "conv1_1"])  # the config's order does not matter: column order is kept
    assert ctx.columns.tolist() == [0, 1, 2, 5, 6, 7]
    assert ctx.feature_names == ["conv1_1:0", "conv1_1:1", "conv1_1:2", "fc7:0", "fc7:1", "fc7:2"]
    assert ctx.layers == ["conv1_1", "fc7"]
    assert ctx.layer_of_feature.tolist() == ["conv1_1"] * 3 + ["fc7"] * 3
    np.testing.assert_array_equal(ctx.features, tiny.features[:, [0, 1, 2, 5, 6, 7]])
    np.testing.assert_array_equal(ctx.ks().d, oracle.signed_d(tiny.features[:, [0, 1, 2, 5, 6, 7]], tiny.labels, 3)[0])
    assert ctx.classes == ["a", "b", "c"] and ctx.labels.tolist() == tiny.labels.tolist()


def test_all_layers_read_the_memory_map_itself(tiny):
    ctx = tiny.context()
    assert isinstance(ctx.features, np.memmap)
    assert ctx.layers == tiny.layers and ctx.feature_names == tiny.feature_names


def test_unknown_layer_is_one_error_naming_the_key(tiny):
    with pytest.raises(Exception, match=r"analysis\.layers: unknown layer\(s\) \['nope'\]"):
        tiny.context(layers=["nope"])


def test_statistics_are_computed_once_for_all_callbacks(tiny, monkeypatch):
    from featstudy import stats

    calls = {"signed_ks": 0, "signed_ks_random": 0}
    kwargs = {}
    for name in calls:
        real = getattr(stats, name)

        def counting(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            kwargs[_name] = k
            return _real(*a, **k)

        monkeypatch.setattr(stats, name, counting)
    ctx = tiny.context(permutations=2, seed=1, chunk_size=3)
    for cb in (KSCallback(), ThresholdsCallback(), NullCallback()):
        cb.run(ctx)
    assert calls == {"signed_ks": 1, "signed_ks_random": 1}
    # analysis.chunk_size reaches the engine (memory), no progress bar inside a job's log
    assert kwargs["signed_ks"] == {"bins": None, "chunk_size": 3, "progress": False}
    assert kwargs["signed_ks_random"] == {"permutations": 2, "seed": 1, "bins": None, "chunk_size": 3,
                                          "progress": False}
    assert ctx.seconds("ks") is not None and ctx.seconds("ks_random") is not None
    np.testing.assert_array_equal(ctx.d_random(), oracle.d_random(tiny.features, tiny.labels, 3, 2, 1))


def test_kept_fractions_are_computed_once_for_the_thresholds_and_figures_callbacks(tiny, monkeypatch):
    from featstudy import stats
    from featstudy.analysis.figures import FiguresCallback

    calls = []
    real = stats.kept_fraction_by_layer

    def counting(d, *a, **k):
        calls.append(np.ndim(d))
        return real(d, *a, **k)

    monkeypatch.setattr(stats, "kept_fraction_by_layer", counting)
    ctx = tiny.context()
    thresholds = ThresholdsCallback().run(ctx)
    figures = FiguresCallback(which=["fig10"], formats=["png"]).run(ctx)
    assert calls == [2, 3]  # the real D (F, C), then the randomized stack (K, F, C): once for both callbacks
    kept = ctx.kept()
    assert kept is ctx.kept() and ctx.seconds("kept@0.001") is not None
    # by hand (test_thresholds): 13 of the 24 real pairs lie beyond t+ = .375 / t- = -.375, 3 of the 24 randomized
    assert (kept.overall, kept.overall_random) == (pytest.approx(13 / 24, abs=1e-12), pytest.approx(3 / 24, abs=1e-12))
    m = thresholds.metrics
    assert (m["kept_fraction"], m["kept_fraction_random"]) == (kept.overall, kept.overall_random)
    assert thresholds.objects["kept"] == kept.by_layer and thresholds.objects["kept_random"] == kept.by_layer_random
    bars = [b.get_height() for b in figures.objects["figures"]["fig10"].axes[0].patches]
    assert bars == [100 * kept.by_layer[n] for n in tiny.layers] + [100 * kept.by_layer_random[n] for n in tiny.layers]


def test_write_table_csv_rounds_json_keeps_full_precision(tmp_path):
    result = CallbackResult()
    path = write_table(result, tmp_path / "t.csv", ["name", "share", "n"], [["x", 1 / 3, 4], ["y", 0.5, 0]])
    with open(path, newline="") as fh:
        assert list(csv.reader(fh)) == [["name", "share", "n"], ["x", "0.333333", "4"], ["y", "0.5", "0"]]
    assert result.files == [path]
    assert result.tables == {f"{tmp_path.name}/t.json": {"name": ["x", "y"], "share": [1 / 3, 0.5], "n": [4, 0]}}


def test_instantiate_callbacks_in_order_skipping_entries_without_target():
    out = instantiate_callbacks({
        "ks": {"_target_": "featstudy.analysis.ks.KSCallback"},
        "note": {"step": 1},
        "thresholds": {"_target_": "featstudy.analysis.thresholds.ThresholdsCallback", "step": 0.01},
    })
    assert [name for name, _ in out] == ["ks", "thresholds"]
    assert isinstance(out[0][1], KSCallback) and isinstance(out[1][1], ThresholdsCallback)
    assert out[1][1].step == 0.01 and out[1][1].name == "thresholds"
    assert instantiate_callbacks(None) == [] and instantiate_callbacks({}) == []


@pytest.mark.parametrize("block, message", [
    ({"_target_": "featstudy.analysis.nope.Nope"}, r"analysis\.callbacks\.bad: cannot instantiate "
                                                   r"featstudy\.analysis\.nope\.Nope \(Error loading"),
    ({"_target_": "collections.OrderedDict"}, r"analysis\.callbacks\.bad: collections\.OrderedDict is not an "
                                              r"AnalysisCallback"),
    # the cause's own line is kept: the callback's message naming its key
    ({"_target_": "featstudy.analysis.null.NullCallback", "q": 2},
     r"^analysis\.callbacks\.bad: cannot instantiate featstudy\.analysis\.null\.NullCallback "
     r"\(analysis\.callbacks\.null\.q=2: must be in \(0, 1\)\)$"),
])
def test_bad_callback_blocks_are_one_config_error(block, message):
    with pytest.raises(ConfigError, match=message) as info:
        instantiate_callbacks({"bad": block})
    assert "\n" not in str(info.value)


def test_a_class_without_images_shifts_no_name(tmp_path, caplog):
    """classes.txt names a, b, c but no image is labelled b (all unreadable): D has two columns, named a and c, and
    the labels index those columns (fig1/fig3 pick class members by column)."""
    from featstudy.analysis import AnalysisContext
    from featstudy.store import load_embedding, write_embedding

    x = np.array([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0], [12.0]], dtype=np.float32)
    stored = np.array([0, 0, 0, 0, 2, 2, 2])
    folder = write_embedding(tmp_path / "e", features=x, labels=stored, classes=["a", "b", "c"],
                             paths=[f"{i}.png" for i in range(7)], feature_names=["fc7:0"], meta={})
    ctx = AnalysisContext(load_embedding(folder), {"bins": None, "permutations": 1, "seed": 0}, tmp_path / "o", "t")
    with caplog.at_level("WARNING", logger="featstudy.analysis.base"):
        assert ctx.classes == ["a", "c"]
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("dataset: class(es) ['b'] have no readable image") and "D has 2 columns" in message
    assert ctx.labels.tolist() == [0, 0, 0, 0, 1, 1, 1] and ctx.labels.dtype == np.int64
    # by hand: a's values (0..3) lie entirely below c's (10..12): D(a) = -1, D(c) = +1
    assert ctx.ks().d.tolist() == [[-1.0, 1.0]]
    KSCallback().run(ctx)
    with np.load(tmp_path / "o" / "arrays" / "ks.npz") as z:
        assert z["classes"].tolist() == ["a", "c"] and z["d"].shape == (1, 2) and z["n_in"].tolist() == [4, 3]


def test_the_real_labels_p_and_q_values_are_computed_once_for_the_null_callback_and_the_atlas(tiny, monkeypatch):
    """NullCallback then the atlas: the real labels' p-values once (then one per randomized permutation), the atlas
    reading the same q-values, equal to BH (scipy) of the p-values."""
    from scipy.stats import false_discovery_control

    from featstudy import stats
    from featstudy.analysis.null import NullCallback

    calls = []
    real = stats.ks_pvalues
    monkeypatch.setattr(stats, "ks_pvalues", lambda *a, **k: calls.append(1) or real(*a, **k))
    ctx = tiny.context(permutations=2)
    result = NullCallback().run(ctx)
    assert len(calls) == 1 + 2
    p, q = ctx.null_pq()
    assert len(calls) == 3 and q is result.objects["q"]
    np.testing.assert_allclose(q.ravel(), false_discovery_control(p.ravel()), rtol=1e-12)
