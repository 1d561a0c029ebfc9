"""The environment holds the fbgemm build that matches torch's, and none of the PyPI strangers."""

import importlib.metadata as md
import re
from pathlib import Path

import pytest

from sidrank import envcheck
from builders import PROJECT_ROOT


def test_torchrec_and_the_matching_fbgemm_import():
    import fbgemm_gpu  # noqa: F401
    import torch
    import torchrec

    fbgemm = "fbgemm-gpu-cpu" if torch.version.cuda is None else "fbgemm-gpu"
    assert md.version(fbgemm).split("+")[0] == envcheck.FBGEMM
    assert torchrec.__version__ == envcheck.TORCHREC
    assert envcheck.check() == []


@pytest.mark.parametrize(
    ("torch_cuda", "packages", "problem"),
    [
        (None, {"fbgemm-gpu-cpu": "1.8.0"}, None),
        # The install trap: torchrec's dependency pulls the CUDA fbgemm beside a CPU torch.
        (None, {"fbgemm-gpu-cpu": "1.8.0", "fbgemm-gpu": "1.8.0"}, "CUDA build.*beside a CPU torch"),
        (None, {}, "fbgemm-gpu-cpu is missing"),
        (None, {"fbgemm-gpu-cpu": "1.7.0"}, "1.7.0 installed; this stack needs 1.8.0"),
        ("12.8", {"fbgemm-gpu": "1.8.0+cu128"}, None),
        ("12.8", {"fbgemm-gpu": "1.8.0"}, None),  # PyPI's wheel carries no local tag
        ("12.8", {"fbgemm-gpu-cpu": "1.8.0"}, "CPU build.*beside a CUDA 12.8 torch.*pip install torch==2.13.0 "
                                              "fbgemm-gpu==1.8.0 --index-url https://download.pytorch.org/whl/cu128"),
        ("12.8", {}, "fbgemm-gpu is missing"),
        ("12.8", {"fbgemm-gpu": "1.8.0+cu126"}, r"1.8.0\+cu126 .* needs 1.8.0\+cu128"),
    ],
)
def test_fbgemm_must_match_torchs_build(torch_cuda, packages, problem):
    found = envcheck.fbgemm_problems(torch_cuda, packages)
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and re.search(problem, found[0]), found


def test_our_packages_are_ours():
    import ranking
    import tokenizer

    repo = PROJECT_ROOT
    for module in (tokenizer, ranking):
        assert Path(module.__file__).resolve().is_relative_to(repo), module.__file__


def test_the_makefile_reads_the_pins_from_envcheck_without_the_environment():
    import subprocess
    import sys

    # -S -I: no site-packages, so the pins must come from the standard library alone (make runs it first).
    script = PROJECT_ROOT / "sidrank" / "envcheck.py"
    pins = {
        which: subprocess.run([sys.executable, "-S", "-I", str(script), "--pins", which], check=True,
                              capture_output=True, text=True).stdout.split()
        for which in ("torch", "torchrec")
    }
    assert pins == {
        "torch": [f"torch=={envcheck.TORCH}", f"fbgemm-gpu-cpu=={envcheck.FBGEMM}"],
        "torchrec": [f"torchrec=={envcheck.TORCHREC}"],
    }
    assert "envcheck.py --pins torch" in (PROJECT_ROOT / "Makefile").read_text()
