"""Checkpoints of the ranker: saved sharded by training (DCP), loaded unsharded by serving."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from sidrank import contract
from sidrank.schema import DataError
from ranking.batches import DENSE_FEATURES
from ranking.tables import FeatureConfig, sparse_tables
from ranking.model import ModelConfig, RankerTrain, build_model

log = logging.getLogger(__name__)


def save_checkpoint(state: dict[str, Any], out: Path) -> None:
    """Sharded save of ``state`` into ``out/checkpoint``; a temp folder renamed at the end, never half-written."""
    final, tmp = out / "checkpoint", out / ".checkpoint.tmp"
    if dist.get_rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(state, checkpoint_id=tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


class Loaded(NamedTuple):
    """A checkpoint loaded for serving: the model, the table sizes it was built with, its features, its config."""

    model: RankerTrain
    meta: contract.FeatureMeta
    features: FeatureConfig
    config: dict


def _dcp_load(state: dict, checkpoint: Path) -> None:
    with warnings.catch_warnings():
        # One process without a process group is exactly what no_dist asks for; DCP warns anyway.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=checkpoint, no_dist=True)


def load_checkpoint(checkpoint: Path, meta: contract.FeatureMeta) -> Loaded:
    """Build the run's model unsharded on CPU and load the sharded DCP checkpoint into it.

    The id tables keep the checkpoint's sizes (the store may have grown since
    training; newer ids are served as unknown); every other table must match
    ``meta``.

    Raises:
        DataError: no checkpoint, or tables whose sizes differ from the store's.
    """
    if not (checkpoint / ".metadata").exists():
        raise DataError(f"{checkpoint}: no checkpoint; train with `python -m ranking.train` (--save-checkpoint)")
    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    shapes = {key: tuple(value.size) for key, value in stored.items() if hasattr(value, "size")}
    extra = {"config": "", "best_epoch": -1}
    _dcp_load(extra, checkpoint)
    config = json.loads(extra["config"])
    features, model_cfg = FeatureConfig(**config["features"]), ModelConfig(**config["model"])

    def rows_of(table: str, default: int) -> int:
        found = [
            shape[0] - 1 for key, shape in shapes.items()
            if key.endswith((f"embedding_bags.{table}.weight", f"embeddings.{table}.weight"))
        ]
        return found[0] if found else default

    meta = dataclasses.replace(meta, n_users=rows_of("t_user", meta.n_users), n_items=rows_of("t_item", meta.n_items))
    model = build_model(sparse_tables(meta, features), len(DENSE_FEATURES), model_cfg, device="cpu")
    state = model.state_dict()
    # DMP saves the dense layers under their DDP wrapper ("module."); find the prefix from one key.
    first = next(iter(state))
    prefix = next((key[: -len(first)] for key in shapes if key.endswith(first)), "")
    wrong = [(k, tuple(v.shape), shapes.get(prefix + k)) for k, v in state.items() if shapes.get(prefix + k) != v.shape]
    if wrong:
        raise DataError(
            f"{checkpoint}: parameters (name, from the store's meta, in the checkpoint) {wrong[:3]} differ; the "
            f"store was republished with other vocabularies since training: retrain, or serve with the run's store"
        )
    loaded = {prefix + k: v for k, v in state.items()}
    _dcp_load(loaded, checkpoint)
    model.load_state_dict({k[len(prefix) :]: v for k, v in loaded.items()})
    log.info("loaded %s (best epoch %s, %s)", checkpoint, extra["best_epoch"], config["model"]["arch"])
    return Loaded(model.eval(), meta, features, config)
