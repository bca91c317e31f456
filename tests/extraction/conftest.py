"""Fixtures for extraction tests: a seeded random VGG19 saved to a file, an awkward image folder."""

from __future__ import annotations

import pytest
import torch

from extract_helpers import awkward_folder


@pytest.fixture(scope="session")
def vgg_file(tmp_path_factory):
    """Seeded random VGG19 weights saved as a state_dict file (what a user's local .pth looks like)."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        net = torchvision.models.vgg19(weights=None)
    path = tmp_path_factory.mktemp("weights") / "vgg19-random-1234.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def awkward(tmp_path):
    return awkward_folder(tmp_path / "awkward")
