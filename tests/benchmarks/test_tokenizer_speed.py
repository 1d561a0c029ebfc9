"""The tokenizer speed benchmark's structure, batched encoding, one place per default.

Tiny sizes and structure only: nothing here asserts a speed.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from benchmarks import tokenizer_speed
from tokenizer import defaults
from tokenizer.mm_rqvae import MMRQVAE, MMRQVAEConfig
from tokenizer.mmq import MMQ, MMQConfig
from tokenizer.encoder import QuantizedEncoder
from tokenizer.methods import METHODS, TokenizerConfig, build_tokenizer
from tokenizer.quantizer import ResidualQuantizer, kmeans
from tokenizer.rqkmeans import RQKMeans
from tokenizer.rqvae import RQVAE
from tokenizer.settings import NetworkConfig, QuantizerConfig

N_ITEMS, LEVELS, K = 300, 4, 8
TINY = ["--items", str(N_ITEMS), "--levels", str(LEVELS), "--codebook-size", str(K), "--kmeans-iters", "2",
        "--text-dim", "12", "--tags-dim", "6", "--titles", "0", "--threads", "1"]  # fmt: skip


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # main() sets the process's torch threads
    yield
    torch.set_num_threads(threads)


def test_benchmark_writes_one_record_per_method_and_the_floor(tmp_path: Path, keep_threads: None) -> None:
    payload = tokenizer_speed.main([*TINY, "--results-dir", str(tmp_path), "--name", "speed"])
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert [r["method"] for r in saved["methods"]] == list(METHODS)
    assert saved["inputs"]["dims"] == {"tags": 6, "text": 12} and saved["torch_threads"] == 1
    assert saved["reference"]["agreement"] > 0.99  # the floor finds the codes torch.cdist finds
    for record in payload["methods"]:
        encode, training = record["encode"], record["training"]
        assert encode["batch_size"] == defaults.ENCODE_BATCH_SIZE and len(record["usage"]) == LEVELS
        assert encode["items_per_second"] > 0 and encode["times_floor"] > 0 and encode["peak_rss_gib"] > 0
        assert training["items_per_second"] > 0 and record["config"]["kmeans_iters"] == 2
        if record["method"] != "rqkmeans":
            assert training["steps"] == -(-N_ITEMS // defaults.BATCH_SIZE)
    markdown = (tmp_path / "speed.md").read_text()
    assert "floor: 1 matmul + argmin" in markdown and "torch.cdist" in markdown
    assert all(f"| {method} |" in markdown for method in METHODS) and "MiniLM" not in markdown


def test_synthetic_inputs_are_views_of_one_matrix() -> None:
    inputs = tokenizer_speed.synthetic_inputs(50, {"text": 5, "tags": 3}, seed=0)
    assert inputs.concatenated.shape == (50, 8) and list(inputs.modalities) == ["tags", "text"]
    torch.testing.assert_close(torch.cat(list(inputs.modalities.values()), dim=1), inputs.concatenated)
    text = inputs.modalities["text"]
    assert text.untyped_storage().data_ptr() == inputs.concatenated.untyped_storage().data_ptr()
    torch.testing.assert_close(text.norm(dim=1), torch.ones(50))  # the generator's L2-normalised views


@pytest.mark.parametrize("method", METHODS)
def test_encode_is_the_same_in_any_batch_size(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    xs = {"tags": torch.randn(200, 6, generator=gen), "text": torch.randn(200, 12, generator=gen)}
    cfg = TokenizerConfig(dataset=Path("."), method=method, levels=LEVELS, codebook_size=K, hidden_dims=(16,),
                          latent_dim=8, kmeans_iters=2)  # fmt: skip
    torch.manual_seed(0)
    model = build_tokenizer(cfg, {"tags": 6, "text": 12})
    x = METHODS[method].inputs(xs)
    model.init_codebooks(x, seed=0)
    model.eval()
    codes = model.encode(x)
    assert codes.shape == (200, LEVELS)
    assert torch.equal(model.encode(x, batch_size=7), codes)


def test_model_defaults_are_the_cli_defaults() -> None:
    """Every default the classes share with TokenizerConfig (the only config the CLI reads) is
    TokenizerConfig's: each shared setting is declared once, in its setting group."""
    cli = TokenizerConfig(dataset=Path("."))
    groups = {"quantizer": QuantizerConfig, "network": NetworkConfig}
    for target in (ResidualQuantizer, QuantizedEncoder, RQKMeans, RQVAE):
        params = inspect.signature(target).parameters
        assert params["levels"].default == cli.levels, target.__name__
        for name, group in groups.items():
            if name in params:
                assert params[name].default == cli.part(group), (target.__name__, name)
    # MM-RQ-VAE's levels are per modality, not P: a different setting of the same name
    for config in (MMRQVAEConfig({"tags": 8}), MMQConfig({"tags": 8})):
        for group in groups.values():
            assert config.part(group) == cli.part(group), (type(config).__name__, group.__name__)
    assert inspect.signature(kmeans).parameters["iters"].default == cli.kmeans_iters
    learned = (RQVAE, MMRQVAE, MMQ)
    for fit in [*(cls.fit for cls in learned), *(cls.train_epochs for cls in learned)]:
        params = inspect.signature(fit).parameters
        assert (params["epochs"].default, params["batch_size"].default, params["lr"].default) == (
            cli.epochs, cli.batch_size, cli.lr,
        )  # fmt: skip
