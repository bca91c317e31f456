"""Numerical precision of extraction (issue 16, items 3 and 9).

* ``32-true`` means IEEE float32 in every rank: TF32 is switched off where the model runs, also in a ``ddp_spawn``
  rank, which starts with torch's defaults (cuDNN TF32 on) whatever the parent set. The flags can be read and set
  without CUDA, so a real two-process gloo run on CPU shows them.
* ``bf16-mixed`` pools in float32: the features are means of bf16 activations, not bf16 numbers themselves.
* A non-finite activation stops the run with one line naming the layer, and nothing is written for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featstudy.errors import ConfigError, DataError
from featstudy.extraction import get_embedding, plan
from featstudy.store import load_embedding

SRC = Path(__file__).resolve().parents[2] / "src"

#: A real Lightning predict with the real ExtractionModule; the model is a stand-in that records, in the rank that
#: runs it, the TF32 flags in force during predict_step (one JSON file per rank).
RECORDER = r'''
import json, os, sys
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from featstudy.extraction.module import ExtractionModule, collate


class Items(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"id": i, "image": torch.full((1, 3, 4, 4), float(i)), "mode": "RGB", "reason": ""}


class Recorder(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def pooled_layers(self, x):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        b = torch.backends
        seen = {"rank": rank, "pid": os.getpid(), "cudnn": b.cudnn.allow_tf32, "matmul": b.cuda.matmul.allow_tf32,
                "matmul_precision": torch.get_float32_matmul_precision()}
        with open(os.path.join(self.out, f"rank{rank}-{os.getpid()}.json"), "w") as fh:
            json.dump(seen, fh)
        return {"a": x.flatten(1).mean(1, keepdim=True).float()}

    def per_crop(self, x):  # what ExtractionModule called before the layers were pooled where produced
        return self.pooled_layers(x)["a"]


if __name__ == "__main__":
    out, strategy, devices, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    # the parent as a user may leave it: TF32 on everywhere (a spawned child starts from torch's defaults anyway)
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    module = ExtractionModule(Recorder(out))
    module.n_features = 1
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, precision=precision, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.predict(module, DataLoader(Items(), batch_size=1, collate_fn=collate), return_predictions=False)
    b = torch.backends
    print(json.dumps({"cudnn": b.cudnn.allow_tf32, "matmul": b.cuda.matmul.allow_tf32,
                      "matmul_precision": torch.get_float32_matmul_precision()}))
'''


def _record(tmp_path, strategy, devices, precision):
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER, encoding="utf-8")
    out = tmp_path / "seen"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, str(script), str(out), strategy, str(devices), precision], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    return ranks, json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ddp_spawn_ranks_compute_in_ieee_fp32(tmp_path):
    ranks, parent = _record(tmp_path, "ddp_spawn", 2, "32-true")
    assert sorted(r["rank"] for r in ranks) == [0, 1]  # two spawned ranks, each wrote what it saw
    assert len({r["pid"] for r in ranks}) == 2 and all(r["pid"] != os.getpid() for r in ranks)
    for r in ranks:
        assert (r["cudnn"], r["matmul"], r["matmul_precision"]) == (False, False, "highest"), r
    # the parent's own settings are its own business: untouched
    assert (parent["cudnn"], parent["matmul"], parent["matmul_precision"]) == (True, True, "high")


@pytest.fixture
def tf32_on():
    """This process with TF32 on (as a user may leave it); torch's defaults put back afterwards."""
    before = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    yield
    torch.backends.cudnn.allow_tf32 = before[0]
    torch.set_float32_matmul_precision(before[1])


def _record_here(tmp_path, precision):
    """The recorder's predict in this process (one device): what predict_step saw, and the flags after it."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from featstudy.extraction.module import ExtractionModule, collate

    ns: dict = {"__name__": "recorder"}
    exec(compile(RECORDER, "recorder.py", "exec"), ns)  # its classes, without running its __main__ block
    module = ExtractionModule(ns["Recorder"](str(tmp_path)))
    module.n_features = 1
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False)
    trainer.predict(module, DataLoader(ns["Items"](), batch_size=1, collate_fn=collate), return_predictions=False)
    seen = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    b = torch.backends
    return seen, (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())


def test_single_process_flags_are_set_during_predict_and_restored_after(tmp_path, tf32_on):
    seen, after = _record_here(tmp_path, "32-true")
    assert len(seen) == 1
    assert (seen[0]["cudnn"], seen[0]["matmul"], seen[0]["matmul_precision"]) == (False, False, "highest")
    assert after == (True, True, "high")


def test_mixed_precision_leaves_the_flags_alone(tmp_path, tf32_on):
    seen, after = _record_here(tmp_path, "bf16-mixed")
    assert (seen[0]["cudnn"], seen[0]["matmul"], seen[0]["matmul_precision"]) == (True, True, "high")
    assert after == (True, True, "high")


def _folder(root: Path, n: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + i % 3, 44, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    return {"_target_": "featstudy.datasets.ImageFolder", "name": "imagefolder", "root": str(root), "split": "all", "download": False}


def test_bf16_mixed_features_are_float32_means_not_bf16_values(tmp_path, make_cfg):
    # one crop: nothing is averaged after the layer's spatial mean, so a mean taken in bf16 stays a bf16 value
    cfg = make_cfg(tmp_path / "cache", dataset=_folder(tmp_path / "data"),
                   crops={"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 40, "size": 32}, **{"trainer.precision": "bf16-mixed"})
    emb = load_embedding(get_embedding(cfg).path)
    assert emb.features.dtype == np.float32 and emb.features.shape == (8, 9600)
    conv = np.asarray(emb.features[:, :5504])  # fc7 is one linear output per unit: a bf16 number by nature
    assert np.isfinite(conv).all()
    rounded = torch.from_numpy(conv.copy()).to(torch.bfloat16).float().numpy()
    nonzero = conv != 0
    off_grid = (rounded != conv) & nonzero
    # a bf16 mean puts every value on the bf16 grid (8 significant bits; so did the code before the fix: none off
    # it); a float32 mean of 4 (conv5 at 32 px) to 1024 (conv1) bf16 values lands on it only now and then (about
    # 20% of the values here)
    assert nonzero.sum() > 1000
    assert off_grid.sum() > 0.6 * nonzero.sum(), f"{off_grid.sum()} of {nonzero.sum()} values are not bf16 values"
    # and more distinct values per column than the bf16 grid allows
    distinct = np.mean([len(np.unique(conv[:, j])) for j in range(conv.shape[1])])
    distinct_bf16 = np.mean([len(np.unique(rounded[:, j])) for j in range(rounded.shape[1])])
    assert distinct > distinct_bf16


def _overflowing_weights(path: Path) -> Path:
    """Seeded random VGG19 whose conv3_1 kernel (features.10) is 3e38 everywhere: its input is a ReLU+max-pool
    output (>= 0, not all 0), so any window summing above 1.2 overflows float32 to +inf; earlier layers are
    untouched and finite; later ones see inf * (+/-w) and turn nan."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        net = torchvision.models.vgg19(weights=None)
    with torch.no_grad():
        net.features[10].weight.fill_(3e38)
    torch.save(net.state_dict(), path)
    return path


def test_an_overflowing_layer_stops_the_run_naming_it_and_nothing_is_written(tmp_path, make_cfg):
    # 16-mixed cannot run on CPU (Lightning turns it into bf16-mixed), so the check is shown with an activation that
    # overflows float32 itself under 32-true; 16-mixed takes the same path with the fix named in the message
    weights = _overflowing_weights(tmp_path / "overflow.pth")
    cfg = make_cfg(tmp_path / "cache", weights=weights, dataset=_folder(tmp_path / "data"),
                   crops={"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 40, "size": 32})
    with pytest.raises((ConfigError, DataError)) as err:
        get_embedding(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert "layer conv3_1 overflowed (inf)" in msg  # the first layer in table order that is not finite
    assert "c0/00.png" in msg  # the batch's first image: sorted class folders, sorted names
    assert "trainer.precision=32-true" in msg and "model.weights" in msg
    folder = plan(cfg).folder
    assert not (folder / "DONE").exists() and not (folder / "features.npy").exists()
    assert not list((folder / "shards").glob("shard-*")) if (folder / "shards").exists() else True


NEW_API = r'''
import json, sys
import torch
from omegaconf import OmegaConf
from featstudy.extraction import get_embedding

b = torch.backends
b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = "tf32", "ieee"  # torch >= 2.9's API, set apart
try:
    b.cudnn.allow_tf32
    raise SystemExit("the legacy getter was expected to raise here")
except RuntimeError:
    pass
before = (b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision)
get_embedding(OmegaConf.load(sys.argv[1]))
after = (b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision)
print(json.dumps({"before": before, "after": after}))
'''


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch without the fp32_precision API")
def test_a_32_true_extraction_runs_when_torch_s_new_precision_api_is_in_use(tmp_path, make_cfg):
    # torch >= 2.9 raises on the legacy TF32 getters once conv and rnn were set apart with the new API: the
    # extraction must neither crash on them nor leave its own settings behind
    from omegaconf import OmegaConf

    cfg = make_cfg(tmp_path / "cache", dataset=_folder(tmp_path / "data", n=4),
                   crops={"_target_": "featstudy.transforms.CropSpec", "name": "center", "resize": 40, "size": 32})
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, "-c", NEW_API, str(tmp_path / "cfg.yaml")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    seen = json.loads(p.stdout.strip().splitlines()[-1])
    assert seen["after"] == seen["before"] and seen["before"][:2] == ["tf32", "ieee"]
    assert (plan(cfg).folder / "DONE").exists()
