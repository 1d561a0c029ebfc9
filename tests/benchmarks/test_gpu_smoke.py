"""The GPU smoke test fails loudly without a GPU (never skips) and prints the CUDA install lines."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sidrank import envcheck
from sidrank.schema import DataError
from benchmarks import gpu_smoke
from builders import PROJECT_ROOT


def test_without_a_gpu_it_fails_with_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DataError, match="sees no GPU .* on a GPU machine run: pip uninstall -y torch fbgemm-gpu-cpu"):
        gpu_smoke.main(["--no-prepare"])


def test_the_command_exits_non_zero_with_one_line_when_no_gpu_is_visible() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "sees no GPU" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_print_install_names_the_matching_cuda_wheels(capsys) -> None:
    gpu_smoke.main(["--print-install", "--cuda-tag", "cu126"])
    out = capsys.readouterr().out
    assert f"fbgemm-gpu=={envcheck.FBGEMM} --index-url https://download.pytorch.org/whl/cu126" in out
    assert f"torchrec=={envcheck.TORCHREC}" in out
