"""Checkpoints of the ranker: per-epoch training state and the best model, sharded (DCP); loaded unsharded.

``<out>/train_state/epoch-NNNN/`` holds everything a restarted job needs to
continue exactly where the epoch ended: the sharded model (fused optimizer
state inside TorchRec's tables), the dense optimizer, every rank's RNG and a
``progress.json`` (epoch, best epoch and AUC, history, the config it belongs
to). The data order is a function of (seed, epoch, rank), so the epoch
number is the data-order state. A folder is written under a temporary name
and renamed, so a folder with its final name is complete; the last epoch
and the best epoch are kept, older ones deleted.

DCP reads ``.metadata`` and non-tensor entries with pickle: these folders are
for the training job that wrote them. Serving reads the weights-only export
(``ranking.export``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from sidrank import contract
from sidrank.io import read_json, write_json
from sidrank.schema import DataError
from ranking.batches import DENSE_FEATURES
from ranking.tables import FeatureConfig, sparse_tables
from ranking.model import ModelConfig, RankerTrain, build_model

log = logging.getLogger(__name__)

STATE_DIR = "train_state"
PROGRESS_FILE = "progress.json"
_EPOCH_DIR = re.compile(r"epoch-(\d{4,})")


def save_dcp(state: dict[str, Any], final: Path, progress: dict | None = None) -> None:
    """Sharded save of ``state`` (all ranks) into ``final``: a temporary sibling renamed at the end, never half-written.

    ``progress`` is written by rank 0 as ``progress.json`` inside the folder before the rename.
    """
    tmp = final.with_name(f".{final.name}.tmp")
    if dist.get_rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(state, checkpoint_id=tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        if progress is not None:
            write_json(progress, tmp / PROGRESS_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()


def save_checkpoint(state: dict[str, Any], out: Path) -> None:
    """The best model (plus ``config`` and ``best_epoch``) as ``out/checkpoint``."""
    save_dcp(state, out / "checkpoint")


@dataclasses.dataclass
class Progress:
    """Where training stands after an epoch; ``progress.json`` of an epoch folder.

    Args:
        epoch: the last finished epoch.
        best_epoch: the epoch with the best valid AUC so far (its folder is kept).
        best_auc: that AUC.
        history: one dict per finished epoch (``metrics.json["history"]``).
        stopped: early stopping fired after ``epoch``.
        config: the run's resolved config; a state of another config is not resumed.
        world: the world size; the data shards depend on it, so another one starts afresh.
    """

    epoch: int
    best_epoch: int
    best_auc: float
    history: list[dict]
    stopped: bool
    config: dict
    world: int


# What a resumed run may change: the budget (more epochs or patience continue a run) and how it runs
# (its own folder's spelling, device, loop, what is saved at the end); the data and the model must match.
NOT_RESUME_RELEVANT = (
    "epochs", "patience", "out", "device", "train_pipeline", "save_checkpoint", "resume", "ddr_cap_gb",
)


def _resumable(config: dict) -> dict:
    """The config a resumed run must share with its state (all but NOT_RESUME_RELEVANT)."""
    return {k: v for k, v in config.items() if k not in NOT_RESUME_RELEVANT}


def epoch_dir(out: Path, epoch: int) -> Path:
    """``<out>/train_state/epoch-NNNN``."""
    return out / STATE_DIR / f"epoch-{epoch:04d}"


def _complete_epochs(out: Path) -> list[int]:
    state = out / STATE_DIR
    found = [_EPOCH_DIR.fullmatch(p.name) for p in state.iterdir()] if state.is_dir() else []
    return sorted(int(m.group(1)) for m in found if m and (state / m.group(0) / PROGRESS_FILE).exists())


def _training_state(dmp: DistributedModelParallel, opt: CombinedOptimizer) -> dict[str, Any]:
    """Model, optimizers and every rank's RNG ([world, n] uint8 rows, the same tensor on every rank)."""
    rng = [None] * dist.get_world_size()
    dist.all_gather_object(rng, _rng_state(dmp.device))
    # Fused SGD keeps no state; DCP saves nothing for its empty per-table dicts but would look them up on load.
    optim = opt.state_dict()
    optim["state"] = {key: value for key, value in optim["state"].items() if value}
    return {"model": dmp.state_dict(), "optim": optim, "rng": torch.stack(rng)}


def _rng_state(device: torch.device) -> torch.Tensor:
    """This process's CPU generator state, then (on a GPU) its device's: uint8 [n]."""
    cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    return torch.cat([torch.get_rng_state(), *cuda])


def save_epoch(dmp: DistributedModelParallel, opt: CombinedOptimizer, out: Path, progress: Progress) -> None:
    """Checkpoint the state after ``progress.epoch``; then drop every older folder but the best epoch's."""
    save_dcp(_training_state(dmp, opt), epoch_dir(out, progress.epoch), dataclasses.asdict(progress))
    if dist.get_rank() == 0:
        for epoch in _complete_epochs(out):
            if epoch not in (progress.epoch, progress.best_epoch):
                shutil.rmtree(epoch_dir(out, epoch))
    dist.barrier()


def _dcp_load(state: dict, checkpoint: Path, *, no_dist: bool = False) -> None:
    with warnings.catch_warnings():
        # One process without a process group is exactly what no_dist asks for; DCP warns anyway.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=checkpoint, no_dist=no_dist)


def resume(dmp: DistributedModelParallel, opt: CombinedOptimizer, out: Path, config: dict) -> Progress | None:
    """Load the last complete epoch state of this config and world size into ``dmp``, ``opt`` and the RNG.

    Returns its progress, or None (nothing to resume: start at epoch 0).
    """
    progress = [None]
    if dist.get_rank() == 0:
        epochs = _complete_epochs(out)
        found = Progress(**read_json(epoch_dir(out, epochs[-1]) / PROGRESS_FILE)) if epochs else None
        if found is not None and (_resumable(found.config) != _resumable(config) or found.world != dist.get_world_size()):
            log.info("%s: a state of another config or world size; starting at epoch 0", out / STATE_DIR)
            found = None
        progress = [found]
    dist.broadcast_object_list(progress, src=0)
    if progress[0] is None:
        return None
    # Adam's state appears at its first step; an all-zero step creates it (and moves nothing) so DCP can
    # fill it. The fused optimizers' state lives in the tables (a zero step would create entries DCP never saved).
    for _, optimizer in opt.optimizers:
        if isinstance(optimizer, KeyedOptimizerWrapper) and not optimizer.state:
            optimizer.init_state()
    state = _training_state(dmp, opt)
    _dcp_load(state, epoch_dir(out, progress[0].epoch))
    dmp.load_state_dict(state["model"])
    optim = opt.state_dict()
    optim["state"].update(state["optim"]["state"])
    opt.load_state_dict(optim)
    mine = state["rng"][dist.get_rank()].clone()  # a row view at an offset crashes set_rng_state
    cpu = len(torch.get_rng_state())
    torch.set_rng_state(mine[:cpu])
    if dmp.device.type == "cuda":
        torch.cuda.set_rng_state(mine[cpu:], dmp.device)
    log.info("resumed from %s (best epoch %d)", epoch_dir(out, progress[0].epoch), progress[0].best_epoch)
    return progress[0]


def load_best(dmp: DistributedModelParallel, out: Path, best_epoch: int) -> None:
    """Load the model of the best epoch's folder into ``dmp`` (all ranks)."""
    state = {"model": dmp.state_dict()}
    _dcp_load(state, epoch_dir(out, best_epoch))
    dmp.load_state_dict(state["model"])


class Loaded(NamedTuple):
    """A checkpoint loaded for serving: the model, the table sizes it was built with, its features, its config."""

    model: RankerTrain
    meta: contract.FeatureMeta
    features: FeatureConfig
    config: dict


def unsharded_model(config: dict, meta: contract.FeatureMeta, shapes: dict[str, tuple], source: Path) -> Loaded:
    """The run's model built on CPU for ``meta``'s table sizes, its parameters not yet loaded.

    Args:
        config: the run's resolved config (``metrics.json["config"]``).
        meta: table sizes to build with.
        shapes: parameter name (unsharded) -> shape of what will be loaded.
        source: the file named in errors.

    Raises:
        DataError: a parameter whose shape differs from ``shapes`` (or is missing there).
    """
    features, model_cfg = FeatureConfig(**config["features"]), ModelConfig(**config["model"])
    model = build_model(sparse_tables(meta, features), len(DENSE_FEATURES), model_cfg, device="cpu")
    wrong = [(k, tuple(v.shape), shapes.get(k)) for k, v in model.state_dict().items() if shapes.get(k) != v.shape]
    if wrong:
        raise DataError(
            f"{source}: parameters (name, from the store's meta, in the checkpoint) {wrong[:3]} differ; the "
            f"store was republished with other vocabularies since training: retrain, or serve with the run's store"
        )
    return Loaded(model, meta, features, config)


def load_checkpoint(checkpoint: Path, meta: contract.FeatureMeta) -> Loaded:
    """Build the run's model unsharded on CPU and load the sharded DCP checkpoint into it.

    DCP unpickles: only for folders this project wrote (serving loads ``ranking.export``).
    The id tables keep the checkpoint's sizes (the store may have grown since
    training; newer ids are served as unknown); every other table must match
    ``meta``.

    Raises:
        DataError: no checkpoint, or tables whose sizes differ from the store's.
    """
    if not (checkpoint / ".metadata").exists():
        raise DataError(f"{checkpoint}: no checkpoint; train with `python -m ranking.train` (--save-checkpoint)")
    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    # DMP saves the dense layers under their DDP wrapper: "module." somewhere inside the name.
    shapes = {key.replace("module.", ""): tuple(value.size) for key, value in stored.items() if hasattr(value, "size")}
    extra = {"config": "", "best_epoch": -1}
    _dcp_load(extra, checkpoint, no_dist=True)
    config = json.loads(extra["config"])

    def rows_of(table: str, default: int) -> int:
        found = [
            shape[0] - 1 for key, shape in shapes.items()
            if key.endswith((f"embedding_bags.{table}.weight", f"embeddings.{table}.weight"))
        ]
        return found[0] if found else default

    meta = dataclasses.replace(meta, n_users=rows_of("t_user", meta.n_users), n_items=rows_of("t_item", meta.n_items))
    loaded = unsharded_model(config, meta, shapes, checkpoint)
    names = {key.replace("module.", ""): key for key in stored}
    state = {names[k]: v for k, v in loaded.model.state_dict().items()}
    _dcp_load(state, checkpoint, no_dist=True)
    loaded.model.load_state_dict({k.replace("module.", ""): v for k, v in state.items()})
    log.info("loaded %s (best epoch %s, %s)", checkpoint, extra["best_epoch"], config["model"]["arch"])
    return loaded._replace(model=loaded.model.eval())
