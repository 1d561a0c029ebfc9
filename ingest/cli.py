"""Dataset ingestion CLI: raw files -> events / items / users tables under an evaluation protocol.

Usage::

    python -m ingest movielens-100k [--out artifacts] [--cache-dir artifacts/cache] [--protocol item-cold]
    python -m ingest grouplens --path ~/data/ml-100k [--name ml-100k-grouplens]
    python -m ingest amazon --reviews reviews_Beauty_5.json.gz --meta meta_Beauty.json.gz
    python -m ingest synthetic --items 10000 --events 1000000 --users 5000 --seed 0

``--protocol`` (every source) picks the evaluation protocol of sidrank/protocol.py:
``temporal`` (default) or ``item-cold`` (20% of the items lose their train rows
and are the cold set). meta.json records it, so every later stage follows it,
and the folder name carries it: ``<out>/<name>`` or ``<out>/<name>-item-cold``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingest.amazon import load_amazon
from ingest.dataset import IngestedDataset, write_dataset
from ingest.movielens import fetch_recbole_wheel, load_grouplens, load_recbole_wheel
from ingest.synthetic import SyntheticConfig, generate
from sidrank.protocol import PROTOCOLS, TEMPORAL, check_protocol
from sidrank.schema import DataError

log = logging.getLogger(__name__)

SOURCES = ("movielens-100k", "grouplens", "amazon", "synthetic")


@dataclass
class IngestConfig:
    """One ingest run; source-specific options are ignored by the other sources.

    Args:
        source: ``movielens-100k``, ``grouplens``, ``amazon`` or ``synthetic``.
        name: dataset name; the folder is ``<out>/<name>`` under ``temporal``,
            ``<out>/<name>-<protocol>`` otherwise.
        out: output root.
        cache_dir: where the RecBole wheel is downloaded (movielens-100k).
        path: folder with u.data / u.item / u.user (grouplens).
        reviews: Amazon reviews JSON lines, optionally .gz (amazon).
        meta: Amazon metadata JSON lines, optionally .gz (amazon).
        synthetic: generator settings, only for ``synthetic``.
        protocol: evaluation protocol, ``temporal`` or ``item-cold`` (sidrank/protocol.py).
    """

    source: str
    name: str
    out: Path = Path("artifacts")
    cache_dir: Path = Path("artifacts/cache")
    path: Path | None = None
    reviews: Path | None = None
    meta: Path | None = None
    synthetic: SyntheticConfig | None = None
    protocol: str = TEMPORAL

    def __post_init__(self) -> None:
        check_protocol(self.protocol, "protocol")
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r}: expected one of {SOURCES}")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"name={self.name!r}: expected a plain folder name")
        needed = {"grouplens": ("path",), "amazon": ("reviews", "meta"), "synthetic": ("synthetic",)}
        for attribute in needed.get(self.source, ()):
            if getattr(self, attribute) is None:
                raise ValueError(f"{attribute}=None: required for source {self.source!r}")


def load(config: IngestConfig) -> IngestedDataset:
    """Read the configured source into an :class:`IngestedDataset`."""
    if config.source == "movielens-100k":
        return load_recbole_wheel(fetch_recbole_wheel(config.cache_dir), name=config.name)
    if config.source == "grouplens":
        assert config.path is not None  # checked by IngestConfig.__post_init__
        return load_grouplens(config.path, name=config.name)
    if config.source == "amazon":
        assert config.reviews is not None and config.meta is not None
        return load_amazon(config.reviews, config.meta, name=config.name)
    assert config.synthetic is not None
    return generate(config.synthetic, name=config.name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ingest", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="source", required=True)

    def command(source: str, default_name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(source, help=help_text)
        sub.add_argument("--out", type=Path, default=IngestConfig.out, help="output root")
        sub.add_argument("--name", default=default_name, help=f"dataset name (default {default_name})")
        sub.add_argument(
            "--protocol", choices=PROTOCOLS, default=TEMPORAL,
            help="evaluation protocol (default temporal); item-cold holds 20%% of the items out of train "
                 "and writes <out>/<name>-item-cold",
        )  # fmt: skip
        return sub

    ml = command("movielens-100k", "ml-100k", "MovieLens-100K from the recbole==1.2.1 wheel on PyPI")
    ml.add_argument("--cache-dir", type=Path, default=IngestConfig.cache_dir, help="wheel download cache")
    gl = command("grouplens", "ml-100k-grouplens", "GroupLens ml-100k files u.data, u.item, u.user")
    gl.add_argument("--path", type=Path, required=True, help="folder holding u.data, u.item, u.user")
    amazon = command("amazon", "beauty", "Amazon reviews + metadata JSON lines")
    amazon.add_argument("--reviews", type=Path, required=True, help="reviews JSON lines (.json or .json.gz)")
    amazon.add_argument("--meta", type=Path, required=True, help="metadata JSON lines (.json or .json.gz)")
    syn = command("synthetic", "synthetic", "generated events with planted cluster structure")
    syn.add_argument("--items", type=int, required=True)
    syn.add_argument("--events", type=int, required=True)
    syn.add_argument("--users", type=int, required=True)
    syn.add_argument("--seed", type=int, required=True)
    syn.add_argument("--clusters", type=int, default=None, help="latent clusters (generator default if omitted)")
    return parser


def config_from_args(argv: list[str] | None = None) -> IngestConfig:
    """Parse the command line (unknown arguments are rejected) into an :class:`IngestConfig`."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        synthetic = None
        if args.source == "synthetic":
            overrides = {"n_clusters": args.clusters} if args.clusters is not None else {}
            synthetic = SyntheticConfig(
                n_items=args.items, n_events=args.events, n_users=args.users, seed=args.seed, **overrides
            )
        return IngestConfig(
            source=args.source,
            name=args.name,
            out=args.out,
            cache_dir=getattr(args, "cache_dir", IngestConfig.cache_dir),
            path=getattr(args, "path", None),
            reviews=getattr(args, "reviews", None),
            meta=getattr(args, "meta", None),
            synthetic=synthetic,
            protocol=args.protocol,
        )
    except ValueError as exc:
        parser.error(str(exc))  # exits with the usage line and the bad value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry: ingest one source and write ``<out>/<name>``; returns meta.json's content."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from_args(argv)
    log.info("ingest config: %s", config)
    return write_dataset(load(config), config.out, config.protocol)


if __name__ == "__main__":
    try:
        main()
    except DataError as exc:  # the message names file, column and fix; a traceback adds nothing
        raise SystemExit(f"error: {exc}") from None
