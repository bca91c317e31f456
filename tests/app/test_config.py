"""Every experiment and group option composes; validation names the key; paths become absolute."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from featstudy.config import flatten, resolve_paths, validate
from featstudy.errors import ConfigError


@pytest.fixture()
def compose(helpers):
    return helpers.compose

CONF_DIR = Path(os.environ.get("FEATSTUDY_CONF", Path(__file__).resolve().parents[2] / "conf")).absolute()
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_the_five_experiments_exist():
    assert set(EXPERIMENTS) >= {"paper_mit67", "paper_cub200", "paper_flowers102", "paper_imagenet", "demo"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name, compose):
    cfg = compose([f"experiment={name}"], hydra_config=True)
    assert cfg.task_name == name
    assert cfg.hydra.job.chdir is False
    validate(cfg)
    if name == "demo":
        assert cfg.dataset.name == "digits" and cfg.model.weights == "random"
    else:
        assert cfg.model.weights == "IMAGENET1K_V1"
        assert cfg.crops.name == "ten" and (cfg.crops.resize, cfg.crops.size) == (256, 224)
        assert cfg.analysis.bins is None


def test_paper_splits_match_table2(compose):
    assert compose(["experiment=paper_mit67"]).dataset.split == "train"
    assert compose(["experiment=paper_cub200"]).dataset.split == "train"
    assert compose(["experiment=paper_flowers102"]).dataset.split == "test"
    assert compose(["experiment=paper_imagenet"]).dataset.name == "imagenet_val"


@pytest.mark.parametrize("group", ["analysis", "tracking", "paths", "crops", "pooling", "dataset", "model"])
def test_every_group_option_composes(group, compose):
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert options
    for option in options:
        cfg = compose([f"{group}={option}"])
        assert group in cfg


def test_callbacks_are_a_dict_one_can_drop_from(compose):
    cfg = compose(["~analysis.callbacks.figures"])
    assert list(cfg.analysis.callbacks) == ["ks", "thresholds", "null"]
    cfg = compose(["~analysis.callbacks.null"])
    assert "null" not in cfg.analysis.callbacks


def test_run_dirs_and_no_chdir(compose):
    cfg = compose(["task_name=x", "paths.root_dir=/tmp/fs"], hydra_config=True)
    assert cfg.hydra.run.dir.startswith("/tmp/fs/outputs/x/runs/")
    assert cfg.hydra.sweep.dir.startswith("/tmp/fs/multirun/x/")


def test_default_tracking_is_an_absolute_sqlite_uri(compose):
    cfg = compose([])
    uri = cfg.tracking.uri
    assert uri.startswith("sqlite:////") and uri.endswith("/mlruns/mlflow.db")


def test_resolve_paths_makes_every_path_absolute(tmp_path, monkeypatch, compose):
    monkeypatch.chdir(tmp_path)
    cfg = compose(["paths.cache_dir=rel/cache", "dataset.root=data/x"])
    with open_dict(cfg):
        cfg.paths.output_dir = "out"
    resolve_paths(cfg)
    for key, value in cfg.paths.items():
        assert Path(value).is_absolute(), key
    assert cfg.paths.cache_dir == str(tmp_path / "rel" / "cache")
    assert cfg.dataset.root == str(tmp_path / "data" / "x")
    assert OmegaConf.is_interpolation(cfg.paths, "data_dir") is False  # resolved once


@pytest.mark.parametrize("override,key", [
    ("analysis.bins=1", "analysis.bins"),
    ("analysis.bins=abc", "analysis.bins"),
    ("analysis.permutations=0", "analysis.permutations"),
    ("analysis.seed=-1", "analysis.seed"),
    ("analysis.layers=fc7", "analysis.layers"),
    ("analysis.layers=[]", "analysis.layers"),
    ("loader.batch_size=0", "loader.batch_size"),
    ("tracking.uri=mlruns", "tracking.uri"),
])
def test_validate_names_the_key(override, key, compose):
    cfg = compose([override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_validate_accepts_exact_and_layer_lists(compose):
    validate(compose(["analysis.bins=null", "analysis.layers=[conv5_4,fc7]"]))


def test_flatten_gives_dotted_keys(compose):
    flat = flatten(compose(["analysis.bins=50", "paths.output_dir=/tmp/out"]))
    assert flat["analysis.bins"] == "50"
    assert flat["analysis.layers"] == "null"
    assert flat["analysis.callbacks.figures.formats"] == "['png', 'pdf']"
    assert not any(k.startswith("hydra") for k in flat)


def test_every_analysis_callback_instantiates_in_order(compose):
    from featstudy.analysis import AnalysisCallback, instantiate_callbacks

    callbacks = instantiate_callbacks(compose([]).analysis.callbacks)
    assert [name for name, _ in callbacks] == ["ks", "thresholds", "figures", "null"]
    assert all(isinstance(cb, AnalysisCallback) and cb.name == name for name, cb in callbacks)


@pytest.mark.parametrize("override,key", [
    ("analysis.callbacks.figures.formats=[gif]", "analysis.callbacks.figures.formats"),
    ("analysis.callbacks.figures.which=[fig4]", "analysis.callbacks.figures.which"),
    ("analysis.callbacks.null.q=2", "analysis.callbacks.null.q"),
    ("analysis.callbacks.ks._target_=featstudy.nope.Nope", "analysis.callbacks.ks"),
    ("analysis.callbacks.ks._target_=featstudy.store.Embedding", "analysis.callbacks.ks"),
])
def test_bad_callback_settings_name_the_key(override, key, compose):
    from featstudy.analysis import instantiate_callbacks

    with pytest.raises(ConfigError) as err:
        instantiate_callbacks(compose([override]).analysis.callbacks)
    assert key in str(err.value) and "\n" not in str(err.value)
