"""The environment holds the CPU fbgemm build and none of the PyPI strangers."""

import importlib.metadata as md
from pathlib import Path

from sidrank import envcheck
from builders import PROJECT_ROOT


def test_torchrec_and_cpu_fbgemm_import():
    import fbgemm_gpu  # noqa: F401
    import torch
    import torchrec

    assert torch.version.cuda is None, "torch must be the CPU build"
    assert md.version("fbgemm-gpu-cpu") == "1.8.0"
    assert torchrec.__version__ == "1.8.0"


def test_cuda_fbgemm_absent():
    names = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}
    assert "fbgemm-gpu" not in names
    assert envcheck.check() == []


def test_our_packages_are_ours():
    import ranking
    import tokenizer

    repo = PROJECT_ROOT
    for module in (tokenizer, ranking):
        assert Path(module.__file__).resolve().is_relative_to(repo), module.__file__
