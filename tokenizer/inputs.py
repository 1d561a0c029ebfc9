"""What a tokenizer reads: one matrix, or one matrix per modality, validated.

RQ-KMeans and RQ-VAE read the modalities side by side, [N, D]; the
multimodal methods read them separately, ``name -> [N, D_m]``. An all-zero
row of a modality means the item lacks it (:func:`tokenizer.losses.present_rows`).
The helpers here treat both forms alike, so one fit loop serves every method.

Example:
    >>> xs = {"tags": torch.zeros(5, 2), "text": torch.ones(5, 3)}
    >>> n_rows(xs), widths(xs), tuple(take(xs, slice(0, 2))["text"].shape)
    (5, {'tags': 2, 'text': 3}, (2, 3))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar, cast

import torch
from torch import Tensor

from sidrank.schema import DataError
from tokenizer.losses import present_rows

Items = Tensor | Mapping[str, Tensor]  # [N, D], or modality name -> [N, D_m]
I = TypeVar("I", bound=Items)


def n_rows(x: Items) -> int:
    """N, the number of items of ``x``."""
    return len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)


def take(x: I, rows: Tensor | slice) -> I:
    """The items ``rows`` of ``x``, in the same form."""
    return cast(I, {name: v[rows] for name, v in x.items()} if isinstance(x, Mapping) else x[rows])


def widths(x: Items) -> dict[str, int]:
    """Input width per modality; a single matrix is the one modality ``input``."""
    return {name: v.shape[1] for name, v in x.items()} if isinstance(x, Mapping) else {"input": x.shape[1]}


def check_matrix(x: Tensor, width: int) -> Tensor:
    """``x`` as float32 [N, width]; DataError when it has another shape."""
    x = torch.as_tensor(x).float()
    if x.ndim != 2 or x.shape[1] != width:
        raise DataError(f"inputs have shape {tuple(x.shape)}, expected (N, {width}) as when the tokenizer was built")
    return x


def check_modalities(xs: Mapping[str, Tensor], dims: Mapping[str, int]) -> dict[str, Tensor]:
    """The modalities of ``dims`` (name -> D_m) in ``xs``, as float32 [N, D_m] with one common N.

    Raises:
        DataError: a configured modality is absent, has another width, or the
            modalities disagree on N.
    """
    missing = [name for name in dims if name not in xs]
    if missing:
        raise DataError(
            f"modalities {missing} are configured but absent from the inputs (got {sorted(xs)}); "
            f"build them with `python -m tokenizer.modalities --dataset <D>` or drop them from --modalities"
        )
    result = {name: torch.as_tensor(xs[name]).float() for name in dims}
    for name, dim in dims.items():
        if result[name].ndim != 2 or result[name].shape[1] != dim:
            raise DataError(f"modality '{name}' has shape {tuple(result[name].shape)}, expected (N, {dim}) as when built")
    rows = {name: len(x) for name, x in result.items()}
    if len(set(rows.values())) != 1:
        raise DataError(f"modalities have different row counts {rows}; every modality needs one row per item")
    return result


def fit_rows(x: Tensor, name: str, minimum: int) -> Tensor:
    """Bool [N]: the items that have modality ``name``; DataError when fewer than ``minimum``
    do, as a codebook of that many codes cannot be fitted on them."""
    present = present_rows(x)
    n_present = int(present.sum())
    if n_present < minimum:
        what = "all zeros for every fit item (absent entirely)" if n_present == 0 else f"present for {n_present} fit items only"
        raise DataError(
            f"modality '{name}' is {what}, fewer than codebook_size={minimum}; "
            f"rebuild it, lower --codebook-size or drop it from --modalities"
        )
    return present
