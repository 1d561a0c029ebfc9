"""SID embedding tables initialised from the tokenizer codebooks (MME-SID, Wang et al. 2025).

MME-SID initialises the ranker's SID embeddings with the trained codebooks, so
the ranker starts from the tokenizer's geometry (codes close in content are
close in embedding) instead of forgetting it behind a random init. Here each
SID position's table (K + 1 rows, row 0 = unknown) gets that position's
codebook [K, d], PCA-projected to the table width D and scaled to TorchRec's
default init std, so the sparse optimizer's learning rate means the same as
with a random init. The weights are loaded after DMP into each rank's local
shards, so it works with the fused sharded tables on CPU.

    codebooks = read_codebooks(Path("D/sids/V/codebooks.pt"), levels=3, codebook_size=64)
    weights = codebook_table_weights(codebooks, tables, dim=16, seed=0)
    load_table_weights(dmp, weights)  # every rank, after DistributedModelParallel
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from sidrank.schema import DataError
from ranking.tables import SparseTable
from sidrank.contract import FeatureMeta

log = logging.getLogger(__name__)


def read_codebooks(path: Path, levels: int, codebook_size: int) -> list[torch.Tensor]:
    """The per-position codebooks of a SID version (``codebooks.pt`` of ``tokenizer.train``).

    Args:
        path: ``<dataset>/sids/<version>/codebooks.pt`` holding ``{"codebooks": [P x [K, d_p]], ...}``.
        levels: P of the feature meta (code positions of the SID).
        codebook_size: K of the feature meta.

    Returns:
        P float32 tensors [K, d_p] in SID order.
    """
    made_by = "python -m tokenizer.train --dataset D"
    if not path.is_file():
        raise DataError(f"{path}: not found; --sid-init codebook needs the SID version's codebooks ({made_by})")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as exc:
        raise DataError(f"{path}: not a torch file of tensors, lists and dicts ({exc}); re-run {made_by}") from exc
    codebooks = saved.get("codebooks") if isinstance(saved, dict) else None
    if codebooks is None or len(codebooks) != levels:
        found = "no 'codebooks' key" if codebooks is None else f"{len(codebooks)} codebooks"
        raise DataError(f"{path}: {found}, expected one [K, d] codebook per SID position ({levels}); re-run {made_by}")
    out = [torch.as_tensor(c, dtype=torch.float32) for c in codebooks]
    for position, book in enumerate(out):
        finite = bool(torch.isfinite(book).all())
        if book.ndim != 2 or book.shape[0] != codebook_size or not finite:
            raise DataError(
                f"{path}: codebook {position} has shape {tuple(book.shape)} (all finite: {finite}), expected "
                f"finite [K={codebook_size}, d] as in the feature meta; pass the SID version the rows were built from"
            )
        if len(torch.unique(book, dim=0)) < 2:
            raise DataError(f"{path}: codebook {position} has one distinct codeword; no geometry to copy, use random")
    return out


def default_init_std(num_embeddings: int) -> float:
    """Std of TorchRec's default table init, uniform(+-sqrt(1 / num_embeddings))."""
    return math.sqrt(1.0 / num_embeddings) / math.sqrt(3.0)


def project_codebook(codebook: torch.Tensor, dim: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """PCA of K codewords to ``dim`` columns with overall std ``std``.

    The centred codewords are rotated onto their principal axes (signs fixed:
    the largest entry of each axis positive) and all scaled by one factor, so
    distances between codewords keep their ratios. Axes beyond the codebook's
    rank (d < dim or K - 1 < dim) are filled with uniform noise of std ``std``.

    Args:
        codebook: [K, d] codewords.
        dim: D, the table width.
        std: target std of the projected entries.
        generator: seeds the filler columns.

    Returns:
        [K, D] float32.
    """
    centred = (codebook - codebook.mean(dim=0)).double()
    u, sing, _ = torch.linalg.svd(centred, full_matrices=False)
    rank = int((sing > sing[0] * 1e-6).sum()) if sing.numel() and sing[0] > 0 else 0
    if rank == 0:
        raise ValueError("codebook: all codewords are equal; there is no geometry to project")
    axes = min(dim, rank)
    comps = u[:, :axes] * sing[:axes]
    comps = comps * torch.sign(comps.gather(0, comps.abs().argmax(dim=0, keepdim=True)))
    bound = std * math.sqrt(3.0)
    out = torch.empty(codebook.shape[0], dim).uniform_(-bound, bound, generator=generator)
    out[:, :axes] = (comps * (std / comps.std())).float()
    return out


def codebook_table_weights(
    codebooks: Sequence[torch.Tensor], tables: Sequence[SparseTable], dim: int, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Initial weights of the SID position tables from the tokenizer codebooks.

    Table ``t_sid_<l>`` has K + 1 rows: row 0 (unknown) keeps TorchRec's
    default uniform init, row c + 1 is codeword c of position l projected by
    :func:`project_codebook` to the default init's std. Identical on every
    rank for the same inputs and seed.

    Returns:
        table name -> [K + 1, D] float32.
    """
    sizes = {t.name: t.num_embeddings for t in tables}
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for position, book in enumerate(codebooks):
        name = f"t_sid_{position}"
        if sizes.get(name) != book.shape[0] + 1:
            raise ValueError(f"{name}: table has {sizes.get(name)} rows, codebook {position} has {book.shape[0]} + 1")
        std = default_init_std(sizes[name])
        unknown = torch.empty(1, dim).uniform_(-std * math.sqrt(3.0), std * math.sqrt(3.0), generator=generator)
        weights[name] = torch.cat([unknown, project_codebook(book, dim, std, generator)])
    return weights


@torch.no_grad()
def load_table_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, list[tuple[int, int]]]:
    """Copy full table weights into a model's embedding tables, sharded (DMP) or not.

    Each rank writes the slice of its local shards (``shard_offsets`` /
    ``shard_sizes``), so table-wise and column-wise plans both land; the fused
    kernel's state_dict tensors are views of its weights.

    Args:
        model: a DMP-wrapped or plain model holding embedding (bag) collections.
        weights: table name -> [rows, D].

    Returns:
        table name -> (row offset, column offset) of every shard written on this rank.
    """
    written: dict[str, list[tuple[int, int]]] = {}
    for key, value in model.state_dict().items():
        *_, table, leaf = ["", *key.split(".")]
        in_collection = ".embedding_bags." in key or ".embeddings." in key
        if leaf != "weight" or table not in weights or not in_collection:
            continue
        full = weights[table]
        if tuple(value.shape) != tuple(full.shape):
            raise ValueError(f"{table}: table is {tuple(value.shape)}, init weights {tuple(full.shape)}")
        if not isinstance(value, ShardedTensor):
            value.copy_(full)
            written[table] = [(0, 0)]
            continue
        for shard in value.local_shards():
            (r0, c0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(full[r0 : r0 + rows, c0 : c0 + cols])
            written.setdefault(table, []).append((r0, c0))
    return written


def init_tables(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load full ``weights`` into the (sharded) tables on every rank and check that each table landed.

    Collective under an initialised process group: every rank must call it.

    Returns:
        The initialised table names.
    """
    local = sorted(load_table_weights(model, weights))
    written = [local]
    if dist.is_initialized():
        written = [None] * dist.get_world_size()
        dist.all_gather_object(written, local)
    landed = set().union(*written)
    if landed != set(weights):
        raise RuntimeError(f"init from {source} reached tables {sorted(landed)} of {sorted(weights)}")
    log.info("tables %s initialised from %s", sorted(weights), source)
    return sorted(weights)


def init_sid_tables(
    model: nn.Module, tables: Sequence[SparseTable], path: Path, meta: FeatureMeta, dim: int, *, seed: int
) -> list[str]:
    """Codebook-initialise the SID tables of ``model`` on every rank (:func:`init_tables`).

    Args:
        model: the DMP-wrapped (or plain) ranker.
        tables: its tables, from ``ranking.batches.sparse_tables``.
        path: the SID version's ``codebooks.pt``.
        meta: the feature meta (P positions, K codes).
        dim: D, the table width.
        seed: seeds the rows without a codeword.

    Returns:
        The initialised table names.
    """
    codebooks = read_codebooks(path, meta.sid_levels, meta.sid_codebook_size)
    weights = codebook_table_weights(codebooks, tables, dim, seed=seed)
    return init_tables(model, weights, f"{path} (PCA to {dim} dims)")
