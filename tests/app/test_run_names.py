"""MLflow run names put what differs first (issue 11, item 3): expectations written by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from featstudy.run_names import single_run_name, swept_keys, sweep_child_name


def _cfg(**over):
    base = {"task_name": "paper_cub200", "dataset": {"name": "cub200"},
            "model": {"name": "vgg19", "weights": "IMAGENET1K_V1"}, "analysis": {"bins": None}}
    cfg = OmegaConf.create(base)
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    return cfg


@pytest.mark.parametrize("over,name", [
    ({}, "cub200 · vgg19 · IMAGENET1K_V1 · exact"),
    ({"analysis.bins": 100}, "cub200 · vgg19 · IMAGENET1K_V1 · 100 bins"),
    ({"model.weights": "/data/w/vgg19-dcbb9e9d.pth"}, "cub200 · vgg19 · vgg19-dcbb9e9d.pth · exact"),
    ({"dataset.name": "digits", "model.weights": "random", "analysis.bins": 25}, "digits · vgg19 · random · 25 bins"),
])
def test_single_run_name(over, name):
    assert single_run_name(_cfg(**over)) == name


def _multirun(tmp_path: Path, task: list[str]) -> Path:
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": task}}}), tmp_path / "multirun.yaml")
    return tmp_path


def test_swept_keys_are_the_swept_overrides_only(tmp_path):
    d = _multirun(tmp_path, ["experiment=paper_cub200", "analysis.bins=25,null", "analysis.layers=[conv5_4,fc7]",
                             "analysis.seed=range(0,3)", "dataset.root='/a,b'", "model=choice(vgg19,torchvision)"])
    assert swept_keys(d) == ["analysis.bins", "analysis.seed", "model"]
    assert swept_keys(tmp_path / "nowhere") is None


def test_a_sweep_child_starts_with_its_swept_settings(tmp_path):
    cfg = _cfg(**{"analysis.bins": 25})
    job = ["experiment=paper_cub200", "analysis.bins=25", "analysis.layers=[conv5_4,fc7]"]
    assert sweep_child_name(cfg, job, ["analysis.bins"]) == "bins=25 · cub200 · vgg19 · IMAGENET1K_V1 · 25 bins"
    # two swept keys with the same last segment keep their full keys; the others are shortened
    two = ["analysis.bins=25", "other.bins=3", "analysis.seed=1"]
    assert sweep_child_name(cfg, two, ["analysis.bins", "other.bins", "analysis.seed"]).startswith(
        "analysis.bins=25, other.bins=3, seed=1 · cub200")
    # without multirun.yaml: every override of the job
    assert sweep_child_name(cfg, ["analysis.bins=25", "+x=1"], None).startswith("bins=25, x=1 · cub200")
    assert len(sweep_child_name(cfg, [f"k{i}.v=" + "x" * 40 for i in range(20)], None)) == 250
