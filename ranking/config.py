"""Configuration of a training run, filled from the command line (``python -m ranking.train --help``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sidrank import contract
from sidrank.cli import add_config_arguments, parse_config, parser_for
from sidrank.contract import DatasetPaths
from sidrank.schema import DataError
from ranking.tables import FeatureConfig
from ranking.model import ModelConfig
from ranking.distributed import DEVICES
from ranking.sharding import SPARSE_OPTIMIZERS


@dataclass
class TrainConfig:
    """One training run.

    Args:
        dataset: dataset folder with ``events.parquet`` (row ids and splits).
        repo: Feast repository the training rows come from.
        out: run folder for metrics, predictions and the checkpoint.
        rows: training rows parquet, read as given. None means the cache
            ``<dataset>/rows/<version name>/<service>.parquet``, (re)built from
            Feast by rank 0 when missing or older than the feature meta or the
            repository's SID version registry.
        feature_meta: None means ``<repo>/data/feature_meta/<version name>.json``
            with ``sid_version``, else ``<repo>/data/feature_meta.json`` (the default version).
        sid_version: tokenizer version to train on; None means the feature meta's.
        service: Feast feature service name; None means ``contract.FEATURE_SERVICE`` (every SID version).
        epochs: maximum epochs.
        batch_size: global batch (split evenly across ranks).
        sparse_optimizer: fused optimizer of the embedding tables (``ranking.sharding.SPARSE_OPTIMIZERS``).
        lr_sparse: its learning rate.
        lr_dense: Adam learning rate of the MLPs.
        patience: epochs without a better valid AUC before stopping.
        seed: seeds init and the per-epoch shuffle (shared by all ranks).
        ddr_cap_gb: host memory per rank the planner may fill.
        save_checkpoint: write the best model as ``<out>/checkpoint`` (DCP) and ``<out>/export`` (what serving loads).
        device: ``cpu`` (gloo) or ``cuda`` (NCCL, one GPU per local rank); None means cuda when torch sees a GPU.
        train_pipeline: train through TorchRec's TrainPipelineSparseDist (the next batches' copy to the
            device and input all-to-all overlap this step); None means on GPUs only.
        resume: continue from the last finished epoch in ``<out>/train_state`` when it holds this
            config (all but epochs and patience) at this world size; off: start at epoch 0.
        features: sparse feature selection.
        model: architecture.
    """

    dataset: Path
    repo: Path
    out: Path
    rows: Path | None = None
    feature_meta: Path | None = None
    sid_version: str | None = None
    service: str | None = None
    epochs: int = 10
    batch_size: int = 1024
    sparse_optimizer: str = field(default="sgd", metadata={"choices": tuple(SPARSE_OPTIMIZERS)})
    lr_sparse: float = 0.03
    lr_dense: float = 1e-3
    patience: int = 3
    seed: int = 0
    ddr_cap_gb: float = 4.0
    save_checkpoint: bool = True
    device: str | None = field(default=None, metadata={"choices": DEVICES})
    train_pipeline: bool | None = None
    resume: bool = True
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        for name in ("dataset", "repo", "out", "rows", "feature_meta"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise ValueError(f"sparse_optimizer={self.sparse_optimizer!r}: expected one of {sorted(SPARSE_OPTIMIZERS)}")
        for name in ("lr_sparse", "lr_dense", "ddr_cap_gb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.sid_version is not None:
            contract.sid_version_name(self.sid_version)  # raises on an empty name
        if self.model.fusion == "freq" and not (self.features.use_item_id and self.features.use_sid):
            raise ValueError("fusion='freq' fuses the item-id and SID embeddings: it needs use_item_id and use_sid")
        if self.model.fusion == "freq" and self.features.history != "pooled":
            raise ValueError("fusion='freq' gates the pooled item-id slot: it needs history='pooled'")
        if self.features.history == "attention" and not (self.features.use_item_id or self.features.use_sid):
            raise ValueError("history='attention' attends over item ids or SID prefixes: it needs use_item_id or use_sid")
        if self.model.sid_init != "random" and not self.features.use_sid:
            raise ValueError(f"sid_init={self.model.sid_init!r} initialises the SID tables: it needs use_sid")

    def feature_meta_path(self, meta: contract.FeatureMeta) -> Path:
        """``feature_meta`` or the repository's file of the meta's SID version."""
        return self.feature_meta or contract.RepoPaths(self.repo).feature_meta_path(meta.sid_version)

    def service_for(self, meta: contract.FeatureMeta) -> str:
        """The feature service of the rows: ``service`` or the ranker's (it serves every SID version)."""
        return self.service or contract.FEATURE_SERVICE

    def rows_path_for(self, meta: contract.FeatureMeta) -> Path:
        """``rows`` or the per-version, per-service cache (``DatasetPaths.rows_cache``)."""
        return self.rows or DatasetPaths(self.dataset).rows_cache(meta.sid_version, self.service_for(meta))


def read_meta(cfg: TrainConfig) -> contract.FeatureMeta:
    """The feature meta of the configured SID version; a DataError names both versions when they differ."""
    if cfg.feature_meta is None:
        return contract.RepoPaths(cfg.repo).feature_meta(cfg.sid_version)
    meta = contract.read_feature_meta(cfg.feature_meta)
    if cfg.sid_version is not None and meta.sid_version != cfg.sid_version:
        raise DataError(
            f"{cfg.feature_meta}: key 'sid_version' is '{meta.sid_version}' but the ranker is configured with "
            f"--sid-version '{cfg.sid_version}'; pass the feature meta of '{cfg.sid_version}' or drop --feature-meta"
        )
    return meta


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse command-line flags (unknown flags are an error; ``--config FILE`` replays a run) into a TrainConfig."""
    parser = parser_for("python -m ranking.train", "Train the sharded DLRM/DCN ranker on Feast training rows.")
    add_config_arguments(parser, TrainConfig)
    return parse_config(parser, TrainConfig, argv)
