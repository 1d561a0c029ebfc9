"""Fail fast when fbgemm does not match torch's build, or a stranger package shadows ours.

TorchRec needs fbgemm's kernels built for the same device as torch: the CPU
build ``fbgemm-gpu-cpu`` beside a CPU torch (what ``make venv`` installs),
the CUDA build ``fbgemm-gpu`` beside a CUDA torch (a GPU machine, see
:func:`cuda_install_lines`). The CUDA fbgemm beside a CPU torch is the
install trap: torchrec's declared dependency pulls it (2.7 GB) and the
import breaks. Run by `make venv`; also imported by the install test and
``benchmarks.gpu_smoke``.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

# The stack this project is tested with (the Makefile installs the CPU side).
TORCH, FBGEMM, TORCHREC = "2.13.0", "1.8.0", "1.8.0"
# PyTorch's wheel index for a CUDA variant, e.g. cu128 for CUDA 12.8.
CUDA_INDEX = "https://download.pytorch.org/whl/{tag}"


def cuda_tag(torch_cuda: str) -> str:
    """``12.8`` -> ``cu128``: the local version tag of torch's and fbgemm's CUDA wheels."""
    return "cu" + torch_cuda.replace(".", "")


DEFAULT_CUDA_TAG = "cu128"  # the CUDA variant the GPU install lines name unless told another


def cuda_install_lines(tag: str = DEFAULT_CUDA_TAG) -> list[str]:
    """The pip commands that turn this venv into a GPU one (CUDA torch, the matching fbgemm-gpu, torchrec)."""
    index = CUDA_INDEX.format(tag=tag)
    return [
        "pip uninstall -y torch fbgemm-gpu-cpu",
        f"pip install torch=={TORCH} fbgemm-gpu=={FBGEMM} --index-url {index}",
        f"pip install --no-deps torchrec=={TORCHREC}",
        "python -m sidrank.envcheck",
    ]


def fbgemm_problems(torch_cuda: str | None, packages: dict[str, str]) -> list[str]:
    """What is wrong with the fbgemm next to a torch of CUDA version ``torch_cuda`` (None: a CPU build).

    Args:
        torch_cuda: ``torch.version.cuda``.
        packages: installed distribution name (lower case, ``-``) -> version.
    """
    cpu, cuda = packages.get("fbgemm-gpu-cpu"), packages.get("fbgemm-gpu")
    if torch_cuda is None:
        if cuda is not None:
            return [f"fbgemm-gpu {cuda} (CUDA build) is installed beside a CPU torch; `pip uninstall fbgemm-gpu` "
                    f"and install torchrec with --no-deps"]
        if cpu is None:
            return [f"fbgemm-gpu-cpu is missing; `pip install fbgemm-gpu-cpu=={FBGEMM}`"]
        return [] if cpu.split("+")[0] == FBGEMM else [f"fbgemm-gpu-cpu {cpu} installed; this stack needs {FBGEMM}"]
    tag, fix = cuda_tag(torch_cuda), "; ".join(cuda_install_lines(cuda_tag(torch_cuda))[:2])
    if cpu is not None:
        return [f"fbgemm-gpu-cpu {cpu} (CPU build) is installed beside a CUDA {torch_cuda} torch; {fix}"]
    if cuda is None:
        return [f"fbgemm-gpu is missing beside a CUDA {torch_cuda} torch; {fix}"]
    version, _, local = cuda.partition("+")
    if version != FBGEMM or local not in ("", tag):
        return [f"fbgemm-gpu {cuda} installed beside torch for CUDA {torch_cuda}; this stack needs {FBGEMM}+{tag}: {fix}"]
    return []


def installed() -> dict[str, str]:
    """Installed distributions: name (lower case, ``-``) -> version."""
    return {d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions()}


def check() -> list[str]:
    """Return a list of problems with the installed stack (empty when sound)."""
    packages = installed()
    problems = []
    for stranger in ("tokenizer", "ranking"):
        if stranger in packages:
            problems.append(f"PyPI package '{stranger}' is installed and shadows ours; `pip uninstall {stranger}`")
    try:
        import torch

        problems += fbgemm_problems(torch.version.cuda, packages)
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except Exception as exc:  # any import failure is the problem to report
        problems.append(f"import torch/torchrec/fbgemm_gpu failed: {exc!r}")
    return problems


def cpu_install_args() -> tuple[list[str], list[str]]:
    """The CPU stack's pip arguments: (torch + fbgemm-gpu-cpu, torchrec installed with --no-deps)."""
    return [f"torch=={TORCH}", f"fbgemm-gpu-cpu=={FBGEMM}"], [f"torchrec=={TORCHREC}"]


if __name__ == "__main__":
    # `python sidrank/envcheck.py --pins torch|torchrec` needs only the standard library: the Makefile
    # reads the pins from here before the environment exists, so they are written in one place.
    if sys.argv[1:2] == ["--pins"]:
        torch_args, torchrec_args = cpu_install_args()
        print(" ".join(torch_args if sys.argv[2:] == ["torch"] else torchrec_args))
        sys.exit(0)
    found = check()
    for line in found:
        print(f"envcheck: {line}", file=sys.stderr)
    sys.exit(1 if found else 0)
