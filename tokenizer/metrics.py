"""Quality figures of a semantic-ID assignment.

Every tokenizer reports the same dictionary from :func:`tokenizer_metrics`:
how well the codes reconstruct the content, how much of each codebook is used,
and how often distinct items end up with the same (prefix of a) SID;
:func:`sid_metrics` adds the reconstruction per modality, so a published
version of any method, stage 1 or fine-tuned, reports the same figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from tokenizer.losses import present_rows

# A version is degenerate (refused, never marked LATEST) when its items get fewer distinct SIDs than this share
# of the most they could get, min(items, K^P) (K = 5000 on 1,616 items collapsed to a handful of SIDs) ...
MIN_DISTINCT_SID_SHARE = 0.1
# ... or its first position uses fewer codes than this share of min(K, items).
MIN_FIRST_LEVEL_USAGE = 0.05


def reconstruction_metrics(x: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    """Squared error per item summed over dims (mean over items) and mean cosine.

    Args:
        x: inputs, [N, D].
        recon: reconstructions, [N, D].
    """
    error = ((x - recon) ** 2).sum(1)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(recon, axis=1)
    # An all-zero row has no direction: its cosine counts as 0 rather than NaN.
    cosine = (x * recon).sum(1) / np.maximum(norms, 1e-12)
    return {"recon_error": float(error.mean()), "recon_cosine": float(cosine.mean())}


def level_usage(codes: np.ndarray, codebook_size: int) -> list[float]:
    """Distinct codes used per level divided by K, for codes [N, L]."""
    return [len(np.unique(codes[:, level])) / codebook_size for level in range(codes.shape[1])]


def level_perplexity(codes: np.ndarray, codebook_size: int) -> list[float]:
    """exp(entropy) of the code distribution per level: K when uniform, 1 when collapsed."""
    result = []
    for level in range(codes.shape[1]):
        p = np.bincount(codes[:, level], minlength=codebook_size) / len(codes)
        p = p[p > 0]
        result.append(float(np.exp(-(p * np.log(p)).sum())))
    return result


def collision_rate(codes: np.ndarray) -> float:
    """(N - distinct full codes) / N: share of items that repeat an earlier item's SID."""
    return (len(codes) - len(np.unique(codes, axis=0))) / len(codes)


def prefix_collision_rates(codes: np.ndarray) -> list[float]:
    """Collision rate of the prefixes of depth 1..L; the last is the full-code rate."""
    return [collision_rate(codes[:, :depth]) for depth in range(1, codes.shape[1] + 1)]


def largest_bucket(codes: np.ndarray) -> int:
    """Most items sharing one full code."""
    return int(np.unique(codes, axis=0, return_counts=True)[1].max())


def tokenizer_metrics(
    codes: np.ndarray,
    codebook_size: int,
    *,
    x: np.ndarray | None = None,
    recon: np.ndarray | None = None,
    clusters: np.ndarray | None = None,
) -> dict[str, Any]:
    """All figures for codes [N, L]; reconstruction when ``x`` and ``recon`` are given,
    NMI of the first level against ground-truth ``clusters`` [N] when given."""
    codes = np.asarray(codes)
    result: dict[str, Any] = {
        "n_items": len(codes),
        "levels": codes.shape[1],
        "codebook_size": codebook_size,
        "usage": level_usage(codes, codebook_size),
        "perplexity": level_perplexity(codes, codebook_size),
        "prefix_collision_rate": prefix_collision_rates(codes),
        "collision_rate": collision_rate(codes),
        "largest_bucket": largest_bucket(codes),
    }
    if x is not None and recon is not None:
        result.update(reconstruction_metrics(x, recon))
    if clusters is not None:
        result["nmi_first_level"] = float(normalized_mutual_info_score(clusters, codes[:, 0]))
    return result


def modality_metrics(items: Mapping[str, torch.Tensor], recon: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """Reconstruction error and cosine per modality over the items that HAVE it (non-zero rows)."""
    result = {}
    for name, x in items.items():
        present = present_rows(x)
        figures: dict[str, float] = {"n_present": int(present.sum())}
        if figures["n_present"]:
            figures.update(reconstruction_metrics(x[present].numpy(), recon[name][present].numpy()))
        result[name] = figures
    return result


def sid_metrics(
    codes: np.ndarray,
    codebook_size: int,
    items: Mapping[str, torch.Tensor],
    recon: Mapping[str, torch.Tensor],
    clusters: np.ndarray | None = None,
) -> dict[str, Any]:
    """:func:`tokenizer_metrics` of codes [N, P], the reconstruction measured on the modalities
    side by side in sorted name order (as for every method), plus ``per_modality`` figures.

    Args:
        codes: [N, P] SIDs of the items.
        codebook_size: K.
        items: name -> [N, D_m] inputs (all-zero row = modality missing).
        recon: name -> [N, D_m] their reconstructions through ``codes``.
        clusters: [N] planted clusters (synthetic data), for the NMI.
    """
    names = sorted(items)
    x, x_recon = (torch.cat([d[name] for name in names], dim=1).numpy() for d in (items, recon))
    metrics = tokenizer_metrics(codes, codebook_size, x=x, recon=x_recon, clusters=clusters)
    metrics["per_modality"] = modality_metrics(items, recon)
    return metrics


def degenerate_reason(metrics: Mapping[str, Any]) -> str:
    """Why the SIDs of :func:`tokenizer_metrics` are degenerate, or "" when they are not.

    Both shares are relative to what the items and codebook allow, so a small
    dataset with a small codebook is not called degenerate for its pigeonholes.
    """
    n_items, levels, size = int(metrics["n_items"]), int(metrics["levels"]), int(metrics["codebook_size"])
    distinct = round((1 - metrics["collision_rate"]) * n_items)
    possible = min(n_items, size**levels)
    if distinct < MIN_DISTINCT_SID_SHARE * possible:
        return (f"{distinct} distinct SIDs for {n_items} items (collision rate {metrics['collision_rate']:.3f}), "
                f"under {MIN_DISTINCT_SID_SHARE:.0%} of the {possible} possible")
    used = round(metrics["usage"][0] * size)
    if used < MIN_FIRST_LEVEL_USAGE * min(size, n_items):
        return f"the first position uses {used} of {size} codes, under {MIN_FIRST_LEVEL_USAGE:.0%} of min(K, items)"
    return ""


def summary_line(metrics: dict) -> str:
    """One human line of the headline figures of :func:`tokenizer_metrics`."""
    usage = "/".join(f"{u:.2f}" for u in metrics["usage"])
    prefix = "/".join(f"{c:.3f}" for c in metrics["prefix_collision_rate"])
    line = (
        f"items={metrics['n_items']} usage={usage} prefix_collisions={prefix} "
        f"collision_rate={metrics['collision_rate']:.4f} largest_bucket={metrics['largest_bucket']}"
    )
    if "recon_error" in metrics:
        line += f" recon_error={metrics['recon_error']:.4f} recon_cosine={metrics['recon_cosine']:.4f}"
    if "nmi_first_level" in metrics:
        line += f" nmi_first_level={metrics['nmi_first_level']:.3f}"
    return line
