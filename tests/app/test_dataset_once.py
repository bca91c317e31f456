"""A run lists its dataset's folder once (issue 12): the pre-flight builds the dataset (two classes or more?) and
hands it to the extraction, which used to build it a second time.

Real jobs through :func:`featstudy.app.run` (the demo config on a tiny image folder, resnet18 at random weights,
tracking off), with the constructor of :class:`featstudy.datasets.ImageFolder` (which lists the folder) wrapped to
count its calls, whichever way the dataset is built (``datasets.from_config``, ``groups.build``): one on a cache
miss (the extraction), one on a hit, figures included (fig2 opens the images it draws through the run's dataset,
:func:`featstudy.analysis.image_io.use_dataset`, instead of rebuilding it from the embedding's meta.json).
"""

from __future__ import annotations

import functools

import pytest

pytestmark = pytest.mark.slow


def test_a_run_builds_its_dataset_once_on_a_miss_and_on_a_hit(tmp_path, image_folder, helpers, monkeypatch):
    from featstudy import app
    from featstudy.datasets import ImageFolder

    calls = []
    real = ImageFolder.__init__

    @functools.wraps(real)
    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("root", args[0] if args else None))
        real(self, *args, **kwargs)

    monkeypatch.setattr(ImageFolder, "__init__", counting)
    common = [*helpers.tiny_overrides(tmp_path, image_folder), "tracking.uri=null", "model=torchvision",
              "model.name=resnet18", "model.weights=random", "model.nodes=[layer1,flatten]", "crops=center",
              "crops.resize=36", "crops.size=32", "analysis.callbacks.figures.which=[fig2]",
              "analysis.callbacks.figures.formats=[png]", "~analysis.callbacks.null",
              "analysis.permutations=1"]
    for i, cache in enumerate(("miss", "hit")):
        before = len(calls)
        metrics, objects = app.run(helpers.compose([*common, f"paths.output_dir={tmp_path}/out{i}"]))
        assert objects["embedding"].hit is (cache == "hit") and objects["run_id"] is None  # tracking off
        assert metrics["n_classes"] == 3
        assert len(calls) - before == 1, f"cache {cache}: the dataset was built {len(calls) - before} times"
