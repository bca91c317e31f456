"""The demo's subset of the digits: the first ``per_class`` images of each class, stable names, own cache key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from featstudy import datasets
from featstudy.errors import ConfigError


def test_per_class_keeps_the_first_images_of_each_class():
    full = datasets.from_config(OmegaConf.create({"_target_": "featstudy.datasets.Digits", "name": "digits", "split": "all"}))
    sub = datasets.from_config(OmegaConf.create({"_target_": "featstudy.datasets.Digits", "name": "digits", "split": "all", "per_class": 3}))
    assert len(full) == 1797 and len(sub) == 30
    assert [t for _, t in sub.samples].count(7) == 3
    first_sevens = [p for p, t in full.samples if t == 7][:3]
    assert [p for p, t in sub.samples if t == 7] == first_sevens
    i = sub.samples.index((first_sevens[0], 7))
    j = full.samples.index((first_sevens[0], 7))
    assert list(sub.image(i).getdata()) == list(full.image(j).getdata())
    assert sub.fingerprint() != full.fingerprint()
    assert sub.describe()["per_class"] == 3


@pytest.mark.parametrize("bad", [0, -1, "3", True])
def test_per_class_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="dataset.per_class"):
        datasets.from_config(OmegaConf.create({"_target_": "featstudy.datasets.Digits", "name": "digits", "split": "all", "per_class": bad}))


def test_the_demo_config_asks_for_the_subset(helpers):
    cfg = helpers.compose(["experiment=demo"])
    assert cfg.dataset.per_class == 30 and cfg.crops.name == "ten" and cfg.model.weights == "random"
