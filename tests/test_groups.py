"""Config groups build what they describe (issue 12, items 2 and 3): ``_target_`` in every dataset, model, crops and
pooling option, objects that check themselves, the cache key's fields, and weights that carry their preprocessing.

Expectations are written here by hand (the class each option must build, the paper's crop numbers, the digits'
fingerprint recomputed from scikit-learn's pixels), never read back from the YAML under test.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featstudy.errors import ConfigError
from featstudy.groups import build

REPO = Path(__file__).resolve().parents[1]

#: option -> the class it must build (written by hand from the issue and the README's dataset table)
CLASSES = {
    ("dataset", "digits"): "Digits",
    ("crops", "ten"): "CropSpec", ("crops", "center"): "CropSpec", ("crops", "none"): "CropSpec",
    ("pooling", "avg"): "Pooling", ("pooling", "max"): "Pooling",
    ("model", "vgg19"): "TorchvisionModel", ("model", "timm"): "TimmModel", ("model", "open_clip"): "OpenClipModel",
}


@pytest.mark.parametrize("group,option", sorted(CLASSES))
def test_each_option_builds_its_own_class(helpers, group, option):
    over = [f"{group}={option}"] + (["model.weights=random"] if group == "model" else [])
    obj = build(helpers.compose(over)[group], group)
    assert type(obj).__name__ == CLASSES[(group, option)]


@pytest.mark.parametrize("path", sorted(p for g in ("dataset", "model", "crops", "pooling")
                                         for p in (REPO / "conf" / g).glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_option_of_the_four_groups_names_a_target(path):
    from omegaconf import OmegaConf

    target = OmegaConf.load(path).get("_target_")
    assert target, f"{path} has no _target_"
    from hydra.utils import get_object

    assert callable(get_object(target))


def test_paper_crops_and_pooling_are_built_with_the_papers_numbers(helpers):
    cfg = helpers.compose(["experiment=paper_cub200"])
    crops, pooling = build(cfg.crops, "crops"), build(cfg.pooling, "pooling")
    # paper §3.2: shorter side 256, ten crops of 224 (4 corners + centre, mirrored); spatial average
    assert (crops.name, crops.resize, crops.size, crops.n_crops) == ("ten", 256, 224, 10)
    assert pooling.key_fields() == "avg"


def test_per_class_is_declared_where_it_is_used(helpers):
    """`python -m featstudy dataset.per_class=30` used to say "no such key": the digits config declares it."""
    ds = build(helpers.compose(["dataset.per_class=30"]).dataset, "dataset")
    from sklearn.datasets import load_digits

    target = load_digits().target
    expected = sorted(int(i) for c in range(10) for i in np.flatnonzero(target == c)[:30])
    assert len(ds) == 300 and [int(p[7:11]) for p, _ in ds.samples] == expected


@pytest.mark.parametrize("over,message", [
    (["dataset=cub200", "+dataset.n_classes=3"], r"^dataset\.n_classes: not a setting of featstudy\.datasets\.CUB200"),
    (["crops.size=300", "crops.resize=256"], r"^crops\.size: 300 > crops\.resize 256"),
    (["crops.name=twelve"], r"^crops\.name: 'twelve' is not one of"),
    (["pooling.name=min"], r"^pooling\.name: 'min' is not one of \['avg', 'max'\]"),
    (["dataset.name=mit67"], r"^dataset\.name: 'mit67' but dataset\._target_ builds Digits"),
    (["dataset.split=train"], r"^dataset\.split: 'train' is not a split of digits"),
    (["dataset.max_pixels=0"], r"^dataset\.max_pixels: 0 must be a positive integer"),
    (["model.preprocessing=opencv", "model.weights=random"], r"^model\.preprocessing: 'opencv' is not one of"),
    (["crops._target_=featstudy.transforms.Nothing"], r"^crops\._target_: cannot import"),
])
def test_objects_refuse_bad_fields_in_one_line_naming_the_key(helpers, over, message):
    import re

    cfg = helpers.compose(over)
    group = next(g for g in ("dataset", "crops", "pooling", "model") if any(o.startswith(g) for o in over))
    with pytest.raises(ConfigError) as err:
        build(cfg[group], group)
    assert re.search(message, str(err.value)) and "\n" not in str(err.value)


def test_config_validate_lets_the_objects_check_crops_and_pooling(helpers):
    from featstudy.config import validate

    with pytest.raises(ConfigError, match=r"^crops\.size: 64 > crops\.resize 40"):
        validate(helpers.compose(["crops.resize=40", "crops.size=64"]))
    with pytest.raises(ConfigError, match=r"^pooling\.name: 'median'"):
        validate(helpers.compose(["pooling.name=median"]))


def test_the_demo_key_fields_are_exactly_what_changes_the_numbers(helpers, tmp_path):
    """The key of the demo's embedding hashes these fields and no others (the same as before the groups were
    instantiated, so existing caches stay valid): written out by hand, the digits' fingerprint recomputed from
    scikit-learn's pixels as the Digits docstring defines it."""
    from sklearn.datasets import load_digits

    from featstudy.extraction import plan

    cfg = helpers.compose(["experiment=demo", f"paths.cache_dir={tmp_path}"])
    fields = plan(cfg).key_fields
    data = load_digits()
    keep = np.sort(np.concatenate([np.flatnonzero(data.target == c)[:30] for c in range(10)]))
    pixels = np.rint(data.images[keep] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    h = hashlib.sha256(pixels.tobytes())
    h.update(data.target[keep].astype(np.int64).tobytes())
    vgg_nodes = {f"features.{i}": n for i, n in zip(
        (1, 3, 6, 8, 11, 13, 15, 17, 20, 22, 24, 26, 29, 31, 33, 35),
        ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv3_4",
         "conv4_1", "conv4_2", "conv4_3", "conv4_4", "conv5_1", "conv5_2", "conv5_3", "conv5_4"))}
    vgg_nodes["classifier.4"] = "fc7"
    assert fields == {
        "model": {"name": "vgg19", "nodes": vgg_nodes, "preprocessing": "torchvision", "weights": "random",
                  "seed": 0},
        "crops": {"name": "ten", "resize": 36, "size": 32},
        "pooling": "avg",
        "precision": "32-true",
        "dataset": {"name": "digits", "split": "all", "fingerprint": h.hexdigest()},
    }


def test_per_class_keeps_the_first_images_of_each_class_of_any_dataset(helpers, tmp_path):
    """`dataset.per_class=k` on an image folder: the first k files of each class in sorted order, the rest gone,
    and the subset has its own cache key (so `experiment=demo dataset=imagefolder` runs the demo's 30 per class)."""
    from PIL import Image

    from featstudy.extraction import plan

    for c, n in (("ant", 4), ("bee", 1), ("cow", 3)):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(tmp_path / "data" / c / f"{i}.png")
    over = ["experiment=demo", "dataset=imagefolder", f"dataset.root={tmp_path / 'data'}",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    two = build(helpers.compose([*over, "dataset.per_class=2"]).dataset, "dataset")
    assert two.samples == [("ant/0.png", 0), ("ant/1.png", 0), ("bee/0.png", 1), ("cow/0.png", 2), ("cow/1.png", 2)]
    assert two.describe()["per_class"] == 2
    everything = build(helpers.compose([*over, "dataset.per_class=null"]).dataset, "dataset")
    assert len(everything) == 8
    assert plan(helpers.compose([*over, "dataset.per_class=2"])).key != \
        plan(helpers.compose([*over, "dataset.per_class=null"])).key


def test_a_dataset_is_rebuilt_from_its_description(helpers):
    from featstudy import datasets

    ds = build(helpers.compose(["dataset.per_class=4"]).dataset, "dataset")
    again = datasets.rebuild(ds.describe())
    assert type(again).__name__ == "Digits" and again.samples == ds.samples and len(again) == 40


# --- weights carry their preprocessing (item 3) ---------------------------------------------------------------


def _resnet18_state() -> dict:
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    state = {k: v.contiguous() for k, v in _resnet18_state().items()}
    save_file(state, folder / "caffe.safetensors", metadata={"preprocessing": "caffe"})
    save_file(state, folder / "plain.safetensors")
    torch.save(state, folder / "plain.pth")
    return folder


def _model(weights, **kw):
    from featstudy.models import TorchvisionModel

    return TorchvisionModel(name="resnet18", weights=str(weights), nodes=["layer1"], **kw)


def test_the_weights_say_how_their_images_were_preprocessed(weight_files):
    assert _model(weight_files / "caffe.safetensors").preprocessing == "caffe"
    assert _model("random").preprocessing == "torchvision"
    assert _model("IMAGENET1K_V1").preprocessing == "torchvision"
    # an explicit setting wins over what the file records
    assert _model(weight_files / "caffe.safetensors", preprocessing="torchvision").preprocessing == "torchvision"


@pytest.mark.parametrize("name", ["plain.safetensors", "plain.pth"])
def test_a_file_that_records_nothing_is_refused_not_guessed(weight_files, name):
    with pytest.raises(ConfigError, match=r"^model\.preprocessing: .*does not record how its images were "
                                          r"preprocessed; set model\.preprocessing=torchvision"):
        _model(weight_files / name)
    assert _model(weight_files / name, preprocessing="caffe").preprocessing == "caffe"


def test_a_known_caffe_checkpoint_is_recognised_by_its_hash(weight_files, monkeypatch):
    from featstudy.models import weights as W

    digest = hashlib.sha256((weight_files / "plain.pth").read_bytes()).hexdigest()
    monkeypatch.setattr(W, "CAFFE_CHECKPOINTS", {digest[:8]: "plain.pth"})
    assert _model(weight_files / "plain.pth").preprocessing == "caffe"


def test_the_preprocessing_enters_the_key(weight_files, helpers, tmp_path):
    from featstudy.extraction import plan

    def key(weights, *more):
        return plan(helpers.compose(["experiment=demo", "model=torchvision", "model.name=resnet18",
                                     "model.nodes=[layer1]", f"model.weights={weights}",
                                     f"paths.cache_dir={tmp_path}", *more])).key_fields["model"]["preprocessing"]

    assert key(weight_files / "caffe.safetensors") == "caffe"
    assert key(weight_files / "caffe.safetensors", "model.preprocessing=torchvision") == "torchvision"



def test_a_mean_std_pair_is_a_preprocessing_with_its_own_key(weight_files, helpers, tmp_path):
    import json

    from safetensors.torch import save_file

    from featstudy.extraction import plan

    pair = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    assert _model("random", preprocessing=pair).preprocessing == pair
    # ImageNet's pair is ``torchvision``: the same numbers, the same key
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert _model("random", preprocessing=imagenet).preprocessing == "torchvision"
    state = {k: v.contiguous() for k, v in _resnet18_state().items()}
    save_file(state, tmp_path / "pair.safetensors", metadata={"preprocessing": json.dumps(pair)})
    assert _model(tmp_path / "pair.safetensors").preprocessing == pair

    def fields(*more):
        return plan(helpers.compose(["experiment=demo", "model=torchvision", "model.name=resnet18",
                                     "model.nodes=[layer1]", "model.weights=random",
                                     f"paths.cache_dir={tmp_path}", *more]))

    default, mine = fields(), fields("model.preprocessing={mean:[0.5,0.5,0.5],std:[0.25,0.25,0.25]}")
    assert default.key_fields["model"]["preprocessing"] == "torchvision"
    assert mine.key_fields["model"]["preprocessing"] == pair and mine.key != default.key


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "featstudy", *args], capture_output=True, text=True, env=env,
                          timeout=180, cwd=REPO)


@pytest.mark.parametrize("flags", [["--cfg", "job"], ["--cfg", "job", "--resolve"], ["-c", "job"]])
def test_cfg_job_prints_the_preprocessing_that_runs(weight_files, flags, tmp_path):
    """`--cfg job` with a Caffe state_dict used to print `preprocessing: torchvision`; it prints the resolved job
    config, and creates no run folder."""
    proc = _cli("model=torchvision", "model.name=resnet18", "model.nodes=[layer1]", f"paths.root_dir={tmp_path}",
                f"model.weights={weight_files / 'caffe.safetensors'}", *flags)
    assert proc.returncode == 0, proc.stderr
    assert "  preprocessing: caffe\n" in proc.stdout and "${weights_preprocessing" not in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_an_unknown_setting_is_one_line_and_exit_2_from_the_cli():
    proc = _cli("dataset=cub200", "dataset.root=/nonexistent", "+dataset.n_classes=3", "tracking.uri=null")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "dataset.n_classes" in ln]
    assert lines and "not a setting of featstudy.datasets.CUB200" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_dataset_key_fields_name_what_changes_the_images(tmp_path):
    """max_pixels enters the key only when set (PIL's default keeps older keys); ImageNetVal's class subset
    (n_classes, class_seed) enters it; the fingerprint is the content's."""
    from PIL import Image

    from featstudy.datasets import ImageFolder, ImageNetVal

    for wnid in ("n01", "n02", "n03"):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        Image.new("RGB", (4, 4), (len(wnid), 0, 0)).save(tmp_path / "val" / wnid / "ILSVRC2012_val_1.JPEG")
    plain = ImageFolder(tmp_path / "val").key_fields()
    assert set(plain) == {"name", "split", "fingerprint"} and (plain["name"], plain["split"]) == ("imagefolder", "all")
    assert ImageFolder(tmp_path / "val", max_pixels=1000).key_fields()["max_pixels"] == 1000
    subset = ImageNetVal(tmp_path, n_classes=2, class_seed=5).key_fields()
    assert (subset["n_classes"], subset["class_seed"], subset["name"], subset["split"]) == (2, 5, "imagenet_val", "val")
    assert ImageNetVal(tmp_path, n_classes=2, class_seed=6).key_fields()["class_seed"] == 6
