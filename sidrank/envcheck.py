"""Fail fast when the environment has the CUDA fbgemm or a stranger package.

Run by `make venv`; also imported by the install test.
"""

from __future__ import annotations

import importlib.metadata as md
import sys


def check() -> list[str]:
    """Return a list of problems with the installed stack (empty when sound)."""
    problems = []
    installed = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}
    if "fbgemm-gpu" in installed:
        problems.append("fbgemm-gpu (CUDA build) is installed; `pip uninstall fbgemm-gpu` and install torchrec with --no-deps")
    if "fbgemm-gpu-cpu" not in installed:
        problems.append("fbgemm-gpu-cpu is missing; `pip install fbgemm-gpu-cpu==1.8.0`")
    for stranger in ("tokenizer", "ranking"):
        if stranger in installed:
            problems.append(f"PyPI package '{stranger}' is installed and shadows ours; `pip uninstall {stranger}`")
    try:
        import fbgemm_gpu  # noqa: F401
        import torch
        import torchrec  # noqa: F401

        if torch.version.cuda is not None:
            problems.append(f"torch {torch.__version__} is a CUDA build; install torch==2.13.0 (CPU wheel)")
    except Exception as exc:  # any import failure is the problem to report
        problems.append(f"import torchrec/fbgemm_gpu failed: {exc!r}")
    return problems


if __name__ == "__main__":
    found = check()
    for line in found:
        print(f"envcheck: {line}", file=sys.stderr)
    sys.exit(1 if found else 0)
