"""Tokenizer speed at a million items: training and encoding items/s of every method.

    python -m benchmarks.tokenizer_speed                                   # 1,000,000 items, every method
    python -m benchmarks.tokenizer_speed --items 50000 --methods rqvae mmq --titles 0

Inputs: the synthetic generator's planted-cluster items (:mod:`ingest.synthetic`)
with its two modality views made at the widths of a real MovieLens-100K run:
``text`` at MiniLM's 384 and ``tags`` at the 34 of ML-100K's genres and year
buckets (:func:`tokenizer.modalities.tag_features`). Embedding a million titles
with MiniLM is a separate stage, out of reach on 2 cores; it gets its own row,
MiniLM encode items/s on ML-100K titles (repeated up to ``--titles``).

Every method runs at the demo's code budget (P = 4, K = 64,
``demo.CODE_BUDGET``) with :class:`tokenizer.methods.TokenizerConfig`'s
defaults otherwise, on all N items:

- k-means init: the codebook initialisation, k-means++ seeding and
  ``--kmeans-iters`` Lloyd iterations per level (for RQ-KMeans the whole fit);
- training: ``--epochs`` passes at the default batch size (1 epoch by
  default, not the 200 of a real run), items/s = N x epochs / s; as in every
  real run this includes the usage log's encode of all items after the last epoch;
- encoding: all N items in batches of ``--encode-batch-size``, items/s, and
  the process's peak RSS during it (inputs included) and its rise.

Baseline, measured in the same run right before each method's encode: the
cost floor of any encoder, one matmul of the N x D concatenated inputs against
a K x D codebook + argmin in the same batches (one level of RQ-KMeans); each
encode is reported as a multiple of it. ``torch.cdist`` + argmin on the same
inputs is timed once beside it, as torch's own nearest-code search.
``torch.set_num_threads(--threads)``, 2 by default; the load average before
and after is recorded, as other jobs on a shared machine slow multi-threaded
runs down far more than single-threaded ones.

Writes ``benchmarks/results/tokenizer_speed.json`` and ``.md``.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch._dynamo  # noqa: F401  the first optimizer imports it (seconds, once): not any method's training time
from tqdm import tqdm

from benchmarks.report import RESULTS_DIR, markdown_table, rerun_command, write_results
from sidrank.cli import add_config_arguments, parse_config, parser_for
from demo import CODE_BUDGET
from ingest.cli import IngestConfig
from ingest.movielens import fetch_recbole_wheel, load_recbole_wheel
from ingest.synthetic import SyntheticConfig, item_modalities
from tokenizer.defaults import ENCODE_BATCH_SIZE
from tokenizer.fitting import LearnedTokenizer
from tokenizer.metrics import level_usage
from tokenizer.modalities import TEXT_DIM, ModalityConfig, encode_titles, load_text_model
from tokenizer.quantizer import nearest
from tokenizer.methods import METHODS, TokenizerConfig, build_tokenizer

log = logging.getLogger("benchmarks.tokenizer_speed")

BUDGET = dict(zip(CODE_BUDGET[::2], map(int, CODE_BUDGET[1::2]), strict=True))  # {"--levels": P, "--codebook-size": K}
ML100K_TAGS_DIM = 34  # tag_features on ML-100K: 18 genres + 16 five-year release buckets
GIB = 2**30


@dataclass
class SpeedConfig:
    """What the benchmark runs.

    Args:
        items: N, items generated, fitted on and encoded.
        methods: tokenizer methods.
        levels: P, code positions per SID.
        codebook_size: K, codes per position.
        epochs: training passes over the N items (learned tokenizers).
        kmeans_iters: Lloyd iterations per level of the k-means init (a real run's by default).
        encode_batch_size: items per encode batch.
        other_batch_sizes: encode batch sizes timed once more each, to show the choice of the default.
        threads: torch intra-op threads.
        text_dim: width of the ``text`` modality.
        tags_dim: width of the ``tags`` modality.
        titles: ML-100K titles (repeated) for the MiniLM row; 0 skips the row.
        seed: seed of the inputs, initialisation and batch order.
        results_dir: where the JSON and Markdown go.
        name: results file stem.
    """

    items: int = 1_000_000
    methods: tuple[str, ...] = field(default=tuple(METHODS), metadata={"choices": tuple(METHODS)})
    levels: int = BUDGET["--levels"]
    codebook_size: int = BUDGET["--codebook-size"]
    epochs: int = 1
    kmeans_iters: int = TokenizerConfig.kmeans_iters
    encode_batch_size: int = ENCODE_BATCH_SIZE
    other_batch_sizes: tuple[int, ...] = (256, 8192)
    threads: int = 2
    text_dim: int = TEXT_DIM
    tags_dim: int = ML100K_TAGS_DIM
    titles: int = 2000
    seed: int = 0
    results_dir: Path = RESULTS_DIR
    name: str = "tokenizer_speed"

    def __post_init__(self) -> None:
        self.methods, self.results_dir = tuple(self.methods), Path(self.results_dir)
        self.other_batch_sizes = tuple(self.other_batch_sizes)
        if any(b < 1 for b in self.other_batch_sizes):
            raise ValueError(f"other_batch_sizes={self.other_batch_sizes}: every size must be >= 1")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods={unknown}: expected names from {tuple(METHODS)}")
        positive = ("items", "levels", "codebook_size", "epochs", "kmeans_iters", "encode_batch_size", "threads",
                    "text_dim", "tags_dim")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.items < self.codebook_size:
            raise ValueError(f"items={self.items}: k-means needs at least codebook_size={self.codebook_size} items")
        if self.titles < 0:
            raise ValueError(f"titles={self.titles}: expected >= 0 (0 skips the MiniLM row)")


class Inputs(NamedTuple):
    """The synthetic items.

    Attributes:
        concatenated: [N, D] float32, the modalities side by side in sorted name order.
        modalities: name -> [N, D_m], column views of ``concatenated`` (no copies).
    """

    concatenated: torch.Tensor
    modalities: dict[str, torch.Tensor]


# helpers


def reset_peak_rss() -> bool:
    """Set this process's peak RSS to its current RSS (Linux >= 4.0); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_gib(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak since :func:`reset_peak_rss`) of this process in GiB;
    without /proc, the lifetime peak from getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


class Timing(NamedTuple):
    """One timed call: its result, wall seconds, peak RSS during it and RSS before it (GiB)."""

    result: Any
    seconds: float
    peak_rss_gib: float
    rss_before_gib: float


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Timing:
    """Call ``fn`` and measure it (:class:`Timing`)."""
    reset_peak_rss()
    before = rss_gib("VmRSS")
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return Timing(result, time.perf_counter() - start, rss_gib("VmHWM"), before)


def synthetic_inputs(n_items: int, dims: dict[str, int], seed: int) -> Inputs:
    """The generator's noisy views of its planted latents (ingest.synthetic) at widths ``dims``."""
    config = SyntheticConfig(n_items=n_items, n_events=1, n_users=1, seed=seed)
    names = sorted(dims)
    views = [view[1:] for view in item_modalities(config, {name: dims[name] for name in names}).values()]
    matrix = torch.from_numpy(np.concatenate(views, axis=1))
    del views
    starts = np.cumsum([0] + [dims[name] for name in names])
    return Inputs(matrix, {name: matrix[:, starts[i] : starts[i + 1]] for i, name in enumerate(names)})


def cdist_codes(x: torch.Tensor, codebook: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Code [N] of the nearest row of ``codebook`` [K, D] for each row of ``x`` [N, D] by
    ``torch.cdist`` + argmin, batched: torch's own nearest-code search, as a reference."""
    return torch.cat([torch.cdist(part, codebook).argmin(1) for part in x.split(batch_size)])


def floor_codes(x: torch.Tensor, codebook: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The floor: one fused matmul + argmin per batch of ``x`` [N, D] against ``codebook`` [K, D]."""
    return nearest(x, codebook, chunk_size=batch_size)


def per_second(items: int, seconds: float) -> float:
    return items / seconds if seconds > 0 else float("inf")


# measurements


def measure_encode(
    cfg: SpeedConfig, model: torch.nn.Module, x: torch.Tensor | dict[str, torch.Tensor], inputs: Inputs
) -> tuple[torch.Tensor, dict]:
    """Codes [N, P] of all N items and the encode figures, the floor timed right before."""
    # back to back, so the floor and the encode see the same load on a shared machine
    floor = timed(floor_codes, inputs.concatenated, inputs.concatenated[: cfg.codebook_size], cfg.encode_batch_size)
    encode = timed(model.encode, x, batch_size=cfg.encode_batch_size)
    codes = encode.result
    if tuple(codes.shape) != (cfg.items, cfg.levels):
        raise RuntimeError(f"encode returned shape {tuple(codes.shape)}, expected ({cfg.items}, {cfg.levels})")
    others = {size: timed(model.encode, x, batch_size=size).seconds for size in cfg.other_batch_sizes}
    return codes, {
        "batch_size": cfg.encode_batch_size,
        "seconds": encode.seconds,
        "items_per_second": per_second(cfg.items, encode.seconds),
        "peak_rss_gib": encode.peak_rss_gib,
        "rss_before_gib": encode.rss_before_gib,
        "floor_seconds": floor.seconds,
        "times_floor": encode.seconds / floor.seconds,
        "seconds_at_other_batch_sizes": others,
    }


def run_method(cfg: SpeedConfig, method: str, inputs: Inputs) -> dict:
    """k-means init, training and encoding of one method on all N items; a JSON-ready record."""
    tok = TokenizerConfig(
        dataset=Path("."), method=method, levels=cfg.levels, codebook_size=cfg.codebook_size, epochs=cfg.epochs,
        kmeans_iters=cfg.kmeans_iters, seed=cfg.seed, modalities=tuple(inputs.modalities),
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = build_tokenizer(tok, {name: x.shape[1] for name, x in inputs.modalities.items()})
    # the concatenation already exists (the modalities are views of it): no copy
    x = inputs.modalities if METHODS[method].multimodal else inputs.concatenated
    n = cfg.items
    # k-means init (RQ-KMeans: the whole fit), then the training epochs of the learned tokenizers
    init = timed(model.init_codebooks, x, seed=cfg.seed)
    if not isinstance(model, LearnedTokenizer):
        training = {"what": "its k-means init is the fit", "seconds": init.seconds,
                    "items_per_second": per_second(n, init.seconds)}  # fmt: skip
    else:
        train = timed(model.train_epochs, x, epochs=cfg.epochs, batch_size=tok.batch_size, lr=tok.lr, seed=cfg.seed)
        steps = cfg.epochs * math.ceil(n / tok.batch_size)
        training = {"what": f"{cfg.epochs} epoch x {steps:,} steps of {tok.batch_size}", "epochs": cfg.epochs,
                    "steps": steps, "batch_size": tok.batch_size, "seconds": train.seconds,
                    "items_per_second": per_second(n * cfg.epochs, train.seconds), "peak_rss_gib": train.peak_rss_gib}  # fmt: skip
    model.eval()
    codes, encode = measure_encode(cfg, model, x, inputs)
    record = {
        "method": method,
        "config": tok.hashable(),
        "kmeans_init_seconds": init.seconds,
        "kmeans_init_peak_rss_gib": init.peak_rss_gib,
        "training": training,
        "encode": encode,
        "usage": level_usage(codes.numpy(), cfg.codebook_size),
    }
    log.info(
        "%s: init %.1fs, training %.1fs (%.0f items/s), encode %.2fs (%.0f items/s, %.2f x floor %.2fs), peak RSS %.2f GiB",
        method, init.seconds, training["seconds"], training["items_per_second"], encode["seconds"],
        encode["items_per_second"], encode["times_floor"], encode["floor_seconds"], encode["peak_rss_gib"],
    )  # fmt: skip
    return record


def reference_speed(cfg: SpeedConfig, inputs: Inputs) -> dict:
    """Floor and ``torch.cdist`` nearest-code search of all N inputs, back to back; checks they agree."""
    codebook = inputs.concatenated[: cfg.codebook_size]
    floor = timed(floor_codes, inputs.concatenated, codebook, cfg.encode_batch_size)
    cdist = timed(cdist_codes, inputs.concatenated, codebook, cfg.encode_batch_size)
    return {
        "floor_seconds": floor.seconds,
        "cdist_seconds": cdist.seconds,
        "cdist_peak_rss_gib": cdist.peak_rss_gib,
        "cdist_rss_before_gib": cdist.rss_before_gib,
        "agreement": float((floor.result == cdist.result).float().mean()),
    }


def ml100k_titles(count: int) -> list[str]:
    """``count`` MovieLens-100K titles (the non-empty ones, repeated in order as needed)."""
    items = load_recbole_wheel(fetch_recbole_wheel(IngestConfig.cache_dir)).items
    titles = [t for t in items["title"] if isinstance(t, str) and t.strip()]
    return (titles * math.ceil(count / len(titles)))[:count]


def minilm_speed(count: int) -> dict:
    """Load time and encode items/s of the MiniLM text model on ``count`` ML-100K titles."""
    titles = ml100k_titles(count)
    load = timed(load_text_model)
    encode = timed(encode_titles, load.result, titles, batch_size=ModalityConfig.batch_size)
    return {
        "titles": count,
        "batch_size": ModalityConfig.batch_size,
        "load_seconds": load.seconds,
        "seconds": encode.seconds,
        "items_per_second": per_second(count, encode.seconds),
        "peak_rss_gib": encode.peak_rss_gib,
        "rss_before_gib": encode.rss_before_gib,
    }


# report


def rss_cell(peak: float, before: float) -> str:
    return f"{peak:.2f} (+{max(peak - before, 0.0):.2f})"


def table(cfg: SpeedConfig, records: list[dict], reference: dict, minilm: dict | None) -> str:
    """The Markdown table: the floor, torch.cdist, one row per method, MiniLM."""
    n = cfg.items
    others = " / ".join(f"{size:,}" for size in cfg.other_batch_sizes)
    header = ["encoder", f"k-means init s ({cfg.kmeans_iters} iters/level)", "training", "train items/s",
              f"encode s (batch {cfg.encode_batch_size:,})", "encode items/s", "encode / floor",
              f"encode s at batch {others or '-'}", "peak RSS in encode GiB (rise)"]  # fmt: skip
    floors = [reference["floor_seconds"], *(r["encode"]["floor_seconds"] for r in records)]
    mean = float(np.mean(floors))
    rows = [
        [f"floor: 1 matmul + argmin, {n:,} x {cfg.tags_dim + cfg.text_dim} vs {cfg.codebook_size} codes", "-", "-",
         "-", f"{mean:.2f} ({min(floors):.2f}-{max(floors):.2f}, {len(floors)} runs)", f"{n / mean:,.0f}", "1.00", "-",
         "-"],
        ["torch.cdist + argmin, same inputs", "-", "-", "-", f"{reference['cdist_seconds']:.2f}",
         f"{per_second(n, reference['cdist_seconds']):,.0f}",
         f"{reference['cdist_seconds'] / reference['floor_seconds']:.2f}", "-",
         rss_cell(reference["cdist_peak_rss_gib"], reference["cdist_rss_before_gib"])],
    ]  # fmt: skip
    for r in records:
        t, e = r["training"], r["encode"]
        rows.append([r["method"], f"{r['kmeans_init_seconds']:.1f}", t["what"], f"{t['items_per_second']:,.0f}",
                     f"{e['seconds']:.2f}", f"{e['items_per_second']:,.0f}", f"{e['times_floor']:.2f}",
                     " / ".join(f"{v:.2f}" for v in e["seconds_at_other_batch_sizes"].values()) or "-",
                     rss_cell(e["peak_rss_gib"], e["rss_before_gib"])])  # fmt: skip
    if minilm:
        rows.append([f"MiniLM-L6 text model, {minilm['titles']:,} ML-100K titles", "-",
                     f"pretrained (load {minilm['load_seconds']:.1f} s)", "-", f"{minilm['seconds']:.2f}",
                     f"{minilm['items_per_second']:,.0f}", "-", f"batch {minilm['batch_size']}",
                     rss_cell(minilm["peak_rss_gib"], minilm["rss_before_gib"])])  # fmt: skip
    title = (f"### {n:,} synthetic items (tags {cfg.tags_dim} + text {cfg.text_dim} dims), P={cfg.levels}, "
             f"K={cfg.codebook_size}, torch.set_num_threads({cfg.threads})")  # fmt: skip
    return f"{title}\n\n{markdown_table(header, rows)}"


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = parser_for("python -m benchmarks.tokenizer_speed", "Training and encoding items/s of every tokenizer method.")
    add_config_arguments(parser, SpeedConfig)
    cfg = parse_config(parser, SpeedConfig, argv)

    torch.set_num_threads(cfg.threads)
    start, load_before = time.perf_counter(), os.getloadavg()
    # inputs: generated once, shared by every method
    generated = timed(synthetic_inputs, cfg.items, {"tags": cfg.tags_dim, "text": cfg.text_dim}, cfg.seed)
    inputs = generated.result
    log.info("inputs: %s in %.1fs", {k: tuple(v.shape) for k, v in inputs.modalities.items()}, generated.seconds)
    # the reference searches, every method, then the text model
    reference = reference_speed(cfg, inputs)
    records = [run_method(cfg, method, inputs) for method in tqdm(cfg.methods, desc="tokenizer speed", unit="method")]
    minilm = minilm_speed(cfg.titles) if cfg.titles else None

    text = table(cfg, records, reference, minilm)
    load = {"before": load_before, "after": os.getloadavg()}
    text += (f"\n\nTraining: {cfg.epochs} epoch over all items at the default batch size (a real run does "
             f"{TokenizerConfig.epochs}), including the usage log's encode after the last epoch. The floor is timed "
             f"right before each encode; encode / floor = encode s / that floor's s. Peak RSS counts the "
             f"{inputs.concatenated.numel() * 4 / GIB:.2f} GiB of inputs. Load average (1, 5, 15 min) before "
             f"{', '.join(f'{v:.1f}' for v in load['before'])}, after {', '.join(f'{v:.1f}' for v in load['after'])} "
             f"(the machine may be shared; other jobs slow 2-thread runs far more than 1-thread ones).")  # fmt: skip
    payload = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "torch_threads": torch.get_num_threads(),
        "peak_rss": "per phase (VmHWM reset)" if reset_peak_rss() else "process lifetime (getrusage): no per-phase reset here",
        "load_average": load,
        "inputs": {"dims": {k: v.shape[1] for k, v in inputs.modalities.items()}, "seconds": generated.seconds,
                   "peak_rss_gib": generated.peak_rss_gib},  # fmt: skip
        "reference": reference,
        "methods": records,
        "minilm": minilm,
        "total_seconds": time.perf_counter() - start,
    }
    command = rerun_command("benchmarks.tokenizer_speed", argv)
    write_results(cfg.name, payload, text, command, results_dir=cfg.results_dir)
    print(text)
    return payload


if __name__ == "__main__":
    main()
