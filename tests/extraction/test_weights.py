"""model.weights: local files (sha256, strict keys and shapes), torchvision enums offline, random; never a fallback."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from featstudy.errors import ConfigError, DataError
from featstudy.models import weights as W


def test_file_weights_tag_is_sha256_and_load_strictly(vgg_file):
    src = W.resolve("vgg19", str(vgg_file))
    assert src.kind == "file" and src.tag == f"file:{W.sha256_of(vgg_file)}" and len(src.sha256) == 64
    state, digest = W.load_state_dict(src)
    net = torchvision.models.vgg19(weights=None)
    W.load_strict(net, state, vgg_file)
    torch.testing.assert_close(net.features[0].weight, state["features.0.weight"])
    assert digest == src.sha256


def test_safetensors_and_key_errors(tmp_path):
    from safetensors.torch import save_file

    net = torchvision.models.resnet18(weights=None)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    good = tmp_path / "r18.safetensors"
    save_file(state, str(good))
    loaded, _ = W.load_state_dict(W.resolve("resnet18", str(good)))
    W.load_strict(torchvision.models.resnet18(weights=None), loaded, good)

    missing = dict(state)
    del missing["layer2.0.conv1.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    loaded, _ = W.load_state_dict(W.resolve("resnet18", str(tmp_path / "missing.pth")))
    with pytest.raises(DataError, match=r"missing key 'layer2.0.conv1.weight'"):
        W.load_strict(torchvision.models.resnet18(weights=None), loaded, tmp_path / "missing.pth")

    wrong = dict(state)
    wrong["fc.weight"] = torch.zeros(10, 512)
    torch.save(wrong, tmp_path / "wrong.pth")
    loaded, _ = W.load_state_dict(W.resolve("resnet18", str(tmp_path / "wrong.pth")))
    with pytest.raises(DataError, match=r"'fc.weight' has shape \(10, 512\).*\(1000, 512\)"):
        W.load_strict(torchvision.models.resnet18(weights=None), loaded, tmp_path / "wrong.pth")


def test_unreadable_or_absent_file(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"model.weights: .*garbage.pth: not a readable state_dict"):
        W.load_state_dict(W.resolve("vgg19", str(bad)))
    with pytest.raises(DataError, match=r"model.weights: .*nope.pth: no such file"):
        W.resolve("vgg19", str(tmp_path / "nope.pth"))


def test_enum_offline_names_the_file_and_never_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))

    def no_network(url, dst, prefix):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(W, "_download", no_network)
    src = W.resolve("vgg19", "IMAGENET1K_V1")
    assert src.kind == "torchvision" and src.tag == "IMAGENET1K_V1"
    assert src.path == tmp_path / "th" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    with pytest.raises(DataError, match=r"IMAGENET1K_V1 needs .*vgg19-dcbb9e9d.pth.*model.weights=/path/file.pth"):
        W.load_state_dict(src)
    assert W.resolve("vgg19", "VGG19_Weights.IMAGENET1K_V1").tag == "IMAGENET1K_V1"
    assert W.resolve("vgg19", "DEFAULT").tag == "IMAGENET1K_V1"


def test_enum_file_present_is_used_offline_after_hash_check(tmp_path, monkeypatch, vgg_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(W, "_download", lambda *a: pytest.fail("must not download a file that is present"))
    src = W.resolve("vgg19", "IMAGENET1K_V1")
    src.path.parent.mkdir(parents=True)
    src.path.symlink_to(vgg_file)  # right name, wrong content: its sha256 does not start with dcbb9e9d
    with pytest.raises(DataError, match=r"does not match the name's dcbb9e9d"):
        W.load_state_dict(src)


def test_unknown_enum_lists_valid_names():
    with pytest.raises(ConfigError, match=r"model.weights: 'IMAGENET9K'.*IMAGENET1K_V1"):
        W.resolve("vgg19", "IMAGENET9K")


def test_random_is_seeded_and_tagged():
    from omegaconf import OmegaConf

    from featstudy import models

    def first_conv(seed):
        ms = models.spec(OmegaConf.create({"_target_": "featstudy.models.TorchvisionModel", "name": "resnet18", "weights": "random", "seed": seed, "nodes": ["flatten"]}))
        net, digest = models.build_network(ms)
        assert ms.weights.tag == "random" and digest is None
        return net.conv1.weight.detach().clone()

    torch.testing.assert_close(first_conv(3), first_conv(3))
    assert not torch.equal(first_conv(3), first_conv(4))


def test_sha256_is_remembered_per_file_state_and_recomputed_after_a_change(tmp_path):
    import hashlib
    import os

    f = tmp_path / "w.pth"
    f.write_bytes(b"a" * 1000)
    first = W.sha256_of(f)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest() and W.sha256_of(f) == first
    st = f.stat()
    f.write_bytes(b"b" * 1000)  # same size; the mtime moves on
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert W.sha256_of(f) == hashlib.sha256(b"b" * 1000).hexdigest()
