"""The experiment opens on its runs in MLflow 3's UI: ``mlflow.experimentKind`` (issue 11, item 3).

MLflow 3.17's UI picks the experiment's landing page from that tag; without it an experiment with no traces opens
on the GenAI overview ("No data available"). The value is the one the UI's bundle names CUSTOM_MODEL_DEVELOPMENT.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from featstudy.tracking import prepare_experiment

KIND = "mlflow.experimentKind"


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"


def test_the_ui_bundle_knows_the_value_and_opens_it_on_runs():
    """Read from the installed UI itself (not from featstudy): the value is an experiment kind the UI knows."""
    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    kinds = set()
    for f in js.glob("*.js"):
        kinds.update(re.findall(r'CUSTOM_MODEL_DEVELOPMENT="([a-z_]+)"', f.read_text(errors="replace")))
    if not kinds:
        pytest.skip("this MLflow has no built UI bundle")
    assert kinds == {"custom_model_development"}


def test_a_new_experiment_opens_on_its_runs(tmp_path):
    client, exp_id = prepare_experiment(_uri(tmp_path), "featstudy", str(tmp_path / "artifacts"))
    assert MlflowClient(_uri(tmp_path)).get_experiment(exp_id).tags[KIND] == "custom_model_development"


def test_an_older_experiment_gets_the_tag_and_a_users_choice_is_kept(tmp_path):
    (tmp_path / "mlruns").mkdir()
    prepare_experiment(_uri(tmp_path), "warmup", None)  # creates the store
    plain = MlflowClient(_uri(tmp_path))
    old = plain.create_experiment("older")  # as an older featstudy made it: no kind
    mine = plain.create_experiment("mine", tags={KIND: "genai_development"})
    _, got_old = prepare_experiment(_uri(tmp_path), "older", None)
    _, got_mine = prepare_experiment(_uri(tmp_path), "mine", None)
    assert (got_old, got_mine) == (old, mine)
    assert plain.get_experiment(old).tags[KIND] == "custom_model_development"
    assert plain.get_experiment(mine).tags[KIND] == "genai_development"
