"""MMQ stage 2: behaviour-aware fine-tuning of the semantic IDs (Xu et al. 2025; DESIGN.md section 6).

    python -m tokenizer.finetune --dataset artifacts/ml-100k --sid-version LATEST \\
        --epochs 3 --tau 1.0 --recon-weight 1.0 --lr 1e-3

Phases: load the stage-1 :class:`~tokenizer.mmq.MMQ` of ``D/sids/<version>/``
(``codebooks.pt`` holds its ``config`` and ``state_dict``) and the item
modalities; read the cached Feast rows ``D/rows/ranker_v1.parquet`` and keep
the TRAIN rows (split from ``D/events.parquet``) for training and the valid
rows for evaluation only; test rows are dropped on reading. Then train a
small click model jointly with the tokenizer:

* item vector = sum over SID positions p of ``st_p @ T_p``, where ``st_p``
  [B, K] is the straight-through code assignment (one-hot of the hard code
  forward, gradient of softmax(-distance / tau) backward) and ``T_p`` [K, Z]
  the position's SID embedding table, initialised from the codebook;
* user vector = user-id embedding + linear map of the log1p behaviour counts;
* logit = MLP([user, item, user * item, log1p counts]);
* loss = click BCE + ``recon_weight`` x multimodal reconstruction +
  ``quant_weight`` x quantisation (commitment + codebook) losses, both on the
  batch's (train) items, so the click loss reaches the experts while the
  reconstruction keeps the content. The quantisation term keeps the codebooks
  on the moving encoder outputs: without it (``--quant-weight 0``) on
  MovieLens-100K the code usage fell from 1.00 per position to
  0.22/0.08/0.45/0.55 and full-code collisions rose from 2% to 58% in 3 epochs.

The epoch count is fixed: valid rows only report AUC / log loss, never pick
an epoch, so valid/test labels cannot reach the codes. The tokenizer runs in
eval mode (no dead-code resets) with gradients on. Afterwards every item is
encoded with hard codes and written as a NEW version ``mmq-ft-<hash>`` with the
same contract (``tokenizer.train.sid_table`` / ``write_version``); its
``metrics.json`` adds ``parent_version`` and ``changed_items_share`` (items
whose full code changed), and ``D/sids/LATEST`` moves to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from sidrank.io import read_json
from sidrank.schema import DataError, check_ids_in_range, require_columns, require_file, validate_sids
from sidrank.contract import DatasetPaths
from sidrank.metrics import auc, logloss
from sidrank.contract import ITEM_COUNT_COLUMNS, LATEST, USER_COUNT_COLUMNS
from tokenizer.metrics import summary_line, tokenizer_metrics
from tokenizer.mmq import MMQ, MMQConfig
from tokenizer.modalities import INGEST_COMMAND, read_modalities
from tokenizer.train import ground_truth_clusters, modality_metrics, sid_table, write_version

logger = logging.getLogger(__name__)

COUNT_COLUMNS = (*USER_COUNT_COLUMNS, *ITEM_COUNT_COLUMNS)
ROW_COLUMNS = ("row_id", "user_id", "item_id", "label", *COUNT_COLUMNS)
ROWS_COMMAND = "python -m ranking.train --dataset <D> --repo feature_repo --out <run> --sid-version <V> (it caches D/rows/<V>/)"
TRAIN_COMMAND = "python -m tokenizer.train --dataset <D> --method mmq"


@dataclass
class FinetuneConfig:
    """One stage-2 run.

    Args:
        dataset: dataset folder (sidrank.schema.DatasetPaths root).
        sid_version: stage-1 (or earlier fine-tuned) MMQ version, or ``LATEST``.
        rows: training rows parquet; None = the parent version's Feast rows cache (``DatasetPaths.rows_cache``).
        epochs: fixed number of passes over the train rows (no early stopping).
        batch_size: rows per step.
        lr: Adam learning rate of tokenizer and click model.
        tau: temperature of the soft code assignment.
        recon_weight: lambda, weight of the multimodal reconstruction loss.
        quant_weight: weight of the experts' commitment + codebook losses.
        hidden_dim: width of the click model's MLP.
        seed: seed of the click model's init and of the row order.
    """

    dataset: Path
    sid_version: str = LATEST
    rows: Path | None = None
    epochs: int = 3
    batch_size: int = 1024
    lr: float = 1e-3
    tau: float = 1.0
    recon_weight: float = 1.0
    quant_weight: float = 1.0
    hidden_dim: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        self.dataset = Path(self.dataset)
        self.rows = None if self.rows is None else Path(self.rows)
        for name in ("epochs", "batch_size", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if not (self.lr > 0 and self.tau > 0 and self.recon_weight >= 0 and self.quant_weight >= 0):
            raise ValueError(
                f"lr={self.lr}, tau={self.tau}, recon_weight={self.recon_weight}, quant_weight={self.quant_weight}: "
                f"expected lr > 0, tau > 0, recon_weight >= 0, quant_weight >= 0"
            )

    def hashable(self) -> dict:
        """The settings that determine the result (not where files lie)."""
        return {k: v for k, v in asdict(self).items() if k not in ("dataset", "rows", "sid_version")}


class Stage1(NamedTuple):
    """A loaded MMQ version: model, its saved config, its name and its codes [n_items, P]."""

    model: MMQ
    config: dict
    version: str
    codes: np.ndarray


class RowTensors(NamedTuple):
    """Rows as tensors: user [N], item [N] int64; dense [N, 4] log1p counts; label [N] float."""

    user: Tensor
    item: Tensor
    dense: Tensor
    label: Tensor


# inputs


def load_stage1(paths: DatasetPaths, version: str) -> Stage1:
    """The MMQ tokenizer of ``D/sids/<version>/`` with its saved codes.

    Raises:
        DataError: missing files, a version made by another method, or a
            checkpoint without the MMQ config / state_dict.
    """
    folder = paths.sid_dir(version)
    source = require_file(folder / "codebooks.pt", TRAIN_COMMAND)
    saved = torch.load(source, weights_only=True)
    config = saved.get("config", {}) if isinstance(saved, dict) else {}
    if config.get("method") != "mmq" or "state_dict" not in saved:
        raise DataError(
            f"{source}: version '{version}' was made by method {config.get('method')!r} (or holds no state_dict); "
            f"fine-tuning needs an MMQ version: run `{TRAIN_COMMAND}` and pass its version"
        )
    try:
        model = MMQ(MMQConfig.from_dict(config))
        model.load_state_dict(saved["state_dict"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{source}: the saved MMQ config/state_dict do not build a model ({exc}); retrain") from exc
    model.eval()
    table = pd.read_parquet(require_file(folder / "sids.parquet", TRAIN_COMMAND))
    columns = validate_sids(table, model.cfg.codebook_size, str(folder / "sids.parquet"))
    if len(columns) != model.cfg.n_positions:
        raise DataError(
            f"{folder}/sids.parquet: {len(columns)} code columns but the MMQ config has "
            f"{model.cfg.n_positions} positions; the version folder is inconsistent, retrain it"
        )
    codes = table.sort_values("item_id")[columns].to_numpy(np.int64)
    return Stage1(model, config, version, codes)


def load_split_rows(paths: DatasetPaths, rows_path: Path) -> dict[str, pd.DataFrame]:
    """Train and valid rows of the cached Feast rows, split by ``D/events.parquet``.

    Test rows are dropped here and never reach fine-tuning. Rows whose label
    or ids disagree with the events were built from other events: DataError.
    """
    source = str(require_file(rows_path, ROWS_COMMAND))
    rows = pd.read_parquet(rows_path)
    require_columns(rows, ROW_COLUMNS, source)
    if rows["row_id"].duplicated().any():
        raise DataError(f"{source}: column 'row_id' repeats values; delete the file to rebuild the rows")
    events_file = require_file(paths.events, INGEST_COMMAND)
    events = pd.read_parquet(events_file, columns=["row_id", "user_id", "item_id", "label", "split"])
    merged = rows[list(ROW_COLUMNS)].merge(
        events, on="row_id", how="left", suffixes=("", "_event"), validate="one_to_one"
    )
    for column in ("label", "user_id", "item_id"):
        if not np.array_equal(merged[column].to_numpy(), merged[f"{column}_event"].to_numpy()):
            raise DataError(
                f"{source}: column '{column}' disagrees with {events_file} for some row_id (or a row_id is "
                f"missing there); the rows were built from other events: delete {source} to rebuild them"
            )
    merged = merged.sort_values("row_id", kind="stable").reset_index(drop=True)
    splits = {s: merged.loc[merged["split"] == s, list(ROW_COLUMNS)].reset_index(drop=True) for s in ("train", "valid")}
    if splits["train"].empty:
        raise DataError(f"{source}: no rows of split 'train' (split from {events_file}); rebuild the rows")
    return splits


def row_tensors(rows: pd.DataFrame, n_users: int, n_items: int, source: str) -> RowTensors:
    """Tensors of ``rows``; ids checked against the tables, counts NaN -> 0 then log1p."""
    users, items = rows["user_id"].to_numpy(np.int64), rows["item_id"].to_numpy(np.int64)
    check_ids_in_range(users, n_users + 1, f"{source} column 'user_id'")
    check_ids_in_range(items, n_items + 1, f"{source} column 'item_id'")
    counts = rows[list(COUNT_COLUMNS)].fillna(0).to_numpy(np.float32)
    if (counts < 0).any():
        raise DataError(f"{source}: columns {list(COUNT_COLUMNS)} hold negative counts; rebuild the behaviour features")
    return RowTensors(
        torch.from_numpy(users),
        torch.from_numpy(items),
        torch.from_numpy(np.log1p(counts)),
        torch.from_numpy(rows["label"].to_numpy(np.float32)),
    )


# the click model


class ClickModel(nn.Module):
    """Small differentiable ranker over SID code assignments.

    Shapes: code assignments are P tensors U x K (U distinct items), item and
    user vectors B x Z, dense counts B x F, logits B.

    Args:
        codebooks: P tensors [K, Z]; the SID tables start as copies of them.
        n_users: user ids are 1..n_users (0 padding).
        n_dense: F, dense features per row.
        hidden_dim: MLP width.
    """

    def __init__(self, codebooks: list[Tensor], n_users: int, n_dense: int, hidden_dim: int) -> None:
        super().__init__()
        dim = codebooks[0].shape[1]
        self.sid_tables = nn.Parameter(torch.stack([c.detach().clone() for c in codebooks]))  # [P, K, Z]
        self.user = nn.Embedding(n_users + 1, dim)
        nn.init.normal_(self.user.weight, std=0.01)  # unseen users stay near 0
        self.dense = nn.Linear(n_dense, dim)
        self.mlp = nn.Sequential(nn.Linear(3 * dim + n_dense, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))

    def item_vectors(self, assignments: list[Tensor]) -> Tensor:
        """[U, Z] = sum_p assignments[p] [U, K] @ table_p [K, Z]."""
        return torch.einsum("puk,pkz->uz", torch.stack(assignments), self.sid_tables)

    def item_vectors_from_codes(self, codes: Tensor) -> Tensor:
        """[U, Z] for hard codes [U, P]: the forward value of :meth:`item_vectors`."""
        positions = torch.arange(codes.shape[1], device=codes.device)
        return self.sid_tables[positions, codes].sum(1)

    def forward(self, items: Tensor, users: Tensor, dense: Tensor) -> Tensor:
        """Logits [B] of item vectors [B, Z], user ids [B] and dense counts [B, F]."""
        user = self.user(users) + self.dense(dense)
        return self.mlp(torch.cat([user, items, user * items, dense], dim=1)).squeeze(1)


# training


def train_step(
    mmq: MMQ, ranker: ClickModel, xs: dict[str, Tensor], rows: RowTensors, batch: Tensor, cfg: FinetuneConfig
) -> Tensor:
    """[4] ``(loss, bce, recon, quant)`` of one batch of row positions (the tokenizer sees only
    the batch's items); ``loss`` carries the gradient."""
    items, inverse = rows.item[batch].unique(return_inverse=True)
    content = {m: x[items] for m, x in xs.items()}
    vectors = ranker.item_vectors(mmq.hard_codes_st(content, cfg.tau))[inverse]
    logits = ranker(vectors, rows.user[batch], rows.dense[batch])
    bce = F.binary_cross_entropy_with_logits(logits, rows.label[batch])
    out = mmq(content)
    loss = bce + cfg.recon_weight * out.recon_loss + cfg.quant_weight * out.quant_loss
    return torch.stack([loss, bce, out.recon_loss, out.quant_loss])


@torch.no_grad()
def evaluate(mmq: MMQ, ranker: ClickModel, xs: dict[str, Tensor], rows: RowTensors) -> dict[str, float]:
    """AUC and log loss of ``rows`` with hard codes (evaluation only: no state changes)."""
    if len(rows.label) == 0:
        return {"auc": float("nan"), "logloss": float("nan")}
    vectors = ranker.item_vectors_from_codes(mmq.encode(xs))  # [n_items + 1, Z]
    probs = torch.sigmoid(ranker(vectors[rows.item], rows.user, rows.dense)).numpy()
    labels = rows.label.numpy()
    return {"auc": auc(labels, probs, what="valid auc"), "logloss": logloss(labels, probs)}


def run_training(
    mmq: MMQ, ranker: ClickModel, xs: dict[str, Tensor], splits: dict[str, RowTensors], cfg: FinetuneConfig
) -> dict[str, list[float]]:
    """Fixed-epoch joint training on the train rows; returns per-epoch histories."""
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam([*mmq.parameters(), *ranker.parameters()], lr=cfg.lr)
    mmq.eval()  # gradients on, but no usage tracking / dead-code resets in stage 2
    terms = ("loss", "bce", "recon", "quant")
    history: dict[str, list[float]] = {k: [] for k in (*terms, "valid_auc", "valid_logloss")}
    train = splits["train"]
    for epoch in range(cfg.epochs):
        # one pass over the train rows in a fresh random order
        sums, order = torch.zeros(len(terms)), torch.randperm(len(train.label), generator=gen)
        for batch in tqdm(order.split(cfg.batch_size), desc=f"finetune {epoch + 1}/{cfg.epochs}", unit="batch"):
            values = train_step(mmq, ranker, xs, train, batch, cfg)
            optimizer.zero_grad()
            values[0].backward()
            optimizer.step()
            sums += values.detach() * len(batch)
        # evaluation on valid rows: reported, never used to choose anything
        scores = evaluate(mmq, ranker, xs, splits["valid"])
        for key, value in zip(terms, (sums / len(train.label)).tolist(), strict=True):
            history[key].append(value)
        history["valid_auc"].append(scores["auc"])
        history["valid_logloss"].append(scores["logloss"])
        logger.info(
            "finetune epoch %d/%d loss %.4f bce %.4f recon %.4f quant %.4f valid auc %.4f logloss %.4f",
            *(epoch + 1, cfg.epochs, *(history[k][-1] for k in history)),
        )
    return history


# the stage


def version_of(
    cfg: FinetuneConfig, parent: str, modalities: dict[str, np.ndarray], train: pd.DataFrame
) -> tuple[str, str]:
    """``(mmq-ft-<hash>, full sha256)`` of the parent, the settings, the content and the TRAIN rows."""
    contents = {name: hashlib.sha256(np.ascontiguousarray(a).data).hexdigest() for name, a in modalities.items()}
    rows = hashlib.sha256(pd.util.hash_pandas_object(train, index=False).to_numpy().tobytes()).hexdigest()
    identity = {"parent": parent, "finetune": cfg.hashable(), "modalities": contents, "train_rows": rows}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"mmq-ft-{digest[:10]}", digest


def child_metrics(
    mmq: MMQ, items: dict[str, Tensor], codes: np.ndarray, parent: Stage1, clusters: np.ndarray | None
) -> dict:
    """Code and reconstruction figures of the fine-tuned codes [n_items, P] (computed as
    tokenizer.train does, so parent and child compare) plus what changed against the parent."""
    recon = mmq.reconstruct(items)
    x_all, recon_all = (torch.cat([d[m] for m in mmq.cfg.modalities], dim=1).numpy() for d in (items, recon))
    metrics = tokenizer_metrics(codes, mmq.cfg.codebook_size, x=x_all, recon=recon_all, clusters=clusters)
    changed = codes != parent.codes
    metrics.update(
        parent_version=parent.version,
        changed_items_share=float(changed.any(1).mean()),
        changed_position_share=changed.mean(0).tolist(),
        per_modality=modality_metrics(items, recon),
        position_names=mmq.cfg.position_names(),
    )
    return metrics


def finetune(cfg: FinetuneConfig) -> dict:
    """Run stage 2 for ``cfg``; returns the new version's metrics (with ``version``)."""
    paths = DatasetPaths(cfg.dataset)
    # inputs: the parent tokenizer, its modalities, the train/valid rows
    meta = read_json(require_file(paths.meta, INGEST_COMMAND))
    n_items, n_users = int(meta["n_items"]), int(meta["n_users"])
    parent = load_stage1(paths, paths.resolve_sid_version(cfg.sid_version))
    # Only behaviour columns and labels are read, so the parent version's own Feast rows serve.
    rows_path = cfg.rows or paths.rows_cache(parent.version)
    mmq = parent.model
    modalities = read_modalities(paths, list(mmq.cfg.modalities))
    xs = mmq.check_inputs({m: torch.from_numpy(a) for m, a in modalities.items()})  # [n_items + 1, d_m]
    if len(parent.codes) != n_items:
        raise DataError(
            f"{paths.sid_dir(parent.version)}/sids.parquet: {len(parent.codes)} items, meta.json says {n_items}"
        )
    frames = load_split_rows(paths, rows_path)
    splits = {s: row_tensors(f, n_users, n_items, f"{rows_path}[{s}]") for s, f in frames.items()}
    version, digest = version_of(cfg, parent.version, modalities, frames["train"])
    logger.info("config %s", json.dumps({**cfg.hashable(), "parent": parent.version, "version": version}))
    items_xs = {m: x[1:] for m, x in xs.items()}  # items 1..n_items, no padding row
    before = mmq.encode(items_xs).numpy()
    if not np.array_equal(before, parent.codes):
        logger.warning(
            "%d items encode differently than %s/sids.parquet (modalities changed since?)",
            int((before != parent.codes).any(1).sum()),
            parent.version,
        )
    # joint training of tokenizer and click model on the train rows
    torch.manual_seed(cfg.seed)
    ranker = ClickModel(mmq.codebooks, n_users, len(COUNT_COLUMNS), cfg.hidden_dim)
    start = time.perf_counter()
    history = run_training(mmq, ranker, xs, splits, cfg)
    train_seconds = time.perf_counter() - start
    # encode every item with hard codes; metrics; the new version
    codes = mmq.encode(items_xs).numpy()
    metrics = {
        **child_metrics(mmq, items_xs, codes, parent, ground_truth_clusters(paths)),
        "version": version,
        "n_train_rows": len(frames["train"]),
        "n_valid_rows": len(frames["valid"]),
        "train_seconds": train_seconds,
        "final_loss": history["loss"][-1],
        "loss_history": history["loss"],
        "history": history,
        "valid_auc": history["valid_auc"][-1],
    }
    config = {
        **parent.config,
        "mmq": mmq.cfg.to_dict(),
        "version": version,
        "config_hash": digest,
        "parent_version": parent.version,
        "finetune": cfg.hashable(),
        "levels": mmq.cfg.n_positions,
        "codebook_size": mmq.cfg.codebook_size,
    }
    events = pd.read_parquet(paths.events, columns=["event_timestamp"])
    table = sid_table(codes, version, events["event_timestamp"].min())
    validate_sids(table, mmq.cfg.codebook_size, f"{paths.sid_dir(version)}/sids.parquet")
    out = write_version(paths, version, table=table, model=mmq, config=config, metrics=metrics)
    print(
        f"{version} (from {parent.version}) -> {out} ({train_seconds:.1f}s, "
        f"changed items {metrics['changed_items_share']:.3f}, valid auc {metrics['valid_auc']:.4f})\n"
        f"  {summary_line(metrics)}"
    )
    return metrics


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    defaults = FinetuneConfig(dataset=Path("."))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--sid-version", default=defaults.sid_version)
    parser.add_argument("--rows", type=Path, default=None)
    for name in ("epochs", "batch_size", "hidden_dim", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "tau", "recon_weight", "quant_weight"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    return finetune(FinetuneConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
