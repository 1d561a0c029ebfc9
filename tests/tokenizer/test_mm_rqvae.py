"""MM-RQ-VAE: training on planted clusters, the shared tokenizer interface, missing modalities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import PLANTED_DIMS, planted_cluster_tensors
from sklearn.metrics import normalized_mutual_info_score

from sidrank.schema import DataError
from tokenizer.losses import gaussian_mmd, info_nce
from tokenizer.metrics import level_usage
from tokenizer.losses import present_rows
from tokenizer.mm_rqvae import MMRQVAE, MMRQVAEConfig
from tokenizer.quantizer import sum_sq_error

def small_config(**overrides) -> MMRQVAEConfig:
    settings = {"latent_dim": 8, "hidden_dims": (32,), "levels": 2, "codebook_size": 8, "dead_code_window": 10}
    return MMRQVAEConfig(PLANTED_DIMS, **{**settings, **overrides})


def test_loss_decreases_codes_recover_clusters_and_interface_holds() -> None:
    xs, clusters = planted_cluster_tensors()
    torch.manual_seed(0)
    model = MMRQVAE(small_config())
    history = model.fit(xs, epochs=30, batch_size=64, lr=3e-3, seed=0)
    assert history[-1] < 0.6 * history[0]
    assert model.history[-1]["recon_mse"] < model.history[0]["recon_mse"]
    codes = model.encode(xs, batch_size=150)  # batched encoding = one-shot encoding
    torch.testing.assert_close(codes, model.encode(xs))
    assert codes.shape == (400, 4) and codes.dtype == torch.long
    assert min(level_usage(codes.numpy(), 8)) > 0.5  # no collapse at any position
    # SID order: modalities sorted by name, L levels each
    assert model.cfg.position_names() == ["tags/0", "tags/1", "text/0", "text/1"]
    for start, name in ((0, "tags"), (2, "text")):
        branch = model.branches[name]
        torch.testing.assert_close(codes[:, start : start + 2], branch.rq.encode(branch.encoder(xs[name])))
        nmi = normalized_mutual_info_score(clusters, codes[:, start].numpy())
        assert nmi > 0.6, (name, nmi)
    # codebooks: one [K, Z] per position; decoding the codes with them reproduces reconstruct()
    books = model.codebooks
    assert [tuple(c.shape) for c in books] == [(8, 8)] * 4
    recon = model.reconstruct(xs)
    latent_text = books[2][codes[:, 2]] + books[3][codes[:, 3]]
    torch.testing.assert_close(recon["text"], model.branches["text"].decoder(latent_text).detach())
    assert {k: tuple(v.shape) for k, v in recon.items()} == {"tags": (400, 8), "text": (400, 32)}
    cosine = torch.nn.functional.cosine_similarity(recon["text"], xs["text"]).mean()
    assert cosine > 0.7


def test_missing_modality_rows_are_masked_out_of_every_loss() -> None:
    xs, _ = planted_cluster_tensors(120)
    missing = torch.zeros(120, dtype=torch.bool)
    missing[::3] = True
    xs["tags"][missing] = 0.0
    model = MMRQVAE(small_config(align="infonce", mmd_bandwidth=0.5))
    model.train()
    out = model(xs)
    present = ~missing
    assert torch.equal(out.present["tags"], present) and out.present["text"].all()
    assert out.recons["tags"].shape == (80, 8) and out.quantized["tags"].shape == (80, 8)
    # the tags terms are exactly those of the present rows alone, as if the others were never there
    tags = model.branches["tags"]
    with torch.no_grad():
        z = tags.encoder(xs["tags"][present])
        q = tags.rq.decode(tags.rq.encode(z))
        recon = tags.decoder(q)
        text = model.branches["text"]
        q_text = text.rq.decode(text.rq.encode(text.encoder(xs["text"])))
        recon_text = text.decoder(q_text)
    expected_mse = sum_sq_error(recon, xs["tags"][present]) + sum_sq_error(recon_text, xs["text"])
    expected_mmd = gaussian_mmd(recon, xs["tags"][present], bandwidth=0.5) + gaussian_mmd(
        recon_text, xs["text"], bandwidth=0.5
    )
    torch.testing.assert_close(out.recon_mse, expected_mse)
    torch.testing.assert_close(out.recon_mmd, expected_mmd)
    # InfoNCE pairs only items that have both modalities
    torch.testing.assert_close(out.align_loss, info_nce(q, q_text[present], temperature=0.1))
    # the quantizer saw only present rows: usage counts 80 items per tags level, 120 per text level
    assert tags.rq.usage.sum(1).tolist() == [80, 80]
    assert model.branches["text"].rq.usage.sum(1).tolist() == [120, 120]
    # gradients: a missing row's input never reaches the loss
    leaf = {name: x.clone().requires_grad_() for name, x in xs.items()}
    model(leaf).loss.backward()
    assert leaf["tags"].grad[missing].abs().sum() == 0 and leaf["tags"].grad[present].abs().sum() > 0


def test_missing_rows_share_codes_at_their_positions_and_training_still_works() -> None:
    xs, _ = planted_cluster_tensors(300)
    missing = torch.arange(300) % 4 == 0
    xs["tags"][missing] = 0.0
    model = MMRQVAE(small_config(sinkhorn_last=True))
    history = model.fit(xs, epochs=10, batch_size=64, lr=3e-3)
    assert np.isfinite(history).all() and history[-1] < history[0]
    codes = model.encode(xs)
    assert len(torch.unique(codes[missing, :2], dim=0)) == 1  # one shared tags code for the missing ones
    assert len(torch.unique(codes[missing], dim=0)) > 10  # the text codes still tell them apart
    assert present_rows(xs["tags"]).sum() == 225


def test_bad_inputs_and_config() -> None:
    xs, _ = planted_cluster_tensors(100)
    model = MMRQVAE(small_config())
    with pytest.raises(DataError, match=r"\['tags'\] are configured but absent"):
        model.fit({"text": xs["text"]}, epochs=1)
    with pytest.raises(DataError, match="'text' has shape"):
        model.encode({"tags": xs["tags"], "text": xs["text"][:, :5]})
    with pytest.raises(DataError, match="different row counts"):
        model.encode({"tags": xs["tags"][:50], "text": xs["text"]})
    with pytest.raises(DataError, match="'tags' is all zeros for every fit item"):
        model.fit({"tags": torch.zeros(100, 8), "text": xs["text"]}, epochs=1)
    with pytest.raises(ValueError, match="align='cosine'"):
        small_config(align="cosine")
    with pytest.raises(ValueError, match="nothing would train"):
        small_config(recon_weight=0.0, mse_weight=0.0)
    with pytest.raises(ValueError, match="modality_dims"):
        MMRQVAEConfig({})
    rebuilt = MMRQVAEConfig.from_dict({**small_config().to_dict(), "method": "mm_rqvae"})
    assert rebuilt == small_config() and rebuilt.modalities == ("tags", "text")
