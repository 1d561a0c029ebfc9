"""MMQ stage 1 on a planted multimodal set: orthogonality, usage, SID layout, missing modalities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import PLANTED_CLUSTERS, planted_cluster_tensors
from sklearn.metrics import normalized_mutual_info_score

from sidrank.schema import DataError
from tokenizer.metrics import level_perplexity, level_usage
from tokenizer.mmq import MMQ, MMQConfig

K = 8
N_MISSING_TAGS = 40  # items 0..39 lack the tags modality (all-zero rows)


def planted_missing_tags(n_items: int = 400, seed: int = 0) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The planted-cluster views with the tags modality absent (all-zero rows) for the first N_MISSING_TAGS items."""
    xs, clusters = planted_cluster_tensors(n_items, seed)
    xs["tags"][:N_MISSING_TAGS] = 0.0
    return xs, clusters


def config(**overrides) -> MMQConfig:
    base = {"latent_dim": 16, "hidden_dims": (64,), "codebook_size": K, "dead_code_window": 10}
    return MMQConfig({"text": 32, "tags": 8}, **{**base, **overrides})


def mean_abs_cosine(model: MMQ, xs: dict[str, torch.Tensor]) -> float:
    """Mean |cos| between the shared latent and each specific latent, on items having that modality."""
    with torch.no_grad():
        latents = model.expert_latents(xs)
    values = []
    for name, specific in latents.specific.items():
        present = xs[name].abs().sum(1) > 0
        values.append(F.cosine_similarity(latents.shared[0][present], specific[0][present], dim=1).abs().mean())
    return float(torch.stack(values).mean())


def fitted(ortho_weight: float) -> tuple[MMQ, list[float], dict[str, float]]:
    xs, _ = planted_missing_tags()
    torch.manual_seed(0)
    model = MMQ(config(ortho_weight=ortho_weight))
    with torch.no_grad():
        start = {"ortho": float(model(xs).ortho_loss), "abs_cos": mean_abs_cosine(model, xs)}
    history = model.fit(xs, epochs=40, batch_size=64, lr=3e-3, seed=0)
    return model, history, start


@pytest.fixture(scope="module")
def trained() -> tuple[MMQ, list[float], dict[str, float]]:
    return fitted(ortho_weight=1.0)


def test_orthogonality_loss_falls_and_experts_decorrelate(trained) -> None:
    model, _, start = trained
    xs, _ = planted_missing_tags()
    with torch.no_grad():
        end = float(model(xs).ortho_loss)
    assert end < 0.2 * start["ortho"]
    assert mean_abs_cosine(model, xs) < 0.5 * start["abs_cos"]
    # the regulariser, not training as such, does it: without it the latents stay more aligned
    unregularised, _, _ = fitted(ortho_weight=0.0)
    with torch.no_grad():
        assert float(unregularised(xs).ortho_loss) > 3 * end


def test_loss_decreases_codes_used_and_clusters_recovered(trained) -> None:
    model, history, _ = trained
    xs, clusters = planted_missing_tags()
    assert history[-1] < 0.3 * history[0]
    codes = model.encode(xs).numpy()
    assert codes.shape == (400, 4) and codes.dtype == np.int64  # shared x 2 levels, tags, text
    assert min(level_usage(codes, K)) > 0.5
    assert min(level_perplexity(codes, K)) > 3  # no position collapsed onto one or two codes
    assert len(np.unique(codes, axis=0)) > 2 * PLANTED_CLUSTERS  # later positions split the clusters
    nmi = normalized_mutual_info_score(clusters, codes[:, 0])
    shuffled = normalized_mutual_info_score(np.random.default_rng(1).permutation(clusters), codes[:, 0])
    assert nmi > 0.7 and nmi > shuffled + 0.6
    recon = model.reconstruct(xs)
    text_cos = F.cosine_similarity(recon["text"], xs["text"], dim=1).mean()
    assert text_cos > 0.8


def test_sid_layout_codebooks_and_straight_through_codes(trained) -> None:
    model, _, _ = trained
    xs, _ = planted_missing_tags()
    assert model.cfg.position_names() == ["shared0/0", "shared0/1", "tags.spec0/0", "text.spec0/0"]
    assert model.n_positions == 4 and [tuple(c.shape) for c in model.codebooks] == [(K, 16)] * 4
    codes = model.encode(xs)
    # batching does not change codes
    assert torch.equal(model.encode(xs, batch_size=7), codes)
    # the shared expert's first two positions decode to its quantizer's codewords
    shared = model.shared[0].rq
    torch.testing.assert_close(
        shared.decode(codes[:, :2]), model.codebooks[0][codes[:, 0]] + model.codebooks[1][codes[:, 1]]
    )
    soft = model.soft_codes(xs, tau=0.5)
    hard = model.hard_codes_st(xs, tau=0.5)
    for p in range(4):
        torch.testing.assert_close(soft[p].sum(1), torch.ones(400))
        assert torch.equal(soft[p].argmax(1), codes[:, p])
        assert torch.equal(hard[p].detach(), F.one_hot(codes[:, p], K).float())
    # gradients of the straight-through codes reach the encoders and the codebooks
    model.zero_grad()
    target = torch.randn(4, K)
    sum((h * target[p]).sum() for p, h in enumerate(hard)).backward()
    assert model.shared[0].encoder[0].weight.grad.abs().sum() > 0
    assert model.specific["text"][0].encoder[0].weight.grad.abs().sum() > 0
    assert model.shared[0].rq.codebooks.grad.abs().sum() > 0
    model.zero_grad()
    with pytest.raises(ValueError, match="tau=0"):
        model.soft_codes(xs, tau=0)


def test_missing_modality_rows_are_masked_out_of_the_losses() -> None:
    xs, _ = planted_missing_tags(60)
    torch.manual_seed(0)
    model = MMQ(config())
    model.init_codebooks(xs)
    model.train()
    out = model(xs)
    present = xs["tags"].abs().sum(1) > 0
    expected = ((out.recon["text"] - xs["text"]) ** 2).sum(1).mean() + (
        ((out.recon["tags"] - xs["tags"]) ** 2).sum(1)[present].mean()
    )
    torch.testing.assert_close(out.recon_loss, expected)
    # the tags expert's quantizer counted only the 20 items that have tags
    assert int(model.specific["tags"][0].rq.usage.sum()) == int(present.sum()) == 20
    assert int(model.specific["text"][0].rq.usage.sum()) == 60
    # nothing flows from the missing rows into the tags decoder
    model.zero_grad()
    model({name: x[:N_MISSING_TAGS] for name, x in xs.items()}).loss.backward()
    assert model.decoders["tags"][0].weight.grad.abs().sum() == 0
    assert model.decoders["text"][0].weight.grad.abs().sum() > 0
    # items lacking tags share the tags-specific code (that of a zero input)
    codes = model.encode(xs)
    assert codes[:N_MISSING_TAGS, 2].unique().numel() == 1


def test_bad_inputs_and_config() -> None:
    xs, _ = planted_missing_tags(50)
    model = MMQ(config())
    with pytest.raises(DataError, match=r"\['tags'\] are configured but absent"):
        model.encode({"text": xs["text"]})
    with pytest.raises(DataError, match=r"'text' has shape \(50, 31\)"):
        model.encode({"text": xs["text"][:, :31], "tags": xs["tags"]})
    with pytest.raises(DataError, match="'tags' is all zeros"):
        model.fit({"text": xs["text"], "tags": torch.zeros(50, 8)}, epochs=1)
    with pytest.raises(ValueError, match="n_shared_experts=0"):
        config(n_shared_experts=0)
    with pytest.raises(ValueError, match="ortho_weight=-1"):
        config(ortho_weight=-1.0)
    with pytest.raises(ValueError, match="modality_dims"):
        MMQConfig({})
    # more experts -> more positions, in the documented order; the config round-trips through JSON
    cfg = config(n_shared_experts=2, n_specific_experts=2, shared_levels=1)
    assert cfg.n_positions == 2 + 2 * 2
    assert cfg.position_names() == [
        "shared0/0",
        "shared1/0",
        "tags.spec0/0",
        "tags.spec1/0",
        "text.spec0/0",
        "text.spec1/0",
    ]
    assert MMQConfig.from_dict({"method": "mmq", "mmq": cfg.to_dict()}) == cfg
    assert MMQ(cfg).encode(xs).shape == (50, 6)
