"""Tokenizers on planted clusters, metrics on hand examples, and the tokenizer.train CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from builders import planted_cluster_views, seal_modalities, write_tokenizer_dataset
from sklearn.metrics import normalized_mutual_info_score

from sidrank.schema import DataError, validate_sids
from sidrank.contract import DatasetPaths
from tokenizer import train
from tokenizer.metrics import (
    collision_rate,
    degenerate_reason,
    largest_bucket,
    level_perplexity,
    level_usage,
    prefix_collision_rates,
    reconstruction_metrics,
    tokenizer_metrics,
)
from tokenizer.mm_rqvae import MMRQVAE, MMRQVAEConfig
from tokenizer.mmq import MMQ, MMQConfig
from tokenizer.rqkmeans import RQKMeans
from tokenizer.rqvae import RQVAE
from tokenizer.methods import build_tokenizer
from tokenizer.settings import NetworkConfig, QuantizerConfig
from tokenizer.train import TokenizerConfig, main

def concat(views: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([views[k] for k in sorted(views)], axis=1)[1:])


def shuffled_nmi(clusters: np.ndarray, codes: np.ndarray) -> float:
    return normalized_mutual_info_score(np.random.default_rng(1).permutation(clusters), codes)


# metrics on hand examples


def test_code_metrics_on_hand_example() -> None:
    codes = np.array([[0, 1], [0, 1], [0, 2], [1, 1]])
    assert collision_rate(codes) == 0.25  # one item repeats an earlier SID
    assert prefix_collision_rates(codes) == [0.5, 0.25]
    assert largest_bucket(codes) == 2
    assert level_usage(codes, 4) == [0.5, 0.5]
    p = np.array([0.75, 0.25])
    np.testing.assert_allclose(level_perplexity(codes, 4), [np.exp(-(p * np.log(p)).sum())] * 2)
    assert level_perplexity(np.arange(4)[:, None], 4) == pytest.approx([4.0])
    full = tokenizer_metrics(codes, 4, clusters=np.array([5, 5, 5, 6]))
    assert full["collision_rate"] == 0.25 and full["nmi_first_level"] == pytest.approx(1.0)
    assert "recon_error" not in full


def test_reconstruction_metrics_on_hand_example() -> None:
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    recon = np.array([[0.0, 0.0], [0.0, 1.0]])
    result = reconstruction_metrics(x, recon)
    assert result["recon_error"] == pytest.approx((1.0 + 1.0) / 2)  # summed over dims, mean over items
    assert result["recon_cosine"] == pytest.approx((0.0 + 1.0) / 2)  # zero reconstruction has cosine 0


# tokenizers recover planted clusters


def test_rqkmeans_recovers_planted_clusters() -> None:
    views, clusters = planted_cluster_views()
    x = concat(views)
    model = RQKMeans(x.shape[1], levels=3, quantizer=QuantizerConfig(codebook_size=8))
    [error] = model.fit(x, seed=0)
    codes = model.encode(x).numpy()
    nmi = normalized_mutual_info_score(clusters, codes[:, 0])
    assert nmi > 0.8 and nmi > shuffled_nmi(clusters, codes[:, 0]) + 0.7
    assert min(level_usage(codes, 8)) > 0.5
    assert error == pytest.approx(((model.decode(torch.from_numpy(codes)) - x) ** 2).sum(1).mean().item(), rel=1e-5)


def test_rqvae_loss_decreases_and_recovers_planted_clusters() -> None:
    views, clusters = planted_cluster_views()
    x = concat(views)
    torch.manual_seed(0)
    network, quantizer = NetworkConfig(latent_dim=16, hidden_dims=(64,)), QuantizerConfig(codebook_size=8, dead_code_window=10)
    model = RQVAE(x.shape[1], levels=2, network=network, quantizer=quantizer)
    history = model.fit(x, epochs=40, batch_size=64, lr=3e-3, seed=0)
    assert history[-1] < 0.6 * history[0]
    codes = model.encode(x).numpy()
    nmi = normalized_mutual_info_score(clusters, codes[:, 0])
    assert nmi > 0.6 and nmi > shuffled_nmi(clusters, codes[:, 0]) + 0.5
    assert min(level_usage(codes, 8)) > 0.5
    recon = model.decode(torch.from_numpy(codes))
    assert recon.shape == x.shape
    assert reconstruction_metrics(x.numpy(), recon.numpy())["recon_cosine"] > 0.7


# the CLI


def run_cli(paths: DatasetPaths, *extra: str) -> dict:
    return main(["--dataset", str(paths.root), "--levels", "2", "--codebook-size", "8", *extra])


def test_cli_rqkmeans_writes_sid_contract_and_fits_on_train_items_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, views = write_tokenizer_dataset(tmp_path / "d")
    seen = {}

    def spy(cfg: TokenizerConfig, x_fit: torch.Tensor):
        seen["x_fit"] = x_fit.clone()
        return fit_tokenizer(cfg, x_fit)

    fit_tokenizer = train.fit_tokenizer
    monkeypatch.setattr(train, "fit_tokenizer", spy)
    metrics = run_cli(paths, "--method", "rqkmeans")
    version = metrics["version"]
    assert version.startswith("rqkmeans-") and (paths.root / "sids" / "LATEST").read_text().strip() == version

    # leakage: the fit saw exactly the train items' rows (ids 1..100), no cold item
    train_ids = np.unique(pd.read_parquet(paths.events).query("split == 'train'")["item_id"])
    assert train_ids.max() <= 100 and metrics["n_fit_items"] == len(train_ids)
    torch.testing.assert_close(
        seen["x_fit"], torch.from_numpy(np.concatenate([views["tags"], views["text"]], 1)[train_ids])
    )

    out = paths.sid_dir(version)
    sids = pd.read_parquet(out / "sids.parquet")
    assert validate_sids(sids, 8, "sids.parquet") == ["sid_0", "sid_1"]
    assert sids["item_id"].tolist() == list(range(1, 121))  # cold items 101..120 included
    assert (sids["sid_version"] == version).all()
    assert sids["event_timestamp"].eq(pd.Timestamp("2024-01-01", tz="UTC")).all()
    assert str(sids["created"].dtype) == "datetime64[ns, UTC]"
    saved = torch.load(out / "codebooks.pt")
    assert [tuple(c.shape) for c in saved["codebooks"]] == [(8, 40), (8, 40)]
    config = json.loads((out / "config.json").read_text())
    assert config["levels"] == 2 and config["codebook_size"] == 8 and config["modalities"] == ["tags", "text"]
    assert config["modality_dims"] == {"tags": 8, "text": 32}
    written = json.loads((out / "metrics.json").read_text())
    assert written["collision_rate"] == metrics["collision_rate"] and written["nmi_first_level"] > 0.7
    # the SIDs decode to the saved codebooks' sums
    codes = torch.from_numpy(sids[["sid_0", "sid_1"]].to_numpy())
    recon = saved["codebooks"][0][codes[:, 0]] + saved["codebooks"][1][codes[:, 1]]
    expected = reconstruction_metrics(concat(views).numpy(), recon.numpy())["recon_error"]
    assert written["recon_error"] == pytest.approx(expected, rel=1e-5)

    # same inputs -> same version; a new setting -> a new version
    assert run_cli(paths, "--method", "rqkmeans")["version"] == version
    assert run_cli(paths, "--method", "rqkmeans", "--epochs", "7")["version"] == version  # an RQ-VAE-only knob
    assert run_cli(paths, "--method", "rqkmeans", "--modalities", "text", "tags")["version"] == version  # = all
    assert run_cli(paths, "--method", "rqkmeans", "--seed", "1")["version"] != version
    # --config replays a run from its metrics.json (the saved options, flags given beside it winning)
    assert main(["--config", str(out / "metrics.json"), "--dataset", str(paths.root)])["version"] == version


def test_cli_rqvae_smoke(tmp_path: Path) -> None:
    paths, _ = write_tokenizer_dataset(tmp_path / "d")
    args = ("--method", "rqvae", "--epochs", "3", "--hidden-dims", "16", "--latent-dim", "8", "--batch-size", "32")
    metrics = run_cli(paths, *args, "--sinkhorn-last")
    out = paths.sid_dir(metrics["version"])
    validate_sids(pd.read_parquet(out / "sids.parquet"), 8, "sids.parquet")
    assert [tuple(c.shape) for c in torch.load(out / "codebooks.pt")["codebooks"]] == [(8, 8), (8, 8)]
    assert len(metrics["loss_history"]) == 3 and np.isfinite(metrics["final_loss"])


def test_cli_bad_inputs(tmp_path: Path) -> None:
    paths, views = write_tokenizer_dataset(tmp_path / "d")
    with pytest.raises(DataError, match="'image' is not listed"):
        run_cli(paths, "--method", "rqkmeans", "--modalities", "text", "image")
    broken = views["tags"].copy()
    broken[3, 0] = np.nan
    np.save(paths.modality("tags"), broken)
    with pytest.raises(DataError, match=r"tags\.npy: missing or changed.*python -m tokenizer\.modalities"):
        run_cli(paths, "--method", "rqkmeans")
    seal_modalities(paths)
    with pytest.raises(DataError, match=r"tags\.npy.*NaN"):
        run_cli(paths, "--method", "rqkmeans")
    paths.modality("tags").unlink()
    with pytest.raises(DataError, match=r"tags\.npy: missing or changed"):
        run_cli(paths, "--method", "rqkmeans")
    with pytest.raises(ValueError, match="method='vq'"):
        TokenizerConfig(dataset=paths.root, method="vq")
    with pytest.raises(ValueError, match="codebook_size=0"):
        TokenizerConfig(dataset=paths.root, codebook_size=0)
    with pytest.raises(SystemExit):
        main(["--dataset", str(paths.root), "--no-such-flag", "1"])


def test_a_codebook_larger_than_the_train_items_is_refused_before_training(tmp_path: Path) -> None:
    paths, _ = write_tokenizer_dataset(tmp_path / "d")  # 100 items have train rows
    with pytest.raises(DataError, match=r"100 items have train rows, fewer than --codebook-size 101"):
        run_cli(paths, "--method", "rqkmeans", "--codebook-size", "101")
    assert not (paths.root / "sids").exists()


def test_a_degenerate_version_is_refused_and_latest_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, _ = write_tokenizer_dataset(tmp_path / "d")
    good = run_cli(paths, "--method", "rqkmeans", "--codebook-size", "8", "--levels", "2")["version"]
    real = train.fit_and_measure

    def collapsed(inputs):  # every item on one SID, as K = 5000 on 1,616 items nearly was
        fitted = real(inputs)
        codes = np.zeros_like(fitted.codes)
        return fitted._replace(codes=codes, metrics={**fitted.metrics, **tokenizer_metrics(codes, 8)})

    monkeypatch.setattr(train, "fit_and_measure", collapsed)
    with pytest.raises(DataError, match=r"degenerate \(1 distinct SIDs for 120 items.*LATEST still names"):
        run_cli(paths, "--method", "rqkmeans", "--codebook-size", "8", "--levels", "2", "--seed", "1")
    assert paths.resolve_sid_version("LATEST") == good
    assert sorted(p.name for p in (paths.root / "sids").iterdir()) == ["LATEST", good]


def test_degenerate_reason_thresholds() -> None:
    spread = np.stack([np.arange(64) // 8, np.arange(64) % 8], axis=1)
    assert degenerate_reason(tokenizer_metrics(spread, 8)) == ""
    assert degenerate_reason(tokenizer_metrics(spread % 2, 8)).startswith("4 distinct SIDs for 64 items")
    one_first_code = np.stack([np.zeros(400, int), np.arange(400) % 200, np.arange(400) // 200], axis=1)
    assert "first position uses 1 of 200 codes" in degenerate_reason(tokenizer_metrics(one_first_code, 200))


# the multimodal methods through the CLI

SMALL = ("--epochs", "3", "--hidden-dims", "16", "--latent-dim", "8", "--batch-size", "32")


def test_cli_mm_rqvae_gets_modalities_separately_and_writes_a_rebuildable_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, views = write_tokenizer_dataset(tmp_path / "d")
    seen = {}

    def spy(cfg: TokenizerConfig, x_fit):
        seen["x_fit"] = x_fit
        return fit_tokenizer(cfg, x_fit)

    fit_tokenizer = train.fit_tokenizer
    monkeypatch.setattr(train, "fit_tokenizer", spy)
    metrics = run_cli(paths, "--method", "mm_rqvae", "--levels", "4", *SMALL)
    version = metrics["version"]
    assert version.startswith("mm_rqvae-")
    # fit on the train items' rows only, one tensor per modality (not concatenated)
    train_ids = np.unique(pd.read_parquet(paths.events).query("split == 'train'")["item_id"])
    assert sorted(seen["x_fit"]) == ["tags", "text"]
    for name in ("tags", "text"):
        torch.testing.assert_close(seen["x_fit"][name], torch.from_numpy(views[name][train_ids]))

    out = paths.sid_dir(version)
    sids = pd.read_parquet(out / "sids.parquet")
    assert validate_sids(sids, 8, "sids.parquet") == ["sid_0", "sid_1", "sid_2", "sid_3"]
    config = json.loads((out / "config.json").read_text())
    assert (config["levels"], config["codebook_size"], config["codebook_dim"]) == (4, 8, 8)
    assert config["position_names"] == ["tags/0", "tags/1", "text/0", "text/1"]
    saved = torch.load(out / "codebooks.pt")
    assert [tuple(c.shape) for c in saved["codebooks"]] == [(8, 8)] * 4
    # the saved config and state rebuild the tokenizer, which reproduces the published SIDs
    model = MMRQVAE(MMRQVAEConfig.from_dict(config["mm_rqvae"]))
    model.load_state_dict(saved["state_dict"])
    codes = model.encode({name: torch.from_numpy(view[1:]) for name, view in views.items()})
    np.testing.assert_array_equal(codes.numpy(), sids[["sid_0", "sid_1", "sid_2", "sid_3"]].to_numpy())
    torch.testing.assert_close(torch.stack(model.codebooks), torch.stack(saved["codebooks"]))
    written = json.loads((out / "metrics.json").read_text())
    assert written["per_modality"]["tags"]["n_present"] == 120 and "recon_cosine" in written["per_modality"]["text"]
    assert {"recon_mmd", "recon_mse", "quant_loss", "align_loss"} <= set(written["final_loss_terms"])

    # versions: another method's knob keeps it, one of its own changes it; rqkmeans ignores MM-RQ-VAE knobs
    mm_args = ("--method", "mm_rqvae", "--levels", "4", *SMALL)
    assert run_cli(paths, *mm_args, "--ortho-weight", "3")["version"] == version
    assert run_cli(paths, *mm_args, "--align", "infonce")["version"] != version
    kmeans_version = run_cli(paths, "--method", "rqkmeans")["version"]
    assert run_cli(paths, "--method", "rqkmeans", "--mse-weight", "0", "--align", "none")["version"] == kmeans_version
    with pytest.raises(ValueError, match="multiple of 2"):
        run_cli(paths, "--method", "mm_rqvae", "--levels", "3", *SMALL)


def test_cli_mmq_same_contract_and_code_budget_checks(tmp_path: Path) -> None:
    paths, views = write_tokenizer_dataset(tmp_path / "d")
    # 1 shared expert x 2 levels + 2 modalities x 1 specific expert x 1 level = 4 positions
    metrics = run_cli(paths, "--method", "mmq", "--levels", "4", *SMALL, "--shared-levels", "2")
    out = paths.sid_dir(metrics["version"])
    sids = pd.read_parquet(out / "sids.parquet")
    assert validate_sids(sids, 8, "sids.parquet") == ["sid_0", "sid_1", "sid_2", "sid_3"]
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "mmq" and config["levels"] == 4
    assert config["position_names"] == ["shared0/0", "shared0/1", "tags.spec0/0", "text.spec0/0"]
    saved = torch.load(out / "codebooks.pt")
    model = MMQ(MMQConfig.from_dict(config))  # what tokenizer.finetune does
    model.load_state_dict(saved["state_dict"])
    codes = model.encode({name: torch.from_numpy(view[1:]) for name, view in views.items()})
    np.testing.assert_array_equal(codes.numpy(), sids[["sid_0", "sid_1", "sid_2", "sid_3"]].to_numpy())
    assert [tuple(c.shape) for c in saved["codebooks"]] == [(8, 8)] * 4
    assert set(metrics["per_modality"]) == {"tags", "text"} and "ortho_loss" in metrics["final_loss_terms"]
    with pytest.raises(ValueError, match="= 4 code positions; pass --levels 4"):
        run_cli(paths, "--method", "mmq", "--levels", "3", *SMALL)
    with pytest.raises(ValueError, match="no Sinkhorn"):
        run_cli(paths, "--method", "mmq", "--levels", "4", "--sinkhorn-last")


def test_cli_multimodal_modality_absent_entirely(tmp_path: Path) -> None:
    paths, views = write_tokenizer_dataset(tmp_path / "d")
    np.save(paths.modality("tags"), np.zeros_like(views["tags"]))  # valid file, but no item has tags
    seal_modalities(paths)
    for method in ("mm_rqvae", "mmq"):
        with pytest.raises(DataError, match="'tags' is all zeros for every fit item"):
            run_cli(paths, "--method", method, "--levels", "4", *SMALL)


def test_benchmark_variants_share_one_code_budget_and_nmi_on_hand_example() -> None:
    from benchmarks.tokenizers import VARIANTS, TokenizerBenchConfig, nmi_figures, variant_config

    bench = TokenizerBenchConfig(levels=4, codebook_size=16)
    base = TokenizerConfig(dataset=Path("."), modalities=("tags", "text"))
    for variant in VARIANTS:
        cfg = variant_config(bench, base, variant, seed=1)
        assert (cfg.levels, cfg.codebook_size, cfg.seed) == (4, 16, 1)
        assert build_tokenizer(cfg, {"tags": 8, "text": 32}).n_positions == 4, variant
    codes = np.array([[0, 5], [0, 6], [1, 7], [1, 7]])
    figures = nmi_figures(codes, np.array([3, 3, 4, 4]))
    assert figures["nmi_first_level"] == pytest.approx(1.0) and figures["nmi_best_position"] == pytest.approx(1.0)
    assert figures["nmi_full_sid"] < 1.0  # three SIDs for two clusters
