"""The root config built for real: every experiment, and every option of the app-level groups (analysis, tracking,
paths, the Hydra launchers and callbacks) instantiated into the object featstudy uses; validation names the key;
paths become absolute. The extraction groups (model, crops, pooling, dataset, loader, trainer) are instantiated in
``tests/extraction/test_extraction_configs.py``; :func:`test_every_config_group_is_instantiated_by_a_test` keeps the
two lists complete.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from featstudy.config import flatten, resolve_paths, validate
from featstudy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = Path(os.environ.get("FEATSTUDY_CONF", REPO / "conf")).absolute()
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
GROUPS_TESTED_HERE = {"analysis", "tracking", "paths", "hydra", "experiment"}
GROUPS_TESTED_IN_EXTRACTION = {"model", "crops", "pooling", "dataset", "loader", "trainer"}
#: paper Table 2 (and §5.3 for ImageNet): the dataset class and split each paper run analyses
PAPER = {"paper_mit67": ("MIT67", "train"), "paper_cub200": ("CUB200", "train"),
         "paper_flowers102": ("Flowers102", "test"), "paper_imagenet": ("ImageNetVal", "val")}
SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher"
#: hydra/launcher option -> (plugin class, parameters that tell the options apart)
LAUNCHERS = {
    "local": (f"{SUBMITIT}.LocalLauncher", {"gpus_per_node": 0, "timeout_min": 60, "cpus_per_task": 1}),
    "slurm": (f"{SUBMITIT}.SlurmLauncher", {"gpus_per_node": 1, "timeout_min": 120, "cpus_per_task": 8,
                                            "array_parallelism": 32, "signal_delay_s": 120, "max_num_timeout": 0}),
    "joblib": ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", {"n_jobs": -1}),
}


@pytest.fixture()
def compose(helpers):
    return helpers.compose


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def class_name(obj) -> str:
    """``module.Class`` (Hydra's plugin scan imports plugin modules twice, so compare launcher classes by name)."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def test_every_config_group_is_instantiated_by_a_test():
    assert {p.name for p in CONF_DIR.iterdir() if p.is_dir()} == GROUPS_TESTED_HERE | GROUPS_TESTED_IN_EXTRACTION
    assert set(EXPERIMENTS) == set(PAPER) | {"demo"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_the_papers_pipeline(name, compose):
    """Each experiment as the objects a run builds from it: VGG19's 16 conv layers + fc7 (paper Table 1/3), the
    ten-crop transform, the four analyses; the paper runs with ImageNet weights at 224 px on the paper's split, the
    demo with random weights at 32 px on 30 digits per class (README)."""
    from PIL import Image

    from featstudy import datasets, models
    from featstudy.analysis import instantiate_callbacks
    from featstudy.models.vgg19 import LAYERS
    from featstudy.transforms import ImageTransform, crop_spec

    cfg = compose([f"experiment={name}"])
    validate(cfg)
    ms = models.spec(cfg.model)
    assert ms.name == "vgg19" and list(ms.nodes.values()) == LAYERS and len(LAYERS) == 17
    assert [n for n, _ in instantiate_callbacks(cfg.analysis.callbacks)] == ["ks", "thresholds", "figures", "null",
                                                                             "selectivity", "bootstrap", "atlas"]
    crops = ImageTransform(crop_spec(cfg.crops), ms.preprocessing)(Image.new("RGB", (300, 260), (90, 30, 200)))
    if name == "demo":
        assert ms.weights.kind == "random" and crops.shape == (10, 3, 32, 32)
        ds = datasets.from_config(cfg.dataset)
        assert type(ds).__name__ == "Digits" and len(ds) == 300 and sorted(set(ds.targets)) == list(range(10))
    else:
        assert (ms.weights.kind, ms.weights.tag) == ("torchvision", "IMAGENET1K_V1")
        assert crops.shape == (10, 3, 224, 224)
        cls, split = PAPER[name]
        assert datasets.DATASETS[cfg.dataset.name].__name__ == cls and cfg.dataset.split == split
        assert cfg.analysis.bins == 100  # paper §4: "we discretize the domain of each EDF into 100 bins"


def test_analysis_callbacks_are_built_in_order_with_their_settings(compose):
    """The settings reach the objects (values unlike the classes' defaults), ``analysis.threshold_step`` drives both
    steps, and ``~analysis.callbacks.<name>`` drops one."""
    from featstudy.analysis import instantiate_callbacks
    from featstudy.analysis.figures import FiguresCallback
    from featstudy.analysis.ks import KSCallback
    from featstudy.analysis.null import NullCallback
    from featstudy.analysis.thresholds import ThresholdsCallback

    assert options("analysis") == ["default"]
    from featstudy.analysis.atlas import AtlasCallback
    from featstudy.analysis.bootstrap import BootstrapCallback
    from featstudy.analysis.selectivity import SelectivityCallback

    cfg = compose(["analysis.threshold_step=0.01", "analysis.callbacks.null.q=0.1",
                   "analysis.callbacks.figures.top_k=4", "analysis.callbacks.figures.which=[fig9]",
                   "analysis.bootstrap=7", "analysis.bootstrap_level=0.9", "analysis.callbacks.selectivity.dpi=77",
                   "analysis.callbacks.atlas.top_k=5", "analysis.callbacks.atlas.crop_px=64"])
    built = instantiate_callbacks(cfg.analysis.callbacks)
    assert [(name, type(cb)) for name, cb in built] == [("ks", KSCallback), ("thresholds", ThresholdsCallback),
                                                       ("figures", FiguresCallback), ("null", NullCallback),
                                                       ("selectivity", SelectivityCallback),
                                                       ("bootstrap", BootstrapCallback), ("atlas", AtlasCallback)]
    cb = dict(built)
    assert cb["thresholds"].step == cb["figures"].step == cb["bootstrap"].step == cb["atlas"].step == 0.01
    assert (cb["atlas"].top_k, cb["atlas"].crop_px, cb["atlas"].crops_per_feature) == (5, 64, 4)
    assert (cb["bootstrap"].n_boot, cb["bootstrap"].level, cb["selectivity"].dpi) == (7, 0.9, 77)
    assert cb["null"].q == 0.1 and cb["figures"].top_k == 4 and cb["figures"].which == ["fig9"]
    assert all(c.name == n for n, c in built)
    dropped = instantiate_callbacks(compose(["~analysis.callbacks.figures"]).analysis.callbacks)
    assert [(n, type(c)) for n, c in dropped] == [("ks", KSCallback), ("thresholds", ThresholdsCallback),
                                                  ("null", NullCallback), ("selectivity", SelectivityCallback),
                                                  ("bootstrap", BootstrapCallback), ("atlas", AtlasCallback)]


@pytest.fixture()
def http_env(monkeypatch):
    """Jobs export ``tracking.http_*`` as ``MLFLOW_HTTP_REQUEST_*``; undone after the test."""
    from featstudy.tracking import HTTP_SETTINGS

    for env in HTTP_SETTINGS.values():
        monkeypatch.setenv(env, "")
        monkeypatch.delenv(env)
    return HTTP_SETTINGS


def test_tracking_mlflow_starts_a_run_in_a_sqlite_file_under_the_root(compose, tmp_path, http_env):
    from mlflow.tracking import MlflowClient

    from featstudy.tracking import Tracker

    assert options("tracking") == ["mlflow", "server"]
    cfg = compose(["tracking=mlflow", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}"])
    tracker = Tracker.start(cfg, tags={"featstudy.role": "job"})
    assert tracker.broken is None and tracker.uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert (tmp_path / "mlruns" / "mlflow.db").is_file() and (tmp_path / "out" / "tracking_journal.jsonl").is_file()
    tracker.end("FINISHED")
    client = MlflowClient(tracking_uri=tracker.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "featstudy"
    assert client.get_experiment(run.info.experiment_id).name == "featstudy"
    assert client.get_experiment(run.info.experiment_id).artifact_location == (tmp_path / "mlruns" / "artifacts").as_uri()
    assert os.environ[http_env["http_timeout"]] == "30"  # MLflow's own HTTP client is bounded too


def test_tracking_server_is_the_preset_servers_http_uri(compose, tmp_path, http_env):
    """``tracking=server`` speaks HTTP to the port ``scripts/tracking_server.sh`` serves on, with no artifact
    location of its own (the server's ``--serve-artifacts``); an unreachable server leaves the job offline with its
    journal."""
    from featstudy.tracking import Journal, Tracker, sqlite_path

    cfg = compose(["tracking=server", f"paths.output_dir={tmp_path / 'out'}"])
    script_port = re.search(r"mlport=\$\{MLFLOW_PORT:-(\d+)\}", (REPO / "scripts" / "tracking_server.sh").read_text())
    assert cfg.tracking.uri == f"http://127.0.0.1:{script_port.group(1)}" and sqlite_path(cfg.tracking.uri) is None
    with socket.socket() as s:  # a port nothing listens on, instead of a server that may be running
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open_dict(cfg):
        cfg.tracking.update({"uri": f"http://127.0.0.1:{port}", "retries": 1, "retry_delay": 0,
                             "http_max_retries": 0, "http_timeout": 3})
    tracker = Tracker.start(cfg)
    assert tracker.broken is not None and tracker.run_id is None
    start = Journal.read(tmp_path / "out")["start"]
    assert start["uri"] == f"http://127.0.0.1:{port}" and start["artifact_location"] is None
    assert os.environ[http_env["http_max_retries"]] == "0"


def test_paths_are_absolute_under_featstudy_root(compose, tmp_path, monkeypatch):
    """``paths=default``: every location under ``$FEATSTUDY_ROOT`` (relative to the working directory), else the
    working directory; the tracking store, the run and sweep folders follow."""
    assert options("paths") == ["default"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEATSTUDY_ROOT", "proj")
    cfg = compose(["task_name=x"], hydra_config=True)
    root = tmp_path / "proj"
    expected = {"root_dir": root, "data_dir": root / "data", "cache_dir": root / ".cache" / "featstudy",
                "log_dir": root / "outputs", "mlruns_dir": root / "mlruns"}
    assert {k: cfg.paths[k] for k in expected} == {k: str(v) for k, v in expected.items()}
    assert cfg.tracking.uri == f"sqlite:///{root}/mlruns/mlflow.db"
    assert cfg.hydra.run.dir.startswith(f"{root}/outputs/x/runs/")
    assert cfg.hydra.sweep.dir.startswith(f"{root}/multirun/x/")
    monkeypatch.delenv("FEATSTUDY_ROOT")
    assert compose([]).paths.root_dir == str(tmp_path)


def test_the_project_root_is_found_above_the_working_directory(compose, tmp_path, monkeypatch):
    """From a subfolder of a project (a ``.project-root`` file at its top), every location is the project's, not
    the subfolder's (a second mlruns/ the UI never shows, a second extraction); FEATSTUDY_ROOT still wins; the
    repository itself carries the marker."""
    from featstudy.config import project_root

    assert (Path(__file__).resolve().parents[2] / ".project-root").is_file()
    proj = tmp_path / "proj"
    (proj / "notebooks" / "deep").mkdir(parents=True)
    (proj / ".project-root").write_text("")
    (proj / "notebooks" / ".project-root").mkdir()  # a folder of that name is not the marker
    monkeypatch.delenv("FEATSTUDY_ROOT", raising=False)
    monkeypatch.chdir(proj / "notebooks" / "deep")
    cfg = compose([])
    assert cfg.paths.root_dir == str(proj) and cfg.tracking.uri == f"sqlite:///{proj}/mlruns/mlflow.db"
    assert cfg.paths.cache_dir == str(proj / ".cache" / "featstudy")
    assert project_root()[1].startswith(".project-root found above")
    monkeypatch.setenv("FEATSTUDY_ROOT", str(tmp_path / "elsewhere"))
    assert compose([]).paths.root_dir == str(tmp_path / "elsewhere")
    assert project_root()[1] == "FEATSTUDY_ROOT"


@pytest.mark.parametrize("option", sorted({*options("hydra/launcher"), "joblib"}))
def test_hydra_launcher_option_builds_its_plugin(option, compose, tmp_path):
    """What Hydra does with ``hydra/launcher=<option>``: instantiate the plugin class from the composed config."""
    from hydra.utils import instantiate

    target, params = LAUNCHERS[option]
    cfg = compose([f"hydra/launcher={option}", f"hydra.sweep.dir={tmp_path}"], hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert class_name(launcher) == target
    got = launcher.joblib if option == "joblib" else launcher.params
    assert {k: got[k] for k in params} == params
    if option != "joblib":  # submitit keeps its job folders inside the sweep folder
        assert got["submitit_folder"] == f"{tmp_path}/.submitit/%j"


def test_hydra_sweep_callback_is_featstudys(compose):
    from hydra.utils import instantiate

    from featstudy.tracking import SweepCallback

    callbacks = compose([], hydra_config=True).hydra.callbacks
    assert [type(instantiate(c)) for c in callbacks.values()] == [SweepCallback]


def test_resolve_paths_makes_every_path_absolute(tmp_path, monkeypatch, compose):
    monkeypatch.chdir(tmp_path)
    cfg = compose(["paths.cache_dir=rel/cache", "dataset.root=data/x"])
    with open_dict(cfg):
        cfg.paths.output_dir = "out"
    resolve_paths(cfg)
    for key, value in cfg.paths.items():
        assert Path(value).is_absolute(), key
    assert cfg.paths.cache_dir == str(tmp_path / "rel" / "cache")
    assert cfg.paths.output_dir == str(tmp_path / "out")
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


@pytest.mark.parametrize("override,key", [
    ("analysis.callbacks.figures.formats=[gif]", "analysis.callbacks.figures.formats"),
    ("analysis.callbacks.figures.which=[fig4]", "analysis.callbacks.figures.which"),
    ("analysis.callbacks.null.q=2", "analysis.callbacks.null.q"),
    ("analysis.callbacks.atlas.top_k=0", "analysis.callbacks.atlas.top_k"),
    ("analysis.callbacks.atlas.jpeg_quality=101", "analysis.callbacks.atlas.jpeg_quality"),
    ("+analysis.callbacks.atlas.colour=red", "analysis.callbacks.atlas.colour"),
    ("analysis.callbacks.ks._target_=featstudy.nope.Nope", "analysis.callbacks.ks"),
    ("analysis.callbacks.ks._target_=featstudy.store.Embedding", "analysis.callbacks.ks"),
])
def test_bad_callback_settings_name_the_key(override, key, compose):
    from featstudy.analysis import instantiate_callbacks

    with pytest.raises(ConfigError) as err:
        instantiate_callbacks(compose([override]).analysis.callbacks)
    assert key in str(err.value) and "\n" not in str(err.value)
