"""End to end: what a run logs to MLflow equals what it wrote to its files, and both equal an independent computation
(scipy's KS, seeded permutations, brute-force Eq. 4, exact null counts) from the cached embedding it used.

A real job (``python -m featstudy`` in this process: real extraction of a tiny image folder with resnet18 at random
weights, the real SQLite store) with ``analysis.permutations=2`` and a seed; then the same config with another seed
and again with the first: the randomized arrays are the same for a seed and differ across seeds.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("analysis_oracle", Path(__file__).parents[1] / "analysis" / "oracle.py")
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)


def job(root: Path, images: Path, helpers, seed: int) -> list[str]:
    return [*helpers.tiny_overrides(root, images), "model=torchvision", "model.name=resnet18", "model.weights=random",
            "model.nodes=[layer1,flatten]", "crops=center", "crops.resize=36", "crops.size=32",
            "~analysis.callbacks.figures", "analysis.permutations=2", f"analysis.seed={seed}", "analysis.bins=null",
            "analysis.threshold_step=0.01", f"hydra.run.dir={root}/out/seed{seed}_{len(list(root.glob('out/*')))}"]


def run_job(root, images, helpers, seed):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRA_FULL_ERROR", "0")
        assert helpers.run_cli(job(root, images, helpers, seed), mp) == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("featstudy")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.info.status == "FINISHED"
    return client, run


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def first(tmp_path_factory, image_folder, helpers):
    root = tmp_path_factory.mktemp("e2e")
    return root, *run_job(root, image_folder, helpers, seed=5)


def test_logged_metrics_equal_the_files_and_an_independent_computation(first, tmp_path):
    root, client, run = first
    m = run.data.metrics
    out = Path(run.data.tags["featstudy.output_dir"])
    # the cached embedding the run used, read with numpy alone
    emb = Path(run.data.tags["featstudy.embedding_path"])
    x = np.load(emb / "features.npy")
    labels = np.load(emb / "labels.npy")
    names = (emb / "feature_names.txt").read_text().splitlines()
    n_classes = len((emb / "classes.txt").read_text().splitlines())
    layer_of = np.array([n.rsplit(":", 1)[0] for n in names])
    assert x.shape == (24, 64 + 512) and n_classes == 3

    d, d_plus, d_minus = oracle.signed_d(x, labels, n_classes)
    d_rand = oracle.d_random(x, labels, n_classes, 2, 5)
    expect = oracle.thresholds(d, d_rand, step=0.01)
    tp, tm = expect["t_plus"], expect["t_minus"]

    # 1. the files against the independent computation
    with np.load(out / "arrays" / "ks.npz") as z:
        np.testing.assert_allclose(z["d"], d, atol=1e-12)
        np.testing.assert_allclose(z["d_plus"], d_plus, atol=1e-12)
        np.testing.assert_allclose(z["d_minus"], d_minus, atol=1e-12)
        np.testing.assert_allclose(z["d_random"], d_rand, atol=1e-12)
        assert int(z["seed"]) == 5 and int(z["permutations"]) == 2
    t4 = read_rows(out / "tables" / "table4.csv")[0]
    assert float(t4["t_plus"]) == tp and float(t4["t_minus"]) == tm
    assert float(t4["d_avg_t_plus"]) == pytest.approx(expect["d_avg_t_plus"], rel=1e-5)
    by_layer = {r["layer"]: r for r in read_rows(out / "tables" / "irrelevant_by_layer.csv")}
    assert list(by_layer) == ["layer1", "flatten"]

    # 2. MLflow's metrics against the same independent numbers, and against the files
    assert (m["t_plus"], m["t_minus"]) == (tp, tm)
    assert m["d_avg_t_plus"] == pytest.approx(expect["d_avg_t_plus"], abs=1e-12)
    assert m["d_avg_t_minus"] == pytest.approx(expect["d_avg_t_minus"], abs=1e-12)
    assert m["n_images"] == 24 and m["n_classes"] == 3 and m["n_features"] == 576
    for layer in ("layer1", "flatten"):
        cols = layer_of == layer
        kept = ((d[cols] > tp) | (d[cols] < tm)).mean()
        kept_r = ((d_rand[:, cols] > tp) | (d_rand[:, cols] < tm)).mean()
        irrelevant = int(np.sum([not np.any((row > tp) | (row < tm)) for row in d[cols]]))
        assert m[f"kept_fraction.{layer}"] == pytest.approx(kept, abs=1e-12)
        assert m[f"kept_fraction_random.{layer}"] == pytest.approx(kept_r, abs=1e-12)
        assert m[f"n_irrelevant_features.{layer}"] == irrelevant
        assert float(by_layer[layer]["kept_fraction"]) == pytest.approx(m[f"kept_fraction.{layer}"], rel=1e-5)
        assert int(by_layer[layer]["n_irrelevant"]) == m[f"n_irrelevant_features.{layer}"]
    assert float(t4["t_plus"]) == m["t_plus"] and float(t4["t_minus"]) == m["t_minus"]

    # 3. the d_avg curve in MLflow: one value per grid point x = k/100, at step round(1000 x)
    grid, avg_plus, *_ = oracle.d_avg(d, d_rand, step=0.01)
    history = sorted(client.get_metric_history(run.info.run_id, "d_avg_plus"), key=lambda h: h.step)
    assert [h.step for h in history] == [10 * k for k in range(101)]
    np.testing.assert_allclose([h.value for h in history], avg_plus, atol=1e-12)
    d_avg_file = read_rows(out / "tables" / "d_avg.csv")
    np.testing.assert_allclose([float(r["d_avg_plus"]) for r in d_avg_file], avg_plus, rtol=1e-5, atol=1e-9)

    # 4. the analytic null: BH over the run's own F x C exact-or-asymptotic p-values, recomputed with scipy
    from scipy.stats import ks_2samp

    p = np.array([[ks_2samp(x[labels != c, f], x[labels == c, f], method="exact").pvalue
                   if abs(d[f, c]) > 0 else 1.0 for c in range(n_classes)] for f in range(x.shape[1])])
    share = float((oracle.bh(p) < 0.05).mean())
    assert m["null_significant_share"] == pytest.approx(share, abs=0.5 / d.size)
    null_rows = {r["layer"]: r for r in read_rows(out / "tables" / "null_by_layer.csv")}
    assert float(null_rows["flatten"]["share"]) == pytest.approx(m["null_significant_share.flatten"], rel=1e-5)


def test_seed_gives_the_same_randomized_arrays_and_another_seed_others(first, image_folder, helpers):
    root, client, run = first
    _, other = run_job(root, image_folder, helpers, seed=6)
    _, again = run_job(root, image_folder, helpers, seed=5)
    assert other.data.tags["embedding_cache"] == "hit" == again.data.tags["embedding_cache"]

    def arrays(r):
        with np.load(Path(r.data.tags["featstudy.output_dir"]) / "arrays" / "ks.npz") as z:
            return z["d"], z["d_random"]

    d5, r5 = arrays(run)
    d6, r6 = arrays(other)
    d5b, r5b = arrays(again)
    assert r5.shape == r6.shape == (2, 576, 3)
    np.testing.assert_array_equal(d5, d6)  # the real D does not depend on the seed
    np.testing.assert_array_equal(r5, r5b)
    assert not np.array_equal(r5, r6) and not np.array_equal(r5[0], r6[0])
    assert again.data.metrics["t_plus"] == run.data.metrics["t_plus"]
    assert again.data.metrics["kept_fraction_random"] == run.data.metrics["kept_fraction_random"]
