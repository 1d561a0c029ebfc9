"""MMQ stage 2's click model, trained jointly with the tokenizer (Xu et al. 2025).

* item vector = sum over SID positions p of ``st_p @ T_p``, where ``st_p``
  [B, K] is the straight-through code assignment (one-hot of the hard code
  forward, gradient of softmax(-distance / tau) backward) and ``T_p`` [K, Z]
  the position's SID embedding table, initialised from the codebook;
* user vector = user-id embedding + linear map of the log1p behaviour counts;
* logit = MLP([user, item, user * item, log1p counts]);
* loss = click BCE + ``recon_weight`` x multimodal reconstruction +
  ``quant_weight`` x quantisation (commitment + codebook) losses, both on the
  batch's (train) items, so the click loss reaches the experts while the
  reconstruction keeps the content.

:func:`run_training` runs a fixed number of epochs through the tokenizers'
loop (:func:`tokenizer.fitting.run_epochs`); valid rows are only scored.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidrank.contract import ITEM_COUNT_COLUMNS, USER_COUNT_COLUMNS, check_behaviour_counts
from sidrank.metrics import auc, logloss
from sidrank.schema import check_ids_in_range
from tokenizer.fitting import run_epochs
from tokenizer.mmq import MMQ

logger = logging.getLogger(__name__)

COUNT_COLUMNS = (*USER_COUNT_COLUMNS, *ITEM_COUNT_COLUMNS)


class JointSettings(Protocol):
    """What the joint training reads of :class:`tokenizer.finetune.FinetuneConfig`."""

    epochs: int
    batch_size: int
    lr: float
    tau: float
    recon_weight: float
    quant_weight: float
    seed: int


class RowTensors(NamedTuple):
    """Rows as tensors: user [N], item [N] int64; dense [N, 4] log1p counts; label [N] float."""

    user: Tensor
    item: Tensor
    dense: Tensor
    label: Tensor


def row_tensors(rows: pd.DataFrame, n_users: int, n_items: int, source: str) -> RowTensors:
    """Tensors of ``rows``; ids checked against the tables, counts NaN -> 0 then log1p."""
    users, items = rows["user_id"].to_numpy(np.int64), rows["item_id"].to_numpy(np.int64)
    check_ids_in_range(users, n_users + 1, f"{source} column 'user_id'")
    check_ids_in_range(items, n_items + 1, f"{source} column 'item_id'")
    check_behaviour_counts(rows, source)
    counts = rows[list(COUNT_COLUMNS)].fillna(0).to_numpy(np.float32)
    return RowTensors(
        torch.from_numpy(users),
        torch.from_numpy(items),
        torch.from_numpy(np.log1p(counts)),
        torch.from_numpy(rows["label"].to_numpy(np.float32)),
    )


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


def train_step(
    mmq: MMQ, ranker: ClickModel, xs: dict[str, Tensor], rows: RowTensors, batch: Tensor, cfg: JointSettings
) -> dict[str, Tensor]:
    """``loss`` (with the gradient), ``bce``, ``recon`` and ``quant`` of one batch of row positions
    [B]; the tokenizer sees only the batch's items."""
    items, inverse = rows.item[batch].unique(return_inverse=True)
    content = {m: x[items] for m, x in xs.items()}
    vectors = ranker.item_vectors(mmq.hard_codes_st(content, cfg.tau))[inverse]
    logits = ranker(vectors, rows.user[batch], rows.dense[batch])
    bce = F.binary_cross_entropy_with_logits(logits, rows.label[batch])
    out = mmq(content)
    loss = bce + cfg.recon_weight * out.recon_loss + cfg.quant_weight * out.quant_loss
    return {"loss": loss, "bce": bce, "recon": out.recon_loss, "quant": out.quant_loss}


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
    mmq: MMQ, ranker: ClickModel, xs: dict[str, Tensor], splits: dict[str, RowTensors], cfg: JointSettings
) -> dict[str, list[float]]:
    """Fixed-epoch joint training on the train rows; returns per-epoch histories of the loss
    terms and of the valid AUC / log loss."""
    mmq.eval()  # gradients on, but no usage tracking / dead-code resets in stage 2
    train = splits["train"]

    def score_valid(epoch: int, means: dict[str, float]) -> dict[str, float]:
        # evaluation on valid rows: reported, never used to choose anything
        scores = evaluate(mmq, ranker, xs, splits["valid"])
        logger.info(
            "finetune epoch %d/%d %s valid auc %.4f logloss %.4f",
            *(epoch + 1, cfg.epochs, " ".join(f"{k} {v:.4f}" for k, v in means.items()), scores["auc"], scores["logloss"]),
        )
        return {"valid_auc": scores["auc"], "valid_logloss": scores["logloss"]}

    records = run_epochs(
        lambda batch: train_step(mmq, ranker, xs, train, batch, cfg),
        len(train.label),
        [*mmq.parameters(), *ranker.parameters()],
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        desc="finetune",
        after_epoch=score_valid,
    )
    return {key: [record[key] for record in records] for key in records[0]}
