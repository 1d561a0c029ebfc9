"""GPU smoke test of the ranker: the CUDA stack checked, the demo trained on 1 GPU, on all GPUs and on CPU.

    python -m benchmarks.gpu_smoke                  # on a GPU machine, after the pip lines below
    python -m benchmarks.gpu_smoke --print-install  # the pip lines that turn this venv into a CUDA one

It first checks that torch sees a GPU and that fbgemm is the CUDA build of
torch's CUDA version (``sidrank.envcheck``); if not, it fails with exit 1
and one line naming the fix (it never skips, and never downloads wheels
itself). Then it prepares the demo's dataset and Feast store (the stages of
``python -m demo``), trains the demo's ranker for ``--epochs`` epochs under
torchrun with ``--device cuda`` on 1 GPU and on every GPU of the host, and
with ``--device cpu`` on ``--cpu-nproc`` ranks, and writes samples/s, train
time and test/valid AUC of each run to
``benchmarks/results/gpu_smoke.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.report import RESULTS_DIR, markdown_table, rerun_command, write_results
from demo import DemoConfig, run_stage, stage_commands
from sidrank import envcheck
from sidrank.cli import add_config_arguments, parse_config, parser_for, run_main
from sidrank.io import read_json
from sidrank.schema import DataError


@dataclass
class GpuSmokeConfig:
    """What the smoke test runs.

    Args:
        dataset: demo dataset name (``ml-100k`` or ``synthetic``).
        epochs: ranker epochs per run (early stopping may end sooner).
        batch_size: global batch of every run.
        cpu_nproc: CPU ranks of the comparison run; 0 skips it.
        prepare: run the demo's ingest, tokenizer, features and Feast stages first.
        print_install: only print the pip commands for a CUDA venv (``--cuda-tag``) and exit.
        cuda_tag: PyTorch wheel index of the CUDA version to install (cu128 = CUDA 12.8).
        artifacts: root of the dataset folders.
        runs: folder of the runs (one subfolder each).
        results_dir: where the JSON and Markdown results go.
        name: results file stem.
    """

    dataset: str = "ml-100k"
    epochs: int = 3
    batch_size: int = 4096
    cpu_nproc: int = 2
    prepare: bool = True
    print_install: bool = False
    cuda_tag: str = envcheck.DEFAULT_CUDA_TAG
    artifacts: Path = DemoConfig.artifacts
    runs: Path = Path("artifacts/bench/gpu_smoke")
    results_dir: Path = RESULTS_DIR
    name: str = "gpu_smoke"


def require_gpus(cuda_tag: str) -> int:
    """The number of GPUs torch sees, after checking the CUDA stack.

    Raises:
        DataError: no GPU visible, or fbgemm not the CUDA build of torch's version; names the pip lines.
    """
    if not torch.cuda.is_available():
        raise DataError(
            f"gpu_smoke: --device cuda asked for, but torch {torch.__version__} sees no GPU (CUDA build: "
            f"{torch.version.cuda or 'no'}); on a GPU machine run: {' && '.join(envcheck.cuda_install_lines(cuda_tag))}"
        )
    problems = envcheck.check()
    if problems:
        raise DataError(f"gpu_smoke: the CUDA stack is not sound: {'; '.join(problems)}")
    return torch.cuda.device_count()


def train_run(cfg: GpuSmokeConfig, demo: DemoConfig, label: str, nproc: int, device: str) -> dict:
    """One torchrun ranker run of the demo; its metrics with the run's label."""
    out = cfg.runs / label.replace(" ", "_")
    ranker = stage_commands(dataclasses.replace(demo, out=out, nproc=nproc))[-1][1]
    flags = ["--device", device, "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--no-resume"]
    run_stage(f"ranker on {label}", [*ranker, *flags])
    metrics = read_json(out / "metrics.json")
    return {"run": label, "device": device, "ranks": nproc, **{k: metrics[k] for k in (
        "samples_per_s", "test_auc", "valid_auc", "best_epoch", "epochs_run")}, "train_s": metrics["timings"]["train_s"]}


def run(cfg: GpuSmokeConfig, command: str) -> dict:
    """Check the stack, prepare the demo, train on 1 GPU, all GPUs and CPU; write and return the results."""
    n_gpus = require_gpus(cfg.cuda_tag)
    demo = DemoConfig(dataset=cfg.dataset, artifacts=cfg.artifacts)
    if cfg.prepare:
        for name, argv in stage_commands(demo)[:-1]:
            run_stage(name, argv)
    plans = [("1 GPU", 1, "cuda")] + ([(f"{n_gpus} GPUs", n_gpus, "cuda")] if n_gpus > 1 else [])
    plans += [(f"CPU x{cfg.cpu_nproc}", cfg.cpu_nproc, "cpu")] if cfg.cpu_nproc else []
    runs = [train_run(cfg, demo, *plan) for plan in plans]
    cpu = next((r for r in runs if r["device"] == "cpu"), None)
    for r in runs:
        r["speedup_vs_cpu"] = r["samples_per_s"] / cpu["samples_per_s"] if cpu else None
        r["test_auc_minus_cpu"] = r["test_auc"] - cpu["test_auc"] if cpu else None
    table = markdown_table(
        ["run", "ranks", "samples/s", "x CPU", "train s", "test AUC", "valid AUC", "test AUC - CPU"],
        [[r["run"], str(r["ranks"]), f"{r['samples_per_s']:.0f}",
          "" if r["speedup_vs_cpu"] is None else f"{r['speedup_vs_cpu']:.1f}", f"{r['train_s']:.1f}",
          f"{r['test_auc']:.4f}", f"{r['valid_auc']:.4f}",
          "" if r["test_auc_minus_cpu"] is None else f"{r['test_auc_minus_cpu']:+.4f}"] for r in runs],
    )
    payload = {"config": dataclasses.asdict(cfg), "gpus": [torch.cuda.get_device_name(i) for i in range(n_gpus)],
               "torch_cuda": torch.version.cuda, "runs": runs}
    write_results(cfg.name, payload, table, command, cfg.results_dir)
    print(table)
    return payload


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = parser_for("python -m benchmarks.gpu_smoke", __doc__.splitlines()[0])
    add_config_arguments(parser, GpuSmokeConfig)
    cfg = parse_config(parser, GpuSmokeConfig, argv)
    if cfg.print_install:
        print("\n".join(envcheck.cuda_install_lines(cfg.cuda_tag)))
        return None
    return run(cfg, rerun_command("benchmarks.gpu_smoke", argv))


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.gpu_smoke")
