"""Every tokenizer method satisfies the one Tokenizer interface, built from the registry as the CLI builds it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sidrank.schema import DataError
from tokenizer.inputs import n_rows, widths
from tokenizer.interface import Tokenizer
from tokenizer.methods import METHODS, TokenizerConfig

N, P, K = 120, 4, 8
DIMS = {"tags": 6, "text": 10}


def modalities(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xs = {name: torch.randn(N, dim, generator=gen) for name, dim in DIMS.items()}
    xs["tags"][:5] = 0.0  # five items lack the tags modality
    return xs


def fitted(method: str) -> tuple[Tokenizer, list[float], object]:
    cfg = TokenizerConfig(dataset=Path("."), method=method, levels=P, codebook_size=K, latent_dim=4,
                          hidden_dims=(16,), kmeans_iters=3, dead_code_window=3, epochs=2, batch_size=32)  # fmt: skip
    x = METHODS[method].inputs(modalities())
    torch.manual_seed(0)
    model = METHODS[method].build(cfg, widths(x))
    return model, model.fit(x, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=0), x


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_satisfies_the_interface(method: str) -> None:
    model, history, x = fitted(method)
    assert isinstance(model, Tokenizer)
    assert len(history) >= 1 and all(np.isfinite(history))
    model.eval()
    # encode: [N, P] codes in [0, K), deterministic, whatever the batch size
    codes = model.encode(x)
    assert codes.shape == (n_rows(x), P) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < K
    assert torch.equal(model.encode(x), codes) and torch.equal(model.encode(x, batch_size=7), codes)
    # decode / reconstruct: back to the form and widths of the inputs
    for recon in (model.decode(codes), model.reconstruct(x)):
        assert widths(recon) == widths(x) and n_rows(recon) == N
        values = recon.values() if isinstance(recon, dict) else [recon]
        assert all(torch.isfinite(v).all() for v in values)
    # what a published version keeps
    assert (model.n_positions, model.codebook_size) == (P, K) and len(model.position_names()) == P
    assert len(model.codebooks) == P and all(book.shape[0] == K for book in model.codebooks)
    json.dumps(model.settings())
    terms = model.metrics(x, batch_size=32)
    assert np.isfinite(terms["loss"]) and not model.training  # measuring leaves the mode as it was
    # fitting again from the same seed gives the same codes
    again, _, _ = fitted(method)
    assert torch.equal(again.encode(x), codes)


@pytest.mark.parametrize("method", list(METHODS))
def test_inputs_of_another_shape_are_a_data_error(method: str) -> None:
    model, _, x = fitted(method)
    wrong = {name: v[:, :-1] for name, v in x.items()} if isinstance(x, dict) else x[:, :-1]
    with pytest.raises(DataError, match="shape"):
        model.encode(model.check_inputs(wrong))
