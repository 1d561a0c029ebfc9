"""Process groups and rank coordination shared by training, evaluation and the benchmarks.

Every rank runs the same collectives in the same order or the job hangs, so
a failure on one rank is turned into an error on all of them here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from sidrank.schema import DataError


DEVICES = ("cpu", "cuda")


def resolve_device(requested: str | None) -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` or ``cpu``; None means cuda when torch sees a GPU.

    Raises:
        DataError: cuda requested but torch sees none (a CPU build, or no driver), or fewer GPUs than local ranks.
    """
    if requested not in (None, *DEVICES):
        raise DataError(f"--device {requested}: expected one of {DEVICES} (or none: cuda when available)")
    kind = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not torch.cuda.is_available():
        raise DataError(
            f"--device cuda: torch {torch.__version__} sees no GPU (CUDA build: {torch.version.cuda or 'no'}); "
            f"install the CUDA torch and fbgemm-gpu (`python -m benchmarks.gpu_smoke --print-install`) or pass --device cpu"
        )
    if local_rank >= torch.cuda.device_count():
        raise DataError(f"--device cuda: LOCAL_RANK {local_rank} but {torch.cuda.device_count()} GPUs on this host; "
                        f"start at most that many processes per node (torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device = torch.device("cpu")) -> bool:
    """Join torchrun's group (NCCL on GPUs, gloo on CPU), or form a one-process group; True if this call created it."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        # torchrun keeps one store across restarts (--max-restarts): without a prefix per attempt, a
        # restarted rank reads the dead ranks' addresses and times out connecting to them.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt-{attempt}", store), rank=rank,
                                world_size=world)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def on_rank0(fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 while the others wait; a failure there stops every rank instead of hanging them."""
    if not dist.is_initialized():
        fn()
        return
    error = [None]
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as exc:
            error = [f"{type(exc).__name__}: {exc}"]
            dist.broadcast_object_list(error, src=0)
            raise
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"rank 0 failed: {error[0]}")


def on_every_rank(fn: Callable[[], None]) -> None:
    """Run ``fn`` on every rank; if it fails on any, every rank raises (the others would wait in a collective)."""
    failure = None
    try:
        fn()
    except Exception as exc:
        failure = exc
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if failure is None else f"{type(failure).__name__}: {failure}")
        failed = [(rank, error) for rank, error in enumerate(errors) if error is not None]
        if failed and failure is None:
            raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    if failure is not None:
        raise failure


def rank_share(row_ids: np.ndarray, split: str, rank: int, world: int) -> np.ndarray:
    """The row ids of one split (ascending) that this rank encodes.

    Train: every world-th row from ``rank`` (each rank trains on its own
    shard, so no rank holds all rows). Valid/test: one contiguous part, the
    part :func:`score_split` scores; parts differ by at most one row, so no
    rank is left without rows while the split has at least ``world``.
    """
    if split == "train":
        return row_ids[rank::world]
    return np.array_split(row_ids, world)[rank]
