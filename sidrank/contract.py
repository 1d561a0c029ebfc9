"""The training-row contract between the feature store and the ranker.

Training rows are what ``get_historical_features`` returns for the feature
service (one row per labelled event, re-sorted by ``row_id``). The feature
pipeline writes ``features/feature_meta.json`` (table sizes); the ranker reads
it and never imports ``feature_repo``.

It also holds the one resolver of every cross-stage location: a dataset's
artifacts (:class:`DatasetPaths`, including ``sids/LATEST`` and the rows
cache) and a Feast repository's generated data (:class:`RepoPaths`: SID
version registry, default version, per-version feature meta). Every stage
asks these; none builds such a path itself.

SID versions: the feature store holds the SIDs of every published tokenizer
version side by side, keyed by ``sid_version`` like users by ``user_id``, and
serves them all through the one feature service ``ranker_v1``: a request
names its version, so publishing a new one never hides an older one. The SID
codes and the users' history prefixes (``hist_sid_p1`` / ``hist_sid_p2``,
which depend on the codes) are per version; counts, profile and content are
shared. The repository's default version is the one a request without a
version gets (:meth:`RepoPaths.published_sid_version`).

Missing values after the point-in-time join are legitimate (a user or item
with no earlier events has no behaviour row yet): counts read as 0 and lists
as empty. A missing SID is an error (every item has one).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sidrank.io import read_unit_file, require_built_from, require_complete_unit, write_text
from sidrank.schema import DataError, require_file

if TYPE_CHECKING:
    import pandas as pd

# The ranker's feature service; every published SID version is read through it (sid_version is a key).
FEATURE_SERVICE = "ranker_v1"
# The default version's table sizes; every published version also has FEATURE_META_DIR/<name>.json.
FEATURE_META_FILE = "feature_meta.json"
FEATURE_META_DIR = "feature_meta"
# Published SID versions and the default one (RepoPaths.read_sid_registry), written by features.publish.
SID_VERSIONS_FILE = "sid_versions.json"
# What features.publish materialized into the online store (RepoPaths.materialized); not part of the data unit.
MATERIALIZED_FILE = "materialized.json"
# Tables keyed by (entity, sid_version): <repo>/data/<table>.parquet holds the rows of every published version.
SID_VERSION_TABLES = ("item_sids", "user_sid_history")
# The user profile features the Feast repository declares (user_profile_fv): those of every
# ingest source. A dataset without one publishes 0 (unknown) and its feature meta omits it.
USER_PROFILE_FEATURES = ("age_id", "gender_id", "occupation_id", "zip_code_id", "segment_id")

# Columns carried from the entity dataframe.
ENTITY_COLUMNS = ("row_id", "user_id", "item_id", "event_timestamp", "label")

# Causal behaviour counts (events strictly before the row), log1p-scaled by the ranker.
USER_COUNT_COLUMNS = ("user_count", "user_pos_count")
ITEM_COUNT_COLUMNS = ("item_count", "item_pos_count")

# Scalar categorical ids from the item content view (0 = unknown).
ITEM_SCALAR_COLUMNS = ("year_bucket",)

# int64 list features.
ITEM_TAGS = "tag_ids"  # 1..n_tags
SID_CODES = "sid_codes"  # L codes in [0, K)
HIST_ITEMS = "hist_items"  # last HISTORY_LENGTH positive item ids, most recent first
HIST_SID_PREFIXES = ("hist_sid_p1", "hist_sid_p2")  # encoded SID prefixes of hist_items, depth 1 and 2
HISTORY_LENGTH = 20

SID_VERSION = "sid_version"
# The version name that stands for the one the tokenizer wrote last.
LATEST = "LATEST"

# The files of ingest's unit (sidrank.io.publish_unit) in the dataset folder; the later stages' subfolders
# (modalities/, sids/<version>/, features/) are units of their own that record this unit's digest.
DATASET_FILES = ("events.parquet", "items.parquet", "users.parquet", "meta.json")
# Every dataset unit lists it: the file each stage reads first.
DATASET_META_FILE = "meta.json"
# Upstream keys of a unit's "built_from": the dataset unit, and the SID version unit features were built from.
BUILT_FROM_DATASET = "dataset"
BUILT_FROM_SIDS = "sids"


def sid_version_name(version: str) -> str:
    """File-safe name of a tokenizer version: ``rqvae-822439f417`` -> ``rqvae_822439f417``.

    Names the per-version files (feature meta, rows cache), so two versions
    that differ only in punctuation would collide; the publish step refuses that.
    """
    name = re.sub(r"[^0-9A-Za-z_]", "_", version.strip())
    if not name:
        raise ValueError(f"version={version!r}: expected a non-empty tokenizer version")
    return name


def check_behaviour_counts(rows: "pd.DataFrame", source: str) -> None:
    """Each (count, positive count) pair of training rows: both missing (no earlier event) or both set,
    non-negative, positives at most the count. Every error names the column at fault.

    Raises:
        DataError: naming the column, the first rows and the fix.
    """
    fix = "rebuild the behaviour features (python -m features.build) and the training rows"
    for count, positive in (USER_COUNT_COLUMNS, ITEM_COUNT_COLUMNS):
        # numpy, not pandas, per column: serving runs this for every request of 100 rows.
        values = {c: np.asarray(rows[c], dtype=np.float64) for c in (count, positive)}
        for column, other in ((count, positive), (positive, count)):
            lone = np.isnan(values[column]) & ~np.isnan(values[other])
            if lone.any():
                raise DataError(f"{source}: column '{column}' is missing in rows {np.flatnonzero(lone)[:5].tolist()} "
                                f"where '{other}' is set; {fix}")
            negative = values[column] < 0
            if negative.any():
                raise DataError(f"{source}: column '{column}' has negative counts in rows "
                                f"{np.flatnonzero(negative)[:5].tolist()}; {fix}")
        above = values[positive] > values[count]
        if above.any():
            raise DataError(f"{source}: column '{positive}' exceeds '{count}' in rows {np.flatnonzero(above)[:5].tolist()}; "
                            f"{fix}")


def encode_prefix(codes: "list[int] | tuple[int, ...]", codebook_size: int) -> int:
    """Mixed-radix integer of a SID prefix: (c0, c1, ..) -> c0 * K + c1 ...

    The depth is carried by the feature name, so equal integers at different
    depths never meet in one table without the depth being hashed in too.
    """
    value = 0
    for code in codes:
        value = value * codebook_size + int(code)
    return value


@dataclass
class FeatureMeta:
    """Table sizes the ranker needs, written by the feature pipeline.

    Args:
        n_users: user ids are 1..n_users.
        n_items: item ids are 1..n_items.
        n_tags: tag ids are 1..n_tags.
        n_year_buckets: year_bucket ids are 0..n_year_buckets - 1.
        sid_levels: number of code positions L.
        sid_codebook_size: codes per position K.
        sid_version: the SID version the features were built from.
        user_profile: feature column (``<profile column>_id``) -> vocabulary
            size (ids 0..V-1, 0 unknown).
        events_sha256: sha256 of the events.parquet the features were built
            from, so a ranker pointed at another dataset's events refuses to train.
    """

    n_users: int
    n_items: int
    n_tags: int
    n_year_buckets: int
    sid_levels: int
    sid_codebook_size: int
    sid_version: str
    user_profile: dict[str, int] = field(default_factory=dict)
    events_sha256: str = ""


@dataclass(frozen=True)
class DatasetPaths:
    """Where each stage reads and writes the artifacts of one dataset.

    Args:
        root: folder of the dataset, e.g. ``artifacts/ml-100k``.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def events(self) -> Path:
        return self.root / "events.parquet"

    @property
    def items(self) -> Path:
        return self.root / "items.parquet"

    @property
    def users(self) -> Path:
        return self.root / "users.parquet"

    @property
    def meta(self) -> Path:
        return self.root / "meta.json"

    @property
    def modalities(self) -> Path:
        return self.root / "modalities"

    @property
    def modality_manifest(self) -> Path:
        return self.modalities / "manifest.json"

    def modality(self, name: str) -> Path:
        return self.modalities / f"{name}.npy"

    def sid_dir(self, version: str) -> Path:
        return self.root / "sids" / version

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def feature_meta(self) -> Path:
        return self.features / FEATURE_META_FILE

    @property
    def latest_sid_file(self) -> Path:
        """``sids/LATEST``: the name of the SID version the tokenizer wrote last."""
        return self.root / "sids" / LATEST

    @property
    def ingest_command(self) -> str:
        """The command that rebuilds the dataset unit, named in errors."""
        return f"python -m ingest SOURCE --out {self.root.parent} (the run that made {self.root.name})"

    def modalities_command(self) -> str:
        return f"python -m tokenizer.modalities --dataset {self.root}"

    def sids_command(self) -> str:
        return f"python -m tokenizer.train --dataset {self.root} (or tokenizer.finetune for an mmq-ft version)"

    def features_command(self) -> str:
        return f"python -m features.build --dataset {self.root} --sid-version V"

    def dataset_digest(self) -> str:
        """The digest of the complete ingest unit, every file checked against its sha256.

        Raises:
            DataError: the unit is incomplete (an interrupted ingest) or was
                changed since; the message names the ingest command.
        """
        return require_complete_unit(self.root, self.ingest_command, files=(DATASET_META_FILE,))["digest"]

    def built_from_dataset(self) -> dict[str, str]:
        """``built_from`` of a unit made from this dataset (modalities, a SID version)."""
        return {BUILT_FROM_DATASET: self.dataset_digest()}

    def modalities_digest(self) -> str:
        """The digest of the complete modalities unit built from the current dataset unit."""
        return require_complete_unit(self.modalities, self.modalities_command(), built_from=self.built_from_dataset())[
            "digest"
        ]

    def sid_digest(self, version: str, built_from_dataset: dict[str, str] | None = None) -> str:
        """The digest of SID ``version``'s complete unit, built from the current dataset unit.

        Args:
            built_from_dataset: :meth:`built_from_dataset` as the caller has
                just computed it, so the dataset unit is not hashed again;
                None computes it here.
        """
        dataset = self.built_from_dataset() if built_from_dataset is None else built_from_dataset
        return require_complete_unit(self.sid_dir(version), self.sids_command(), built_from=dataset)["digest"]

    def built_from_sids(self, version: str, built_from_dataset: dict[str, str] | None = None) -> dict[str, str]:
        """``built_from`` of the feature unit made from SID ``version`` of this dataset (each unit hashed once).

        Args:
            built_from_dataset: as for :meth:`sid_digest`.
        """
        dataset = self.built_from_dataset() if built_from_dataset is None else built_from_dataset
        return {**dataset, BUILT_FROM_SIDS: self.sid_digest(version, dataset)}

    def require_features(self) -> dict:
        """The manifest of the complete feature unit, built from the current dataset and its SID version.

        Every unit involved (features, dataset, SID version) is hashed once per call.
        """
        manifest = require_complete_unit(self.features, self.features_command(), files=(FEATURE_META_FILE,))
        # The SID version is read from the checked unit's own meta (its bytes checked against the manifest),
        # then the manifest's upstream digests are compared without hashing the feature unit again.
        meta = json.loads(read_unit_file(self.features, manifest, FEATURE_META_FILE, self.features_command()))
        require_built_from(self.features, manifest, self.features_command(),
                           self.built_from_sids(str(meta["sid_version"])))
        return manifest

    def resolve_sid_version(self, version: str) -> str:
        """``LATEST`` -> the version named in ``sids/LATEST``; any other name is returned as is."""
        if version != LATEST:
            return version
        made_by = f"python -m tokenizer.train --dataset {self.root}"
        return require_file(self.latest_sid_file, made_by).read_text().strip()

    def mark_latest_sid_version(self, version: str) -> None:
        """Point ``sids/LATEST`` at ``version`` (atomically), once its folder is complete."""
        write_text(version + "\n", self.latest_sid_file)

    def rows_cache(self, version: str, service: str | None = None) -> Path:
        """Where ``ranking.train`` caches the Feast rows of SID ``version`` read through ``service``.

        ``rows/<version name>/<service>.parquet``, the service defaulting to
        :data:`FEATURE_SERVICE`; rows of different versions never share a file.
        """
        return self.root / "rows" / sid_version_name(version) / f"{service or FEATURE_SERVICE}.parquet"


def read_feature_meta(path: str | Path) -> FeatureMeta:
    """Read a ``feature_meta.json`` (``asdict(FeatureMeta)`` plus extra keys, which are ignored)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: feature meta not found; run `python -m features.build` or pass --feature-meta")
    raw = json.loads(path.read_text())
    fields = dataclasses.fields(FeatureMeta)
    optional = {
        f.name for f in fields if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    missing = [f.name for f in fields if f.name not in raw and f.name not in optional]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; regenerate it with `python -m features.build`")
    return FeatureMeta(**{f.name: raw[f.name] for f in fields if f.name in raw})


@dataclass(frozen=True)
class RepoPaths:
    """The generated data of a Feast repository (``<repo>/data``), written by ``features.publish``.

    Feast finds the same files through ``feature_store.yaml`` and the source
    paths in ``definitions.py``, all relative to the repository folder.

    Args:
        repo: the Feast repository folder (``feature_repo``).
    """

    repo: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "repo", Path(self.repo))

    @property
    def data(self) -> Path:
        return self.repo / "data"

    @property
    def sid_registry(self) -> Path:
        """``{"default": V, "versions": {V: entry}}`` of every published SID version."""
        return self.data / SID_VERSIONS_FILE

    @property
    def online_store(self) -> Path:
        return self.data / "online_store.db"

    @property
    def materialized(self) -> Path:
        """``{"start", "end"}``: the widest window ``features.publish`` materialized into the online store."""
        return self.data / MATERIALIZED_FILE

    def table(self, name: str) -> Path:
        """A feature table: a shared one, or one of SID_VERSION_TABLES with the rows of every version."""
        return self.data / f"{name}.parquet"

    @property
    def default_feature_meta_path(self) -> Path:
        """The feature meta of the default SID version."""
        return self.data / FEATURE_META_FILE

    def feature_meta_path(self, version: str) -> Path:
        return self.data / FEATURE_META_DIR / f"{sid_version_name(version)}.json"

    def publish_command(self) -> str:
        return f"python -m features.publish --dataset D --repo {self.repo}"

    def read_sid_registry(self) -> dict:
        """The registry; ``{"default": None, "versions": {}}`` when nothing is published.

        Raises:
            DataError: the data folder is not a complete unit (an interrupted
                publish, or files changed since), naming the publish command.
        """
        if not self.sid_registry.exists():
            return {"default": None, "versions": {}}
        require_complete_unit(self.data, self.publish_command(), files=(SID_VERSIONS_FILE,))
        return json.loads(self.sid_registry.read_text())

    def default_sid_version(self) -> str:
        default = self.read_sid_registry()["default"]
        if default is None:
            raise DataError(
                f"{self.sid_registry}: no SID version is published in {self.repo}; run "
                f"`python -m features.publish --dataset D --repo {self.repo}`"
            )
        return default

    def published_sid_version(self, version: str | None = None) -> str:
        """``version`` (None: the default version), checked to be published here.

        Raises:
            DataError: the version is not published, naming the published ones
                and the commands that publish it.
        """
        if version is None:
            return self.default_sid_version()
        published = sorted(self.read_sid_registry()["versions"])
        if version not in published:
            raise DataError(
                f"{self.sid_registry}: SID version '{version}' is not published in {self.repo} (published: "
                f"{published}); run `python -m features.build --dataset D --sid-version {version}` and "
                f"`python -m features.publish --dataset D --repo {self.repo} --no-set-default`"
            )
        return version

    def feature_meta(self, version: str | None = None) -> FeatureMeta:
        """The feature meta of SID ``version`` (None: the default version).

        Raises:
            DataError: the version is not published here (see
                :meth:`published_sid_version`) or its meta disagrees.
        """
        version = self.published_sid_version(version)
        path = require_file(
            self.feature_meta_path(version), f"python -m features.publish --dataset D --repo {self.repo}"
        )
        meta = read_feature_meta(path)
        if meta.sid_version != version:
            raise DataError(f"{path}: key 'sid_version' is '{meta.sid_version}', expected '{version}'; republish it")
        return meta
