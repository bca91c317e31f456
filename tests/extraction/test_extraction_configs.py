"""Every option of the extraction config groups composes with the root config and passes validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from featstudy.extraction import plan
from featstudy.transforms import crop_spec

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "dataset").glob("*.yaml")))
def test_dataset_options_have_the_contract_keys(option):
    cfg = _compose(f"dataset={option}")
    assert cfg.dataset.name == option and {"root", "split", "download"} <= set(cfg.dataset.keys())


@pytest.mark.parametrize("group", ["model", "crops", "pooling"])
def test_other_group_options_compose(group, tmp_path):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = _compose(f"{group}={option}", "model.weights=random", f"paths.cache_dir={tmp_path}")
        if group == "crops":
            crop_spec(cfg.crops)
        p = plan(cfg)
        assert p.key.startswith(f"{cfg.model.name}-digits-all-")


def test_keys_users_rely_on():
    cfg = _compose()
    assert {"name", "weights", "preprocessing"} <= set(cfg.model.keys())
    assert {"name", "resize", "size"} <= set(cfg.crops.keys()) and cfg.pooling.name == "avg"
    assert {"batch_size", "num_workers"} <= set(cfg.loader.keys())
    assert {"accelerator", "devices", "num_nodes", "strategy", "precision"} <= set(cfg.trainer.keys())
